"""The text-embedding ensembles served by the real Triton, against sentence-transformers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tandem_serve.client import TextEmbeddingClient
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

ENSEMBLES = ("text_embedding", "text_embedding_fused")
PROTOCOLS = ("grpc", "http")


def _client(triton, protocol, model):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    return TextEmbeddingClient(url, protocol, model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ENSEMBLES)
def test_edge_texts_match_reference(triton, reference, model, protocol):
    with _client(triton, protocol, model) as client:
        served = client.embed(EDGE_TEXTS)
    assert served.shape == (len(EDGE_TEXTS), 384) and served.dtype == np.float32
    assert_cosines(served, reference(EDGE_TEXTS))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ENSEMBLES)
def test_each_text_alone_matches_reference(triton, reference, model, protocol):
    expected = reference(EDGE_TEXTS)
    with _client(triton, protocol, model) as client:
        for text, row in zip(EDGE_TEXTS, expected):
            assert_cosines(client.embed([text]), row[None])


@pytest.mark.parametrize("model", ENSEMBLES)
def test_batch_of_64_mixed_lengths_in_one_request(triton, reference, model):
    texts = mixed_texts(64, seed=1)
    with _client(triton, "grpc", model) as client:
        assert client.max_batch_size == 64
        assert_cosines(client.embed(texts), reference(texts))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_64_concurrent_requests_batch_and_match(triton, reference, protocol):
    """64 single-text requests in flight at once: ragged dynamic batches, right answer for each."""
    texts = mixed_texts(64, seed=2)
    expected = reference(texts)
    local = threading.local()
    clients = []

    def embed_one(index: int) -> np.ndarray:
        if not hasattr(local, "client"):  # tritonclient's HTTP client is not thread-safe
            local.client = _client(triton, protocol, ENSEMBLES[index % 2])
            clients.append(local.client)
        return local.client.embed([texts[index]])

    pool = ThreadPoolExecutor(16)
    try:
        futures = [pool.submit(embed_one, i) for i in range(len(texts))]
        served = np.concatenate([f.result(timeout=120) for f in futures])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for client in clients:
            client.close()
    assert_cosines(served, expected)


def test_ensembles_agree(triton):
    texts = mixed_texts(10, seed=4)
    with _client(triton, "grpc", "text_embedding") as a, _client(triton, "http", "text_embedding_fused") as b:
        assert_cosines(a.embed(texts), b.embed(texts), 0.9999)
