"""Detectors users bring, served by a real Triton (issue 19): the shipped YOLOv5 exported to ONNX with `tandem detector
export` keeps its accuracy and its boxes; the library's anchor-free YOLOv8 exported with torch.export, profiled and
planned, and served with `head_format yolov8` answers what the same weights answer in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tandem_serve.clients.triton import ObjectDetectionClient
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tests.detector_files import assert_same_detections, in_process, yolov8_files

pytest.importorskip("onnxruntime")
TANDEM = [sys.executable, "-m", "tandem_serve.cli"]
TEXT_MODELS = ("tokenizer", "token_embedding", "encoder", "encoder_fused", "text_embedding", "text_embedding_fused")


def _tandem(*args: str) -> str:
    done = subprocess.run([*TANDEM, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _repository(tmp_path: Path, weights: Path, head_format: str) -> Path:
    """`tandem repository export` with the detector's weights and head format, without the text models."""
    repo = tmp_path / "repo"
    _tandem("repository", "export", repo, "--weights", weights, "--head-format", head_format)
    for name in TEXT_MODELS:
        shutil.rmtree(repo / name, ignore_errors=True)
    return repo


def test_the_shipped_detector_exported_to_onnx_serves_its_accuracy_and_boxes(tmp_path):
    onnx = tmp_path / "shapes.onnx"
    assert "head_format=yolov5" in _tandem("detector", "export", onnx, "--max-batch", "16")
    rng = np.random.default_rng(919)
    scenes = [generate_scene(rng) for _ in range(24)]
    encoded = [encode_scene(scene, rng) for scene in scenes]
    want = in_process(DetectorConfig(), encoded, conf=0.25, max_det=300)
    repo = _repository(tmp_path, onnx, "yolov5")
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws")) as server:
        with ObjectDetectionClient(server.grpc_url) as client:
            served = [client.detect(data) for data in encoded]
    counts = MatchCounts()
    for scene, got, expected in zip(scenes, served, want):
        counts.add(got.boxes, got.scores, got.classes, scene.boxes, scene.classes)
        assert_same_detections(got, expected)
    assert counts.precision >= 0.9 and counts.recall >= 0.9, counts


def test_an_anchor_free_yolov8_from_torch_export_is_profiled_planned_and_served_as_in_process(tmp_path):
    """`tandem profile --detector-weights`, `tandem plan`, and Triton serving the plan's repository, against the same
    weights in-process. Random weights leave every cell scoring alike (near-ties make NMS chaotic), so the
    BatchNorms take the test images' statistics first and the class biases are set to -1: then a few dozen cells
    per image score above 0.5, their scores 1e-4 or more apart."""
    import json

    encoded, weights = yolov8_files(tmp_path)
    program = tmp_path / "v8.pt2"
    _tandem("detector", "export", program, "--weights", weights, "--head-format", "yolov8", "--max-batch", "16")
    _tandem("profile", "--out", tmp_path / "profile.json", "--pipelines", "detection", "--devices", "cpu",
            "--batch-sizes", "1", "2", "--repeats", "1", "--no-serving-cost", "--detector-weights", program,
            "--head-format", "yolov8")
    profiled = json.loads((tmp_path / "profile.json").read_text())
    assert profiled["models"] == {"detector_weights": str(program.resolve()), "detector_head_format": "yolov8"}
    assert {s["stage"] for s in profiled["stages"]} >= {"image_preprocess", "detector", "nms"}
    _tandem("plan", tmp_path / "profile.json", "--out", tmp_path / "plan")
    repo = tmp_path / "plan" / "triton"
    want = in_process(DetectorConfig(weights=str(weights), head_format="yolov8"), encoded, conf=0.5, max_det=40)
    assert min(len(w.boxes) for w in want) >= 1 and sum(len(w.boxes) for w in want) >= 100
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws")) as server:
        with ObjectDetectionClient(server.grpc_url) as client:
            served = [client.detect(data, conf_threshold=0.5, max_det=40) for data in encoded]
    for got, expected in zip(served, want):
        assert_same_detections(got, expected)
