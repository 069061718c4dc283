"""The TorchServe services without TorchServe: request parsing, replies, per-request errors, config errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.torchserve.replies import NPY, Reply, answer
from tandem_serve.torchserve.request_parsing import parse_image, parse_texts
from tandem_serve.torchserve.services import ObjectDetectionService, TextEmbeddingService, select_device
from tests.helpers import assert_cosines


@pytest.mark.parametrize("request_dict, expected", [
    ({"body": {"text": "hello"}}, ["hello"]),
    ({"body": {"text": ["a", "b"]}}, ["a", "b"]),
    ({"body": ["a", "b"]}, ["a", "b"]),
    ({"body": "plain text"}, ["plain text"]),
    ({"data": "Zürich €".encode()}, ["Zürich €"]),
    ({"text": b"form field"}, ["form field"]),
])
def test_parse_texts(request_dict, expected):
    assert parse_texts(request_dict, max_texts=4) == expected


@pytest.mark.parametrize("request_dict, message", [
    ({}, "empty request"),
    ({"body": {"txt": "x"}}, '"text" field'),
    ({"body": {"text": []}}, "empty"),
    ({"body": ["a"] * 5}, "too many texts"),
    ({"body": {"text": ["a", 3]}}, r"text\[1\] must be a string"),
    ({"body": b"\xff\xfe"}, "not valid UTF-8"),
])
def test_parse_texts_rejects(request_dict, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_texts(request_dict, max_texts=4)


JSON_TYPE = {"content-type": "application/json"}


@pytest.mark.parametrize("request_dict, headers, status, message", [
    ({"body": b'{"text": ['}, JSON_TYPE, 400, "malformed JSON body: Expecting value: line 1 column 11"),
    ({"body": b'{"text": "hi"}'}, {"content-type": "application/xml"}, 415, "'application/xml' is not accepted"),
    ({"body": b"<text>hi</text>"}, {"content-type": "text/xml"}, 415, "is not accepted"),
    ({"a": "b"}, {"content-type": "application/x-www-form-urlencoded"}, 400, "without a field 'text'"),
    ({"body": b""}, {}, 400, "empty request"),  # an empty POST, or a GET
    ({"body": ""}, {"content-type": "text/plain"}, 400, "empty request"),
    ({"body": b""}, JSON_TYPE, 400, "empty request"),
    ({"data": b"x"}, {"content-type": "multipart/form-data; boundary=z"}, 400, "without a field 'text'"),
])
def test_strict_parsing_by_content_type(request_dict, headers, status, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_texts(request_dict, 4, headers)
    assert info.value.http_status == status


def test_content_types_that_are_taken():
    assert parse_texts({"body": {"text": ["a"]}}, 4, {"content-type": "application/json; charset=utf-8"}) == ["a"]
    assert parse_texts({"body": "x"}, 4, {"content-type": "text/plain; charset=utf-8"}) == ["x"]
    assert parse_texts({"body": {"text": ""}}, 4, JSON_TYPE) == [""]  # an empty text is a text; an empty body is not
    assert parse_image({"body": b"\x89PNG"}, {"content-type": "image/png"})[0] == b"\x89PNG"
    for kind in ("application/json", "text/plain"):
        with pytest.raises(InvalidInputError, match="is not accepted") as info:
            parse_image({"body": b"\x89PNG"}, {"content-type": kind})
        assert info.value.http_status == 415


def test_parse_image():
    assert parse_image({"body": b"\x89PNG"}) == (b"\x89PNG", None, None, None)
    assert parse_image({"data": b"jpg", "conf_threshold": b"0.5", "max_det": "7"}) == (b"jpg", 0.5, None, 7)
    for request, message in [({"body": {"image": "x"}}, "raw bytes"), ({}, "no image"), ({"body": b""}, "empty"),
                             ({"data": b"x", "max_det": b"many"}, "max_det must be an integer")]:
        with pytest.raises(InvalidInputError, match=message):
            parse_image(request)


class FakeContext:
    """Records what the adapter sets, like TorchServe's Context does per request."""

    def __init__(self):
        self.status, self.types, self.headers = {}, {}, {}

    def set_response_status(self, code, phrase, idx):
        self.status[idx] = (code, phrase)

    def set_response_header(self, idx, name, value):
        self.headers.setdefault(idx, {})[name] = value

    def set_response_content_type(self, idx, value):
        self.types[idx] = value


def test_answer_sets_status_per_request():
    context = FakeContext()
    bodies = answer(context, [Reply.json({"ok": 1}), Reply.error("bad thing")])
    assert json.loads(bodies[1]) == {"code": 400, "type": "InvalidInput", "message": "bad thing"}
    assert context.status == {1: (400, "Bad Request")} and context.types[0] == "application/json"


def test_select_device_without_gpu():
    assert select_device("auto", None).type == "cpu"
    assert select_device("cpu", 0).type == "cpu"


@pytest.fixture(scope="module")
def text_service(model_files):
    config = {"handler": {"model_dir": str(model_files.root), "max_texts": 8, "pipeline": {"micro_batch_size": 2}}}
    service = TextEmbeddingService(model_files.root, config)
    yield service
    service.close()


def test_text_service_batch_with_bad_requests(text_service, reference):
    requests = [{"body": {"text": ["first", "second"]}}, {"body": {"text": 5}}, {"body": "third one"},
                {"body": b"\xc3"}, {"body": ["fourth"]}]
    replies = text_service.handle(requests, [{}, {}, {}, {}, {"accept": NPY}])
    assert [r.status for r in replies] == [200, 400, 200, 400, 200]
    assert "text[0] must be a string" in json.loads(replies[1].body)["message"]
    first = np.array(json.loads(replies[0].body)["embeddings"], np.float32)
    assert_cosines(first, reference(["first", "second"]))
    third = np.array(json.loads(replies[2].body)["embeddings"], np.float32)
    assert_cosines(third, reference(["third one"]))
    assert replies[4].content_type == NPY
    fourth = np.load(io.BytesIO(replies[4].body), allow_pickle=False)
    assert fourth.dtype == np.float32 and fourth.shape == (1, 384)
    assert_cosines(fourth, reference(["fourth"]))


@pytest.mark.parametrize("config, message", [
    ({"handler": {"max_texts": 0}}, "max_texts"),
    ({"handler": {"pipeline": {"micro_batch_size": "x"}}}, r"handler.pipeline: parameter 'micro_batch_size' must be int"),
    ({"handler": {"encoder": {"precision": "fp8"}}}, "handler.encoder"),
    ({"handler": {"tokeniser": {}}}, "unknown handler section"),
    ({"handler": {"model_dir": "missing"}}, "does not exist"),
])
def test_text_service_config_errors(tmp_path, config, message):
    with pytest.raises(Exception, match=message) as info:
        TextEmbeddingService(tmp_path, config)
    assert info.type.__name__ in ("ConfigError", "ModelFilesError")


def test_detection_service_overrides_and_errors(tmp_path):
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    rng = np.random.default_rng(11)
    image = encode_scene(generate_scene(rng), rng)
    service = ObjectDetectionService(tmp_path, {"handler": {"pipeline": {"micro_batch_size": 2}}})
    try:
        replies = service.handle([{"body": image}, {"data": image, "max_det": b"1"}, {"body": b"junk"},
                                  {"data": image, "iou_threshold": b"2"}])
    finally:
        service.close()
    assert [r.status for r in replies] == [200, 200, 400, 400]
    full, one = json.loads(replies[0].body), json.loads(replies[1].body)
    assert len(full["boxes"]) >= 1 and len(one["boxes"]) == 1
    np.testing.assert_allclose(one["boxes"][0], full["boxes"][0], atol=1e-3)  # max_det keeps the best box
    assert "iou_threshold must lie in" in json.loads(replies[3].body)["message"]


def test_detection_weights_resolved_inside_the_archive(tmp_path):
    with pytest.raises(Exception, match=str(tmp_path / "nope.safetensors")):
        ObjectDetectionService(tmp_path, {"handler": {"detector": {"weights": "nope.safetensors"}}})
    with pytest.raises(ConfigError, match="device"):
        ObjectDetectionService(tmp_path, {"handler": {"device": "tpu"}})


def test_missing_java_is_named(monkeypatch, tmp_path):
    from tandem_serve.torchserve.launcher import TorchServeStartError, find_java

    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(TorchServeStartError, match="Java not found"):
        find_java()
