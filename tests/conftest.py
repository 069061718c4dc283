"""Shared fixtures: the model files and the sentence-transformers reference."""

from __future__ import annotations

import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.triton.keys import KEYS_ENV
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions


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


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # stages and CPU lanes set the process's torch threads


@pytest.fixture(scope="session")
def triton(request, tmp_path_factory):
    """One real embedded Triton for the session; its log tail is printed when a test failed.

    Its keys file is where clients look by default ($TANDEM_TRITON_KEYS), as for `tandem serve triton`."""
    server = EmbeddedTriton(TritonOptions(workspace=tmp_path_factory.mktemp("triton"), startup_timeout_s=300))
    os.environ[KEYS_ENV] = str(server.keys_file)
    yield from _serve(request, server)


def _serve(request, server):
    """Start `server` for the session; print its log tail at the end if a test failed meanwhile."""
    server.start()
    failed_before = request.session.testsfailed
    yield server
    if request.session.testsfailed > failed_before:
        sys.stderr.write("\n" + server.log_tail(200) + "\n")
    server.stop()


def require_torchserve() -> None:
    """Skip only where TorchServe cannot run at all (the GPU machine has no Java); CI has both."""
    import shutil

    if shutil.which("java") is None or importlib.util.find_spec("ts") is None:
        pytest.skip("TorchServe needs Java and the torchserve package (present in CI; the GPU machine has neither)")


# Small batch window for the tests: concurrent requests land in one handler batch.
TORCHSERVE_TEST_CONFIG = {"batchSize": 8, "maxBatchDelay": 300, "handler": {"pipeline": {"micro_batch_size": 3}}}


@pytest.fixture(scope="session")
def torchserve(request, tmp_path_factory):
    """One real TorchServe (Java frontend + Python workers) on freshly built archives, for the session."""
    from tandem_serve.torchserve.archive import ARCHIVES, build_archive
    from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions

    require_torchserve()

    store = tmp_path_factory.mktemp("model_store")
    for name in ARCHIVES:
        build_archive(name, store, overrides=TORCHSERVE_TEST_CONFIG)
    yield from _serve(request, EmbeddedTorchServe(TorchServeOptions(model_store=store,
                                                                     workspace=tmp_path_factory.mktemp("torchserve"))))
