"""Decoding every kind of input image, letterboxing, and rejecting unusable bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tandem_serve.errors import InvalidInputError
from tandem_serve.vision.letterbox import PAD_VALUE, Letterbox, decode_image, letterbox, preprocess


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "I;16", "CMYK", "RGB", "1"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new("RGB", (64, 48), (200, 30, 60)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    pixels, box = preprocess(encoded(image, fmt), 64)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == np.uint8
    assert (box.width, box.height) == (64, 48)


def test_transparent_pixels_composite_on_pad_grey():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgb, _ = decode_image(encoded(image))
    assert np.asarray(rgb)[0, 0].tolist() == [PAD_VALUE] * 3


def test_letterbox_geometry_and_box_round_trip():
    image = Image.new("RGB", (1280, 640), (0, 0, 0))
    pixels, box = letterbox(image, image.size, 640)
    assert box == Letterbox(0.5, 0, 160, 1280, 640)
    assert (pixels[:, :160] == PAD_VALUE).all() and (pixels[:, 160:480] == 0).all()
    boxes = np.array([[10, 20, 300, 400], [0, 0, 1280, 640]], np.float32)
    np.testing.assert_allclose(box.to_original(box.to_input(boxes)), boxes, atol=1e-3)


def test_large_jpeg_uses_draft_decoding_but_keeps_original_geometry():
    image = Image.new("RGB", (4000, 3000), (10, 200, 10))
    decoded, size = decode_image(encoded(image, "JPEG"), target=640)
    assert size == (4000, 3000) and decoded.size[0] < 4000
    _, box = preprocess(encoded(image, "JPEG"), 640)
    assert (box.width, box.height) == (4000, 3000) and abs(box.scale - 0.16) < 1e-6


@pytest.mark.parametrize("data,message", [
    (b"", "IMAGE is empty"),
    (b"\x89PNG\r\n\x1a\n garbage", "not a decodable image"),
    (b"just some text, not an image\n" * 10, "not a decodable image"),
])
def test_unusable_bytes_are_invalid_input(data, message):
    with pytest.raises(InvalidInputError, match=message):
        preprocess(data)


def test_truncated_jpeg_and_tiny_and_huge_images():
    jpeg = encoded(Image.new("RGB", (300, 300), (1, 2, 3)), "JPEG")
    with pytest.raises(InvalidInputError, match="not a decodable image"):
        preprocess(jpeg[: len(jpeg) // 2])
    with pytest.raises(InvalidInputError, match="1x1; at least 2x2"):
        preprocess(encoded(Image.new("RGB", (1, 1))))
    with pytest.raises(InvalidInputError, match="above the limit of 10000 pixels"):
        preprocess(encoded(Image.new("L", (200, 200))), max_pixels=10_000)
