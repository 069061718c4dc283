"""A model's declared output type is what clients get, on the real Triton: EMBEDDING declared TYPE_FP16 is served as
float16 (the model's embeddings, half the bytes); a type the model cannot produce keeps the model from loading, named."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tandem_serve.paths import default_repositories
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions, TritonStartError
from tandem_serve.triton.model_config import read_config, write_config
from tests.helpers import assert_cosines


def _repository(tmp_path, data_type: int):
    """encoder_utf8 alone (one instance) with EMBEDDING declared as `data_type`."""
    repo = tmp_path / "repo"
    shutil.copytree(default_repositories()[0] / "encoder_utf8", repo / "encoder_utf8")
    config = read_config(repo / "encoder_utf8" / "config.pbtxt")
    config.output[0].data_type = data_type
    config.instance_group[0].count = 1
    write_config(config, repo / "encoder_utf8" / "config.pbtxt")
    return repo


def test_embedding_declared_fp16_is_served_as_float16(tmp_path, reference):
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import model_config_pb2 as mc

    texts = ["half precision on the wire", "a second, somewhat longer text about declared output types"]
    rows = np.zeros((2, max(len(t.encode()) for t in texts)), np.uint8)
    for row, text in zip(rows, texts):
        row[: len(text.encode())] = np.frombuffer(text.encode(), np.uint8)
    with EmbeddedTriton(TritonOptions(model_repositories=[_repository(tmp_path, mc.TYPE_FP16)],
                                      workspace=tmp_path / "ws")) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        tensor = grpcclient.InferInput("TEXT", list(rows.shape), "UINT8")
        tensor.set_data_from_numpy(rows)
        served = client.infer("encoder_utf8", [tensor]).as_numpy("EMBEDDING")
    assert served.dtype == np.float16 and served.shape == (2, 384)
    assert_cosines(served.astype(np.float32), reference(texts))


def test_an_output_type_the_model_cannot_produce_refuses_the_model_naming_it(tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc

    with pytest.raises(TritonStartError, match="output EMBEDDING is declared TYPE_INT8; the model produces TYPE_FP32"):
        with EmbeddedTriton(TritonOptions(model_repositories=[_repository(tmp_path, mc.TYPE_INT8)],
                                          workspace=tmp_path / "ws")):
            pass
