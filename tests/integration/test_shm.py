"""Client-side system shared memory through the ensembles on the real Triton: same answers, clear errors, no leaks."""

from __future__ import annotations

import os
import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from tandem_serve.clients.shm import ShmPool
from tandem_serve.clients.triton import ObjectDetectionClient, TextEmbeddingClient, _text_array
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

MODULES = {"grpc": grpcclient, "http": httpclient}


def _shm_entries() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("tandem")}


def _url(triton, protocol):
    return triton.grpc_url if protocol == "grpc" else triton.http_url


@pytest.fixture
def no_leaks(triton):
    """The test must leave no /dev/shm entry and no region registered with the server."""
    before = _shm_entries()
    yield
    assert _shm_entries() == before
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    registered = [r.name for r in client.get_system_shared_memory_status(headers=triton.keys.shm_headers("grpc")).regions.values()]
    assert not [name for name in registered if name.startswith("tandem")], registered
    assert client.is_server_ready()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["text_embedding", "text_embedding_fused"])
def test_text_through_system_shm_matches_wire(triton, reference, no_leaks, protocol, model):
    texts = EDGE_TEXTS + mixed_texts(40, seed=12)
    with TextEmbeddingClient(_url(triton, protocol), protocol, model, shm="system") as client:
        assert _shm_entries()  # the regions exist while the client is open
        through_shm = client.embed(texts)
    with TextEmbeddingClient(_url(triton, protocol), protocol, model) as client:
        wire = client.embed(texts)
    np.testing.assert_array_equal(through_shm, wire)
    assert_cosines(through_shm, reference(texts))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_detection_through_system_shm_matches_wire(triton, no_leaks, protocol):
    rng = np.random.default_rng(61)
    images = [encode_scene(generate_scene(rng), rng) for _ in range(6)]
    with ObjectDetectionClient(_url(triton, protocol), protocol, shm="system", shm_slots=2) as client:
        through_shm = [client.detect(data) for data in images] + [client.detect(images[0], max_det=1)]
    with ObjectDetectionClient(_url(triton, protocol), protocol) as client:
        wire = [client.detect(data) for data in images] + [client.detect(images[0], max_det=1)]
    assert sum(len(d.boxes) for d in wire) > 0 and len(through_shm[-1].boxes) == 1
    for a, b in zip(through_shm, wire):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.classes, b.classes)


def test_pool_is_released_when_a_request_fails(triton, no_leaks):
    with pytest.raises(InferenceServerException, match="not valid UTF-8"):
        with TextEmbeddingClient(triton.grpc_url, shm="system") as client:
            client.embed([b"caf\xc3"])


def test_input_larger_than_a_slot_uses_a_one_off_region(triton, reference, no_leaks):
    texts = ["y " * 3000, "short"]
    with TextEmbeddingClient(triton.grpc_url, shm="system", shm_bytes=4096) as client:
        assert_cosines(client.embed(texts), reference(texts))
        assert len(_shm_entries()) == 2  # the one-off pair is gone again


def test_write_beyond_a_slot_is_refused(triton, no_leaks):
    with ShmPool(grpcclient.InferenceServerClient(triton.grpc_url), "system", slots=2, input_bytes=128,
                 headers=triton.keys.shm_headers("grpc")) as pool:
        with pytest.raises(ValueError, match="exceed the 128-byte shared-memory slot"):
            pool.write_inputs(1, [np.zeros(100, np.float32)])


@pytest.fixture
def region(triton):
    """A raw 4 KiB system region registered with the server, removed afterwards."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    handle = shm.create_shared_memory_region("tandem-test-raw", "/tandem-test-raw", 4096)
    headers = triton.keys.shm_headers("grpc")
    client.register_system_shared_memory("tandem-test-raw", "/tandem-test-raw", 4096, headers=headers)
    yield client, handle
    try:
        client.unregister_system_shared_memory("tandem-test-raw", headers=headers)
    finally:
        shm.destroy_shared_memory_region(handle)


def _text_tensor(data: np.ndarray) -> grpcclient.InferInput:
    return grpcclient.InferInput("text", list(data.shape), "BYTES")


@pytest.mark.parametrize("case", ["unregistered", "beyond_region", "output_too_small"])
def test_bad_regions_give_clear_errors(triton, no_leaks, region, case):
    client, handle = region
    data = _text_array(["hello"])
    payload = serialize_byte_tensor(data)
    shm.set_shared_memory_region(handle, [payload])
    tensor = _text_tensor(data)
    output = grpcclient.InferRequestedOutput("embedding")
    size = len(payload.item())
    expected = {"unregistered": "Unable to find shared memory region", "beyond_region": "Invalid offset + byte size for shared memory region",
                "output_too_small": "to hold"}[case]
    if case == "unregistered":
        tensor.set_shared_memory("tandem-never-registered", size)
    elif case == "beyond_region":
        tensor.set_shared_memory("tandem-test-raw", size, offset=4090)
    else:
        tensor.set_shared_memory("tandem-test-raw", size)
        output.set_shared_memory("tandem-test-raw", 16, offset=1024)
    with pytest.raises(InferenceServerException) as info:
        client.infer("text_embedding", [tensor], outputs=[output])
    assert expected.lower() in info.value.message().lower(), info.value.message()
    assert client.is_server_ready()
    assert client.infer("text_embedding", [_wire("hello")]).as_numpy("embedding").shape == (1, 384)


def _wire(text: str) -> grpcclient.InferInput:
    data = _text_array([text])
    tensor = _text_tensor(data)
    tensor.set_data_from_numpy(data)
    return tensor


def test_region_unregistered_mid_flight(triton, no_leaks):
    """Requests racing an unregister: it is refused while in use, or the requests fail with a message; the server stays ready."""
    pool = ShmPool(grpcclient.InferenceServerClient(triton.grpc_url), "system", slots=1, headers=triton.keys.shm_headers("grpc"))
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    results: queue.Queue = queue.Queue()
    try:
        placed = pool.write_inputs(0, [_text_array(["racing the unregister"])])[0]
        for _ in range(20):
            tensor = _text_tensor(_text_array(["racing the unregister"]))
            tensor.set_shared_memory(pool.input_name, placed.byte_size, placed.offset)
            client.async_infer("text_embedding", [tensor], callback=lambda result, error: results.put((result, error)))
        try:
            client.unregister_system_shared_memory(pool.input_name, headers=pool.headers)
        except InferenceServerException as exc:  # Triton refuses while requests use it
            assert "currently in use" in exc.message()
        outcomes = [results.get(timeout=120) for _ in range(20)]
    finally:
        pool.close()
    for result, error in outcomes:
        if error is not None:
            assert "shared memory region" in error.message().lower(), error.message()
        else:
            assert result.as_numpy("embedding").shape == (1, 384)
    assert client.is_server_ready()
    assert client.infer("text_embedding", [_wire("after the race")]).as_numpy("embedding").shape == (1, 384)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_torch_tensors_into_a_stage_model_through_system_shm(triton, model_files, no_leaks, protocol):
    """Tensors the caller holds (torch) go to a stage model as they are; the answer equals the wire path's."""
    import torch

    from tandem_serve.clients.triton import TensorClient
    from tandem_serve.text.bert import load_token_embedding

    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0]])
    mask = (ids != 0).to(torch.int64)
    with torch.inference_mode():
        hidden = load_token_embedding(model_files)(ids).to(torch.float16)
    inputs = [("HIDDEN", hidden), ("ATTENTION_MASK", mask)]
    with TensorClient(_url(triton, protocol), protocol, "encoder", 60.0, shm="system") as client:
        through_shm = client.infer_tensors(inputs, ["EMBEDDING"])["EMBEDDING"]
    with TensorClient(_url(triton, protocol), protocol, "encoder", 60.0) as client:
        wire = client.infer_tensors(inputs, ["EMBEDDING"])["EMBEDDING"]
    assert through_shm.shape == (1, 384)
    np.testing.assert_array_equal(through_shm, wire)


def test_registering_without_the_key_says_where_the_key_is(triton, no_leaks):
    with pytest.raises(PermissionError, match=r"needs its key .*keys\.json"):
        ShmPool(grpcclient.InferenceServerClient(triton.grpc_url), "system", slots=1, headers=None)
    with pytest.raises(PermissionError, match="needs its key"):
        TextEmbeddingClient(triton.grpc_url, shm="system", shm_key="not-the-key")
