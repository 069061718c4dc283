"""Tokenization stage: UTF-8 texts to padded INPUT_IDS / ATTENTION_MASK (HuggingFace `tokenizers`).

Padding policy: each request is padded to its own longest text, rounded up to a multiple of
`pad_multiple` (8 by default, capped at `max_seq_length`). Short requests stay short instead of
being padded to 256; rounding keeps the number of distinct shapes small and tensor-core friendly
and wastes fewer than `pad_multiple` tokens per row. Downstream stages declare
`allow_ragged_batch`, so requests of different padded lengths still share a dynamic batch; the
stage that merges them pads to the batch's longest request (see `tandem_serve.runtime.batching`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from tandem_serve.errors import InvalidInputError


@dataclass(frozen=True)
class TokenizedBatch:
    """Padded token ids and attention mask, both int64 [batch, length]."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def decode_utf8(items: Sequence[bytes | str], name: str = "TEXT") -> list[str]:
    """Decode raw request bytes strictly; name the first invalid item (of input `name`)."""
    texts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{name}[{index}] is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    return texts


def check_text_sizes(items: Sequence[bytes | str], max_text_bytes: int, max_request_bytes: int) -> None:
    """Raise InvalidInputError when a text, or a request's texts together, exceed their UTF-8 byte limits."""
    total = 0
    for index, item in enumerate(items):
        size = len(item.encode("utf-8")) if isinstance(item, str) else len(item)
        if size > max_text_bytes:
            raise InvalidInputError(f"TEXT[{index}] has {size} bytes; at most {max_text_bytes} per text "
                                    "(tokenizer parameter max_text_bytes)")
        total += size
    if total > max_request_bytes:
        raise InvalidInputError(f"the request's texts have {total} bytes; at most {max_request_bytes} per request "
                                "(tokenizer parameter max_request_bytes)")


def padded_length(longest: int, pad_multiple: int, max_length: int) -> int:
    """Round `longest` up to a multiple of `pad_multiple`, never beyond `max_length`."""
    rounded = -(-longest // pad_multiple) * pad_multiple
    return max(1, min(rounded, max_length))


# What the tokenizers library reads as "off" in TOKENIZERS_PARALLELISM (an unset variable means on).
PARALLELISM_OFF = ("", "off", "false", "f", "no", "n", "0")


def tokenizers_serial() -> bool:
    """Whether the tokenizers library runs batch calls on the calling thread (TOKENIZERS_PARALLELISM off)."""
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    return value is not None and value.strip().lower() in PARALLELISM_OFF


def keep_tokenizers_serial() -> None:
    """Make this process's batch calls run on the calling thread, before any tokenizing: for a process that serves one
    model whose instances are sized a core each (a Triton stub, `parallel: false`). The library reads the variable
    at every call; set here once, before other threads of the process could read it."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class TextTokenizer:
    """Tokenizes with truncation at the model's max_seq_length and the padding policy above."""

    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_multiple: int = 8, pad_id: int = 0,
                 parallel: bool = True, prompt: str = ""):
        if pad_multiple < 1:
            raise ValueError("pad_multiple must be >= 1")
        self.max_length = max_length
        self.pad_multiple = pad_multiple
        self.pad_id = pad_id
        self.parallel = parallel  # False: on the calling thread (one core per instance)
        self.prompt = prompt  # prepended to every text (the model's default prompt)
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # tokenizer.json files often carry their own fixed padding/truncation: replace both.
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_length)

    def __call__(self, texts: Sequence[str]) -> TokenizedBatch:
        """Tokenize `texts` (already decoded) into one padded batch."""
        return self.tokenize_groups([texts])[0]

    def tokenize_groups(self, groups: Sequence[Sequence[str]],
                        prompts: Sequence[str | None] | None = None) -> list[TokenizedBatch]:
        """Tokenize several requests in one parallel call, padding each request on its own. `prompts`: per request
        the text prepended to each of its texts (None: the default prompt)."""
        chosen = [self.prompt if p is None else p for p in prompts] if prompts is not None else [self.prompt] * len(groups)
        flat = [prompt + text for group, prompt in zip(groups, chosen) for text in group]  # "" + text is text itself
        # One batch call: spread over all cores, or on this thread where the library runs serially
        # (TOKENIZERS_PARALLELISM off, `keep_tokenizers_serial`); _fast: no character offsets, which nothing here
        # reads, 0.8x the CPU per text of `encode` (bench/tokenizer_calls.py). Else `encode`, one text at a time:
        # a batch call would start the library's thread pool beside an instance sized one core.
        if self.parallel or tokenizers_serial():
            encodings = self._tokenizer.encode_batch_fast(flat, add_special_tokens=True)
        else:
            encodings = [self._tokenizer.encode(text, add_special_tokens=True) for text in flat]
        batches, start = [], 0
        for group in groups:
            batches.append(self._pad([e.ids for e in encodings[start : start + len(group)]]))
            start += len(group)
        return batches

    def _pad(self, rows: list[list[int]]) -> TokenizedBatch:
        length = padded_length(max((len(r) for r in rows), default=1), self.pad_multiple, self.max_length)
        ids = np.full((len(rows), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = row
            mask[index, : len(row)] = 1
        return TokenizedBatch(ids, mask)
