"""Decoding every kind of input image, letterboxing, and rejecting unusable bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tandem_serve.errors import InvalidInputError
from tandem_serve.vision.letterbox import (
    PAD_VALUE,
    Letterbox,
    decode_image,
    decode_jpeg_letterboxed,
    geometry,
    letterbox,
    placement,
    preprocess,
    read_header,
)


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


def _float_reference(data: bytes, size: int = 640) -> np.ndarray:
    """Full-size decode, antialiased bilinear resize in float per channel, padded: CHW uint8."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    box = geometry(*image.size, size)
    new_w, new_h, pad_x, pad_y = placement(box)
    planes = [np.asarray(c.convert("F").resize((new_w, new_h), Image.BILINEAR)) for c in image.split()]
    canvas = np.full((3, size, size), PAD_VALUE, np.uint8)
    canvas[:, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = np.stack(planes).round().clip(0, 255).astype(np.uint8)
    return canvas


def test_jpegs_take_the_fast_path_and_stay_close_to_a_float_reference():
    from tandem_serve.workloads import mixed_size_jpegs

    for data in mixed_size_jpegs(8, seed=4):
        header = read_header(data)
        assert header.jpeg
        fast = decode_jpeg_letterboxed(data, header, 640)
        assert fast is not None
        pixels, box = preprocess(data, 640)
        np.testing.assert_array_equal(pixels, fast[0])  # preprocess took it
        image, size = decode_image(data, target=640)
        assert box == letterbox(image, size, 640)[1]  # the geometry of the Pillow path
        diff = np.abs(pixels.astype(np.int16) - _float_reference(data))
        # 1920x1080: a 1/2 DCT reduction, then 1.5x by INTER_LINEAR: mean 1.1 (bench/decode.py averages 0.23)
        assert diff.mean() < 1.5 and np.percentile(diff, 99.9) <= 16, (diff.mean(), np.percentile(diff, 99.9))


def test_exif_orientation_is_ignored_on_both_paths():
    image = Image.new("RGB", (400, 200), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 100, 200))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    pixels, box = preprocess(buffer.getvalue(), 640)
    assert (box.width, box.height) == (400, 200)
    left = pixels[:, 320, 60]  # row inside the image, x inside the blue strip (scale 1.6)
    assert left[2] > 150 and left[0] < 80, left


def test_grey_and_cmyk_jpegs_become_rgb():
    grey = encoded(Image.new("L", (300, 200), 77), "JPEG")
    pixels, _ = preprocess(grey, 64)
    assert read_header(grey).jpeg and (np.abs(pixels[:, 32, 32].astype(int) - 77) <= 2).all()
    cmyk = encoded(Image.new("CMYK", (300, 200), (0, 255, 255, 0)), "JPEG")
    assert not read_header(cmyk).jpeg  # Pillow converts it
    pixels, _ = preprocess(cmyk, 64)
    assert pixels[0, 32, 32] > 200 and pixels[1, 32, 32] < 60
