"""The fault tier: each fault the supervised embedded Triton must survive, caused on a real server.

A server of its own (killing stubs would disturb the session's), supervised as `tandem serve triton`
runs it, checking every 0.25 s and reclaiming registrations every second.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tandem_serve.clients.triton import TextEmbeddingClient, text_input
from tandem_serve.paths import default_repositories
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.stubs import SHM_DIR, server_stubs
from tandem_serve.triton.supervisor import SupervisorOptions
from tests.helpers import assert_cosines

RECOVERY_BOUND_S = 90.0  # detection + unload + load of a CPU model on the 2-core CI machine (seen: 4-8 s)
ANSWER_BOUND_S = 30.0  # every request gets a result or an error within this


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    options = TritonOptions(workspace=tmp_path_factory.mktemp("faults"), startup_timeout_s=300,
                            supervisor=SupervisorOptions(interval_s=0.25, reclaim_interval_s=1.0))
    triton = EmbeddedTriton(options).start()
    failed_before = request.session.testsfailed
    yield triton
    if request.session.testsfailed > failed_before:
        sys.stderr.write("\n" + triton.log_tail(200) + "\n")
    triton.stop()


def _health(server, path: str = "/ready") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.health_url + path, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait_ready(server, bound_s: float = RECOVERY_BOUND_S) -> float:
    """Seconds until the launcher's health endpoint says ready again; fails past `bound_s`."""
    start = time.monotonic()
    while _health(server)[0] != 200:
        assert time.monotonic() - start < bound_s, f"not ready within {bound_s} s: {_health(server)[1]}"
        time.sleep(0.1)
    return time.monotonic() - start


def _restarts(server) -> dict[str, int]:
    return {name: m["restarts"] for name, m in _health(server, "/status")[1]["models"].items()}


def _stubs_of(server, model: str):
    return [s for s in server_stubs(server.process.pid) if s.model == model]


def test_a_killed_stub_under_load_is_reloaded_and_readiness_says_so_meanwhile(server, reference):
    """SIGKILL a tokenizer stub while 4 clients send: every request is answered within the bound (a result or an
    error, none hangs or goes missing), the health endpoint turns 503 and back to 200, then all is served again."""
    assert _health(server)[0] == 200 and _health(server, "/live")[0] == 200
    victims = _stubs_of(server, "tokenizer")
    stop = threading.Event()
    outcomes: list[tuple[float, float, str]] = []  # (sent, took, outcome)
    readiness: list[tuple[float, int]] = []
    lock = threading.Lock()

    def send() -> None:
        with TextEmbeddingClient(server.grpc_url, model="text_embedding_fused", timeout_s=ANSWER_BOUND_S) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    client.embed(["a request racing a dead stub"])
                    outcome = "ok"
                except InferenceServerException as exc:
                    outcome = exc.message()[:80]
                with lock:
                    outcomes.append((sent, time.monotonic() - sent, outcome))

    def probe() -> None:
        while not stop.is_set():
            readiness.append((time.monotonic(), _health(server)[0]))
            time.sleep(0.05)

    threads = [threading.Thread(target=send) for _ in range(4)] + [threading.Thread(target=probe)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(victims[0].pid, signal.SIGKILL)
    time.sleep(1.0)
    recovered_in = _wait_ready(server) + 1.0
    time.sleep(1.0)  # served again, under the same load
    stop.set()
    for thread in threads:
        thread.join(timeout=ANSWER_BOUND_S + 10)
        assert not thread.is_alive(), "a client never got its answer"
    assert all(took < ANSWER_BOUND_S for _, took, _ in outcomes)
    after = [o for sent, _, o in outcomes if sent > killed_at + recovered_in]
    assert after and set(after) == {"ok"}, Counter(after)
    failed = Counter(o for _, _, o in outcomes if o != "ok")
    expected = ("not healthy", "unknown model", "not ready", "unavailable")
    assert all(any(e in o.lower() for e in expected) for o in failed), failed
    assert any(code == 503 for at, code in readiness if at > killed_at), "readiness never said the model was down"
    assert readiness[-1][1] == 200
    status = _health(server, "/status")[1]["models"]["tokenizer"]
    assert status["restarts"] >= 1 and status["state"] == "serving" and status["last_recovery_s"] < RECOVERY_BOUND_S
    assert not victims[0].region_path.exists(), "the dead stub's region was left in /dev/shm"
    assert _health(server, "/status")[1]["detail"]["removed_stub_regions"] >= 1
    assert len(_stubs_of(server, "tokenizer")) >= len(victims)
    with TextEmbeddingClient(server.grpc_url, model="text_embedding") as client:  # the other ensemble came back too
        assert_cosines(client.embed(["still correct"]), reference(["still correct"]))
    print(f"\ntokenizer stub killed under load: ready again after {recovered_in:.1f} s "
          f"(reload {status['last_recovery_s']:.1f} s); {sum(failed.values())} of {len(outcomes)} requests failed meanwhile")


def _overflow_shape(dims: list[int], itemsize: int, batch: int) -> list[int]:
    """[batch, *dims] with one variable dim (else the last) so large that the byte size is a multiple of 2**64:
    0 after Triton 2.51's unsigned overflow, which then matches an empty payload."""
    at = next((i for i, d in enumerate(dims) if d < 0), len(dims) - 1)
    shape = [1 if d < 0 else d for d in dims]
    shape[at] = 1
    fixed = batch * itemsize * int(np.prod(shape))
    twos = (fixed & -fixed).bit_length() - 1  # 2-adic valuation
    shape[at] = 1 << (64 - twos)
    return [batch, *shape]


ITEMSIZE = {"TYPE_UINT8": 1, "TYPE_INT32": 4, "TYPE_INT64": 8, "TYPE_FP16": 2, "TYPE_FP32": 4}
WIRE = {"TYPE_UINT8": "UINT8", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_FP16": "FP16", "TYPE_FP32": "FP32"}


def _model_config(model: str) -> model_config_pb2.ModelConfig:
    for repository in default_repositories():
        path = repository / model / "config.pbtxt"
        if path.exists():
            return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    raise FileNotFoundError(model)


def _overflow_request(model: str, batch: int) -> service_pb2.ModelInferRequest:
    """`model`'s variable-size inputs with overflowing shapes and no data, its fixed-size inputs with zeros;
    a model without variable dims gets its first input with an overflowing last dim (a shape it does not declare)."""
    config = _model_config(model)
    request = service_pb2.ModelInferRequest(model_name=model)
    inputs = [t for t in config.input if not t.optional]
    overflowed = False
    for index, tensor in enumerate(inputs):
        kind = model_config_pb2.DataType.Name(tensor.data_type)
        dims = list(tensor.dims)
        entry = request.inputs.add(name=tensor.name, datatype=WIRE[kind])
        last = index == len(inputs) - 1
        if any(d < 0 for d in dims) or (last and not overflowed):
            entry.shape.extend(_overflow_shape(dims, ITEMSIZE[kind], batch))
            assert ITEMSIZE[kind] * int(np.prod(list(entry.shape), dtype=object)) % (1 << 64) == 0
            request.raw_input_contents.append(b"")
            overflowed = True
        else:
            entry.shape.extend([batch, *dims])
            request.raw_input_contents.append(b"\0" * (batch * ITEMSIZE[kind] * int(np.prod(dims))))
    return request


REFUSED_BY_TRITON = {"object_detection": 16, "detector": 16}  # the attacker's batch; refused by config, no stub hit


@pytest.mark.parametrize("model", ["object_detection", "detector", "image_preprocess", "nms", "encoder", "encoder_fused",
                                   "token_embedding"])
def test_shapes_whose_byte_size_overflows_leave_every_pipeline_serving(server, model):
    """Triton 2.51 accepts a shape whose byte size wraps to 0, and the stub that receives it dies. The public
    ensemble refuses it (max_batch_size 1), the detector too (fixed dims); any other stage it reaches
    directly is reloaded by the supervisor. Either way every pipeline serves again within the bound."""
    batch = REFUSED_BY_TRITON.get(model) or _model_config(model).max_batch_size
    request = _overflow_request(model, batch)
    before = _restarts(server)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=ANSWER_BOUND_S)
    code = info.value.code()
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE), code
    if model in REFUSED_BY_TRITON:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    time.sleep(1.0)  # a few supervisor checks
    _wait_ready(server)
    if model in REFUSED_BY_TRITON:
        assert _restarts(server) == before, "a refused request must not cost a reload"
    _serves_both_pipelines(server)


def _serves_both_pipelines(server) -> None:
    from tandem_serve.clients.triton import ObjectDetectionClient
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    with TextEmbeddingClient(server.grpc_url) as client:
        assert client.embed(["the text pipeline serves"]).shape == (1, 384)
    rng = np.random.default_rng(7)
    with ObjectDetectionClient(server.grpc_url) as client:
        assert len(client.detect(encode_scene(generate_scene(rng), rng)).boxes) > 0


def _send_bytes(stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str, name: str, payload: bytes) -> str:
    """One raw BYTES request of shape [1, 1] (`payload` is its length-prefixed content): "ok" or the error."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.append(payload)
    try:
        stub.ModelInfer(request, timeout=ANSWER_BOUND_S)
        return "ok"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def test_a_malformed_length_prefix_fails_only_its_own_request(server):
    """BYTES whose length prefix claims 0xFFFFFFF0 bytes, sent with 31 good requests, 10 rounds: only it fails. The
    tokenizer (max_batch_size 0) ran each request alone while the encoder batched them: the load that made a
    batching tokenizer fail the malformed request's batch-mates."""
    from tandem_serve.triton.statistics import read_statistics

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_url))
    status = grpcclient.InferenceServerClient(server.grpc_url)
    before = {s.model: s for s in read_statistics(status, "grpc")}
    send = functools.partial(_send_bytes, stub, "text_embedding_fused", "text")

    bad = struct.pack("<I", 0xFFFFFFF0) + b"abcd"
    good = [struct.pack("<I", len(t)) + t for t in (f"good request {i}".encode() for i in range(31))]
    for _ in range(10):
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(send, [bad, *good]))
        assert results[0].startswith("INVALID_ARGUMENT") and "string" in results[0], results[0]
        assert results[1:] == ["ok"] * 31, Counter(results[1:])
    after = {s.model: s for s in read_statistics(status, "grpc")}
    delta = {m: (after[m].requests - before[m].requests, after[m].executions - before[m].executions)
             for m in ("tokenizer", "encoder_fused")}
    assert delta["tokenizer"][0] == delta["tokenizer"][1] == 310, delta  # one request per execution
    assert delta["encoder_fused"][0] == 310 and delta["encoder_fused"][1] < 310, delta  # batched across clients


def test_the_tokenizer_never_batches_a_malformed_request_with_queued_ones(tmp_path):
    """The shipped tokenizer (two instances, queue bound 1024), a long text and 63 short requests, one of them
    malformed, at once, straight to the model: requests queue up (a dynamic batcher would batch them, and the
    Python backend would fail the whole batch); each is executed alone and only the malformed one fails. With one
    instance, Triton's batcher lost wake-ups and some requests hit the 10 s queue timeout (triton/queue_policy.py)."""
    from tandem_serve.triton.statistics import read_statistics

    repo = _tokenizer_repository(tmp_path / "repo")
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws", supervise=False)) as triton:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(triton.grpc_url))
        send = functools.partial(_send_bytes, stub, "tokenizer", "TEXT")

        long = " ".join(["blocking"] * 7000).encode()  # ~62 KiB: tens of ms, while the others queue behind it
        texts = [f"queued request {i}".encode() for i in range(62)]
        good = [struct.pack("<I", len(t)) + t for t in [long, *texts]]
        bad = struct.pack("<I", 0xFFFFFFF0) + b"abcd"
        for _ in range(3):
            with ThreadPoolExecutor(64) as pool:
                first = pool.submit(send, good[0])
                time.sleep(0.005)
                results = [first.result(), *pool.map(send, [*good[1:32], bad, *good[32:]])]
            assert results[32].startswith("INVALID_ARGUMENT"), results[32]
            assert results[:32] + results[33:] == ["ok"] * 63, Counter(results)
        (stats,) = [s for s in read_statistics(grpcclient.InferenceServerClient(triton.grpc_url), "grpc")
                    if s.model == "tokenizer"]
    assert stats.requests == stats.executions == 189


def test_a_sigkilled_shm_client_has_its_registrations_reclaimed(server):
    script = (
        "import sys, time, tritonclient.grpc as g\n"
        "from tandem_serve.clients.shm import ShmPool\n"
        f"pool = ShmPool(g.InferenceServerClient({server.grpc_url!r}), 'system', slots=2, prefix='tandem-victim',\n"
        f"               headers={server.keys.shm_headers('grpc')!r})\n"
        "print(pool.input_name, pool.output_name, flush=True)\n"
        "time.sleep(600)\n"
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    names = client.stdout.readline().split()
    headers = server.keys.shm_headers("grpc")
    status = grpcclient.InferenceServerClient(server.grpc_url)
    registered = lambda: set(status.get_system_shared_memory_status(headers=headers).regions)  # noqa: E731
    try:
        assert len(names) == 2 and set(names) <= registered()
        time.sleep(2.5)  # a live client's registrations are left alone
        assert set(names) <= registered()
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    deadline = time.monotonic() + 15
    while set(names) & registered():
        assert time.monotonic() < deadline, f"still registered: {set(names) & registered()}"
        time.sleep(0.2)
    assert not [n for n in names if (SHM_DIR / n).exists()], "the dead client's /dev/shm files were left"
    assert _health(server, "/status")[1]["detail"]["reclaimed_registrations"] >= 2


def test_the_shared_memory_api_needs_its_key(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for call in (client.get_system_shared_memory_status, client.unregister_system_shared_memory,
                 lambda: client.register_system_shared_memory("x", "/x", 64)):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    with pytest.raises(InferenceServerException, match="restricted"):  # the admin key is not the shm key
        client.unregister_system_shared_memory(headers=server.keys.admin_headers("grpc"))


def _as_nobody(script: str) -> subprocess.CompletedProcess:
    """`script` run by /bin/sh as the user nobody (uid 65534)."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, preexec_fn=drop, timeout=60, cwd="/")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user (CI runs as root)")
def test_another_local_user_reads_no_key_no_region_and_no_log(server):
    pid = server.process.pid
    assert stat.S_IMODE(server.keys_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.workspace.stat().st_mode) == 0o700
    assert stat.S_IMODE(server.log_path.stat().st_mode) == 0o600
    regions = [s.region_path for s in server_stubs(pid)]
    assert regions and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in regions)
    targets = " ".join(str(p) for p in (server.keys_file, server.log_path, *regions))
    result = _as_nobody(f"tr '\\0' ' ' < /proc/{pid}/cmdline; echo; "
                        f"for f in {targets}; do head -c1 \"$f\" >/dev/null 2>&1 && echo \"READABLE $f\"; done; true")
    assert result.returncode == 0, result.stderr
    cmdline = result.stdout.splitlines()[0]
    assert "tritonserver" in cmdline and "--http-restricted-api" in cmdline  # nobody sees the command line...
    assert server.keys.admin not in cmdline and server.keys.shm not in cmdline  # ...but not the keys
    assert "READABLE" not in result.stdout, result.stdout


def _tokenizer_repository(root: Path, queue_size: int | None = None, instances: int | None = None) -> Path:
    """A repository of the shipped tokenizer alone, its queue bound and instance count changed where given."""
    source = default_repositories()[0] / "tokenizer"
    config = text_format.Parse((source / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    if queue_size is not None:
        config.dynamic_batching.default_queue_policy.max_queue_size = queue_size
    if instances is not None:
        del config.instance_group[:]
        config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=instances)
    target = root / "tokenizer"
    target.mkdir(parents=True)
    (target / "1").symlink_to(source / "1", target_is_directory=True)
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    return root


def test_overload_is_refused_fast_with_unavailable(tmp_path):
    """A queue bound of 2 and 48 concurrent long requests: the excess gets UNAVAILABLE at once, nothing hangs."""
    repo = _tokenizer_repository(tmp_path / "repo", queue_size=2, instances=1)
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws", supervise=False)) as triton:
        text = " ".join(["overload"] * 2000)

        def send(_: int) -> tuple[str, float]:
            client = grpcclient.InferenceServerClient(triton.grpc_url)
            start = time.monotonic()
            try:
                client.infer("tokenizer", [text_input([text], "grpc", name="TEXT")], client_timeout=ANSWER_BOUND_S)
                return "ok", time.monotonic() - start
            except InferenceServerException as exc:
                return exc.status() + " " + exc.message(), time.monotonic() - start

        with ThreadPoolExecutor(48) as pool:
            results = list(pool.map(send, range(48)))
    outcomes = Counter(r for r, _ in results)
    refused = [took for r, took in results if "UNAVAILABLE" in r]
    assert outcomes["ok"] >= 1 and refused, outcomes
    assert all("Exceeds maximum queue size" in r for r in outcomes if r != "ok"), outcomes
    assert max(refused) < 5.0, f"refusals should be immediate, slowest {max(refused):.1f} s"


def test_stop_is_prompt_after_a_stub_died(tmp_path):
    repo = _tokenizer_repository(tmp_path / "repo", queue_size=16, instances=1)
    triton = EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws",
                                          supervisor=SupervisorOptions(interval_s=0.2))).start()
    try:
        (victim,) = _stubs_of(triton, "tokenizer")
        os.kill(victim.pid, signal.SIGKILL)
        _wait_ready(triton)
    finally:
        started = time.monotonic()
        triton.stop()
    assert time.monotonic() - started < 15.0
    assert not victim.region_path.exists()
