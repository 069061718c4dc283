"""A YOLOv8-style detector as a user brings one: safetensors with its metadata, its random weights calibrated on the
test scenes (tandem_serve.workloads.calibrated_yolov8) so that boxes score apart instead of near-tied."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.torch import save_file

from tandem_serve.vision.letterbox import preprocess
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
