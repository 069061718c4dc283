"""Decode + letterbox on one core: the decoders and resizers available as wheels, against the plain decode.

    python bench/decode.py [--images 48] [--repeats 3] [--out bench/results/decode.json]

Rows: the plain full-size decode of each decoder (the floor), and decode + letterbox to 640 x 640 by each path,
HWC uint8 out (the layout change to CHW and the normalisation belong on the GPU). Each path's output is compared
with a reference letterbox computed in float from the full-size Pillow decode (antialiased bilinear, what the
detector was trained on): mean and 99.9th-percentile absolute difference in grey levels. Optional decoders
(simplejpeg, OpenCV) are skipped with a note where their wheels are missing. Single-threaded throughout
(torch, OpenCV), images from the benchmarks' JPEG mix (640x480 to 1920x1080, quality 90).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.timing import median_seconds  # noqa: E402
from tandem_serve.vision.letterbox import PAD_VALUE, preprocess  # noqa: E402
from tandem_serve.workloads import mixed_size_jpegs  # noqa: E402

logger = logging.getLogger("decode")
SIZE = 640


def _optional(name: str):
    try:
        return __import__(name)
    except ImportError:
        logger.warning("%s is not installed: its rows are skipped", name)
        return None


cv2 = _optional("cv2")
simplejpeg = _optional("simplejpeg")
if cv2 is not None:
    cv2.setNumThreads(1)


def _geometry(width: int, height: int) -> tuple[int, int, int, int]:
    scale = min(SIZE / width, SIZE / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return new_w, new_h, (SIZE - new_w) // 2, (SIZE - new_h) // 2


def _pad(resized: np.ndarray, new_w: int, new_h: int, pad_x: int, pad_y: int) -> np.ndarray:
    canvas = np.full((SIZE, SIZE, 3), PAD_VALUE, np.uint8)
    canvas[pad_y:pad_y + new_h, pad_x:pad_x + new_w] = resized
    return canvas


def reference(data: bytes) -> np.ndarray:
    """Full-size decode, antialiased bilinear resize in float (Pillow 'F' mode per channel), padded."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    new_w, new_h, pad_x, pad_y = _geometry(*image.size)
    channels = [np.asarray(c.convert("F").resize((new_w, new_h), Image.BILINEAR)) for c in image.split()]
    resized = np.stack(channels, axis=-1).round().clip(0, 255).astype(np.uint8)
    return _pad(resized, new_w, new_h, pad_x, pad_y)


# --- plain decodes (the floor) ---------------------------------------------------------------------------------

def pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def cv2_decode(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def simplejpeg_decode(data: bytes) -> np.ndarray:
    return simplejpeg.decode_jpeg(data, colorspace="RGB")


# --- decode + letterbox paths ----------------------------------------------------------------------------------

def pil_path(reducing_gap: float | None = None) -> Callable[[bytes], np.ndarray]:
    """Pillow: draft (DCT-domain downscale) + antialiased BILINEAR resize (with `reducing_gap`: an integer box
    reduce first, then a short bilinear) + pad (HWC); without it, the project's path before OpenCV."""
    def run(data: bytes) -> np.ndarray:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        image.draft("RGB", (SIZE, SIZE))
        image = image.convert("RGB")
        new_w, new_h, pad_x, pad_y = _geometry(width, height)
        resized = image.resize((new_w, new_h), Image.BILINEAR, reducing_gap=reducing_gap)
        return _pad(np.asarray(resized), new_w, new_h, pad_x, pad_y)
    return run


def _torch_resize(pixels: np.ndarray, new_w: int, new_h: int, antialias: bool) -> np.ndarray:
    tensor = torch.from_numpy(np.require(pixels, requirements=['C', 'W'])).permute(2, 0, 1).unsqueeze(0)  # channels-last
    out = torch.nn.functional.interpolate(tensor, size=(new_h, new_w), mode="bilinear", antialias=antialias,
                                          align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def pil_draft_torch(data: bytes) -> np.ndarray:
    """draft + torch's uint8 antialiased bilinear (AVX2 kernel, channels-last)."""
    image = Image.open(io.BytesIO(data))
    width, height = image.size
    image.draft("RGB", (SIZE, SIZE))
    new_w, new_h, pad_x, pad_y = _geometry(width, height)
    return _pad(_torch_resize(np.asarray(image.convert("RGB")), new_w, new_h, True), new_w, new_h, pad_x, pad_y)


def _cv2_reduced_flag(width: int, height: int) -> tuple[int, int]:
    """The largest IMREAD_REDUCED_COLOR_N that keeps the decode at or above the target size."""
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if max(width, height) / factor >= SIZE:
            return factor, flag
    return 1, cv2.IMREAD_COLOR


def cv2_path(interpolation: int) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as header:  # size without decoding
            width, height = header.size
        _, flag = _cv2_reduced_flag(width, height)
        pixels = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), flag), cv2.COLOR_BGR2RGB)
        new_w, new_h, pad_x, pad_y = _geometry(width, height)
        resized = cv2.resize(pixels, (new_w, new_h), interpolation=interpolation)
        return cv2.copyMakeBorder(resized, pad_y, SIZE - new_h - pad_y, pad_x, SIZE - new_w - pad_x,
                                  cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return run


def simplejpeg_path(resize: str, chw: bool = False) -> Callable[[bytes], np.ndarray]:
    def run(data: bytes) -> np.ndarray:
        out = _simplejpeg_hwc(data)
        return np.ascontiguousarray(out.transpose(2, 0, 1)).transpose(1, 2, 0) if chw else out

    def _simplejpeg_hwc(data: bytes) -> np.ndarray:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        new_w, new_h, pad_x, pad_y = _geometry(width, height)
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=new_w, min_height=new_h)
        if resize == "torch":
            resized = _torch_resize(pixels, new_w, new_h, True)
        elif resize == "torch-noaa":
            resized = _torch_resize(pixels, new_w, new_h, False)
        else:
            resized = cv2.resize(pixels, (new_w, new_h), interpolation=cv2.INTER_AREA if resize == "area"
                                 else cv2.INTER_LINEAR)
        return _pad(resized, new_w, new_h, pad_x, pad_y)
    return run


def median_ms(fn: Callable[[bytes], np.ndarray], images: list[bytes], repeats: int) -> float:
    """Median ms per image of `fn` over all `images`, after one warm-up pass."""
    return median_seconds(lambda: [fn(data) for data in images], "cpu", repeats) / len(images) * 1e3


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = mixed_size_jpegs(args.images, seed=3)
    references = [reference(d) for d in images]

    floors = {"pillow": pil_decode}
    paths: dict[str, Callable[[bytes], np.ndarray]] = {
        "tandem_serve preprocess (CHW, as served)": lambda d: preprocess(d, SIZE)[0].transpose(1, 2, 0),
        "pillow draft + BILINEAR (before)": pil_path(), "pillow draft + BILINEAR reducing_gap=2": pil_path(2.0),
        "pillow draft + torch bilinear antialias": pil_draft_torch}
    if cv2 is not None:
        floors["opencv"] = cv2_decode
        paths["opencv reduced + INTER_LINEAR"] = cv2_path(cv2.INTER_LINEAR)
        paths["opencv reduced + INTER_AREA"] = cv2_path(cv2.INTER_AREA)
    if simplejpeg is not None:
        floors["simplejpeg"] = simplejpeg_decode
        paths["simplejpeg scaled + torch bilinear antialias"] = simplejpeg_path("torch")
        paths["simplejpeg scaled + torch bilinear"] = simplejpeg_path("torch-noaa")
        paths["simplejpeg scaled + torch bilinear antialias, CHW"] = simplejpeg_path("torch", chw=True)
        if cv2 is not None:
            paths["simplejpeg scaled + opencv INTER_AREA"] = simplejpeg_path("area")
            paths["simplejpeg scaled + opencv INTER_LINEAR"] = simplejpeg_path("linear")
            paths["simplejpeg scaled + opencv INTER_LINEAR, CHW"] = simplejpeg_path("linear", chw=True)

    rows = [{"path": f"plain decode, {name} (full size)", "ms": median_ms(fn, images, args.repeats), "floor": True}
            for name, fn in floors.items()]
    floor = min(r["ms"] for r in rows)
    for name, fn in paths.items():
        diffs = np.concatenate([np.abs(fn(d).astype(np.int16) - r).ravel() for d, r in zip(images, references)])
        rows.append({"path": name, "ms": median_ms(fn, images, args.repeats), "floor": False,
                     "mean_abs_diff": float(diffs.mean()), "p999_abs_diff": float(np.percentile(diffs, 99.9))})
    for row in rows:
        row["vs_floor"] = row["ms"] / floor
    print(f"\n{len(images)} JPEGs (640x480..1920x1080, q90), one core; floor = fastest plain decode {floor:.2f} ms\n")
    print("| path | ms/image | x floor | mean abs diff | p99.9 abs diff |\n|---|---|---|---|---|")
    for row in rows:
        diff = (f"{row['mean_abs_diff']:.2f} | {row['p999_abs_diff']:.0f}" if not row["floor"] else "- | -")
        print(f"| {row['path']} | {row['ms']:.2f} | {row['vs_floor']:.2f} | {diff} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "images": len(images), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
