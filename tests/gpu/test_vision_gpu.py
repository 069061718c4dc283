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
    assert "detector: CUDA graphs for batches [1, 2, 3, 4, 6, 8, 12, 16] at 640 px captured" in log  # max_batch_size 16
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


def test_cuda_graphs_give_the_eager_detections():
    """Batches replayed from CUDA graphs (padded to a bucket with zero images) find what the eager network finds;
    a batch beyond the largest bucket runs eagerly."""
    graphed = DetectStage(DetectorConfig(cuda_graph_max_batch=8), "cuda:0")
    eager = DetectStage(DetectorConfig(cuda_graph_max_batch=0), "cuda:0")
    assert graphed.graphs is not None and eager.graphs is None
    rng = np.random.default_rng(99)
    prepared = [preprocess(encode_scene(generate_scene(rng), rng)) for _ in range(11)]
    pixels = torch.from_numpy(np.stack([p for p, _ in prepared]))
    for batch in (1, 3, 5, 8, 11):
        requests = [pixels[i : i + 1] for i in range(batch)]
        for got, want, (_, box) in zip(graphed(requests), eager(requests), prepared):
            a = postprocess(got[0].cpu().numpy(), box, 0.25, 0.45, 300)
            b = postprocess(want[0].cpu().numpy(), box, 0.25, 0.45, 300)
            assert len(a.boxes) == len(b.boxes) >= 1, batch
            np.testing.assert_allclose(a.boxes, b.boxes, atol=0.5)
            np.testing.assert_allclose(a.scores, b.scores, atol=2e-3)
            assert (a.classes == b.classes).all()
    assert sorted(b for b, _ in graphed.graphs.slots) == [1, 3, 6, 8]  # the buckets used; 11 ran eagerly


def test_candidates_reach_nms_through_the_host(triton):
    """The shipped detector copies its batch's candidates to the host once (output_on_device false): nms never
    receives CUDA tensors, so it needs no CUDA context of its own."""
    from tandem_serve.clients.triton import ObjectDetectionClient

    rng = np.random.default_rng(3)
    with ObjectDetectionClient(triton.grpc_url) as client:
        assert len(client.detect(encode_scene(generate_scene(rng), rng)).boxes) >= 1
    log = triton.log_path.read_text()
    assert "nms: CANDIDATES arrive on cpu" in log and "nms: CANDIDATES arrive on cuda" not in log
