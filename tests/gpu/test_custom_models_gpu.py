"""Models users bring, on the GPU (issue 19): each encoder architecture with its own head served by the project's
encoder in fp16 with CUDA graphs and the fused token embedding, against sentence-transformers in fp32 on the CPU;
the anchor-free YOLOv8-style detector from safetensors (fp32 and fp16, CUDA graphs), torch.export (exported here,
moved to the GPU), AOTInductor (compiled here) and ONNX on onnxruntime's CUDA provider, each against the library network on the GPU.

Runs on a machine with torch, transformers, sentence-transformers and onnxscript only (tests/gpu/run_h200.sh custom,
with --noconftest): the tokenizer files come from $TANDEM_TOKENIZER_DIR (else the shipped model's), the detector
files are exported here."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tandem_serve.errors import ModelFilesError
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.stage_config import DetectorConfig, EncoderConfig
from tandem_serve.text.stages import EncoderStage
from tandem_serve.text.tokenize import TextTokenizer
from tandem_serve.vision.detector import DetectStage
from tandem_serve.vision.export import export_network
from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.shapes import encode_scene, generate_scene
from tandem_serve.vision.yolov8 import YoloV8, YoloV8Spec
from tests.gpu.figures import results  # noqa: F401 - the session's figures fixture
from tests.helpers import centred_cosines, cosines, mixed_texts
from tests.sentence_models import architecture_dir, saved_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
st = pytest.importorskip("sentence_transformers")
GPU = "cuda:0"
TEXTS = mixed_texts(40, seed=31) + ["a", "Ça a été une journée très réussie à Zürich.", "東京は日本の首都です。"]
SIZE = 320  # the detectors' image size


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    return Path(os.environ.get("TANDEM_TOKENIZER_DIR") or SentenceModelFiles.load().root)


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> dict[str, object]:
    """A YOLOv8n of 3 classes with seeded random weights (safetensors with its metadata), the same network exported
    to ONNX with a dynamic batch (uint8 input), and to ONNX of batch 1 with float input in [0, 1] (what YOLO exporters
    often write), for 320 px images."""
    directory = tmp_path_factory.mktemp("detectors")
    torch.manual_seed(8)
    network = YoloV8(YoloV8Spec.of_size("n", 3)).eval()
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(directory / "v8n.safetensors"),
              metadata={"size": "n", "num_classes": "3", "head_format": "yolov8"})
    files = {"safetensors": directory / "v8n.safetensors"}
    try:
        files["onnx"] = export_network(network, directory / "v8n.onnx", SIZE, max_batch=64)
        torch.onnx.export(network, (torch.zeros(1, 3, SIZE, SIZE),), str(directory / "fixed.onnx"),
                          input_names=["images"], dynamo=True, external_data=False)
        files["fixed_onnx"] = directory / "fixed.onnx"
    except Exception as exc:  # noqa: BLE001 - where the exporter is missing, the ONNX tests skip and say why
        files["onnx_error"] = exc
    return files


# architecture, pooling modes, Dense layers, Normalize: each pooling family and head shape at least once
HEADS = [
    ("bert", "cls", ((256, torch.nn.Tanh()),), False),
    ("bert", ("max", "mean"), (), False),
    ("roberta", "mean", (), True),
    ("xlm-roberta", "cls", ((64, torch.nn.GELU()),), True),
    ("distilbert", "weightedmean", (), False),
    ("distilbert", "mean_sqrt_len_tokens", (), True),
    ("roberta", "lasttoken", (), False),
    ("mpnet", "mean", (), True),
    ("mpnet", "cls", ((96, torch.nn.Tanh()),), False),
]


def _per_text(model: Path, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One request per text, INPUT_IDS + ATTENTION_MASK, as the tokenizer stage hands them on."""
    files = SentenceModelFiles.load(model)
    tokenizer = TextTokenizer(files.tokenizer_json, files.max_seq_length, 8, files.bert.pad_token_id,
                              prompt=files.prompt)
    return [(torch.from_numpy(b.input_ids), torch.from_numpy(b.attention_mask))
            for b in tokenizer.tokenize_groups([[t] for t in texts])]


@pytest.mark.parametrize("arch,modes,dense,normalize", HEADS, ids=[f"{h[0]}-{h[1]}" for h in HEADS])
def test_each_architecture_and_head_serves_sentence_transformers_embeddings_in_fp16(
        tokenizer_dir, tmp_path, results, arch, modes, dense, normalize):
    encoder_dir = architecture_dir(arch, tmp_path / "encoder", tokenizer_dir, roberta_positions=514)
    model = saved_model(encoder_dir, tmp_path / "model", modes, dense, normalize)
    want = st.SentenceTransformer(str(model), device="cpu").encode(TEXTS, convert_to_numpy=True, batch_size=64)
    graphed = EncoderStage(EncoderConfig(model_dir=str(model), precision="fp16", fuse_token_embedding=True), GPU)
    fp32 = EncoderStage(EncoderConfig(model_dir=str(model), fuse_token_embedding=True, cuda_graph_max_batch=0), GPU)
    assert graphed.graphs is not None and fp32.graphs is None
    tag = f"{arch}_{modes if isinstance(modes, str) else '+'.join(modes)}"
    for size in (1, 5, 33, len(TEXTS)):  # within the graph buckets, and beyond the largest (eager)
        requests = _per_text(model, TEXTS[:size])
        got = np.concatenate([e.numpy() for e in graphed(requests)])
        exact = np.concatenate([e.numpy() for e in fp32(requests)])
        assert got.shape == want[:size].shape and np.isfinite(got).all()
        half, full = cosines(got, want[:size]), cosines(exact, want[:size])
        assert half.min() >= 0.999, (size, half.min())
        assert full.min() >= 0.9999, (size, full.min())  # fp32 on the GPU: the bound
        if size > 1:  # what tells the texts apart, apart from the vector random encoders give them all
            centred_half = centred_cosines(got, want[:size]).min()
            assert centred_cosines(exact, want[:size]).min() >= 0.9999
            assert centred_half >= 0.98, (size, centred_half)
            results[f"custom_text_{tag}_batch{size}_min_centred_cosine_fp16"] = float(centred_half)
        np.testing.assert_allclose(np.linalg.norm(exact, axis=1), np.linalg.norm(want[:size], axis=1), rtol=1e-3)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want[:size], axis=1), rtol=1e-2)
        results[f"custom_text_{tag}_batch{size}_min_cosine_fp16"] = float(half.min())
        results[f"custom_text_{tag}_batch{size}_min_cosine_fp32"] = float(full.min())
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-2)


# ---- detection ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    rng = np.random.default_rng(23)
    return torch.from_numpy(np.stack([preprocess(encode_scene(generate_scene(rng), rng), SIZE)[0]
                                      for _ in range(6)]))


SETTINGS = dict(head_format="yolov8", prefilter_conf=0.4, max_candidates=8000)


def _stage(weights: Path, **changes) -> DetectStage:
    stage = DetectStage(DetectorConfig(weights=str(weights), **{**SETTINGS, **changes}), GPU)
    stage.capture(SIZE)
    return stage


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of x1 y1 x2 y2 boxes [n, 4] x [m, 4]."""
    lt, rb = torch.max(a[:, None, :2], b[None, :, :2]), torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def matched_fraction(got: torch.Tensor, want: torch.Tensor, iou: float, score: float) -> float:
    """Of the reference's real candidate rows, the fraction that have a served row of the same class with IoU >=
    `iou` and a score within `score` (both directions; the smaller); rows near the prefilter may flip."""
    fractions = []
    for a, b in ((got, want), (want, got)):
        for x, y in zip(a, b):
            x, y = x[x[:, 4] >= 0].double(), y[y[:, 4] >= 0].double()
            assert len(y) > 10
            ok = ((_iou(y[:, :4], x[:, :4]) >= iou) & (y[:, None, 5] == x[None, :, 5])
                  & ((y[:, None, 4] - x[None, :, 4]).abs() <= score))
            fractions.append(ok.any(1).double().mean().item())
    return min(fractions)


def test_yolov8_from_safetensors_in_fp16_with_graphs_keeps_the_fp32_candidates(detectors, images, results):
    weights = detectors["safetensors"]
    fp32 = _stage(weights, cuda_graph_max_batch=0)
    fp16 = _stage(weights, precision="fp16")
    fp32_graphs = _stage(weights)
    assert fp16.graphs is not None and fp32.graphs is None
    want = fp32([images])[0]
    exact = matched_fraction(fp32_graphs([images])[0], want, 0.99, 1e-3)
    half = matched_fraction(fp16([images])[0], want, 0.95, 2e-2)
    results["custom_yolov8_graphs_fp32_matched"], results["custom_yolov8_fp16_matched"] = exact, half
    assert exact >= 0.99 and half >= 0.95, (exact, half)


def test_yolov8_from_torch_export_moved_to_the_gpu_serves_the_network_candidates(detectors, images, tmp_path, results):
    """Exported on this machine (its torch writes what its torch reads), loaded through move_to_device_pass."""
    from tandem_serve.vision.detector import load_detector

    weights = detectors["safetensors"]
    network = load_detector(DetectorConfig(weights=str(weights), head_format="yolov8"), torch.device("cpu"))
    program = export_network(network, tmp_path / "v8n.pt2", SIZE, max_batch=64)
    exported, reference = _stage(program), _stage(weights)
    assert exported.graphs is not None  # an exported program's module is captured like the library network
    batch = torch.cat([images, images.flip(-1)])
    fraction = matched_fraction(exported([batch])[0], reference([batch])[0], 0.99, 1e-3)
    results["custom_yolov8_pt2_matched"] = fraction
    assert fraction >= 0.99


def test_yolov8_compiled_by_aotinductor_for_the_gpu_serves_the_network_candidates(detectors, images, tmp_path, results):
    """Compiled here for cuda:0 (C++ wrapper and Triton kernels; needs a C++ compiler at compile time)."""
    import shutil

    from tandem_serve.vision.detector import load_detector

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: AOTInductor cannot compile here")
    import signal
    import subprocess
    import sys

    network = load_detector(DetectorConfig(weights=str(detectors["safetensors"]), head_format="yolov8"),
                            torch.device("cpu"))
    began = time.perf_counter()
    package = export_network(network, tmp_path / "v8n-aoti.pt2", SIZE, max_batch=64, compile_for=GPU)
    results["custom_yolov8_aoti_compile_s"] = time.perf_counter() - began
    # torch's own loader first in a child: on the H200 with torch 2.11+cu130 it died of SIGSEGV (2026-12-03)
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])",
                            str(package)], capture_output=True, text=True, timeout=300)
    if probe.returncode == -signal.SIGSEGV:
        results["custom_yolov8_aoti_load"] = f"torch {torch.__version__}: aoti_load_package SIGSEGV"
        pytest.xfail(f"torch {torch.__version__}'s aoti_load_package crashes (SIGSEGV) on this CUDA package")
    assert probe.returncode == 0, probe.stderr[-2000:]
    compiled, reference = _stage(package), _stage(detectors["safetensors"])
    assert compiled.graphs is None and not isinstance(compiled.model, torch.nn.Module)
    batch = torch.cat([images, images.flip(-1)])
    results["custom_yolov8_aoti_matched"] = fraction = matched_fraction(compiled([batch])[0], reference([batch])[0],
                                                                        0.99, 1e-3)
    assert fraction >= 0.99
    results[f"custom_yolov8n_{SIZE}px_batch32_images_per_s_aoti_fp32"] = _images_per_s(compiled, images)


def _onnxruntime_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_yolov8_as_onnx_on_the_cuda_provider_serves_the_network_candidates(detectors, images, results):
    if "onnx_error" in detectors:
        pytest.skip(f"the ONNX exporter failed here: {detectors['onnx_error']}")
    onnx, fixed_onnx = detectors["onnx"], detectors["fixed_onnx"]
    if not _onnxruntime_cuda():
        pytest.importorskip("onnxruntime")
        with pytest.raises(ModelFilesError, match="has no CUDA provider.*install onnxruntime-gpu"):
            _stage(onnx)
        pytest.skip("onnxruntime here has no CUDA provider: the clear refusal checked, the serving path not run")
    reference = _stage(detectors["safetensors"])
    served, fixed = _stage(onnx), _stage(fixed_onnx)
    assert served.graphs is None and served.model.session.get_providers()[0] == "CUDAExecutionProvider"
    assert fixed.model.fixed_batch == 1 and fixed.model.input_dtype == torch.float32
    want = reference([images])[0]
    results["custom_yolov8_onnx_cuda_matched"] = dynamic = matched_fraction(served([images])[0], want, 0.99, 1e-3)
    results["custom_yolov8_onnx_cuda_fixed_matched"] = chunks = matched_fraction(fixed([images])[0], want, 0.99, 1e-3)
    assert dynamic >= 0.99 and chunks >= 0.99, (dynamic, chunks)
    # inputs already on the GPU are bound in place: the same candidates
    on_gpu = served([images.to(GPU)])[0]
    assert matched_fraction(on_gpu, want, 0.99, 1e-3) >= 0.99


def _images_per_s(stage: DetectStage, images: torch.Tensor, batch: int = 32, rounds: int = 20) -> float:
    """Images per second of `stage` on batches of `batch` images already on the GPU, after 3 warm-up batches."""
    timed = images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch].to(GPU)
    for _ in range(3):
        stage.filtered(timed)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(rounds):
        stage.filtered(timed)
    torch.cuda.synchronize()
    return rounds * batch / (time.perf_counter() - began)


def test_detector_forms_timed_on_the_gpu(detectors, images, results):
    """Images per second of each form on batches of 32 (recorded, not asserted: figures for the README)."""
    forms = {"safetensors_fp32_graphs": dict(), "safetensors_fp16_graphs": dict(precision="fp16"),
             "safetensors_fp32_eager": dict(cuda_graph_max_batch=0)}
    stages = {name: _stage(detectors["safetensors"], **changes) for name, changes in forms.items()}
    if _onnxruntime_cuda() and "onnx" in detectors:
        stages["onnx_cuda_fp32"] = _stage(detectors["onnx"])
    for name, stage in stages.items():
        results[f"custom_yolov8n_{SIZE}px_batch32_images_per_s_{name}"] = _images_per_s(stage, images)
