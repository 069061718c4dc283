"""The package as users install it: a wheel built from this checkout, installed into a fresh venv by
docker/install.sh (the script both images run), started from another directory through the images'
entrypoints (docker/triton/entrypoint.sh, docker/torchserve/entrypoint.sh) on the embedded servers.

The venv imports nothing from the checkout: no PYTHONPATH, a working directory outside it, and install.sh
itself asserts that the model repositories, handlers and weights come from the installed package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tandem_serve.clients.triton import ObjectDetectionClient, TextEmbeddingClient
from tandem_serve.servers.processes import free_ports
from tandem_serve.torchserve.client import TorchServeClient
from tandem_serve.triton.keys import TritonKeys
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.conftest import require_torchserve
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT_S = 900


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def _clean_env(venv: Path) -> dict[str, str]:
    """The environment of a user of that venv: its bin first, nothing pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TANDEM_TRITON_KEYS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel of this checkout with the embedded and torchserve extras."""
    work = tmp_path_factory.mktemp("installed")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(work / "dist"), str(ROOT)],
         timeout=INSTALL_TIMEOUT_S)
    (wheel,) = (work / "dist").glob("tandem_serve-*.whl")
    _run([sys.executable, "-m", "venv", str(work / "venv")])
    env = dict(os.environ, TORCH_VERSION=torch.__version__.split("+")[0])  # the CPU build this machine has
    result = _run(["bash", str(ROOT / "docker" / "install.sh"), str(work / "venv" / "bin" / "python"), str(wheel),
                   "embedded,torchserve"], env=env, timeout=INSTALL_TIMEOUT_S)
    assert "assets in" in result.stdout and str(work / "venv") in result.stdout
    return work


class Entrypoint:
    """An image's entrypoint script run as a process group, stopped with SIGTERM like `docker stop`."""

    def __init__(self, script: str, env: dict[str, str], cwd: Path, log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(["bash", str(ROOT / "docker" / script)], env=env, cwd=cwd, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, health_url: str, timeout_s: float = 420.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the entrypoint exited with {self.process.returncode}:\n{self.tail()}"
            try:
                with urllib.request.urlopen(f"{health_url}/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise AssertionError(f"not ready within {timeout_s} s:\n{self.tail()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def __enter__(self) -> "Entrypoint":
        return self

    def __exit__(self, failure, *_) -> None:
        """Stop it; its log goes to stderr when the test failed, and it must exit 0 (a clean SIGTERM stop)."""
        if failure is not None:
            sys.stderr.write(self.tail())
        code = self.stop()
        if failure is None:
            assert code == 0, f"the entrypoint exited with {code}:\n{self.tail()}"


def test_the_triton_entrypoint_serves_text_and_images_from_the_installed_package(installed, reference):
    venv, elsewhere = installed / "venv", installed / "elsewhere-triton"
    elsewhere.mkdir()
    env = _clean_env(venv)
    keys_file = installed / "secret" / "keys.json"
    keys_file.parent.mkdir()
    _run([str(venv / "bin" / "tandem"), "keys", str(keys_file)], env=env, cwd=elsewhere)  # the installed CLI
    names = ("HTTP", "GRPC", "METRICS", "HEALTH")
    ports = dict(zip(names, free_ports(len(names))))
    env.update({f"TANDEM_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(TANDEM_HOST="127.0.0.1", TANDEM_KEY_FILE=str(keys_file), TANDEM_WORKSPACE=str(installed / "ws-triton"))
    with Entrypoint("triton/entrypoint.sh", env, elsewhere, installed / "triton.log") as server:
        server.wait_ready(f"http://127.0.0.1:{ports['HEALTH']}")
        # the stubs import the venv's package, not the checkout
        package = (installed / "ws-triton" / "backends" / "python" / "tandem_serve").resolve()
        assert package.is_relative_to(venv) and ROOT not in package.parents, package

        texts = EDGE_TEXTS + mixed_texts(24, seed=5)
        with TextEmbeddingClient(f"127.0.0.1:{ports['GRPC']}", "grpc") as client:
            assert_cosines(client.embed(texts), reference(texts))

        rng = np.random.default_rng(2024)
        scenes = [generate_scene(rng) for _ in range(12)]
        counts = MatchCounts()
        with ObjectDetectionClient(f"127.0.0.1:{ports['GRPC']}", "grpc") as client:
            for scene in scenes:
                found = client.detect(encode_scene(scene, rng))
                counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
        assert counts.precision >= 0.9 and counts.recall >= 0.9, counts

        # the restricted APIs take the mounted keys, and only them
        keys = TritonKeys.read(keys_file)
        http = httpclient.InferenceServerClient(f"127.0.0.1:{ports['HTTP']}")
        assert http.get_system_shared_memory_status(headers=keys.shm_headers("http")) == []
        with pytest.raises(InferenceServerException):
            http.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException):
            http.unload_model("detector", headers=keys.shm_headers("http"))  # the shm key is no admin key
        http.close()


def test_the_torchserve_entrypoint_serves_archives_built_by_the_installed_cli(installed, reference):
    require_torchserve()
    venv, elsewhere = installed / "venv", installed / "elsewhere-torchserve"
    elsewhere.mkdir()
    env = _clean_env(venv)
    store = installed / "model-store"
    _run([str(venv / "bin" / "tandem"), "archive", "--store", str(store)], env=env, cwd=elsewhere, timeout=600)
    names = ("INFERENCE", "MANAGEMENT", "METRICS", "GRPC_INFERENCE", "GRPC_MANAGEMENT", "HEALTH")
    ports = dict(zip(names, free_ports(len(names))))
    env.update({f"TANDEM_{name}_PORT": str(port) for name, port in ports.items()})
    workspace = installed / "ws-torchserve"
    env.update(TANDEM_HOST="127.0.0.1", TANDEM_MODEL_STORE=str(store), TANDEM_WORKSPACE=str(workspace))
    with Entrypoint("torchserve/entrypoint.sh", env, elsewhere, installed / "torchserve.log") as server:
        server.wait_ready(f"http://127.0.0.1:{ports['HEALTH']}")
        properties = dict(line.split("=", 1) for line in (workspace / "config.properties").read_text().splitlines())
        assert properties["disable_token_authorization"] == "false" and properties["metrics_mode"] == "prometheus"
        assert properties["management_address"].startswith("http://127.0.0.1:")
        assert properties["enable_model_api"] == "false"
        client = TorchServeClient(f"127.0.0.1:{ports['INFERENCE']}", key_file=workspace / "key_file.json")
        texts = EDGE_TEXTS[:4] + mixed_texts(8, seed=9)
        assert_cosines(client.embed(texts), reference(texts))
        rng = np.random.default_rng(77)
        counts = MatchCounts()
        for scene in [generate_scene(rng) for _ in range(8)]:
            found = client.detect(encode_scene(scene, rng))
            counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
        assert counts.precision >= 0.9 and counts.recall >= 0.9, counts
