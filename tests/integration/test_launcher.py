"""The embedded launcher: safe command line, start-up failures reported with the log."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from tandem_serve.paths import default_repositories
from tandem_serve.triton.launcher import (
    EmbeddedTriton,
    TritonDistribution,
    TritonOptions,
    TritonStartError,
)
from tandem_serve.servers.processes import process_group_members


def test_command_binds_loopback_and_keys_every_control_api(tmp_path):
    server = EmbeddedTriton(TritonOptions(workspace=tmp_path))
    command = server.command(TritonDistribution.find())
    assert "--model-control-mode=explicit" in command  # for the supervisor's reloads, behind the admin key
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in command
    for restriction in (f"model-repository,logging,trace:tandem-admin-key={server.keys.admin}",
                        f"shared-memory:tandem-shm-key={server.keys.shm}"):
        assert f"--http-restricted-api={restriction}" in command
        assert f"--grpc-restricted-protocol={restriction}" in command
    assert server.keys.admin != server.keys.shm
    assert [c for c in command if c.startswith("--model-repository=")] == [
        f"--model-repository={p.resolve()}" for p in default_repositories()
    ]
    unsupervised = EmbeddedTriton(TritonOptions(workspace=tmp_path, supervise=False)).command(TritonDistribution.find())
    assert "--model-control-mode=none" in unsupervised


def _tokenizer_only_repository(root: Path, model_dir: str) -> Path:
    """A repository holding the tokenizer alone, its model_dir set through ModelConfig."""
    source = default_repositories()[0] / "tokenizer"
    target = root / "repo" / "tokenizer"
    shutil.copytree(source, target)
    config = text_format.Parse((source / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config.parameters["model_dir"].string_value = model_dir
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    return root / "repo"


def test_missing_model_file_fails_start_and_names_it(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "sentence_bert_config.json", "model.safetensors"):
        (model_dir / name).write_text("{}")
    repo = _tokenizer_only_repository(tmp_path, str(model_dir))
    server = EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws", startup_timeout_s=120))
    with pytest.raises(TritonStartError) as info:
        server.start()
    assert f"model directory {model_dir} lacks tokenizer.json" in str(info.value)
    assert not server.is_alive()


def test_stub_missing_for_python_version_is_clear():
    dist = TritonDistribution.find()
    with pytest.raises(TritonStartError, match="no Python-backend stub for Python 2.7"):
        dist.stub_for((2, 7))
    assert dist.stub_for(sys.version_info[:2]).is_file()


def _stub_regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*")}


@pytest.mark.parametrize("crash", [False, True], ids=["graceful", "server-killed"])
def test_stop_leaves_no_stub_processes_or_shm(tmp_path, crash):
    """Graceful stop, and a server killed with SIGKILL: no stub survives, no region leaks."""
    before = _stub_regions()
    repo = _tokenizer_only_repository(tmp_path, "")
    server = EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws", startup_timeout_s=120))
    server.start()
    group = server.process.pid
    stubs = process_group_members(group)
    assert len(stubs) >= 2, "expected tritonserver and its tokenizer stub"
    assert _stub_regions() - before, "the stub's shm region should exist while serving"
    if crash:
        os.kill(group, signal.SIGKILL)
        server.process.wait()
    server.stop()
    assert process_group_members(group) == []
    assert _stub_regions() - before == set()


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="only where numpy 2 is installed (the GPU machine)")
def test_numpy2_in_stubs_fails_load_with_the_fix_named(tmp_path):
    """This Triton's stubs corrupt TYPE_STRING inputs under numpy 2: the tokenizer refuses to load."""
    repo = _tokenizer_only_repository(tmp_path, "")
    options = TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws", startup_timeout_s=120, stub_python_path=[])
    with pytest.raises(TritonStartError, match=r"cannot read TYPE_STRING tensors with numpy 2"):
        EmbeddedTriton(options).start()


def test_stubs_of_a_killed_launcher_are_swept(tmp_path):
    """SIGKILL the launching process: tritonserver dies with it, its stubs do not; the next start removes them."""
    import subprocess
    import time

    from tandem_serve.triton.launcher import is_tandem_stub, sweep_orphaned_stubs
    from tandem_serve.triton.stubs import orphaned_stubs

    before = _stub_regions()
    repo = _tokenizer_only_repository(tmp_path, "")
    script = ("import time; from pathlib import Path; from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions; "
              f"EmbeddedTriton(TritonOptions(model_repositories=[Path({str(repo)!r})], workspace=Path({str(tmp_path / 'ws')!r}), "
              "startup_timeout_s=120)).start(); print('ready', flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not orphaned_stubs(is_tandem_stub):  # tritonserver is dying; its stub becomes an orphan
            assert time.monotonic() < deadline, "expected an orphaned stub"
            time.sleep(0.2)
        assert _stub_regions() - before
        assert sweep_orphaned_stubs() >= 1
        deadline = time.monotonic() + 10
        while orphaned_stubs(is_tandem_stub):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert _stub_regions() - before == set()
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_a_kept_workspace_gets_new_keys_that_work_and_stay_off_the_command_line(tmp_path):
    """`tandem serve triton` keeps its workspace: the second start appends to the same log, makes new keys, and
    must wipe them from /proc/<pid>/cmdline only after tritonserver has parsed them."""
    import tritonclient.http as httpclient

    repo = _tokenizer_only_repository(tmp_path, "")
    keys = []
    for _ in range(2):
        with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws", startup_timeout_s=120)) as server:
            cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
            assert server.keys.admin.encode() not in cmdline and server.keys.shm.encode() not in cmdline
            client = httpclient.InferenceServerClient(server.http_url)
            assert [m["name"] for m in client.get_model_repository_index(headers=server.keys.admin_headers("http"))] == ["tokenizer"]
            assert client.get_system_shared_memory_status(headers=server.keys.shm_headers("http")) == []
            keys.append(server.keys)
    assert keys[0] != keys[1] and (tmp_path / "ws" / "server.log").stat().st_size > 0


def _installed_layout(home: Path) -> Path:
    """An installed Triton's layout (bin/tritonserver, backends/python with its stub) made from the embedded one.
    In the NGC image the package sits in the stub's site-packages; here a link in the backend directory (on the
    stub's sys.path) stands in for it."""
    dist = TritonDistribution.find()
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "tritonserver").symlink_to(dist.binary)
    backend = home / "backends" / "python"
    backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (backend / name).symlink_to(dist.root / "backends" / "python" / name)
    shutil.copy2(dist.stub_for(sys.version_info[:2]), backend / "triton_python_backend_stub")
    (backend / "tandem_serve").symlink_to(Path(__import__("tandem_serve").__file__).parent, target_is_directory=True)
    return home


def test_an_installed_server_runs_with_its_own_backends(tmp_path, monkeypatch, reference):
    from tandem_serve.clients.triton import TextEmbeddingClient
    from tests.helpers import assert_cosines

    embedded = TritonDistribution.find()
    home = _installed_layout(tmp_path / "opt" / "tritonserver")
    # NGC's image sets LD_LIBRARY_PATH for its server; the embedded binary needs the wheel's libraries
    monkeypatch.setenv("LD_LIBRARY_PATH", os.pathsep.join(filter(None, [str(embedded.libs), os.environ.get("LD_LIBRARY_PATH")])))
    installed = TritonDistribution.find(home)
    assert installed.installed and installed.libs is None
    options = TritonOptions(workspace=tmp_path / "ws", tritonserver_home=home, startup_timeout_s=300)
    with EmbeddedTriton(options) as server:
        command = server.process.args
        assert command[0] == str(home / "bin" / "tritonserver")
        assert f"--backend-directory={home / 'backends'}" in command
        assert "--allow-client-shm=true" not in command  # 2.51 has no such flag (its shm API is on)
        assert not (tmp_path / "ws" / "backends").exists()  # nothing assembled: the server's own backends
        texts = ["an installed server", "uses its own Python backend"]
        with TextEmbeddingClient(server.grpc_url, "grpc") as client:
            assert_cosines(client.embed(texts), reference(texts))


def test_the_client_shm_flag_follows_what_the_server_offers(tmp_path):
    home = _installed_layout(tmp_path / "new")
    (home / "bin" / "tritonserver").unlink()
    (home / "bin" / "tritonserver").write_text("#!/bin/sh\necho '  --allow-client-shm <boolean>  Allow clients ...'\n")
    (home / "bin" / "tritonserver").chmod(0o755)
    new = TritonDistribution.find(home)
    assert new.has_option("--allow-client-shm", dict(os.environ))
    server = EmbeddedTriton(TritonOptions(workspace=tmp_path / "ws", tritonserver_home=home))
    assert "--allow-client-shm=true" in server.command(new, client_shm_flag=True)
    assert not TritonDistribution.find().has_option("--allow-client-shm", dict(os.environ))


def test_a_missing_installed_server_or_backend_is_named(tmp_path):
    with pytest.raises(TritonStartError, match="no bin/tritonserver under"):
        TritonDistribution.find(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tritonserver").write_text("")
    with pytest.raises(TritonStartError, match="has no Python backend"):
        TritonDistribution.find(tmp_path)


def test_an_exported_repository_moves_with_its_detector_weights(tmp_path):
    """`tandem repository export --weights` copies the weights beside the detector's config and names them
    relatively; moved elsewhere, the repository still loads them (Triton passes the model's own directory)."""
    from tandem_serve.clients.triton import ObjectDetectionClient
    from tandem_serve.paths import shipped_weights
    from tandem_serve.triton.repository import export_repository
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    mine = tmp_path / "mine.safetensors"
    shutil.copy(shipped_weights(), mine)
    export_repository(tmp_path / "exported", weights=mine)
    mine.unlink()  # only the copy in the repository is left
    for name in ("tokenizer", "token_embedding", "encoder", "encoder_fused", "text_embedding", "text_embedding_fused"):
        shutil.rmtree(tmp_path / "exported" / name)
    moved = tmp_path / "elsewhere" / "models"
    moved.parent.mkdir()
    shutil.move(tmp_path / "exported", moved)
    rng = np.random.default_rng(12)
    scene = generate_scene(rng)
    with EmbeddedTriton(TritonOptions(model_repositories=[moved], workspace=tmp_path / "ws")) as server:
        with ObjectDetectionClient(server.grpc_url) as client:
            found = client.detect(encode_scene(scene, rng))
    assert len(found.boxes) >= 1
