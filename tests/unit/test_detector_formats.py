"""Detectors users bring (issue 19): the library's anchor-free YOLOv8-style network, and networks exported to ONNX
(run by onnxruntime) and torch.export, served by the detector stage with the candidates of the in-process network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tandem_serve.errors import ConfigError, ModelFilesError
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.vision.detector import DetectStage, load_detector, own_precision_and_device
from tandem_serve.vision.export import export_network
from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tandem_serve.vision.yolov8 import REG_MAX, YoloV8, YoloV8Spec

CPU = torch.device("cpu")
SIZE = 320
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(21)
    scenes = [preprocess(encode_scene(generate_scene(rng), rng), SIZE)[0] for _ in range(3)]
    return torch.from_numpy(np.stack(scenes))


@pytest.fixture(scope="module")
def yolov8(tmp_path_factory):
    """A YOLOv8n of 3 classes with random weights (no bias prior: every cell scores, so candidates abound) saved
    as safetensors, and exported to ONNX (dynamic batch) and torch.export."""
    torch.manual_seed(8)
    network = YoloV8(YoloV8Spec.of_size("n", 3)).eval()
    directory = tmp_path_factory.mktemp("yolov8")
    weights = directory / "v8.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(weights),
              metadata={"size": "n", "num_classes": "3", "head_format": "yolov8"})
    return {"network": network, "safetensors": weights,
            "onnx": export_network(network, directory / "v8.onnx", SIZE, max_batch=8),
            "pt2": export_network(network, directory / "v8.pt2", SIZE, max_batch=8)}


def test_the_network_has_the_published_sizes_and_layout():
    """Parameter counts of the published YOLOv8 n / s at 80 classes (3.2 M, 11.2 M); [B, 4 + classes, N] out."""
    counts = {s: sum(p.numel() for p in YoloV8(YoloV8Spec.of_size(s, 80)).parameters()) for s in "ns"}
    assert 3.1e6 < counts["n"] < 3.2e6 and 11.1e6 < counts["s"] < 11.2e6, counts
    with torch.no_grad():
        out = YoloV8(YoloV8Spec.of_size("n", 5)).eval()(torch.zeros(2, 3, 256, 256, dtype=torch.uint8))
    assert out.shape == (2, 4 + 5, (256 // 8) ** 2 + (256 // 16) ** 2 + (256 // 32) ** 2)


def test_the_head_decodes_distances_from_cell_centres_as_a_loop_computes_them(yolov8, images):
    """The DFL decode against a per-cell, per-side numpy loop over the head's own logits."""
    network = yolov8["network"]
    logits: dict[tuple[int, str], np.ndarray] = {}

    def keep(level: int, kind: str):
        def hook(module, inputs, output) -> None:
            logits[(level, kind)] = output.detach().double().numpy()
        return hook

    hooks = [branch[-1].register_forward_hook(keep(level, kind))
             for kind, branches in (("box", network.head.cv2), ("cls", network.head.cv3))
             for level, branch in enumerate(branches)]
    with torch.no_grad():
        out = network(images[:1]).double().numpy()[0]
    for hook in hooks:
        hook.remove()
    column = 0
    for level, stride in enumerate((8, 16, 32)):
        box, cls = logits[(level, "box")][0], logits[(level, "cls")][0]
        ny, nx = box.shape[1:]
        for y in range(0, ny, 7):
            for x in range(0, nx, 5):
                sides = []
                for side in range(4):
                    bins = box[side * REG_MAX:(side + 1) * REG_MAX, y, x]
                    p = np.exp(bins - bins.max())
                    sides.append(float((p / p.sum() * np.arange(REG_MAX)).sum()))
                left, top, right, bottom = sides
                x1, y1 = (x + 0.5 - left) * stride, (y + 0.5 - top) * stride
                x2, y2 = (x + 0.5 + right) * stride, (y + 0.5 + bottom) * stride
                want = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, *(1 / (1 + np.exp(-cls[:, y, x])))]
                np.testing.assert_allclose(out[:, column + y * nx + x], want, rtol=1e-4, atol=1e-3)
        column += ny * nx
    assert column == out.shape[1]


def _matched(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each image's real rows: the same count, and in prediction order the same boxes, scores and classes."""
    assert got.shape[0] == want.shape[0]
    for g, w in zip(got, want):
        g, w = g[g[:, 4] >= 0], w[w[:, 4] >= 0]
        assert len(w) > 10 and len(g) == len(w)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("form", ["onnx", "pt2"])
def test_an_exported_yolov8_serves_the_candidates_of_its_network(yolov8, images, form):
    settings = dict(head_format="yolov8", prefilter_conf=0.4, max_candidates=8000)
    reference = DetectStage(DetectorConfig(weights=str(yolov8["safetensors"]), **settings))
    exported = DetectStage(DetectorConfig(weights=str(yolov8[form]), **settings))
    exported.capture(SIZE)
    batch = torch.cat([images, images.flip(-1)])
    _matched(exported([batch])[0], reference([batch])[0])


def test_the_shipped_yolov5_as_onnx_finds_what_the_shipped_weights_find(tmp_path, images):
    shipped = DetectStage(DetectorConfig(prefilter_conf=0.05))
    onnx = export_network(load_detector(DetectorConfig(), CPU), tmp_path / "shipped.onnx", SIZE, max_batch=4)
    served = DetectStage(DetectorConfig(weights=str(onnx), prefilter_conf=0.05))
    _matched(served([images])[0], shipped([images])[0])


def test_an_onnx_model_of_fixed_batch_and_float_input_is_served_in_chunks(tmp_path, images, yolov8):
    """What exporters of YOLO models often write: batch 1, float32 input in [0, 1]."""
    network = yolov8["network"]
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(network, (torch.zeros(1, 3, SIZE, SIZE),), str(path), input_names=["images"],
                      dynamo=True, external_data=False)
    settings = dict(head_format="yolov8", prefilter_conf=0.4, max_candidates=8000)
    fixed = DetectStage(DetectorConfig(weights=str(path), **settings))
    assert fixed.model.fixed_batch == 1 and fixed.model.input_dtype == torch.float32
    reference = DetectStage(DetectorConfig(weights=str(yolov8["safetensors"]), **settings))
    _matched(fixed([images])[0], reference([images])[0])
    with pytest.raises(ConfigError, match=r"exported for images of \[320, 320\], the pipeline sends 640x640"):
        fixed.capture(640)


def test_formats_that_do_not_fit_are_refused_by_name(tmp_path, yolov8):
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ModelFilesError, match="bad.onnx is not an ONNX model onnxruntime can run"):
        load_detector(DetectorConfig(weights=str(tmp_path / "bad.onnx")), CPU)
    with pytest.raises(ConfigError, match="holds a network with head_format 'yolov8'; the detector's head_format "
                                          "parameter is 'yolov5'"):
        load_detector(DetectorConfig(weights=str(yolov8["safetensors"])), CPU)
    torch.save(yolov8["network"].state_dict(), tmp_path / "v8.pt")
    with pytest.raises(ModelFilesError, match="does not fit a YOLOv8s with 3 classes"):
        load_detector(DetectorConfig(weights=str(tmp_path / "v8.pt"), head_format="yolov8", size="s", num_classes=3), CPU)
    with pytest.raises(ConfigError, match="comes as .pt2 or .onnx"):
        load_detector(DetectorConfig(weights=str(tmp_path / "v8.pt"), head_format="boxes-scores-classes", size="n",
                                     num_classes=3), CPU)
    assert isinstance(load_detector(DetectorConfig(weights=str(tmp_path / "v8.pt"), head_format="yolov8", size="n",
                                                   num_classes=3), CPU), YoloV8)
    with pytest.raises(ConfigError, match="chosen by the suffix"):
        export_network(yolov8["network"], tmp_path / "v8.tflite", SIZE)


def test_an_aotinductor_package_serves_the_candidates_of_its_network(tmp_path, yolov8, images):
    """Compiled ahead of time for the CPU (about a minute): the same candidates; refused on another device."""
    package = export_network(yolov8["network"], tmp_path / "v8-aoti.pt2", SIZE, max_batch=8, compile_for="cpu")
    settings = dict(head_format="yolov8", prefilter_conf=0.4, max_candidates=8000)
    compiled = DetectStage(DetectorConfig(weights=str(package), **settings))
    assert not isinstance(compiled.model, torch.nn.Module)
    # what `tandem profile` reads: fp32 only, on the CPU only
    assert own_precision_and_device(str(package)) == (True, "cpu")
    assert own_precision_and_device(str(yolov8["pt2"])) == (False, None)
    reference = DetectStage(DetectorConfig(weights=str(yolov8["safetensors"]), **settings))
    batch = torch.cat([images, images[:1]])
    _matched(compiled([batch])[0], reference([batch])[0])
    with pytest.raises(ConfigError, match=r"compiled by AOTInductor for cpu; the detector runs on cuda:0: compile it "
                                          r"there \(tandem detector export --compile cuda:0\)"):
        load_detector(DetectorConfig(weights=str(package), head_format="yolov8"), torch.device("cuda:0"))
    with pytest.raises(ConfigError, match="an AOTInductor package is a .pt2"):
        export_network(yolov8["network"], tmp_path / "v8.onnx", SIZE, compile_for="cpu")
