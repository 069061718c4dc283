"""Models users bring, served by a real Triton on the GPU (issue 19): one repository from `export_repository` with a
user's sentence-transformers model (XLM-R, CLS pooling, a Dense layer, Normalize) and a YOLOv8-style detector from
safetensors, and the same detector as ONNX on onnxruntime's CUDA provider in the stub; the shipped configs' KIND_AUTO
puts the encoders and the detector on the GPU. The embeddings are checked against sentence-transformers in fp32 on
the CPU (the split ensemble's encoder in fp32, the fused one in fp16 with CUDA graphs), the detections against the
same stages run in this process on the GPU.

Needs the Triton wheels (tests/gpu/run_h200.sh custom-triton; the ONNX test: custom-onnx); the tokenizer files come
from $TANDEM_TOKENIZER_DIR (else the shipped model's), so the shipped model is not needed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem_serve.clients.triton import ObjectDetectionClient, TextEmbeddingClient
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.triton.repository import export_repository
from tandem_serve.vision.nms import Detections, iou_one_to_many
from tests.detector_files import in_process, yolov8_files
from tests.helpers import centred_cosines, cosines, mixed_texts
from tests.sentence_models import architecture_dir, saved_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
st = pytest.importorskip("sentence_transformers")
TEXTS = mixed_texts(30, seed=41) + ["a", "Ça a été une journée très réussie à Zürich.", "東京は日本の首都です。"]
CONF, MAX_DET = 0.5, 40


def _set_parameter(model_dir: Path, key: str, value: str) -> None:
    config = read_config(model_dir / "config.pbtxt")
    config.parameters[key].string_value = value
    write_config(config, model_dir / "config.pbtxt")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory) -> dict:
    """What a user brings: a sentence-transformers directory and the detector's weights (with the test images)."""
    tmp = tmp_path_factory.mktemp("user-files")
    tokenizer_dir = Path(os.environ.get("TANDEM_TOKENIZER_DIR") or SentenceModelFiles.load().root)
    encoder = architecture_dir("xlm-roberta", tmp / "encoder", tokenizer_dir, roberta_positions=514)
    model = saved_model(encoder, tmp / "mine", "cls", ((48, torch.nn.GELU()),), True)
    encoded, weights = yolov8_files(tmp)
    return {"model": model, "weights": weights, "encoded": encoded}


@pytest.fixture(scope="module")
def custom(user_files, tmp_path_factory):
    """The repository exported from the user's files and one Triton serving it for the module."""
    tmp = tmp_path_factory.mktemp("custom-triton")
    repo = tmp / "repo"
    export_repository(repo, model_dir=user_files["model"], weights=user_files["weights"], head_format="yolov8")
    _set_parameter(repo / "encoder_fused", "precision", "fp16")  # encoder stays fp32 (the split ensemble)
    server = EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp / "ws", startup_timeout_s=300))
    server.start()
    try:
        yield {**user_files, "server": server}
    finally:
        server.stop()


def test_the_users_models_are_gpu_instances(custom):
    log = custom["server"].log_path.read_text()
    for name in ("encoder", "encoder_fused", "detector"):
        assert f"TRITONBACKEND_ModelInstanceInitialize: {name}_0_0 (GPU device 0)" in log, name
    for name in ("tokenizer", "token_embedding", "image_preprocess", "nms"):
        assert f"TRITONBACKEND_ModelInstanceInitialize: {name}_0_0 (CPU device 0)" in log, name
    assert "detector: CUDA graphs for batches" in log


@pytest.mark.parametrize("ensemble,precision", [("text_embedding", "fp32"), ("text_embedding_fused", "fp16")])
def test_the_users_text_model_served_on_the_gpu_matches_sentence_transformers(custom, results, ensemble, precision):
    want = st.SentenceTransformer(str(custom["model"]), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with TextEmbeddingClient(custom["server"].grpc_url, model=ensemble) as client:
        got = np.concatenate([client.embed(TEXTS[:1]), client.embed(TEXTS[1:6]), client.embed(TEXTS[6:])]
                             + [client.embed([text]) for text in TEXTS[:3]])
    want = np.concatenate([want, want[:3]])
    assert got.shape == want.shape == (len(TEXTS) + 3, 48)
    cosine, centred = cosines(got, want).min(), centred_cosines(got, want).min()
    results[f"custom_triton_{ensemble}_{precision}_min_cosine"] = float(cosine)
    results[f"custom_triton_{ensemble}_{precision}_min_centred_cosine"] = float(centred)
    # the split ensemble hands HIDDEN on in fp16 (its config's choice), the fused encoder runs in fp16 throughout
    assert cosine >= (0.9999 if precision == "fp32" else 0.999), cosine
    assert centred >= (0.99 if precision == "fp32" else 0.98), centred
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-3 if precision == "fp32" else 1e-2)


def _reference(weights: Path, encoded: list[bytes]) -> list[Detections]:
    """The same stages run in this process on cuda:0 in fp32, one image per batch as the served requests come: the
    reference (on the CPU instead, TF32 against fp32 flips a few near-tied boxes in NMS: 0.96-0.97 matched)."""
    return in_process(DetectorConfig(weights=str(weights), head_format="yolov8"), encoded, CONF, MAX_DET, "cuda:0", 1)


def _matched(a: Detections, b: Detections, margin: float) -> tuple[int, int]:
    """(found, of): `a`'s boxes scoring `margin` above the threshold found in `b` with the same class, IoU >= 0.9
    and a score within 2e-2: the GPU's convolutions run in TF32 (torch's cuDNN default, onnxruntime's CUDA provider's
    too), a 10-bit mantissa as fp16's (bench/detector_forms.py), and random weights leave many boxes near-tied; boxes
    near the threshold may flip."""
    found = of = 0
    for box, score, cls in zip(a.boxes, a.scores, a.classes):
        if score < CONF + margin:
            continue
        of += 1
        if len(b.boxes):
            iou = iou_one_to_many(box.astype(np.float64), b.boxes.astype(np.float64))
            found += bool(((iou >= 0.9) & (b.classes == cls) & (np.abs(b.scores - score) <= 2e-2)).any())
    return found, of


def _agreement(served: list[Detections], want: list[Detections]) -> tuple[float, float]:
    """(recall, precision) of the served boxes against the in-process ones, by _matched; as many boxes per image
    within 10 %."""
    totals = np.zeros(4, int)
    for got, expected in zip(served, want):
        assert abs(len(got.boxes) - len(expected.boxes)) <= max(2, len(expected.boxes) // 10)
        totals += (*_matched(expected, got, 0.02), *_matched(got, expected, 0.02))
    return totals[0] / totals[1], totals[2] / totals[3]


def test_the_users_detector_served_on_the_gpu_finds_the_in_process_boxes(custom, results):
    encoded = custom["encoded"]
    want = _reference(custom["weights"], encoded)
    assert min(len(w.boxes) for w in want) >= 1 and sum(len(w.boxes) for w in want) >= 100
    recall, precision = _agreement(_served(custom["server"], encoded), want)
    results["custom_triton_yolov8_matched_recall"] = recall
    results["custom_triton_yolov8_matched_precision"] = precision
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)

def _served(server: EmbeddedTriton, encoded: list[bytes]) -> list[Detections]:
    with ObjectDetectionClient(server.grpc_url) as client:
        return [client.detect(data, conf_threshold=CONF, max_det=MAX_DET) for data in encoded]


def test_the_users_detector_as_onnx_is_served_on_the_gpu_by_onnxruntimes_cuda_provider(user_files, tmp_path, results):
    """The same weights exported to ONNX (dynamic batch), served by onnxruntime-gpu inside the detector's stub on
    the GPU instance (tests/gpu/run_h200.sh custom-onnx puts it on the stubs' path)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime-gpu is carried by run_h200.sh custom-onnx only")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDA provider here: {ort.get_available_providers()}")
    from tandem_serve.vision.detector import load_detector
    from tandem_serve.vision.export import export_network

    config = DetectorConfig(weights=str(user_files["weights"]), head_format="yolov8")
    onnx = export_network(load_detector(config, torch.device("cpu")), tmp_path / "v8n.onnx", 640, max_batch=16)
    repo = tmp_path / "repo"
    export_repository(repo, weights=onnx, head_format="yolov8")
    for name in ("tokenizer", "token_embedding", "encoder", "encoder_fused", "text_embedding", "text_embedding_fused"):
        shutil.rmtree(repo / name)
    encoded = user_files["encoded"]
    with EmbeddedTriton(TritonOptions(model_repositories=[repo], workspace=tmp_path / "ws",
                                      startup_timeout_s=300)) as server:
        served = _served(server, encoded)
        log = server.log_path.read_text()
    assert "TRITONBACKEND_ModelInstanceInitialize: detector_0_0 (GPU device 0)" in log
    assert "ONNX detector v8n.onnx on CUDAExecutionProvider" in log
    # served as the same ONNX file runs in this process; against the torch network, onnxruntime's own convolution
    # algorithms (TF32) move the near-tied boxes of random weights further: recorded, bounded loosely
    recall, precision = _agreement(served, _reference(onnx, encoded))
    torch_recall, torch_precision = _agreement(served, _reference(user_files["weights"], encoded))
    results["custom_triton_yolov8_onnx_matched_recall"] = recall
    results["custom_triton_yolov8_onnx_matched_precision"] = precision
    results["custom_triton_yolov8_onnx_vs_torch_matched"] = [torch_recall, torch_precision]
    assert recall >= 0.98 and precision >= 0.98, (recall, precision)
    assert torch_recall >= 0.9 and torch_precision >= 0.9, (torch_recall, torch_precision)
