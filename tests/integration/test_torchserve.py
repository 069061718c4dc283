"""Both pipelines on a real TorchServe over its REST inference API: answers, errors, security settings."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tandem_serve.client import TextEmbeddingClient
from tandem_serve.torchserve.client import TorchServeClient, TorchServeError, multipart
from tandem_serve.torchserve.replies import NPY
from tandem_serve.torchserve.services import BATCH_HEADER
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts


def _client(server) -> TorchServeClient:
    return TorchServeClient(server.inference_url, server.key_file)


def _post(server, model: str, body: bytes, content_type: str, token: str | None = None, accept: str = "*/*"):
    """(status, headers, body) of one raw REST request."""
    request = urllib.request.Request(f"{server.inference_url}/predictions/{model}", data=body, method="POST", headers={
        "Authorization": f"Bearer {token if token is not None else server.key()}", "Content-Type": content_type,
        "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
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
    from tandem_serve.client import ObjectDetectionClient

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
