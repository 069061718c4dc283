"""Test data and assertions shared by the test tiers."""

from __future__ import annotations

import numpy as np

# English, accented Latin, CJK, emoji, empty, whitespace only, far beyond 256 tokens.
EDGE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ça a été une journée très réussie, naïve café crème brûlée à Zürich.",
    "我爱自然语言处理。東京は日本の首都です。한국어 문장입니다.",
    "Launch day 🚀🔥 feeling 😀👍🏽 family 👨‍👩‍👧‍👦",
    "",
    "   \t\n  ",
    " ".join(f"word{i} and more text" for i in range(400)),
]


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts of very different lengths (1 to ~300 tokens), deterministic."""
    rng = np.random.default_rng(seed)
    vocabulary = "serving tensor latency throughput batch queue GPU CPU token embedding pipeline stage model".split()
    texts = []
    for _ in range(count):
        length = int(rng.choice([1, 3, 8, 20, 60, 150, 300]))
        texts.append(" ".join(rng.choice(vocabulary, size=length)))
    return texts


def cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays."""
    return np.sum(actual * expected, axis=1) / np.linalg.norm(actual, axis=1) / np.linalg.norm(expected, axis=1)


def assert_cosines(actual: np.ndarray, expected: np.ndarray, bound: float = 0.9999) -> float:
    """Row-wise cosine between unit vectors >= bound; returns the minimum."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-4)
    cosine = cosines(actual, expected)
    assert cosine.min() >= bound, f"min cosine {cosine.min():.7f} at row {int(cosine.argmin())}"
    return float(cosine.min())


def centred_cosines(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Row-wise cosines after taking the reference's mean embedding off both: what tells the texts apart. Random
    encoders (CLS pooling especially) give nearly one vector for every text, where a plain cosine of 0.999 says little."""
    centre = expected.mean(axis=0)
    return cosines(actual - centre, expected - centre)
