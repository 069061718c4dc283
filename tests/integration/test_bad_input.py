"""Bad requests get their own INVALID_ARG / HTTP 400; batch-mates succeed; the server stays ready."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tandem_serve.clients.triton import TextEmbeddingClient, text_input
from tandem_serve.triton.statistics import read_statistics

INVALID = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


def _raw_client(triton, protocol):
    if protocol == "grpc":
        return grpcclient.InferenceServerClient(triton.grpc_url)
    return httpclient.InferenceServerClient(triton.http_url)


def _infer_error(client, model, inputs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs)
    return info.value


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("model", ["text_embedding", "text_embedding_fused"])
def test_invalid_utf8_is_invalid_arg(triton, protocol, model):
    client = _raw_client(triton, protocol)
    error = _infer_error(client, model, [text_input([b"caf\xc3", b"fine"], protocol)])
    assert error.status() == INVALID[protocol]
    assert "not valid UTF-8" in error.message() and "TEXT[0]" in error.message()
    assert "Traceback" not in error.message()
    assert client.is_server_ready()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_non_string_input_is_rejected(triton, protocol):
    client = _raw_client(triton, protocol)
    module = grpcclient if protocol == "grpc" else httpclient
    numbers = module.InferInput("text", [1, 1], "INT32")
    numbers.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    error = _infer_error(client, "text_embedding", [numbers])
    assert error.status() == INVALID[protocol]
    assert "data-type" in error.message() or "datatype" in error.message().lower()
    assert client.is_server_ready()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wrong_shape_is_rejected(triton, protocol):
    client = _raw_client(triton, protocol)
    module = grpcclient if protocol == "grpc" else httpclient
    wrong = module.InferInput("text", [1, 2], "BYTES")
    wrong.set_data_from_numpy(np.array([[b"a", b"b"]], dtype=object))
    error = _infer_error(client, "text_embedding", [wrong])
    assert error.status() == INVALID[protocol]
    assert "shape" in error.message()
    too_big = text_input(["x"] * 65, protocol)
    assert _infer_error(client, "text_embedding", [too_big]).status() == INVALID[protocol]
    assert client.is_server_ready()


def test_bad_request_in_a_dynamic_batch_fails_alone(triton, reference):
    """32 requests in flight, every 4th with invalid UTF-8: only those fail; the rest share later batches."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    stats_client = httpclient.InferenceServerClient(triton.http_url)
    before = {s.model: s for s in read_statistics(stats_client, "http")}
    texts = [f"request number {i} about dynamic batching" for i in range(32)]
    results: queue.Queue = queue.Queue()
    for i, text in enumerate(texts):
        payload = b"\xff\xfe broken" if i % 4 == 0 else text.encode()
        client.async_infer("text_embedding", [text_input([payload], "grpc")],
                           callback=lambda result, error, i=i: results.put((i, result, error)))
    outcomes = dict((i, (r, e)) for i, r, e in (results.get(timeout=120) for _ in texts))
    expected = reference(texts)
    for i in range(32):
        result, error = outcomes[i]
        if i % 4 == 0:
            assert error is not None and error.status() == INVALID["grpc"], i
        else:
            assert error is None, (i, error)
            assert float(result.as_numpy("embedding")[0] @ expected[i]) >= 0.9999
    after = {s.model: s for s in read_statistics(stats_client, "http")}
    executions = {m: after[m].executions - before[m].executions for m in ("tokenizer", "encoder")}
    assert executions["tokenizer"] == 32  # one request per execution: it reads the clients' bytes
    assert executions["encoder"] < 24, "the good requests should share the encoder's dynamic batches"
    assert client.is_server_ready()


def test_stage_level_bad_tensors_fail_per_request(triton):
    """Direct calls to the stages: out-of-vocabulary ids, NaN hidden states, empty masks."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)

    def ids_input(values):
        tensor = grpcclient.InferInput("INPUT_IDS", list(values.shape), "INT64")
        tensor.set_data_from_numpy(values)
        return tensor

    error = _infer_error(client, "token_embedding", [ids_input(np.array([[101, 99999, 102]], np.int64))])
    assert error.status() == INVALID["grpc"] and "INPUT_IDS values must lie in [0, 30522)" in error.message()

    hidden = grpcclient.InferInput("HIDDEN", [1, 3, 384], "FP16")
    hidden.set_data_from_numpy(np.full((1, 3, 384), np.nan, np.float16))
    mask = grpcclient.InferInput("ATTENTION_MASK", [1, 3], "INT64")
    mask.set_data_from_numpy(np.ones((1, 3), np.int64))
    error = _infer_error(client, "encoder", [hidden, mask])
    assert error.status() == INVALID["grpc"] and "NaN" in error.message()

    empty_mask = grpcclient.InferInput("ATTENTION_MASK", [1, 3], "INT64")
    empty_mask.set_data_from_numpy(np.zeros((1, 3), np.int64))
    error = _infer_error(client, "encoder_fused", [ids_input(np.array([[101, 7592, 102]], np.int64)), empty_mask])
    assert error.status() == INVALID["grpc"] and "no token to attend" in error.message()

    with TextEmbeddingClient(triton.grpc_url) as good:
        assert good.embed(["still serving"]).shape == (1, 384)


def test_control_apis_need_the_admin_key(triton):
    """Model control is explicit (the supervisor reloads failed models) but closed without the admin key."""
    client = httpclient.InferenceServerClient(triton.http_url)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()
    assert "restricted" in info.value.message().lower() or "403" in str(info.value.status())
    headers = triton.keys.admin_headers("http")
    index = client.get_model_repository_index(headers=headers)
    assert {m["name"] for m in index} >= {"tokenizer", "encoder", "text_embedding"}
    for call in (lambda: client.load_model("nms"), lambda: client.unload_model("nms"),
                 lambda: client.update_log_settings({"log_verbose_level": 1}),
                 lambda: client.load_model("nms", headers=triton.keys.shm_headers("http"))):  # the shm key is not it
        with pytest.raises(InferenceServerException, match="(?i)restricted"):
            call()
    assert client.is_model_ready("nms") and client.is_server_ready()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_texts_over_the_byte_limits_are_invalid_arg(triton, protocol):
    client = _raw_client(triton, protocol)
    error = _infer_error(client, "text_embedding_fused", [text_input(["fine", "x" * 65_537], protocol)])
    assert error.status() == INVALID[protocol]
    assert "TEXT[1] has 65537 bytes; at most 65536 per text" in error.message()
    error = _infer_error(client, "text_embedding", [text_input(["y" * 60_000] * 9, protocol)])
    assert error.status() == INVALID[protocol] and "at most 524288 per request" in error.message()
    assert client.is_server_ready()
