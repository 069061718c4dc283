"""A YOLOv8-style detector as a user brings one: safetensors with its metadata, its random weights calibrated on the
test scenes (tandem_serve.workloads.calibrated_yolov8) so that boxes score apart instead of near-tied; and the
reference served detections are held to: the same stages run in the test's process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tandem_serve.stage_config import DetectorConfig, ImagePreprocessConfig, NmsConfig
from tandem_serve.vision.detection_pipeline import DetectionStages, VisionStageConfigs
from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.nms import Detections, iou_one_to_many
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tandem_serve.workloads import calibrated_yolov8


def yolov8_files(directory: Path, count: int = 6, seed: int = 33) -> tuple[list[bytes], Path]:
    """(`count` encoded generated scenes, a YOLOv8n of 4 classes calibrated on them saved as v8n.safetensors)."""
    rng = np.random.default_rng(seed)
    encoded = [encode_scene(generate_scene(rng), rng) for _ in range(count)]
    network = calibrated_yolov8(np.stack([preprocess(data, 640)[0] for data in encoded]), num_classes=4, seed=19)
    weights = Path(directory) / "v8n.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights),
              metadata={"size": "n", "num_classes": "4", "head_format": "yolov8"})
    return encoded, weights


def in_process(detector: DetectorConfig, encoded: list[bytes], conf: float, max_det: int, device: str = "cpu",
               per_batch: int | None = None) -> list[Detections]:
    """The detection stages run in this process on `device`, `per_batch` images a batch (default: all in one)."""
    stages = DetectionStages(VisionStageConfigs(ImagePreprocessConfig(), detector, NmsConfig()), torch.device(device))
    step = per_batch or len(encoded)
    found: list[Detections] = []
    for start in range(0, len(encoded), step):
        prepared = [stages.prepare(stages.request(data, conf=conf, max_det=max_det))
                    for data in encoded[start:start + step]]
        found += stages.finish([t.cpu() for t in stages.infer(stages.collate(prepared))], prepared)
    return found


def assert_same_detections(got: Detections, want: Detections) -> None:
    """As many boxes, each wanted one found with the same class at IoU >= 0.99 and a score within 1e-3."""
    assert len(got.boxes) == len(want.boxes)
    for box, score, cls in zip(want.boxes, want.scores, want.classes):
        iou = iou_one_to_many(box.astype(np.float64), got.boxes.astype(np.float64))
        best = int(iou.argmax())
        assert iou[best] >= 0.99 and got.classes[best] == cls and abs(got.scores[best] - score) < 1e-3
