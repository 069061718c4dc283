"""The text-embedding pipeline for one worker: tokenize (+ token embedding) on the CPU, encoder on the device."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from tandem_serve.runtime.batching import concat_padded, split_rows
from tandem_serve.stage_config import EncoderConfig, TokenEmbeddingConfig, TokenizerConfig
from tandem_serve.text.stages import EncoderStage, TokenEmbeddingStage, TokenizeStage
from tandem_serve.text.tokenize import TokenizedBatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextStageConfigs:
    """The stage settings a text pipeline is built from (the same schemas as the Triton models)."""

    tokenizer: TokenizerConfig
    encoder: EncoderConfig
    token_embedding: TokenEmbeddingConfig


@dataclass(frozen=True)
class TextRequest:
    """One request's texts and the prompt prepended to each (None: the model's default prompt)."""

    texts: list[str]
    prompt: str | None = None


class TextEmbeddingStages:
    """PipelineStages for TextRequests (`request(texts, prompt_name)`) -> float32 [n, embedding size] per request.

    With `encoder.fuse_token_embedding` (the default, and always on a CPU device) the device
    stage takes token ids; otherwise the token embedding runs on the CPU in `collate` and the
    device stage receives fp16 hidden states.
    """

    def __init__(self, configs: TextStageConfigs, device: torch.device):
        fused = configs.encoder.fuse_token_embedding or device.type != "cuda"
        encoder_config = dataclasses.replace(configs.encoder, fuse_token_embedding=fused)
        self.tokenize = TokenizeStage(configs.tokenizer)
        self.encoder = EncoderStage(encoder_config, device)
        self.token_embedding = None if fused else TokenEmbeddingStage(configs.token_embedding)
        self.pad_id = self.encoder.files.bert.pad_token_id

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    def request(self, texts: Sequence[str], prompt_name: str | None = None) -> TextRequest:
        """A request of `texts` with the model's prompt `prompt_name` (None: its default); an unknown name raises
        InvalidInputError."""
        return TextRequest(list(texts), self.tokenize.prompt(prompt_name, len(texts)))

    @staticmethod
    def rows(item: TextRequest) -> int:
        return len(item.texts)

    def prepare(self, item: TextRequest) -> TokenizedBatch:
        return self.tokenize([item.texts], [item.prompt])[0]

    def collate(self, prepared: list[TokenizedBatch]) -> list[torch.Tensor]:
        ids = concat_padded([torch.from_numpy(p.input_ids) for p in prepared], self.pad_id)
        mask = concat_padded([torch.from_numpy(p.attention_mask) for p in prepared], 0)
        if self.token_embedding is not None:
            return [self.token_embedding([ids])[0], mask]
        return [ids, mask]

    def infer(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.encoder.encode(inputs[0], inputs[1], graphs=False)]

    @staticmethod
    def finish(outputs: list[torch.Tensor], prepared: list[TokenizedBatch]) -> list[np.ndarray]:
        return [part.numpy() for part in split_rows(outputs[0], [len(p.input_ids) for p in prepared])]
