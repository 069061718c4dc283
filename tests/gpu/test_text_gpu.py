"""GPU tier (run on the H100 with tests/gpu/run_h200.sh): the encoder as a KIND_GPU instance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.clients.triton import TextEmbeddingClient
from tandem_serve.stage_config import EncoderConfig, TokenEmbeddingConfig, TokenizerConfig
from tandem_serve.text.stages import EncoderStage, TokenEmbeddingStage, TokenizeStage
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TEXTS = EDGE_TEXTS + mixed_texts(64, seed=5)


def test_encoders_are_gpu_instances(triton):
    log = triton.log_path.read_text()
    for name in ("encoder", "encoder_fused", "encoder_utf8"):
        assert f"TRITONBACKEND_ModelInstanceInitialize: {name}_0_0 (GPU device 0)" in log
        assert f"{name} instance {name}_0_0 ready on cuda:0" in log
    for name in ("tokenizer", "token_embedding"):
        assert f"TRITONBACKEND_ModelInstanceInitialize: {name}_0_0 (CPU device 0)" in log


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["text_embedding", "text_embedding_fused", "text_embedding_utf8"])
def test_served_on_gpu_matches_reference(triton, reference, results, model, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    with TextEmbeddingClient(url, protocol, model) as client:
        served = client.embed(TEXTS)
    results[f"min_cosine_{model}_{protocol}"] = assert_cosines(served, reference(TEXTS))


def test_utf8_requests_batched_on_the_gpu_and_a_bad_one_fails_alone(triton, reference, results):
    """64 one-text UTF-8 requests at once, one of them invalid UTF-8: batched by encoder_utf8's GPU instances (CUDA
    graphs), every good one its reference embedding, the bad one its own INVALID_ARG."""
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    from tandem_serve.clients.triton import utf8_text_array
    from tandem_serve.triton.statistics import read_statistics

    texts = mixed_texts(63, seed=9)
    payloads = [utf8_text_array(t) for t in texts]
    payloads.insert(20, np.array([[0x61, 0xFF]], np.uint8))
    status = grpcclient.InferenceServerClient(triton.grpc_url)
    before = next(s for s in read_statistics(status, "grpc") if s.model == "encoder_utf8")

    def send(payload):
        client = grpcclient.InferenceServerClient(triton.grpc_url)
        tensor = grpcclient.InferInput("text", list(payload.shape), "UINT8")
        tensor.set_data_from_numpy(payload)
        try:
            return client.infer("text_embedding_utf8", [tensor], client_timeout=60).as_numpy("embedding")
        except Exception as exc:  # noqa: BLE001 - compared below
            return str(exc)

    with ThreadPoolExecutor(64) as pool:
        served = list(pool.map(send, payloads))
    bad = served.pop(20)
    assert isinstance(bad, str) and "INVALID_ARGUMENT" in bad and "not valid UTF-8" in bad, bad
    results["min_cosine_utf8_concurrent"] = assert_cosines(np.concatenate(served), reference(texts))
    after = next(s for s in read_statistics(status, "grpc") if s.model == "encoder_utf8")
    assert after.executions - before.executions < after.requests - before.requests == 64


@pytest.mark.parametrize("precision,bound", [("fp32", 0.9999), ("fp16", 0.999), ("bf16", 0.99)])
def test_encoder_precisions_on_gpu(reference, results, precision, bound):
    """Library stages on cuda:0: how far half precision moves the embeddings (recorded)."""
    tokenize = TokenizeStage(TokenizerConfig())
    embed = TokenEmbeddingStage(TokenEmbeddingConfig())
    encoder = EncoderStage(EncoderConfig(precision=precision), "cuda:0")
    batch = tokenize([TEXTS])[0]
    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    served = encoder([(embed([ids])[0], mask)])[0].cpu().numpy()
    results[f"min_cosine_library_{precision}"] = assert_cosines(served, reference(TEXTS), bound)
    assert np.isfinite(served).all()


def _per_text_requests(texts, fused):
    """One request per text, as Triton hands them to the encoder: (INPUT_IDS or HIDDEN, ATTENTION_MASK)."""
    tokenize, embed = TokenizeStage(TokenizerConfig()), TokenEmbeddingStage(TokenEmbeddingConfig())
    requests = []
    for batch in tokenize([[t] for t in texts]):
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        requests.append((ids if fused else embed([ids])[0], mask))
    return requests


@pytest.mark.parametrize("precision,bound,reference_bound", [("fp32", 0.99999, 0.9999), ("fp16", 0.9995, 0.999)])
@pytest.mark.parametrize("fused", [True, False])
def test_cuda_graphs_match_the_eager_encoder(reference, results, precision, bound, reference_bound, fused):
    """Batches of 1-64 requests of mixed lengths replayed through the captured graphs equal the eager encoder."""
    import time

    graphed = EncoderStage(EncoderConfig(precision=precision, fuse_token_embedding=fused), "cuda:0")
    eager = EncoderStage(EncoderConfig(precision=precision, fuse_token_embedding=fused, cuda_graph_max_batch=0), "cuda:0")
    assert eager.graphs is None and graphed.graphs is not None
    assert len(graphed.graphs.buckets) == len(graphed.graphs.batches) * len(graphed.graphs.lengths)
    graphs = graphed.graphs
    assert graphs.floor_s > 0 and not graphs.buckets[(1, graphs.lengths[0])].eager  # one short text: the replay wins
    for slot in graphs.buckets.values():  # each bucket replays faster than the eager floor, or runs eagerly
        assert slot.graph is not None and slot.eager == (slot.replay_s >= graphs.floor_s)
    tag = f"{'fused' if fused else 'split'}_{precision}"
    results[f"graphs_kept_{tag}"] = sum(not slot.eager for slot in graphs.buckets.values())
    results[f"graphs_floor_ms_{tag}"] = graphs.floor_s * 1e3
    for size in (1, 2, 5, 13, 33, 64, 70):  # 70 is beyond the largest bucket: eager in both
        requests = _per_text_requests(TEXTS[:size], fused)
        got = np.concatenate([e.numpy() for e in graphed(requests)])
        expected = np.concatenate([e.numpy() for e in eager(requests)])
        assert np.isfinite(got).all()
        results[f"graphs_vs_eager_min_cosine_{tag}_batch{size}"] = assert_cosines(got, expected, bound)
        assert_cosines(got, reference(TEXTS[:size]), reference_bound)
        timed = {}
        for name, stage in (("graphs", graphed), ("eager", eager)):
            stage(requests)
            began = time.perf_counter()
            for _ in range(10):
                stage(requests)
            timed[name] = (time.perf_counter() - began) / 10
        results[f"graphs_speedup_{tag}_batch{size}"] = timed["eager"] / timed["graphs"]
