"""Detector loading: shipped safetensors, a user's state dict, TorchScript; YOLOv5 sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.errors import ConfigError, InvalidInputError, ModelFilesError
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.vision.detector import DetectStage, load_detector
from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tandem_serve.vision.yolo import YoloSpec, YoloV5

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pixels():
    rng = np.random.default_rng(12)
    image, _ = preprocess(encode_scene(generate_scene(rng), rng), 320)
    return torch.from_numpy(image)[None]


def test_user_state_dict_and_torchscript_give_the_shipped_outputs(tmp_path, pixels):
    shipped = load_detector(DetectorConfig(), CPU)
    with torch.no_grad():
        expected = shipped(pixels)
    torch.save(shipped.state_dict(), tmp_path / "weights.pt")
    from_state = load_detector(DetectorConfig(weights=str(tmp_path / "weights.pt"), size="n", num_classes=3), CPU)
    scripted = torch.jit.trace(shipped, pixels)
    scripted.save(str(tmp_path / "detector.torchscript"))
    from_script = load_detector(DetectorConfig(weights=str(tmp_path / "detector.torchscript")), CPU)
    with torch.no_grad():
        torch.testing.assert_close(from_state(pixels), expected)
        torch.testing.assert_close(from_script(pixels), expected)


def test_state_dict_needs_size_and_class_count_and_must_fit(tmp_path):
    torch.save(YoloV5(YoloSpec.of_size("s", 3)).state_dict(), tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="set the detector parameters 'size' and 'num_classes'"):
        load_detector(DetectorConfig(weights=str(tmp_path / "s.pt")), CPU)
    with pytest.raises(ModelFilesError, match="does not fit a YOLOv5n with 3 classes"):
        load_detector(DetectorConfig(weights=str(tmp_path / "s.pt"), size="n", num_classes=3), CPU)
    model = load_detector(DetectorConfig(weights=str(tmp_path / "s.pt"), size="s", num_classes=3), CPU)
    assert sum(p.numel() for p in model.parameters()) > 6_000_000
    with pytest.raises(ModelFilesError, match="do not exist"):
        load_detector(DetectorConfig(weights=str(tmp_path / "missing.pt")), CPU)


def test_output_layout_and_candidate_padding(pixels):
    stage = DetectStage(DetectorConfig(prefilter_conf=0.2, max_candidates=5))
    rows = stage([pixels, torch.cat([pixels, torch.full_like(pixels, 114)])])
    assert [r.shape[0] for r in rows] == [1, 2]
    assert all(r.shape[1] <= 5 and r.shape[2] == 6 for r in rows)
    grey = rows[1][1]
    assert (grey[:, 4] == -1).all()  # nothing found on a grey image: padding rows only
    with pytest.raises(InvalidInputError, match="PIXELS must be uint8"):
        stage.check(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InvalidInputError, match="multiple of 32"):
        stage.check(torch.zeros(1, 3, 50, 50, dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(1, 3, 0, 0), (1, 3, 64, 32), (1, 1, 64, 64), (3, 64, 64), (1, 3, 48, 48)])
def test_pixels_of_an_impossible_shape_are_invalid_input(shape):
    with pytest.raises(InvalidInputError, match="PIXELS must be uint8"):
        DetectStage.check(torch.zeros(shape, dtype=torch.uint8))
    assert DetectStage.check(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 3, 64, 64)
