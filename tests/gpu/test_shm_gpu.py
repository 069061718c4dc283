"""GPU tier for the zero-copy data path: CUDA shared memory through the ensembles, CUDA tensors in, chunked staging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tandem_serve.clients.triton import ObjectDetectionClient, TensorClient, TextEmbeddingClient
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, mixed_texts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _url(triton, protocol):
    return triton.grpc_url if protocol == "grpc" else triton.http_url


@pytest.fixture
def no_cuda_leaks(triton):
    import tritonclient.utils.cuda_shared_memory as cudashm

    before = len(cudashm.allocated_shared_memory_regions())
    yield
    assert len(cudashm.allocated_shared_memory_regions()) == before
    status = grpcclient.InferenceServerClient(triton.grpc_url).get_cuda_shared_memory_status(
        headers=triton.keys.shm_headers("grpc"))
    assert not [r for r in status.regions if r.startswith("tandem")], list(status.regions)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["text_embedding", "text_embedding_fused"])
def test_text_through_cuda_shm_matches_wire(triton, no_cuda_leaks, results, protocol, model):
    texts = EDGE_TEXTS + mixed_texts(30, seed=5)
    with TextEmbeddingClient(_url(triton, protocol), protocol, model, shm="cuda") as client:
        through = client.embed(texts)
    with TextEmbeddingClient(_url(triton, protocol), protocol, model) as client:
        wire = client.embed(texts)
    np.testing.assert_array_equal(through, wire)
    results[f"cuda_shm_{model}_{protocol}_equal_to_wire"] = True


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_detection_through_cuda_shm_matches_wire(triton, no_cuda_leaks, protocol):
    rng = np.random.default_rng(17)
    images = [encode_scene(generate_scene(rng), rng) for _ in range(4)]
    with ObjectDetectionClient(_url(triton, protocol), protocol, shm="cuda") as client:
        through = [client.detect(data) for data in images]
    with ObjectDetectionClient(_url(triton, protocol), protocol) as client:
        wire = [client.detect(data) for data in images]
    assert sum(len(d.boxes) for d in wire) > 0
    for a, b in zip(through, wire):
        np.testing.assert_array_equal(a.boxes, b.boxes)


def test_cuda_tensor_goes_to_the_encoder_device_to_device(triton, model_files, no_cuda_leaks):
    from tandem_serve.text.bert import load_token_embedding

    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0]], device="cuda")
    mask = (ids != 0).to(torch.int64)
    with torch.inference_mode():
        hidden = load_token_embedding(model_files, "cuda")(ids).to(torch.float16)
    assert hidden.is_cuda and mask.is_cuda
    with TensorClient(triton.grpc_url, "grpc", "encoder", 60.0, shm="cuda") as client:
        through = client.infer_tensors([("HIDDEN", hidden), ("ATTENTION_MASK", mask)], ["EMBEDDING"])["EMBEDDING"]
    with TensorClient(triton.grpc_url, "grpc", "encoder", 60.0) as client:
        wire = client.infer_tensors([("HIDDEN", hidden.cpu()), ("ATTENTION_MASK", mask.cpu())], ["EMBEDDING"])["EMBEDDING"]
    np.testing.assert_array_equal(through, wire)
