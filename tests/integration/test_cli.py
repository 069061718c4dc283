"""The `tandem` command line as a user runs it: serve, infer, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import assert_cosines

TANDEM = [sys.executable, "-m", "tandem_serve.cli"]


def _wait_for_line(process: subprocess.Popen, pattern: str, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(seen)}")


def _kill_the_server_and_expect_exit_1(process: subprocess.Popen, child: str, ready_s: float, says: str,
                                       exit_s: float) -> None:
    """Once `tandem serve ...` (`process`) is ready and its health endpoint says so, SIGKILL its child process named
    `child`: the launcher prints `says`, exits 1 within `exit_s`, and its health endpoint is gone with it."""
    import urllib.request

    import psutil

    health = _wait_for_line(process, r"health (http://\S+)/ready", ready_s).group(1)
    _wait_for_line(process, r"Press Ctrl-C", 10)
    with urllib.request.urlopen(f"{health}/ready", timeout=10) as answer:
        assert answer.status == 200
    (server,) = [p for p in psutil.Process(process.pid).children() if p.name() == child]
    server.kill()
    _wait_for_line(process, says, 30)
    assert process.wait(timeout=exit_s) == 1
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{health}/live", timeout=5)


@pytest.mark.parametrize("shm", ["none", "system"])
def test_infer_text_json_matches_reference(triton, reference, shm):
    texts = ["Command lines are user interfaces too.", "日本語のテキスト"]
    result = subprocess.run([*TANDEM, "infer", "text", *texts, "--url", triton.grpc_url, "--json", "--shm", shm],
                            capture_output=True, text=True, timeout=120, check=True)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert_cosines(np.array([r["embedding"] for r in rows], np.float32), reference(texts))


def test_infer_against_nothing_fails_with_one_line(tmp_path):
    result = subprocess.run([*TANDEM, "infer", "text", "x", "--url", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "ERROR" in result.stderr


def test_serve_stops_cleanly_on_ctrl_c(tmp_path):
    regions_before = set(os.listdir("/dev/shm"))
    process = subprocess.Popen(
        [*TANDEM, "serve", "triton", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
         "--workspace", str(tmp_path / "ws")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        match = _wait_for_line(process, r"Triton ready: HTTP (\S+)\s+gRPC (\S+)", 300)
        _wait_for_line(process, r"Press Ctrl-C", 10)
        assert match.group(1).startswith("127.0.0.1:")
        served = subprocess.run([*TANDEM, "infer", "text", "hello", "--url", match.group(2)],
                                capture_output=True, text=True, timeout=120)
        assert served.returncode == 0 and "dim 384" in served.stdout
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = (tmp_path / "ws" / "server.log").read_text()
    assert "Signal (2) received" in log
    leftover = {n for n in set(os.listdir("/dev/shm")) - regions_before if n.startswith("triton_python_backend")}
    assert leftover == set()
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "ws")], capture_output=True).stdout


def test_serve_exits_1_naming_it_when_tritonserver_dies(tmp_path):
    """SIGKILL tritonserver under `tandem serve triton`: the launcher says so with the log's tail and exits 1 (a
    container restarts), its health endpoint is gone with it, and no stub or stub region is left behind."""
    import shutil

    from tandem_serve.paths import default_repositories

    repo = tmp_path / "repo"
    shutil.copytree(default_repositories()[0] / "tokenizer", repo / "tokenizer")
    regions_before = set(os.listdir("/dev/shm"))
    process = subprocess.Popen(
        [*TANDEM, "serve", "triton", "--model-repository", str(repo), "--http-port", "0", "--grpc-port", "0",
         "--metrics-port", "0", "--health-port", "0", "--workspace", str(tmp_path / "ws")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _kill_the_server_and_expect_exit_1(process, "tritonserver", 300, r"tritonserver exited unexpectedly", 60)
    finally:
        if process.poll() is None:
            process.kill()
    leftover = {n for n in set(os.listdir("/dev/shm")) - regions_before if n.startswith("triton_python_backend")}
    assert leftover == set()
    assert not subprocess.run(["pgrep", "-f", str(tmp_path / "ws")], capture_output=True).stdout


def test_serve_torchserve_and_infer(tmp_path):
    """`tandem serve torchserve` builds the missing archives, serves them; `tandem infer --server torchserve` answers."""
    from tandem_serve.vision.shapes import encode_scene, generate_scene
    from tests.conftest import require_torchserve

    require_torchserve()
    rng = np.random.default_rng(3)
    image = tmp_path / "scene.jpg"
    image.write_bytes(encode_scene(generate_scene(rng), rng))
    workspace = tmp_path / "ws"
    process = subprocess.Popen(
        [*TANDEM, "serve", "torchserve", "--store", str(tmp_path / "store"), "--workspace", str(workspace),
         *[arg for name in ("inference", "management", "metrics", "grpc-inference", "grpc-management")
           for arg in (f"--{name}-port", "0")]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        match = _wait_for_line(process, r"TorchServe ready: inference (http://[0-9.:]+)\s", 400)
        _wait_for_line(process, r"Press Ctrl-C", 10)
        assert match.group(1).startswith("http://127.0.0.1:")
        client = ["--server", "torchserve", "--url", match.group(1), "--key-file", str(workspace / "key_file.json")]
        text = subprocess.run([*TANDEM, "infer", "text", "hello", *client], capture_output=True, text=True, timeout=120)
        assert text.returncode == 0 and "dim 384, norm 1.0000" in text.stdout, text.stderr
        found = subprocess.run([*TANDEM, "infer", "image", str(image), *client, "--out", str(tmp_path / "boxes.png")],
                               capture_output=True, text=True, timeout=120)
        assert found.returncode == 0 and re.search(r"[1-9]\d* detection\(s\)", found.stdout), found.stdout + found.stderr
        assert (tmp_path / "boxes.png").stat().st_size > 0
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["object_detection.mar", "text_embedding.mar"]
    assert not subprocess.run(["pgrep", "-f", str(workspace)], capture_output=True).stdout


def test_serve_torchserve_exits_1_naming_it_when_java_dies(tmp_path):
    """SIGKILL TorchServe's Java frontend under `tandem serve torchserve`: the launcher says so and exits 1, its health
    endpoint goes with it, and no worker is left behind."""
    from tests.conftest import require_torchserve

    require_torchserve()
    workspace = tmp_path / "ws"
    process = subprocess.Popen(
        [*TANDEM, "serve", "torchserve", "--store", str(tmp_path / "store"), "--workspace", str(workspace),
         "--health-port", "0", *[arg for name in ("inference", "management", "metrics", "grpc-inference",
                                                  "grpc-management") for arg in (f"--{name}-port", "0")]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _kill_the_server_and_expect_exit_1(process, "java", 400, r"exited unexpectedly", 90)
    finally:
        if process.poll() is None:
            process.kill()
    assert not subprocess.run(["pgrep", "-f", str(workspace)], capture_output=True).stdout
