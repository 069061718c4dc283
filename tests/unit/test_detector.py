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


def test_a_torch_export_program_serves_the_candidates_of_its_network(tmp_path, pixels):
    """The library's YOLOv5 exported with torch.export (dynamic batch) and loaded from its .pt2 finds exactly what
    the same weights find as a state dict; an archive that is not a program is refused by name."""
    network = YoloV5(YoloSpec.of_size("n", 3)).eval()
    torch.save(network.state_dict(), tmp_path / "n.pt")
    batch = torch.export.Dim("batch", min=1, max=16)
    size = pixels.shape[-1]  # the served image size is fixed by the configs; only the batch varies
    program = torch.export.export(network, (torch.zeros(2, 3, size, size, dtype=torch.uint8),),
                                  dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, tmp_path / "n.pt2")
    images = torch.cat([pixels, torch.full_like(pixels, 114), pixels.flip(-1)])
    exported = DetectStage(DetectorConfig(weights=str(tmp_path / "n.pt2"), prefilter_conf=0.001))
    reference = DetectStage(DetectorConfig(weights=str(tmp_path / "n.pt"), size="n", num_classes=3, prefilter_conf=0.001))
    got, want = exported([images]), reference([images])
    assert got[0].shape == want[0].shape and want[0].shape[1] > 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)
    (tmp_path / "bad.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ModelFilesError, match="bad.pt2 is not a torch.export program"):
        load_detector(DetectorConfig(weights=str(tmp_path / "bad.pt2")), CPU)
