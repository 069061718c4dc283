"""encoder_utf8's library stage: UTF-8 rows in, sentence-transformers' embeddings out, bad rows named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.errors import InvalidInputError
from tandem_serve.stage_config import EncoderConfig, TokenizerConfig, Utf8EncoderConfig
from tandem_serve.text.stages import Utf8EmbeddingStage
from tests.helpers import EDGE_TEXTS, assert_cosines


@pytest.fixture(scope="module")
def stage():
    return Utf8EmbeddingStage(Utf8EncoderConfig(TokenizerConfig(max_text_bytes=128, max_request_bytes=192),
                                                EncoderConfig(fuse_token_embedding=True, cpu_threads=1)))


def _rows(*texts: bytes) -> torch.Tensor:
    """Texts as uint8 rows zero-padded to the longest."""
    rows = np.zeros((len(texts), max(len(t) for t in texts)), np.uint8)
    for row, text in zip(rows, texts):
        row[: len(text)] = np.frombuffer(text, np.uint8)
    return torch.from_numpy(rows)


def test_requests_of_one_or_several_texts_match_the_reference(stage, reference, restore_torch_threads):
    texts = [t for t in EDGE_TEXTS if len(t.encode()) <= 128]  # all but the long one, the empty text among them
    requests = [stage.decode(_rows(t.encode())) for t in texts[:3]] + [stage.decode(_rows(*(t.encode() for t in texts[3:])))]
    assert requests[-1] == texts[3:]  # trailing zero bytes of the shorter rows are not text
    served = stage(requests)
    assert [len(r) for r in served] == [1, 1, 1, len(texts) - 3]
    assert_cosines(torch.cat(served).numpy(), reference(texts))


@pytest.mark.parametrize("raw, message", [
    (_rows(b"ok", b"\xff\xfe"), r"TEXT\[1\] is not valid UTF-8"),
    (_rows(b"a" * 129), "TEXT\\[0\\] has 129 bytes; at most 128"),
    (_rows(b"a" * 100, b"b" * 100), "200 bytes; at most 192 per request"),
    (torch.zeros(4, dtype=torch.uint8), r"uint8 \[texts, UTF-8 bytes\], got uint8 \[4\]"),
    (torch.zeros((1, 4), dtype=torch.int32), "got int32"),
    (torch.zeros((0, 4), dtype=torch.uint8), r"got uint8 \[0, 4\]"),
])
def test_bad_rows_are_named(stage, raw, message):
    with pytest.raises(InvalidInputError, match=message):
        stage.decode(raw)
