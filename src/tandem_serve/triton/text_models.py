"""Triton Python-backend models of the text pipeline; each `model.py` re-exports one of these.

Thin adapters: they parse the config once, build a library stage, and translate tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tandem_serve.stage_config import EncoderConfig, TokenEmbeddingConfig, TokenizerConfig, Utf8EncoderConfig
from tandem_serve.text.stages import EncoderStage, TokenEmbeddingStage, TokenizeStage, Utf8EmbeddingStage
from tandem_serve.text.tokenize import keep_tokenizers_serial
from tandem_serve.triton import backend

logger = logging.getLogger(__name__)


class TokenizerModel:
    """TEXT (bytes) (+ optional PROMPT_NAME) -> INPUT_IDS, ATTENTION_MASK."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, TokenizerConfig)
        backend.check_bytes_tensors_readable()
        if not settings.parallel:  # this stub serves this model only: its batch calls on the instance's thread
            keep_tokenizers_serial()
        self.stage = TokenizeStage(settings)
        self.outputs = backend.Outputs(config, {"INPUT_IDS": torch.int64, "ATTENTION_MASK": torch.int64})

    def _decode(self, request: Any) -> tuple[list[str], str | None]:
        texts = self.stage.decode(backend.input_bytes(request, "TEXT"))
        return texts, self.stage.prompt(backend.optional_input_bytes(request, "PROMPT_NAME"), len(texts))

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=self._decode,
            compute=lambda items: self.stage([texts for texts, _ in items], [prompt for _, prompt in items]),
            encode=lambda b: [self.outputs.tensor("INPUT_IDS", b.input_ids),
                              self.outputs.tensor("ATTENTION_MASK", b.attention_mask)],
            stage="tokenizer",
        )


class TokenEmbeddingModel:
    """INPUT_IDS -> HIDDEN."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, TokenEmbeddingConfig)
        self.stage = TokenEmbeddingStage(settings)
        backend.expect_dims(config, "output", "HIDDEN", [-1, self.stage.files.bert.hidden_size])
        self.outputs = backend.Outputs(config, {"HIDDEN": self.stage.output_dtype})

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=lambda r: self.stage.check(backend.input_tensor(r, "INPUT_IDS")),
            compute=self.stage,
            encode=lambda hidden: [self.outputs.tensor("HIDDEN", hidden)],
            stage="token_embedding",
        )


def _encoder_outputs(config: dict[str, Any], args: dict[str, str], encoder: EncoderStage) -> backend.Outputs:
    """EMBEDDING as declared (float32, or cast to FP16 / FP64); fail initialize where its dims are not the model's
    embedding size; log the instance ready."""
    backend.expect_dims(config, "output", "EMBEDDING", [encoder.files.embedding_size],
                        "set EMBEDDING dims to the model's embedding size here and in the ensembles "
                        "(`tandem repository export --model-dir` writes them)")
    outputs = backend.Outputs(config, {"EMBEDDING": torch.float32})
    logger.info("%s instance %s ready on %s", config["name"], args.get("model_instance_name"), encoder.device)
    return outputs


class EncoderModel:
    """HIDDEN (or INPUT_IDS when fused) + ATTENTION_MASK -> EMBEDDING."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, EncoderConfig)
        self.stage = EncoderStage(settings, backend.instance_device(args))
        self.input_name = "INPUT_IDS" if settings.fuse_token_embedding else "HIDDEN"
        if not settings.fuse_token_embedding:
            backend.expect_dims(config, "input", "HIDDEN", [-1, self.stage.hidden_size])
        self.outputs = _encoder_outputs(config, args, self.stage)

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=lambda r: self.stage.check(backend.input_tensor(r, self.input_name),
                                              backend.input_tensor(r, "ATTENTION_MASK")),
            compute=self.stage,
            encode=lambda embedding: [self.outputs.tensor("EMBEDDING", embedding)],
            stage="encoder",
        )


class Utf8EncoderModel:
    """TEXT (uint8 UTF-8 bytes, one text per row) -> EMBEDDING, tokenized and encoded in one step."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, Utf8EncoderConfig)
        if not settings.tokenizer.parallel:  # as TokenizerModel
            keep_tokenizers_serial()
        self.stage = Utf8EmbeddingStage(settings, backend.instance_device(args))
        self.outputs = _encoder_outputs(config, args, self.stage.encoder)

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=lambda r: self.stage.decode(backend.input_tensor(r, "TEXT")),
            compute=self.stage,
            encode=lambda embedding: [self.outputs.tensor("EMBEDDING", embedding)],
            stage="encoder_utf8",
        )
