"""The text-embedding ensembles served by the real Triton, against sentence-transformers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tandem_serve.clients.triton import TextEmbeddingClient
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

ENSEMBLES = ("text_embedding", "text_embedding_fused")
PROTOCOLS = ("grpc", "http")


def _client(triton, protocol, model):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    return TextEmbeddingClient(url, protocol, model)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", ENSEMBLES + ("text_embedding_utf8",))
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


def _utf8_request(client, payload: np.ndarray, model: str = "text_embedding_utf8", name: str = "text") -> str | np.ndarray:
    """One raw UINT8 request over gRPC: its embedding rows, or the error's status and message."""
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput(name, list(payload.shape), "UINT8")
    tensor.set_data_from_numpy(payload)
    try:
        return client.infer(model, [tensor], client_timeout=60).as_numpy("EMBEDDING" if name == "TEXT" else "embedding")
    except Exception as exc:  # noqa: BLE001 - the error is what is compared
        return f"{getattr(exc, 'status', lambda: '')()}: {getattr(exc, 'message', lambda: str(exc))()}"


def test_utf8_requests_batch_across_clients_and_bad_ones_fail_alone(triton, reference):
    """64 one-text requests at once to text_embedding_utf8, three of them bad (invalid UTF-8, a truncated UTF-8
    sequence, one byte over max_text_bytes): the bad ones get their own INVALID_ARG, every other request its reference
    embedding, and encoder_utf8 ran them in batches of several clients (the BYTES tokenizer cannot batch them)."""
    import tritonclient.grpc as grpcclient

    from tandem_serve.clients.triton import utf8_text_array
    from tandem_serve.triton.statistics import read_statistics

    texts = mixed_texts(61, seed=5)
    payloads = [utf8_text_array(t) for t in texts]
    bad = {7: np.array([[0x61, 0xFF, 0x62]], np.uint8), 30: np.full((1, 65_537), 0x61, np.uint8),
           50: np.array([[0xE2, 0x82]], np.uint8)}  # a truncated 3-byte sequence
    for index in sorted(bad):
        payloads.insert(index, bad[index])
    status = grpcclient.InferenceServerClient(triton.grpc_url)
    before = {s.model: s for s in read_statistics(status, "grpc")}
    local = threading.local()

    def send(payload: np.ndarray):
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(triton.grpc_url)
        return _utf8_request(local.client, payload)

    for _ in range(2):
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(send, payloads))
        for index in sorted(bad):
            assert isinstance(results[index], str) and results[index].startswith("StatusCode.INVALID_ARGUMENT"), results[index]
        assert "not valid UTF-8" in results[7] and "not valid UTF-8" in results[50] and "65537 bytes" in results[30]
        good = [r for i, r in enumerate(results) if i not in bad]
        assert all(isinstance(r, np.ndarray) for r in good), [r for r in good if isinstance(r, str)][:3]
        assert_cosines(np.concatenate(good), reference(texts))
    after = {s.model: s for s in read_statistics(status, "grpc")}
    requests = after["encoder_utf8"].requests - before["encoder_utf8"].requests
    executions = after["encoder_utf8"].executions - before["encoder_utf8"].executions
    assert requests == 2 * len(payloads) and executions < requests, (requests, executions)


def test_utf8_ensemble_takes_one_text_per_request_and_the_model_zero_padded_rows(triton, reference):
    """The ensemble refuses a batch of two (one text per request: no declared shape can overflow the byte count);
    encoder_utf8 itself takes rows zero-padded to the longest, trailing zeros not being text."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    refused = _utf8_request(client, np.zeros((2, 4), np.uint8))
    assert refused.startswith("StatusCode.INVALID_ARGUMENT") and "batch-size must be <= 1" in refused, refused
    rows = np.zeros((2, 12), np.uint8)
    for row, text in zip(rows, (b"hi there", b"good morning")):
        row[: len(text)] = np.frombuffer(text, np.uint8)
    served = _utf8_request(client, rows, model="encoder_utf8", name="TEXT")
    assert_cosines(served, reference(["hi there", "good morning"]))
