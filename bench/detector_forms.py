"""How far each form of a user's detector moves the network's raw output from torch fp32 on the CPU (issue 19).

    python bench/detector_forms.py [--size 640] [--batches 1 6] [--out bench/results/detector_forms.json]

A seeded random YOLOv8n (4 classes, BatchNorms calibrated on the images: workloads.calibrated_yolov8) on generated
scenes, letterboxed as image_preprocess does; its output [B, 4 + classes, N] (boxes in pixels, sigmoid scores)
from: torch on cuda:0 with TF32 convolutions (cuDNN's default) and without, and the same network exported to ONNX
(dynamic batch) on onnxruntime's CUDA provider with its default options and with use_tf32=0. Per form and batch:
the largest and the 99.9th-percentile absolute score difference and the largest box-coordinate difference
(pixels). Needs a GPU; the ONNX rows need onnxruntime-gpu.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.vision.export import export_network  # noqa: E402
from tandem_serve.vision.letterbox import preprocess  # noqa: E402
from tandem_serve.vision.shapes import encode_scene, generate_scene  # noqa: E402
from tandem_serve.workloads import calibrated_yolov8  # noqa: E402

logger = logging.getLogger("detector_forms")
DEVICE = torch.device("cuda:0")


def _torch_form(network: torch.nn.Module, tf32: bool):
    """The network on cuda:0, cuDNN's TF32 convolutions on or off."""
    gpu = network.to(DEVICE)

    def run(images: np.ndarray) -> np.ndarray:
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            with torch.no_grad():
                return gpu(torch.from_numpy(images).to(DEVICE)).float().cpu().numpy()
        finally:
            torch.backends.cudnn.allow_tf32 = previous
    return run


def _onnx_form(path: Path, options: dict):
    """The ONNX file on onnxruntime's CUDA provider with `options`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=[("CUDAExecutionProvider", options)])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime fell back to {session.get_providers()}")
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _difference(got: np.ndarray, want: np.ndarray) -> dict:
    scores = np.abs(got[:, 4:] - want[:, 4:])
    return {"boxes_scoring_over_0.5": int((want[:, 4:].max(1) > 0.5).sum()), "score_max": float(scores.max()),
            "score_p999": float(np.quantile(scores, 0.999)),
            "box_max_px": float(np.abs(got[:, :4] - want[:, :4]).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--out", type=Path, default=Path("bench/results/detector_forms.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rng = np.random.default_rng(33)
    scenes = [encode_scene(generate_scene(rng), rng) for _ in range(max(args.batches))]
    images = np.stack([preprocess(data, args.size)[0] for data in scenes])
    network = calibrated_yolov8(images)
    with torch.no_grad():
        reference = network(torch.from_numpy(images)).numpy()  # fp32 on the CPU
    forms = {"torch cuda tf32": _torch_form(network, True), "torch cuda fp32": _torch_form(network, False)}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx = export_network(network.cpu(), Path(tmp) / "v8n.onnx", args.size, max_batch=max(args.batches))
            forms["onnxruntime cuda default"] = _onnx_form(onnx, {})
            forms["onnxruntime cuda use_tf32=0"] = _onnx_form(onnx, {"use_tf32": "0"})
        except Exception as exc:  # noqa: BLE001 - no exporter or no onnxruntime-gpu: the torch rows alone
            logger.warning("ONNX forms left out: %s", exc)
        network.to(DEVICE)
        rows = []
        for name, run in forms.items():
            for batch in args.batches:
                rows.append({"form": name, "batch": batch, **_difference(run(images[:batch]), reference[:batch])})
    logger.info("%-28s %5s %11s %11s %10s", "form", "batch", "score max", "score p99.9", "box max px")
    for row in rows:
        logger.info("%-28s %5d %11.2e %11.2e %10.3f", row["form"], row["batch"], row["score_max"], row["score_p999"],
                    row["box_max_px"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "size": args.size, "reference": "torch fp32 on the CPU",
                                    "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
