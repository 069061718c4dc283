"""The object_detection ensemble on the real Triton: accuracy, overrides, bad input."""

from __future__ import annotations

import io
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from tandem_serve.clients.triton import ObjectDetectionClient
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene

INVALID = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


def _scenes(count: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = [generate_scene(rng) for _ in range(count)]
    return scenes, [encode_scene(s, rng) for s in scenes]


def _client(triton, protocol):
    return ObjectDetectionClient(triton.grpc_url if protocol == "grpc" else triton.http_url, protocol)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_detects_generated_shapes_end_to_end(triton, protocol):
    """Precision and recall >= 0.9 at IoU 0.5 with the right class, on scenes the model never saw."""
    scenes, encoded = _scenes(40, seed=777 if protocol == "grpc" else 778)
    local = threading.local()

    def detect(data: bytes):
        if not hasattr(local, "client"):
            local.client = _client(triton, protocol)
        return local.client.detect(data)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(detect, encoded, timeout=300))
    counts = MatchCounts()
    for scene, found in zip(scenes, results):
        assert found.boxes.dtype == np.float32 and found.classes.dtype == np.int32
        assert (found.boxes[:, [0, 2]] <= scene.image.width).all() and (found.boxes[:, [1, 3]] <= scene.image.height).all()
        counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
    assert counts.precision >= 0.9 and counts.recall >= 0.9, counts


def test_per_request_overrides_and_empty_answer(triton):
    scenes, encoded = _scenes(1, seed=31)
    with _client(triton, "grpc") as client:
        default = client.detect(encoded[0])
        assert len(default.boxes) >= 1
        only_one = client.detect(encoded[0], max_det=1)
        assert len(only_one.boxes) == 1 and only_one.scores[0] == default.scores.max()
        none = client.detect(encoded[0], conf_threshold=0.999999)
        assert none.boxes.shape == (0, 4) and none.scores.shape == (0,) and none.classes.shape == (0,)
        blank = client.detect(_png(Image.new("RGB", (640, 480), (90, 90, 90))))
        assert blank.boxes.shape == (0, 4)


BAD_INPUTS = {
    "corrupt": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "not a decodable image"),
    "text": (b"This is a text file, not an image.\n" * 20, "not a decodable image"),
    "one_pixel": (_png(Image.new("RGB", (1, 1))), "1x1"),
    "huge": (_png(Image.new("1", (8000, 7000))), "above the limit of 50000000 pixels"),
}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_images_are_invalid_arg(triton, protocol, case):
    data, message = BAD_INPUTS[case]
    with _client(triton, protocol) as client:
        with pytest.raises(InferenceServerException) as info:
            client.detect(data)
        assert info.value.status() == INVALID[protocol] and message in info.value.message()
        assert "Traceback" not in info.value.message()
        assert client.client.is_server_ready()


def test_empty_input_and_bad_thresholds_are_rejected(triton):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    empty = grpcclient.InferInput("image", [1, 0], "UINT8")
    empty.set_data_from_numpy(np.zeros((1, 0), np.uint8))
    with pytest.raises(InferenceServerException) as info:
        client.infer("object_detection", [empty])
    assert info.value.status() == INVALID["grpc"]
    _, encoded = _scenes(1, seed=5)
    with _client(triton, "grpc") as detector:
        with pytest.raises(InferenceServerException, match="iou_threshold must lie in"):
            detector.detect(encoded[0], iou_threshold=0.0)
        with pytest.raises(InferenceServerException, match="max_det must be >= 1"):
            detector.detect(encoded[0], max_det=0)
    assert client.is_server_ready()


def test_bad_images_fail_alone_among_concurrent_good_ones(triton):
    scenes, encoded = _scenes(12, seed=99)
    payloads = [BAD_INPUTS["corrupt"][0] if i % 3 == 0 else data for i, data in enumerate(encoded)]
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    results: queue.Queue = queue.Queue()
    for i, data in enumerate(payloads):
        image = np.frombuffer(data, np.uint8)[None]
        tensor = grpcclient.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image)
        client.async_infer("object_detection", [tensor], callback=lambda result, error, i=i: results.put((i, result, error)))
    outcomes = {i: (r, e) for i, r, e in (results.get(timeout=300) for _ in payloads)}
    for i, (result, error) in outcomes.items():
        if i % 3 == 0:
            assert error is not None and error.status() == INVALID["grpc"], i
        else:
            assert error is None, (i, error)
            counts = MatchCounts()
            counts.add(result.as_numpy("boxes")[0], result.as_numpy("scores")[0], result.as_numpy("classes")[0],
                       scenes[i].boxes, scenes[i].classes)
            assert counts.tp >= 1
    assert client.is_server_ready()


def test_non_finite_candidates_reaching_nms_are_dropped(triton):
    """NaN/Inf rows are documented to be dropped; the finite rows still come back, mapped and clipped."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    rows = np.array([[[10, 10, 50, 50, 0.9, 1], [np.nan, 0, 5, 5, 0.99, 0], [0, 0, 5, 5, np.inf, 2]]], np.float32)
    candidates = grpcclient.InferInput("CANDIDATES", list(rows.shape), "FP32")
    candidates.set_data_from_numpy(rows)
    letterbox = grpcclient.InferInput("LETTERBOX", [1, 5], "FP32")
    letterbox.set_data_from_numpy(np.array([[0.5, 0, 0, 200, 200]], np.float32))
    result = client.infer("nms", [candidates, letterbox])
    np.testing.assert_allclose(result.as_numpy("BOXES")[0], [[20, 20, 100, 100]])
    assert result.as_numpy("CLASSES")[0].tolist() == [1]
