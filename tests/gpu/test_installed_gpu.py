"""The installed wheel through the Triton image's entrypoint on the GPU: KIND_AUTO puts the encoders and the
detector on the GPU, the stubs (Python 3.12 here, as in the NGC image) import the installed package.

Run by `tests/gpu/run_h200.sh installed`, which builds $TANDEM_INSTALLED_VENV from the carried wheel with
docker/install.sh; skipped elsewhere (the CPU tier runs the same entrypoint in test_installed_package.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from tandem_serve.clients.triton import ObjectDetectionClient, TextEmbeddingClient
from tandem_serve.servers.processes import free_ports
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts
from tests.integration.test_installed_package import Entrypoint, _clean_env

VENV = os.environ.get("TANDEM_INSTALLED_VENV")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or not VENV,
                                                  reason="needs CUDA and $TANDEM_INSTALLED_VENV (run_h200.sh installed)")]


def test_the_entrypoint_serves_the_installed_package_on_the_gpu(tmp_path, reference, results):
    venv = Path(VENV)
    env = _clean_env(venv)
    for kept in ("TANDEM_MODEL_DIR", "TANDEM_STUB_PYTHONPATH", "LD_LIBRARY_PATH"):
        if kept in os.environ:
            env[kept] = os.environ[kept]
    names = ("HTTP", "GRPC", "METRICS", "HEALTH")
    ports = dict(zip(names, free_ports(len(names))))
    env.update({f"TANDEM_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(TANDEM_HOST="127.0.0.1", TANDEM_WORKSPACE=str(tmp_path / "ws"), TANDEM_KEY_FILE=str(tmp_path / "none"))
    (tmp_path / "elsewhere").mkdir()
    with Entrypoint("triton/entrypoint.sh", env, tmp_path / "elsewhere", tmp_path / "triton.log") as server:
        server.wait_ready(f"http://127.0.0.1:{ports['HEALTH']}", timeout_s=540)
        package = (tmp_path / "ws" / "backends" / "python" / "tandem_serve").resolve()
        assert package.is_relative_to(venv), package
        control = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['GRPC']}")
        kinds = {m: [g.kind for g in control.get_model_config(m).config.instance_group]
                 for m in ("encoder", "encoder_fused", "detector")}
        assert all(k and set(k) == {grpcclient.model_config_pb2.ModelInstanceGroup.KIND_GPU} for k in kinds.values()), kinds
        texts = EDGE_TEXTS + mixed_texts(40, seed=12)
        for model in ("text_embedding", "text_embedding_fused"):
            with TextEmbeddingClient(f"127.0.0.1:{ports['GRPC']}", "grpc", model=model) as client:
                results[f"installed_{model}_min_cosine"] = assert_cosines(client.embed(texts), reference(texts), 0.999)
        rng = np.random.default_rng(4242)
        counts = MatchCounts()
        with ObjectDetectionClient(f"127.0.0.1:{ports['GRPC']}", "grpc") as client:
            for scene in [generate_scene(rng) for _ in range(20)]:
                found = client.detect(encode_scene(scene, rng))
                counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
        results["installed_detection"] = {"precision": counts.precision, "recall": counts.recall}
        assert counts.precision >= 0.9 and counts.recall >= 0.9, counts
