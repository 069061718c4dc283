"""Both pipelines on a real TorchServe over its REST inference API: answers, errors, security settings."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tandem_serve.clients.triton import TextEmbeddingClient
from tandem_serve.torchserve.client import TorchServeClient, TorchServeError, multipart
from tandem_serve.torchserve.replies import NPY
from tandem_serve.torchserve.services import BATCH_HEADER
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts


def _client(server) -> TorchServeClient:
    return TorchServeClient(server.inference_url, server.key_file)


def _post(server, model: str, body: bytes, content_type: str, token: str | None = None, accept: str = "*/*",
          timeout_s: float = 120.0):
    """(status, headers, body) of one raw REST request."""
    request = urllib.request.Request(f"{server.inference_url}/predictions/{model}", data=body, method="POST", headers={
        "Authorization": f"Bearer {token if token is not None else server.key()}", "Content-Type": content_type,
        "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize("binary", [True, False])
def test_embeddings_match_reference_and_triton(torchserve, triton, reference, binary):
    texts = EDGE_TEXTS + mixed_texts(9, seed=21)
    served = _client(torchserve).embed(texts, binary=binary)
    assert served.dtype == np.float32 and served.shape == (len(texts), 384)
    assert_cosines(served, reference(texts))
    with TextEmbeddingClient(triton.grpc_url) as client:
        assert_cosines(served, client.embed(texts))


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", "Zürich is lovely in spring.".encode()),
    ("application/json", json.dumps({"text": "Zürich is lovely in spring."}).encode()),
    ("application/json", json.dumps(["Zürich is lovely in spring."]).encode()),
])
def test_text_request_formats(torchserve, reference, content_type, body):
    status, headers, raw = _post(torchserve, "text_embedding", body, content_type)
    assert status == 200, raw
    assert_cosines(np.asarray(json.loads(raw)["embeddings"], np.float32), reference(["Zürich is lovely in spring."]))
    status, headers, raw = _post(torchserve, "text_embedding", body, content_type, accept=NPY)
    assert status == 200 and headers["content-type"] == NPY
    assert np.load(io.BytesIO(raw), allow_pickle=False).shape == (1, 384)


def test_detection_accuracy_and_overrides(torchserve):
    """The same bar as the Triton ensemble: precision and recall >= 0.9 at IoU 0.5 on unseen scenes."""
    rng = np.random.default_rng(4242)
    scenes = [generate_scene(rng) for _ in range(40)]
    encoded = [encode_scene(s, rng) for s in scenes]
    local = threading.local()

    def detect(data):
        if not hasattr(local, "client"):
            local.client = _client(torchserve)
        return local.client.detect(data)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(detect, encoded, timeout=300))
    counts = MatchCounts()
    for scene, found in zip(scenes, results):
        counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
    assert counts.precision >= 0.9 and counts.recall >= 0.9, counts
    busiest = int(np.argmax([len(r.boxes) for r in results]))
    one = _client(torchserve).detect(encoded[busiest], max_det=1)  # a multipart request with a field
    assert len(one.boxes) == 1 and one.scores[0] == results[busiest].scores.max()
    none = _client(torchserve).detect(encoded[0], conf_threshold=0.999999)
    assert none.boxes.shape == (0, 4)


def test_detection_matches_triton(torchserve, triton):
    from tandem_serve.clients.triton import ObjectDetectionClient

    rng = np.random.default_rng(99)
    encoded = [encode_scene(generate_scene(rng), rng) for _ in range(4)]
    with ObjectDetectionClient(triton.grpc_url) as triton_client:
        for data in encoded:
            ours, theirs = _client(torchserve).detect(data), triton_client.detect(data)
            assert len(ours.boxes) == len(theirs.boxes)
            np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=0.5)  # the archive's detector runs fp16 on a GPU
            np.testing.assert_array_equal(ours.classes, theirs.classes)


def test_mixed_batch_fails_only_bad_requests(torchserve, reference):
    """Good and bad requests sent together land in one handler batch; only the bad ones fail, each with a 400."""
    good = ["first good text", "second good text", "third good text", "fourth good text"]
    bad = [(b"\xff\xfe not utf-8", "text/plain", "not valid UTF-8"),
           (json.dumps({"text": []}).encode(), "application/json", "empty"),
           (json.dumps({"words": "x"}).encode(), "application/json", '"text" field'),
           (json.dumps({"text": ["x"] * 65}).encode(), "application/json", "too many texts")]
    payloads = [(t.encode(), "text/plain", None) for t in good] + bad
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    barrier = threading.Barrier(len(order))

    def send(index):
        body, content_type, _ = payloads[index]
        barrier.wait()
        return _post(torchserve, "text_embedding", body, content_type)

    with ThreadPoolExecutor(len(order)) as pool:
        outcomes = dict(zip(order, pool.map(send, order, timeout=300)))
    assert max(int(h.get(BATCH_HEADER, 1)) for _, h, _ in outcomes.values()) > 1, "the requests were never batched"
    for index, (status, headers, raw) in outcomes.items():
        if index < len(good):
            assert status == 200, raw
            assert_cosines(np.asarray(json.loads(raw)["embeddings"], np.float32), reference([good[index]]))
        else:
            reply = json.loads(raw)
            assert status == 400 and payloads[index][2] in reply["message"], reply
            assert "Traceback" not in reply["message"]
    assert _client(torchserve).embed(["the worker survived"]).shape == (1, 384)


@pytest.mark.parametrize("body, message", [
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not a decodable image"),
    (b"", "the image is empty"),
])
def test_bad_images_get_400(torchserve, body, message):
    status, _, raw = _post(torchserve, "object_detection", body, "application/octet-stream")
    assert status == 400 and message in json.loads(raw)["message"], raw
    fields, content_type = multipart({"data": b"\x89PNG broken", "iou_threshold": b"0"})
    status, _, raw = _post(torchserve, "object_detection", fields, content_type)
    assert status == 400, raw


def test_bad_override_fails_alone(torchserve):
    rng = np.random.default_rng(7)
    image = encode_scene(generate_scene(rng), rng)
    with pytest.raises(TorchServeError) as info:
        _client(torchserve).detect(image, iou_threshold=1.5)
    assert info.value.status == 400 and "iou_threshold must lie in (0, 1]" in info.value.message
    assert len(_client(torchserve).detect(image).boxes) >= 1


def test_security_settings(torchserve):
    properties = torchserve.properties()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert properties[key].startswith("http://127.0.0.1:")
    assert properties["grpc_inference_address"] == properties["grpc_management_address"] == "127.0.0.1"
    status, _, raw = _post(torchserve, "text_embedding", b"hello", "text/plain", token="wrong")
    assert status in (400, 401) and b"Token Authorization failed" in raw
    register = urllib.request.Request(f"{torchserve.management_url}/models?url=evil.mar", method="POST",
                                      headers={"Authorization": f"Bearer {torchserve.key('management')}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(register, timeout=30)
    assert info.value.code == 405  # the model management API is disabled


def test_nothing_survives_a_killed_launcher(torchserve, tmp_path):
    """SIGKILL the process that started TorchServe: Java (PR_SET_PDEATHSIG) and its workers go too."""
    import signal
    import subprocess
    import sys
    import time

    workspace = tmp_path / "ws"
    script = ("import sys, time; from pathlib import Path; "
              "from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions; "
              f"s = EmbeddedTorchServe(TorchServeOptions(model_store=Path({str(torchserve.options.model_store)!r}), "
              f"models=['text_embedding.mar'], workspace=Path({str(workspace)!r}))).start(); "
              "print('ready', flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout.readline().strip() == "ready"
        assert subprocess.run(["pgrep", "-f", str(workspace)], capture_output=True).stdout
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-f", str(workspace)], capture_output=True).stdout:
            assert time.monotonic() < deadline, "TorchServe outlived its launcher"
            time.sleep(0.5)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        subprocess.run(["pkill", "-9", "-f", str(workspace)])


def _request(url: str, token: str | None = None, method: str = "GET", body: bytes | None = None,
             content_type: str | None = None) -> tuple[int, bytes]:
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **({"Content-Type": content_type} if content_type else {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("model, method, body, content_type, status, message", [
    ("text_embedding", "POST", b'{"text": [', "application/json", 400, "malformed JSON body"),
    ("text_embedding", "POST", b'{"text": "hello"}', "application/xml", 415, "'application/xml' is not accepted"),
    ("text_embedding", "POST", b"", "application/json", 400, "empty request"),
    ("text_embedding", "POST", None, None, 400, "empty request"),
    ("text_embedding", "GET", None, None, 400, "empty request"),
    ("text_embedding", "POST", b"hello", "application/x-www-form-urlencoded", 400, "without a field 'text'"),
    ("text_embedding", "POST", b"<text>hello</text>", "text/xml", 415, "'text/xml' is not accepted"),
    ("text_embedding", "POST", json.dumps({"text": "x" * 70_000}).encode(), "application/json", 400, "at most 65536 per text"),
    ("object_detection", "POST", b'{"image": "x"}', "application/json", 415, "is not accepted"),
    ("object_detection", "GET", None, None, 400, "the image is empty"),
])
def test_malformed_requests_get_4xx_naming_the_problem(torchserve, model, method, body, content_type, status, message):
    code, raw = _request(f"{torchserve.inference_url}/predictions/{model}", torchserve.key(), method, body, content_type)
    reply = json.loads(raw)
    assert code == status and reply["code"] == status and message in reply["message"], reply
    assert "Traceback" not in reply["message"]


def _health(server, path: str = "/ready") -> tuple[int, dict]:
    code, raw = _request(server.health_url + path)
    return code, json.loads(raw)


def test_health_needs_no_token_while_ping_does(torchserve):
    code, raw = _request(f"{torchserve.inference_url}/ping")
    assert code in (400, 401) and b"Token Authorization failed" in raw  # TorchServe's own probe needs the token
    assert _request(f"{torchserve.inference_url}/ping", torchserve.key())[0] == 200
    assert _health(torchserve, "/live")[0] == 200
    code, status = _health(torchserve)
    assert code == 200 and status["ready"] and set(status["models"]) == {"text_embedding", "object_detection"}
    assert all(m["ready"] == m["workers"] >= 1 for m in status["models"].values()), status


def test_metrics_are_served_in_prometheus_format_without_a_token(torchserve):
    _client(torchserve).embed(["counted"])
    code, raw = _request(f"{torchserve.metrics_url}/metrics")
    text = raw.decode()
    assert code == 200 and "# TYPE ts_inference_requests_total counter" in text
    assert 'ts_inference_requests_total{model_name="text_embedding"' in text


def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(torchserve):
    """SIGKILL one of the two text workers while requests arrive: it is back within the bound, /status shows it
    down meanwhile, and every request sent after the kill is answered (by the other worker).

    TorchServe 0.12 never answers the requests the dying worker's thread was still collecting into a batch
    (its maxBatchDelay window, 300 ms in these tests): at most one batch of them, counted and reported here.
    With a single worker it also loses every request that arrives during the restart (hence two workers)."""
    import os
    import signal
    import socket
    import time

    described = json.loads(_request(f"{torchserve.management_url}/models/text_embedding", torchserve.key("management"))[1])
    workers = described[0]["workers"]
    assert len(workers) == 2
    outcomes: list[tuple[float, object]] = []  # (sent at, status or "no answer")
    stop = threading.Event()

    def send():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = _post(torchserve, "text_embedding", b"a request racing a dead worker", "text/plain", timeout_s=10)[0]
            except (TimeoutError, socket.timeout, urllib.error.URLError):
                status = "no answer"
            outcomes.append((sent, status))

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    os.kill(int(workers[0]["pid"]), signal.SIGKILL)
    killed, ready_counts = time.monotonic(), []
    while time.monotonic() - killed < 90:
        ready_counts.append(_health(torchserve, "/status")[1]["models"]["text_embedding"]["ready"])
        if ready_counts[-1] == 2 and 1 in ready_counts:
            break
        time.sleep(0.1)
    recovered = time.monotonic() - killed
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert 1 in ready_counts and ready_counts[-1] == 2, ready_counts[-5:]
    lost = [sent for sent, status in outcomes if status == "no answer"]
    assert len(lost) <= 3 and all(sent < killed for sent in lost), outcomes  # only what was in the dying batch
    assert {status for sent, status in outcomes if sent > killed} <= {200}, outcomes
    assert {status for _, status in outcomes} <= {200, 500, 507, "no answer"}
    assert _health(torchserve)[0] == 200
    print(f"\nTorchServe text worker killed: both workers ready again after {recovered:.1f} s; of {len(outcomes)} "
          f"requests {len(lost)} never answered (sent before the kill), "
          f"{len([1 for _, st in outcomes if st in (500, 507)])} got 'Worker died'")


def test_the_load_generator_drives_torchserve_and_counts_its_refusals(torchserve):
    """TorchServeSender through the project's closed loop: every answer 200 with the token; with a wrong token every
    request counts as an error carrying TorchServe's answer (0.12: HTTP 400, InvalidKeyException)."""
    from tandem_serve.loadgen import LoadSpec, TorchServeSender, measure

    bodies = [(json.dumps({"text": t}).encode(), "application/json") for t in mixed_texts(8, seed=4)]
    url = torchserve.inference_url
    good = measure(lambda: TorchServeSender(url, "text_embedding", bodies, torchserve.key()),
                   [LoadSpec("closed", 4, seconds=1.5)])[0]
    assert good.completed >= 8 and good.errors == 0 and good.p50_ms > 0
    bad = measure(lambda: TorchServeSender(url, "text_embedding", bodies, "wrong"), [LoadSpec("closed", 2, seconds=0.5)])[0]
    assert bad.completed == 0 and bad.errors >= 1 and "InvalidKeyException" in bad.first_error


def test_a_full_job_queue_answers_503_and_the_server_serves_on(torchserve, tmp_path):
    """job_queue_size 1 under 32 concurrent senders: the requests beyond the queue get TorchServe's 503 at once (counted
    by the load generator, not hung), the others their embeddings; afterwards a request is answered as before."""
    from tandem_serve.loadgen import LoadSpec, TorchServeSender, measure
    from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions

    options = TorchServeOptions(model_store=torchserve.options.model_store, models=["text_embedding.mar"],
                                workspace=tmp_path / "ts", job_queue_size=1, health_port=None, startup_timeout_s=120)
    bodies = [(json.dumps({"text": t}).encode(), "application/json") for t in mixed_texts(8, seed=5)]
    with EmbeddedTorchServe(options) as server:
        assert server.properties()["job_queue_size"] == "1"
        url, key = server.inference_url, server.key()
        point = measure(lambda: TorchServeSender(url, "text_embedding", bodies, key), [LoadSpec("closed", 32, seconds=2)])[0]
        assert point.errors >= 1 and "HTTP 503" in point.first_error, point.first_error
        assert point.completed >= 1
        assert len(_client(server).embed(["still serving"])) == 1


def test_a_model_missing_from_the_store_fails_start_at_once_naming_it(tmp_path):
    """`text_embedding` where the store holds text_embedding.mar: TorchServe itself would wait forever (never ready)."""
    from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions, TorchServeStartError

    from tests.conftest import require_torchserve

    require_torchserve()
    store = tmp_path / "store"
    store.mkdir()
    (store / "text_embedding.mar").write_bytes(b"")
    options = TorchServeOptions(model_store=store, models=["text_embedding.mar", "text_embedding"],
                                workspace=tmp_path / "ts", health_port=None)
    started = time.monotonic()
    with pytest.raises(TorchServeStartError, match=r"not in the model store .*: text_embedding \("):
        EmbeddedTorchServe(options).start()
    assert time.monotonic() - started < 10
