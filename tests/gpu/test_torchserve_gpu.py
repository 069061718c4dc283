"""GPU tier for the TorchServe handlers' services (in-process: the GPU machine has no Java).

The pipelined schedule on the GPU (pinned coalesced copies, copy/compute streams, events) must
give the same answers as the reference and as the CPU.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tandem_serve.runtime.pipeline import MicroBatchPipeline, PipelineSettings
from tandem_serve.runtime.transfer import copy_to_host, stage_to_device
from tandem_serve.stage_config import DetectorConfig, ImagePreprocessConfig, NmsConfig
from tandem_serve.torchserve.services import ObjectDetectionService, TextEmbeddingService
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.helpers import EDGE_TEXTS, assert_cosines, mixed_texts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_staging_round_trip_keeps_dtypes_shapes_and_bytes():
    device = torch.device("cuda:0")
    tensors = [torch.arange(37, dtype=torch.int64).reshape(37, 1), torch.rand(3, 5, 7).half(),
               torch.zeros(0, 4), torch.tensor([True, False, True]), torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)]
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        on_device = stage_to_device(tensors, device)
        back = copy_to_host(on_device)
    stream.synchronize()
    for original, device_view, host in zip(tensors, on_device, back):
        assert device_view.is_cuda and device_view.dtype == original.dtype and device_view.shape == original.shape
        assert host.is_pinned() or host.numel() == 0
        assert torch.equal(host, original)


@pytest.mark.parametrize("pipelined", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_text_service_on_gpu_matches_reference(model_files, reference, results, pipelined, fused):
    config = {"handler": {"model_dir": str(model_files.root), "encoder": {"precision": "fp16", "fuse_token_embedding": fused},
                          "pipeline": {"micro_batch_size": 4, "pipelined": pipelined}}}
    service = TextEmbeddingService(model_files.root, config, gpu_id=0)
    try:
        assert service.device.type == "cuda"
        groups = [EDGE_TEXTS[:3], EDGE_TEXTS[3:], mixed_texts(9, seed=8), ["short"]]
        replies = service.handle([{"body": {"text": g}} for g in groups] + [{"body": {"text": 5}}])
    finally:
        service.close()
    assert [r.status for r in replies] == [200] * len(groups) + [400]
    worst = min(assert_cosines(np.asarray(json.loads(r.body)["embeddings"], np.float32), reference(g), bound=0.9995)
                for r, g in zip(replies, groups))
    results[f"torchserve_text_fp16_{'pipelined' if pipelined else 'sequential'}_{'fused' if fused else 'cpu_embedding'}_min_cosine"] = worst


def test_text_service_with_a_cpu_lane_matches_reference(model_files, reference, results):
    config = {"handler": {"model_dir": str(model_files.root), "encoder": {"precision": "fp16"},
                          "pipeline": {"micro_batch_size": 2, "cpu_lane_threads": 4}}}
    threads = torch.get_num_threads()
    service = TextEmbeddingService(model_files.root, config, gpu_id=0)
    try:
        groups = [EDGE_TEXTS[:3], EDGE_TEXTS[3:], mixed_texts(9, seed=8), ["short"], mixed_texts(20, seed=9)]
        for _ in range(3):
            replies = service.handle([{"body": {"text": g}} for g in groups] + [{"body": {"text": 5}}])
        lanes = service.pipeline.balancer.snapshot()
    finally:
        service.close()
        torch.set_num_threads(threads)
    assert [r.status for r in replies] == [200] * len(groups) + [400]
    for reply, texts in zip(replies, groups):
        assert_cosines(np.asarray(json.loads(reply.body)["embeddings"], np.float32), reference(texts), bound=0.9995)
    assert lanes["cuda:0"]["batches"] >= 1 and lanes["cpu"]["batches"] >= 1  # each device was measured
    assert lanes["cpu"]["ms_per_row"] > lanes["cuda:0"]["ms_per_row"]
    results["torchserve_text_cpu_lane_batches"] = lanes


def test_detection_service_on_gpu_matches_cpu(tmp_path, results):
    rng = np.random.default_rng(2024)
    requests = [{"body": encode_scene(generate_scene(rng), rng)} for _ in range(10)]
    requests.insert(3, {"body": b"not an image"})
    answers = {}
    for device in ("cpu", "auto"):
        config = {"handler": {"device": device, "decode": "cpu", "detector": {"precision": "fp32"},
                              "pipeline": {"micro_batch_size": 3}}}  # the same decoder: nvJPEG's test is below
        service = ObjectDetectionService(tmp_path, config, gpu_id=0)
        try:
            answers[service.device.type] = service.handle(requests)
        finally:
            service.close()
    boxes = 0
    for cpu, gpu in zip(answers["cpu"], answers["cuda"]):
        assert cpu.status == gpu.status
        if cpu.status == 200:
            a, b = json.loads(cpu.body), json.loads(gpu.body)
            assert a["classes"] == b["classes"]
            np.testing.assert_allclose(np.array(a["boxes"]).reshape(-1, 4), np.array(b["boxes"]).reshape(-1, 4), atol=0.05)
            boxes += len(a["boxes"])
    assert boxes > 0 and answers["cuda"][3].status == 400
    results["torchserve_detection_gpu_vs_cpu_boxes_compared"] = boxes


def test_pipeline_outputs_leave_the_gpu_once_per_micro_batch():
    """The device stage's outputs (candidate rows and counts) reach `finish` as pinned host tensors (one D2H each per
    micro-batch)."""
    from tandem_serve.vision.detection_pipeline import DetectionStages, VisionStageConfigs

    stages = DetectionStages(VisionStageConfigs(ImagePreprocessConfig(), DetectorConfig(), NmsConfig()), torch.device("cuda:0"))
    seen = []
    original = stages.finish

    def finish(outputs, prepared):
        seen.append([(t.device.type, t.is_pinned()) for t in outputs])
        return original(outputs, prepared)

    stages.finish = finish
    rng = np.random.default_rng(1)
    with MicroBatchPipeline(stages, "cuda:0", PipelineSettings(micro_batch_size=2)) as pipe:
        pipe.run([stages.request(encode_scene(generate_scene(rng), rng)) for _ in range(5)])
    assert seen == [[("cpu", True), ("cpu", True)]] * 3


@pytest.mark.parametrize("decode", ["gpu", "tandem"])
def test_detection_service_decoding_with_nvjpeg_matches_the_cpu_path(tmp_path, results, decode):
    """decode: gpu (nvJPEG for every micro-batch) and tandem (micro-batches routed between nvJPEG, two at a time, and the
    pool's CPU decoders) against decode: cpu on the same generated scenes (JPEGs and PNGs, which nvJPEG hands to the CPU):
    precision and recall >= 0.9 at IoU 0.5 on both paths, the two paths' boxes matching at IoU >= 0.9, and the same
    per-request 400s for bad images."""
    from tandem_serve.vision.metrics import MatchCounts
    from tandem_serve.vision.nms import iou_one_to_many

    rng = np.random.default_rng(77)
    scenes = [generate_scene(rng) for _ in range(48)]
    requests = [{"body": encode_scene(scene, rng)} for scene in scenes]
    jpeg = next(r["body"] for r in requests if r["body"][:2] == b"\xff\xd8")
    bad = {5: b"not an image", 11: jpeg[: len(jpeg) // 2], 17: b""}  # text, a truncated JPEG, empty
    for index, data in bad.items():
        requests[index] = {"body": data}
    answers, lanes = {}, {}
    for mode in ("cpu", decode):
        config = {"handler": {"decode": mode, "gpu_decode_threads": 2 if mode == "tandem" else 1,
                              "detector": {"precision": "fp32"}, "pipeline": {"micro_batch_size": 4, "cpu_threads": 4}}}
        service = ObjectDetectionService(tmp_path, config, gpu_id=0)
        try:
            assert service.stages.decode == mode
            for _ in range(3 if mode == "tandem" else 1):  # the tandem: both lanes measured, then routed by measurement
                answers[mode] = service.handle(requests)
            lanes[mode] = service.stages.lanes()
        finally:
            service.close()
    counts = {mode: MatchCounts() for mode in answers}
    matched = total = 0
    for index, (cpu, gpu) in enumerate(zip(answers["cpu"], answers[decode])):
        assert cpu.status == gpu.status, (index, cpu.body, gpu.body)
        if index in bad:
            messages = [re.sub(r" at 0x[0-9a-f]+", "", json.loads(r.body)["message"]) for r in (cpu, gpu)]  # Pillow's
            assert cpu.status == 400 and messages[0] == messages[1], messages  # message names a BytesIO's address
            continue
        found = {mode: json.loads(reply.body) for mode, reply in (("cpu", cpu), (decode, gpu))}
        for mode, body in found.items():
            boxes = np.array(body["boxes"], np.float64).reshape(-1, 4)
            counts[mode].add(boxes, np.array(body["scores"]), np.array(body["classes"]), scenes[index].boxes,
                             scenes[index].classes)
        theirs = np.array(found[decode]["boxes"], np.float64).reshape(-1, 4)
        for box in np.array(found["cpu"]["boxes"], np.float64).reshape(-1, 4):
            matched += int(len(theirs) > 0 and iou_one_to_many(box, theirs).max() >= 0.9)
            total += 1
    figures = {mode: {"precision": c.precision, "recall": c.recall} for mode, c in counts.items()}
    figures["boxes_matched_iou_0.9"] = matched / max(1, total)
    figures["lanes"] = lanes.get("tandem")
    results[f"torchserve_detection_decode_{decode}"] = figures
    for c in counts.values():
        assert c.precision >= 0.9 and c.recall >= 0.9, figures
    assert total > 0 and matched / total >= 0.95, figures
    if decode == "tandem":
        assert lanes["tandem"]["nvjpeg"]["batches"] >= 1 and lanes["tandem"]["cpu"]["batches"] >= 1, lanes  # each measured
