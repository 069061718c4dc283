"""Shared fixtures: the model files and the sentence-transformers reference."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from tandem_serve.model_files import SentenceModelFiles


@pytest.fixture(scope="session")
def model_files() -> SentenceModelFiles:
    return SentenceModelFiles.load()


@pytest.fixture(scope="session")
def reference(model_files):
    """Embed texts with sentence-transformers itself (the independent reference)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_files.root), device="cpu")
    assert model.max_seq_length == 256

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True)

    return embed
