"""MicroBatchPipeline: grouping, per-request failures, pipelined == sequential, and the real pipelines."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.runtime.per_request import Failure
from tandem_serve.runtime.pipeline import MicroBatchPipeline, PipelineSettings, micro_batches
from tandem_serve.stage_config import (
    DetectorConfig,
    EncoderConfig,
    ImagePreprocessConfig,
    NmsConfig,
    TokenEmbeddingConfig,
    TokenizerConfig,
)
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts


@pytest.mark.parametrize("rows, size, expected", [
    ([1, 1, 1, 1, 1], 2, [[0, 1], [2, 3], [4]]),
    ([3, 1, 5, 1], 4, [[0, 1], [2], [3]]),  # a request larger than the size forms one alone
    ([], 4, []),
    ([2, 2], 8, [[0, 1]]),
])
def test_micro_batches(rows, size, expected):
    assert micro_batches(rows, size) == expected


class Squares:
    """Toy stages over lists of numbers: negative numbers are bad input, 13 breaks the device stage."""

    def __init__(self):
        self.threads: dict[str, set[str]] = {"prepare": set(), "infer": set(), "finish": set()}

    def rows(self, item):
        return len(item)

    def prepare(self, item):
        self.threads["prepare"].add(threading.current_thread().name)
        if any(v < 0 for v in item):
            raise InvalidInputError(f"negative value in {item}")
        return torch.tensor(item, dtype=torch.float32)

    def collate(self, prepared):
        return [torch.cat(prepared)]

    def infer(self, inputs):
        self.threads["infer"].add(threading.current_thread().name)
        if (inputs[0] == 13).any():
            raise RuntimeError("device failure")
        return [inputs[0] ** 2]

    def finish(self, outputs, prepared):
        self.threads["finish"].add(threading.current_thread().name)
        return [part.tolist() for part in torch.split(outputs[0], [len(p) for p in prepared])]


ITEMS = [[1.0, 2.0], [3.0], [-1.0], [4.0, 5.0, 6.0], [13.0], [7.0], [8.0, 9.0]]


@pytest.mark.parametrize("pipelined", [True, False])
def test_bad_requests_fail_alone(pipelined):
    stages = Squares()
    assert micro_batches([len(i) for i in ITEMS], 2) == [[0], [1, 2], [3], [4, 5], [6]]
    with MicroBatchPipeline(stages, "cpu", PipelineSettings(micro_batch_size=2, cpu_threads=3, pipelined=pipelined)) as pipe:
        results = pipe.run(ITEMS)
    assert results[0] == [1.0, 4.0] and results[1] == [9.0]
    assert isinstance(results[2], Failure) and results[2].invalid and "negative" in results[2].message
    assert results[3] == [16.0, 25.0, 36.0]
    assert isinstance(results[4], Failure) and not results[4].invalid and "RuntimeError" in results[4].message
    assert isinstance(results[5], Failure) and not results[5].invalid  # [7] shares the micro-batch of [13]
    assert results[6] == [64.0, 81.0]
    caller = threading.current_thread().name
    if pipelined:
        assert stages.threads["infer"] == {caller}
        assert caller not in stages.threads["prepare"] | stages.threads["finish"]
    else:
        assert set().union(*stages.threads.values()) == {caller}


def test_infer_failure_does_not_hang_and_pipeline_recovers():
    stages = Squares()
    with MicroBatchPipeline(stages, "cpu", PipelineSettings(micro_batch_size=1, cpu_threads=2)) as pipe:
        assert isinstance(pipe.run([[13.0]])[0], Failure)
        assert pipe.run([[2.0]]) == [[4.0]]


class SlowSquares(Squares):
    """Squares whose device stage takes `seconds` per micro-batch (a busy device)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def infer(self, inputs):
        time.sleep(self.seconds)
        return super().infer(inputs)


def test_cpu_lane_takes_work_from_a_busy_device_and_keeps_failures_per_request(restore_torch_threads):
    primary, lane = SlowSquares(0.02), Squares()
    settings = PipelineSettings(micro_batch_size=2, cpu_threads=3, cpu_lane_threads=1)
    items = [[i + 0.5, i + 1.5] for i in range(0, 40, 2)] + ITEMS
    with MicroBatchPipeline(primary, "cpu", settings, cpu_stages=lane) as pipe:
        pipe.run(items)  # the first run measures both lanes (and routes mostly to the first while neither is known)
        first = pipe.balancer.snapshot()
        results = pipe.run(items)
        routed = pipe.balancer.snapshot()
    for item, result in zip(items, results):
        if item in ([-1.0], [13.0], [7.0]):  # bad input; the device failure and its batch-mate
            assert isinstance(result, Failure) and result.invalid == (item == [-1.0])
        else:
            assert result == [v * v for v in item]
    second = {lane: routed[lane]["batches"] - first[lane]["batches"] for lane in routed}
    assert second["cpu"] > 5 * second["primary"]  # once measured, the faster lane takes (nearly) all of it
    assert routed["cpu"]["ms_per_row"] < routed["primary"]["ms_per_row"]
    assert lane.threads["infer"] and all(name.startswith("pipeline-cpu-lane") for name in lane.threads["infer"])
    assert all(l.rows_in_flight == 0 for l in pipe.balancer.lanes)


def test_text_pipeline_with_a_cpu_lane_matches_reference(text_stages, reference, restore_torch_threads):
    requests = [EDGE_TEXTS[:3], [EDGE_TEXTS[3]], EDGE_TEXTS[4:], mixed_texts(9, seed=4), ["one more"]]
    settings = PipelineSettings(micro_batch_size=2, cpu_threads=2, cpu_lane_threads=1)
    with MicroBatchPipeline(text_stages, "cpu", settings, cpu_stages=text_stages) as pipe:
        results = pipe.run([text_stages.request(texts) for texts in requests])
        assert pipe.balancer.snapshot()["cpu"]["batches"] >= 1
    for texts, embeddings in zip(requests, results):
        assert_cosines(embeddings, reference(texts))


@pytest.fixture(scope="module")
def text_stages():
    from tandem_serve.text.embedding_pipeline import TextEmbeddingStages, TextStageConfigs

    configs = TextStageConfigs(TokenizerConfig(), EncoderConfig(), TokenEmbeddingConfig())
    return TextEmbeddingStages(configs, torch.device("cpu"))


@pytest.mark.parametrize("pipelined", [True, False])
def test_text_pipeline_matches_reference(text_stages, reference, pipelined):
    requests = [EDGE_TEXTS[:3], [EDGE_TEXTS[3]], EDGE_TEXTS[4:], mixed_texts(5, seed=3), ["one more"]]
    with MicroBatchPipeline(text_stages, "cpu", PipelineSettings(micro_batch_size=4, pipelined=pipelined)) as pipe:
        results = pipe.run([text_stages.request(texts) for texts in requests])
    for texts, embeddings in zip(requests, results):
        assert embeddings.dtype == np.float32
        assert_cosines(embeddings, reference(texts))


def test_detection_pipeline_matches_the_triton_stages():
    """Same boxes as the per-stage path the Triton models run (preprocess -> detector -> nms)."""
    from tandem_serve.vision.detection_pipeline import DetectionStages, VisionStageConfigs
    from tandem_serve.vision.shapes import encode_scene, generate_scene
    from tandem_serve.vision.stages import NmsStage, PreprocessStage
    from tandem_serve.vision.detector import DetectStage

    rng = np.random.default_rng(5)
    encoded = [encode_scene(generate_scene(rng), rng) for _ in range(5)]
    configs = VisionStageConfigs(ImagePreprocessConfig(), DetectorConfig(), NmsConfig())
    stages = DetectionStages(configs, torch.device("cpu"))
    requests = [stages.request(data) for data in encoded]
    requests.insert(2, stages.request(b"not an image"))
    with MicroBatchPipeline(stages, "cpu", PipelineSettings(micro_batch_size=2)) as pipe:
        results = pipe.run(requests)
    assert isinstance(results.pop(2), Failure)
    preprocess, detect, nms = PreprocessStage(configs.preprocess), DetectStage(configs.detector), NmsStage(configs.nms)
    for data, found in zip(encoded, results):
        pixels, box = preprocess(np.frombuffer(data, np.uint8)[None])
        rows = detect([torch.from_numpy(pixels)])[0].numpy()
        expected = nms([nms.request(rows, box)])[0]
        assert len(expected.boxes) > 0
        np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-3)
        np.testing.assert_array_equal(found.classes, expected.classes)


def test_images_decoded_in_collate_fail_alone_and_match_the_prepare_path():
    """The order nvJPEG and the tandem use (headers read per request, the micro-batch decoded in `collate`), run with
    the CPU decoders as a CPU copy of the stages does: a truncated JPEG (its header reads, its data does not)
    fails alone with a 400 naming it, and its batch-mates get the boxes of the decode-in-prepare path."""
    from tandem_serve.vision.detection_pipeline import DetectionStages, PreparedImage, VisionStageConfigs
    from tandem_serve.vision.letterbox import read_header
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    rng = np.random.default_rng(6)
    encoded = [encode_scene(generate_scene(rng), rng) for _ in range(3)]
    truncated = encoded[0][: len(encoded[0]) // 2]
    stages = DetectionStages(VisionStageConfigs(ImagePreprocessConfig(), DetectorConfig(), NmsConfig()), torch.device("cpu"))
    requests = [stages.request(data) for data in encoded[:1] + [truncated] + encoded[1:]]
    headers_only = [PreparedImage(r, header=read_header(r.data)) for r in requests]
    late = stages.finish([t.cpu() for t in stages.infer(stages.collate(headers_only))], headers_only)
    early_prepared = [stages.prepare(r) for r in requests if r.data is not truncated]
    early = stages.finish([t.cpu() for t in stages.infer(stages.collate(early_prepared))], early_prepared)
    failure = late.pop(1)
    assert isinstance(failure, Failure) and failure.status == 400 and "not a decodable image" in failure.message
    for found, expected in zip(late, early):
        assert len(expected.boxes) > 0
        np.testing.assert_allclose(found.boxes, expected.boxes, atol=1e-4)
        np.testing.assert_array_equal(found.classes, expected.classes)


def test_decode_settings_are_checked_and_auto_decodes_on_the_cpu_without_a_gpu():
    from tandem_serve.torchserve.services import ObjectDetectionService, decode_mode
    from tandem_serve.vision.detection_pipeline import DetectionStages, VisionStageConfigs

    configs = VisionStageConfigs(ImagePreprocessConfig(), DetectorConfig(), NmsConfig())
    for mode in ("gpu", "tandem"):
        with pytest.raises(ConfigError, match=f"decode: {mode} needs the detector on a GPU"):
            DetectionStages(configs, torch.device("cpu"), mode)
    with pytest.raises(ConfigError, match="handler 'decode' must be one of"):
        ObjectDetectionService(Path("."), {"handler": {"decode": "nvjpeg"}})
    assert decode_mode("auto", torch.device("cpu")) == "cpu" and decode_mode("gpu", torch.device("cpu")) == "gpu"
    service = ObjectDetectionService(Path("."), {"handler": {"decode": "auto"}})
    try:
        assert service.stages.decode == "cpu" and service.stages.lanes() == {}
    finally:
        service.close()


def test_detection_thresholds_checked_per_request():
    from tandem_serve.vision.stages import NmsStage

    nms = NmsStage(NmsConfig())
    assert nms.thresholds() == (0.25, 0.45, 300)
    with pytest.raises(InvalidInputError, match="iou_threshold"):
        nms.thresholds(iou=0)
