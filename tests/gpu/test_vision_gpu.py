"""GPU tier for detection: the detector as a KIND_GPU instance; accuracy per precision (recorded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.stage_config import DetectorConfig
from tandem_serve.vision.detector import DetectStage
from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.nms import postprocess
from tandem_serve.vision.shapes import encode_scene, generate_scene

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_detector_is_a_gpu_instance(triton):
    log = triton.log_path.read_text()
    assert "TRITONBACKEND_ModelInstanceInitialize: detector_0_0 (GPU device 0)" in log
    assert "detector on cuda:0" in log
    for name in ("image_preprocess", "nms"):
        assert f"TRITONBACKEND_ModelInstanceInitialize: {name}_0_0 (CPU device 0)" in log


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_detector_accuracy_per_precision(results, precision):
    stage = DetectStage(DetectorConfig(precision=precision), "cuda:0")
    rng = np.random.default_rng(4321)
    counts = MatchCounts()
    for _ in range(100):
        scene = generate_scene(rng)
        pixels, box = preprocess(encode_scene(scene, rng))
        rows = stage([torch.from_numpy(pixels)[None]])[0][0].cpu().numpy()  # CANDIDATES stay on the GPU
        found = postprocess(rows, box, 0.25, 0.45, 300)
        counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
    results[f"detector_{precision}"] = {"precision": counts.precision, "recall": counts.recall,
                                        "tp": counts.tp, "fp": counts.fp, "fn": counts.fn}
    assert counts.precision >= 0.9 and counts.recall >= 0.9, counts


def test_candidates_reach_nms_as_cuda_tensors(triton):
    """The detector's GPU output goes to nms through CUDA IPC (FORCE_CPU_ONLY_INPUT_TENSORS off), not via the host."""
    from tandem_serve.client import ObjectDetectionClient

    rng = np.random.default_rng(3)
    with ObjectDetectionClient(triton.grpc_url) as client:
        assert len(client.detect(encode_scene(generate_scene(rng), rng)).boxes) >= 1
    assert "nms: CANDIDATES arrive on cuda:0" in triton.log_path.read_text()
