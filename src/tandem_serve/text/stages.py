"""The text stages as the serving adapters call them: build once, then call per batch.

Each stage takes a list with one entry per request and returns one result per request, so that
adapters only translate framework tensors. Requests are merged into one padded batch for compute.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from tandem_serve.errors import InvalidInputError
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.runtime.batching import concat_padded, split_rows
from tandem_serve.stage_config import EncoderConfig, TokenEmbeddingConfig, TokenizerConfig, Utf8EncoderConfig
from tandem_serve.text.bert import (
    check_attention_mask,
    check_token_ids,
    load_sentence_encoder,
    load_token_embedding,
    parse_dtype,
)
from tandem_serve.runtime.threads import set_stage_threads
from tandem_serve.runtime.transfer import pad_into_host, to_device
from tandem_serve.text.graphs import GraphedEncoder
from tandem_serve.text.token_budget import length_groups, row_lengths, run_groups
from tandem_serve.text.tokenize import TextTokenizer, TokenizedBatch, check_text_sizes, decode_utf8

logger = logging.getLogger(__name__)


class TokenizeStage:
    """UTF-8 texts -> padded INPUT_IDS / ATTENTION_MASK per request."""

    def __init__(self, config: TokenizerConfig):
        self.config = config
        self.files = SentenceModelFiles.load(config.model_dir or None)
        self.tokenizer = TextTokenizer(
            self.files.tokenizer_json, self.files.max_seq_length, config.pad_multiple, self.files.bert.pad_token_id,
            parallel=config.parallel, prompt=self.files.prompt,
        )
        logger.info("tokenizer: %s, max_seq_length %d%s", self.files.root, self.files.max_seq_length,
                    f", default prompt {self.files.prompt!r}" if self.files.prompt else "")

    def decode(self, raw: np.ndarray | Sequence[bytes | str]) -> list[str]:
        """A request's TEXT tensor (bytes objects) or texts -> strings; invalid UTF-8 or texts over the
        configured byte limits raise InvalidInputError."""
        items = np.asarray(raw, dtype=object).reshape(-1).tolist()
        check_text_sizes(items, self.config.max_text_bytes, self.config.max_request_bytes)
        return decode_utf8(items)

    def prompt(self, raw: np.ndarray | Sequence[bytes | str] | str | None, texts: int) -> str | None:
        """A request's PROMPT_NAME (one name, or one per text, all alike; None: not sent) -> the prompt text to
        prepend, None for the model's default; InvalidInputError for an unknown name or names that differ."""
        if raw is None:
            return None
        names = [raw] if isinstance(raw, str) else np.asarray(raw, dtype=object).reshape(-1).tolist()
        if len(names) not in (1, texts):
            raise InvalidInputError(f"PROMPT_NAME must hold one name or one per text ({texts}), got {len(names)}")
        names = decode_utf8(names, "PROMPT_NAME")
        if len(set(names)) > 1:
            raise InvalidInputError(f"PROMPT_NAME must name one prompt per request, got {sorted(set(names))}")
        return self.files.prompt_named(names[0])

    def __call__(self, requests: Sequence[list[str]], prompts: Sequence[str | None] | None = None) -> list[TokenizedBatch]:
        """Per request its texts (and the prompt to prepend to them, None: the default) -> its padded batch."""
        return self.tokenizer.tokenize_groups(requests, prompts)


class TokenEmbeddingStage:
    """INPUT_IDS -> HIDDEN (word + position + type embeddings and LayerNorm) on the CPU."""

    def __init__(self, config: TokenEmbeddingConfig):
        self.files = SentenceModelFiles.load(config.model_dir or None)
        torch.set_num_threads(config.cpu_threads)
        self.module = load_token_embedding(self.files)
        self.output_dtype = parse_dtype(config.output_dtype)
        logger.info("token_embedding: %s, HIDDEN as %s", self.files.root, config.output_dtype)

    def check(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, None, self.files.bert, self.files.max_seq_length)
        return input_ids

    @torch.inference_mode()
    def __call__(self, requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        merged = concat_padded([ids.cpu() for ids in requests], self.files.bert.pad_token_id)
        hidden = self.module(merged).to(self.output_dtype)
        return [h[:, : ids.shape[1]] for h, ids in zip(split_rows(hidden, [len(r) for r in requests]), requests)]


class EncoderStage:
    """HIDDEN (or INPUT_IDS when fused) + ATTENTION_MASK -> sentence embeddings as the model's head computes them
    (pooling, Dense layers, Normalize where listed), fp32, on the host."""

    def __init__(self, config: EncoderConfig, device: str | torch.device = "cpu"):
        self.files = SentenceModelFiles.load(config.model_dir or None)
        self.device = torch.device(device)
        self.fused = config.fuse_token_embedding
        dtype = parse_dtype(config.precision)
        if self.device.type == "cpu" and dtype != torch.float32:
            logger.warning("encoder: precision %s requested on the CPU; using fp32", config.precision)
            dtype = torch.float32
        set_stage_threads(self.device, config.cpu_threads)
        self.module = load_sentence_encoder(self.files, self.device, dtype, fused=self.fused)
        self.max_batch_tokens = config.max_batch_tokens
        self.graphs: GraphedEncoder | None = None
        if self.device.type == "cuda" and config.cuda_graph_max_batch:
            self.graphs = GraphedEncoder(self.module, self.device, config.cuda_graph_max_batch,
                                         self.files.max_seq_length, self.files.bert.pad_token_id, self.fused)
            self.graphs.capture_all()
        logger.info("encoder: %s on %s, %s, token embedding %s, %s", self.files.root, self.device, dtype,
                    "fused" if self.fused else "separate",
                    f"at most {config.max_batch_tokens} tokens per call" if config.max_batch_tokens else "no token budget")

    @property
    def hidden_size(self) -> int:
        return self.files.bert.hidden_size

    def check(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate one request's inputs; raise InvalidInputError naming the problem."""
        if self.fused:
            check_token_ids(inputs, attention_mask, self.files.bert, self.files.max_seq_length)
        else:
            if inputs.dim() != 3 or inputs.shape[2] != self.hidden_size or inputs.shape[1] == 0:
                raise InvalidInputError(f"HIDDEN must be [batch, length>0, {self.hidden_size}], got {list(inputs.shape)}")
            if inputs.shape[1] > self.files.max_seq_length:
                raise InvalidInputError(f"HIDDEN length {inputs.shape[1]} exceeds max_seq_length {self.files.max_seq_length}")
            check_attention_mask(attention_mask, inputs.shape[:2])
            if not bool(torch.isfinite(inputs).all()):
                raise InvalidInputError("HIDDEN contains NaN or Inf")
        return inputs, attention_mask

    @torch.inference_mode()
    def __call__(self, requests: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        pad = self.files.bert.pad_token_id if self.fused else 0
        lengths = None
        if all(t.device.type == "cpu" for r in requests for t in r):  # from the tokenizer's shared memory
            pin = self.device.type == "cuda"
            host = [pad_into_host([r[0] for r in requests], pad, pin), pad_into_host([r[1] for r in requests], 0, pin)]
            if self.max_batch_tokens:  # read on the host before the copy: no wait on the device for them
                lengths = row_lengths(host[1].numpy())
        else:
            host = [concat_padded([r[0] for r in requests], pad), concat_padded([r[1] for r in requests], 0)]
        inputs, mask = to_device(host, self.device)
        # one copy of the batch to the host: EMBEDDING leaves the server anyway, and each per-request GPU output
        # would cross the Python backend on its own (on the H100 this gained ~4 %, within noise)
        embeddings = self.encode(inputs, mask, lengths).cpu()
        return split_rows(embeddings, [len(r[0]) for r in requests])

    @torch.inference_mode()
    def encode(self, inputs: torch.Tensor, mask: torch.Tensor, lengths: np.ndarray | None = None,
               graphs: bool = True) -> torch.Tensor:
        """Embeddings of a merged batch on the stage's device: one call, or under `max_batch_tokens` one per group of
        similar lengths (`lengths`: the rows' from the mask when not given); CUDA graphs where captured and `graphs`."""
        run = (self.graphs if graphs else None) or self.module
        if not self.max_batch_tokens:
            return run(inputs, mask)
        if lengths is None:
            lengths = row_lengths(mask.cpu().numpy())
        return run_groups(run, inputs, mask, length_groups(lengths, self.max_batch_tokens, mask.shape[1]))


class Utf8EmbeddingStage:
    """UTF-8 bytes, one text per row -> sentence embeddings: tokenized and encoded in one step.

    For a server whose clients send one text per request: each request then crosses one model instead of two (the
    tokenizer's step cost about as much host CPU as all the rest, H200 2026-12-04), and the requests are batched before
    tokenizing. Their text comes as a UINT8 tensor, not BYTES: a malformed BYTES request fails its whole batch in
    Triton's Python backend (model_repository/tokenizer), while a UINT8 tensor has no framing to get wrong; invalid
    UTF-8 is found per request here. The model's default prompt is prepended (named prompts: the BYTES ensembles).
    """

    def __init__(self, config: Utf8EncoderConfig, device: str | torch.device = "cpu"):
        self.tokenize = TokenizeStage(config.tokenizer)
        self.encoder = EncoderStage(config.encoder, device)

    def decode(self, raw: torch.Tensor | np.ndarray) -> list[str]:
        """A request's uint8 [texts, bytes] tensor (rows zero-padded to the longest; trailing zero bytes are not text)
        -> its texts; a wrong shape or type, invalid UTF-8 or texts over the byte limits raise InvalidInputError."""
        array = raw.cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[0] < 1:
            raise InvalidInputError(f"TEXT must be uint8 [texts, UTF-8 bytes], got {array.dtype} {list(array.shape)}")
        return self.tokenize.decode([row.tobytes().rstrip(b"\0") for row in array])

    def __call__(self, requests: Sequence[list[str]]) -> list[torch.Tensor]:
        """Per request its texts -> its embeddings, float32 [texts, embedding size] on the host."""
        batch = self.tokenize.tokenizer([text for texts in requests for text in texts])  # one padded batch, one call
        (embeddings,) = self.encoder([(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))])
        return split_rows(embeddings, [len(texts) for texts in requests])
