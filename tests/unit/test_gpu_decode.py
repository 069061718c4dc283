"""The GPU decoder's device-independent parts on the CPU: header checks, the letterbox geometry and pixels
against the CPU path, and the clear error where torchvision is missing. nvJPEG itself: tests/gpu/test_decode_gpu.py."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.vision.gpu_decode import GpuDecoder, letterbox_on_device
from tandem_serve.vision.letterbox import read_header
from tandem_serve.vision.letterbox import decode_image, letterbox
from tandem_serve.workloads import mixed_size_jpegs


def test_headers_name_the_format_and_refuse_what_the_cpu_path_refuses():
    jpeg = mixed_size_jpegs(1)[0]
    header = read_header(jpeg)
    assert header.jpeg and (header.width, header.height) == Image.open(io.BytesIO(jpeg)).size
    png = io.BytesIO()
    Image.new("RGB", (64, 48)).save(png, format="PNG")
    assert not read_header(png.getvalue()).jpeg
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48)).save(cmyk, format="JPEG")
    assert not read_header(cmyk.getvalue()).jpeg  # nvJPEG's RGB mode is not asked to convert CMYK
    assert not read_header(jpeg[: len(jpeg) // 2]).jpeg  # truncated: the CPU path's decoder judges it
    for data, message in ((b"", "empty"), (b"text, not an image" * 20, "not a decodable image")):
        with pytest.raises(InvalidInputError, match=message):
            read_header(data)
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, format="PNG")
    with pytest.raises(InvalidInputError, match="1x1"):
        read_header(tiny.getvalue())
    with pytest.raises(InvalidInputError, match="above the limit"):
        read_header(jpeg, max_pixels=100)


def test_the_device_letterbox_matches_the_cpu_geometry_and_pixels():
    for data in mixed_size_jpegs(4, seed=2):
        full = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        pixels, box = letterbox_on_device(torch.from_numpy(full).permute(2, 0, 1), 640)
        image, size = decode_image(data)  # full size: no draft, the same source pixels
        cpu_pixels, cpu_box = letterbox(image, size, 640)
        assert box == cpu_box and pixels.shape == (3, 640, 640) and pixels.dtype == torch.uint8
        diff = np.abs(pixels.numpy().astype(np.int16) - cpu_pixels)
        assert diff.mean() < 1.0, diff.mean()  # antialiased bilinear both: torch in float vs Pillow


def test_a_cpu_device_or_missing_torchvision_is_refused_clearly():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        GpuDecoder(640, "cpu")
    try:
        importable = importlib.util.find_spec("torchvision") is not None and __import__("torchvision") is not None
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails on import
        importable = False
    if importable:
        pytest.skip("torchvision imports here")
    with pytest.raises(ConfigError, match="torchvision"):
        GpuDecoder(640, "cuda:0")
