"""Image decoding and letterboxing: encoded bytes -> square uint8 network input.

JPEGs (RGB or grey, complete up to their EOI marker) go through OpenCV: `imdecode` with
IMREAD_REDUCED_COLOR_{2,4,8} decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg-turbo),
never below the target, and `resize(INTER_LINEAR)` does the rest; on one H200 core that is 1.13x the
fastest plain full-size decode, where Pillow's draft + antialiased resize was 3.6x (bench/decode.py). Every other
image (PNG modes, CMYK, 16-bit, truncated or odd files) goes through Pillow, which decides what is
decodable, with the same errors as before. The header is always read by Pillow first (no decode): size
limits and tiny images are refused before any pixel is decoded. Pixels stay uint8 (3 x S x S): 4x
fewer bytes than fp32 cross to the GPU, where the detector normalises them.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from tandem_serve.errors import InvalidInputError

PAD_VALUE = 114  # YOLOv5's grey
DEFAULT_MAX_PIXELS = 50_000_000  # documented limit: about 8000 x 6000
JPEG_MAGIC, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
# Stage instances and handler lanes are the parallelism: OpenCV's own threads would only contend with them.
cv2.setNumThreads(1)
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True)
class Letterbox:
    """How an original image maps into the square network input: input = original * scale + pad."""

    scale: float
    pad_x: float
    pad_y: float
    width: int
    height: int

    def as_array(self) -> np.ndarray:
        return np.array([self.scale, self.pad_x, self.pad_y, self.width, self.height], np.float32)

    @classmethod
    def from_array(cls, values: np.ndarray) -> "Letterbox":
        scale, pad_x, pad_y, width, height = (float(v) for v in np.asarray(values).reshape(-1)[:5])
        return cls(scale, pad_x, pad_y, int(width), int(height))

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map x1 y1 x2 y2 boxes from network-input pixels to original pixels, clipped to the image."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.height)
        return out

    def to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Map x1 y1 x2 y2 boxes from original pixels to network-input pixels."""
        out = boxes.astype(np.float32, copy=True) * self.scale
        out[:, [0, 2]] += self.pad_x
        out[:, [1, 3]] += self.pad_y
        return out


@dataclass(frozen=True)
class Header:
    """What Pillow reads from an image's header without decoding it; `jpeg`: a complete RGB or grey JPEG that the
    fast decoders (OpenCV here, nvJPEG in gpu_decode.py) may take."""

    width: int
    height: int
    jpeg: bool


@contextmanager
def _undecodable_as_invalid() -> Iterator[None]:
    """Pillow's failures (and decompression-bomb warnings) inside the block as the client's InvalidInputError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"IMAGE is not a decodable image ({type(exc).__name__}: {exc})") from None


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Size and format; InvalidInputError for empty, unreadable, tiny or oversized images."""
    if len(data) == 0:
        raise InvalidInputError("IMAGE is empty")
    with _undecodable_as_invalid(), Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        # a truncated file goes to Pillow, which refuses it (libjpeg's fast paths fill in grey and go on)
        jpeg = (image.format == "JPEG" and image.mode in ("RGB", "L") and data.startswith(JPEG_MAGIC)
                and data.rstrip(b"\0").endswith(JPEG_END))
    if width * height > max_pixels:
        raise InvalidInputError(f"image is {width}x{height}, above the limit of {max_pixels} pixels")
    if width < 2 or height < 2:
        raise InvalidInputError(f"image is {width}x{height}; at least 2x2 pixels are needed")
    return Header(width, height, jpeg)


def geometry(width: int, height: int, size: int) -> Letterbox:
    """Where an image of width x height lands in the size x size input (scale to fit, centred)."""
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    return Letterbox(scale, (size - new_w) // 2, (size - new_h) // 2, width, height)


def placement(box: Letterbox) -> tuple[int, int, int, int]:
    """(new_w, new_h, pad_x, pad_y) of a letterbox, as integers."""
    return (max(1, round(box.width * box.scale)), max(1, round(box.height * box.scale)), int(box.pad_x),
            int(box.pad_y))


def decode_jpeg_letterboxed(data: bytes, header: Header, size: int) -> tuple[np.ndarray, Letterbox] | None:
    """OpenCV's reduced-scale decode + INTER_LINEAR resize into a CHW canvas; None where OpenCV cannot decode it."""
    box = geometry(header.width, header.height, size)
    new_w, new_h, pad_x, pad_y = placement(box)
    # the strongest DCT-domain reduction that still decodes at least the placed size
    flag = next((f for factor, f in _REDUCED if header.width // factor >= new_w and header.height // factor >= new_h),
                cv2.IMREAD_COLOR)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)  # as Pillow: no EXIF turn
    if bgr is None or bgr.ndim != 3:
        return None
    if bgr.shape[:2] != (new_h, new_w):
        bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((3, size, size), PAD_VALUE, np.uint8)
    for channel in range(3):  # CHW and BGR -> RGB in the one copy into the canvas
        canvas[channel, pad_y:pad_y + new_h, pad_x:pad_x + new_w] = bgr[:, :, 2 - channel]
    return canvas, box


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None,
                 header: Header | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode with Pillow to RGB (possibly reduced by draft) and the original size; InvalidInputError if unusable.
    `header`: its `read_header` result, when the caller already has it."""
    header = header or read_header(data, max_pixels)  # refuses sizes before any pixel is decoded
    with _undecodable_as_invalid():
        image = Image.open(io.BytesIO(data))
        if target and image.format == "JPEG":
            image.draft("RGB", (target, target))  # DCT-domain downscale, never below target
        image.load()
    return _to_rgb(image), (header.width, header.height)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB from grayscale, palette, RGBA/LA (composited on the pad grey), CMYK or 16-bit images."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray((array / peak * 255).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (PAD_VALUE,) * 3)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image


def letterbox(image: Image.Image, original_size: tuple[int, int], size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect to fit `size` x `size`, pad with grey; return (uint8 [3, S, S], Letterbox)."""
    box = geometry(*original_size, size)
    new_w, new_h, pad_x, pad_y = placement(box)
    pixels = np.asarray(image)
    if image.size != (new_w, new_h):
        interpolation = cv2.INTER_AREA if image.size[0] > new_w else cv2.INTER_LINEAR  # no aliasing when shrinking
        pixels = cv2.resize(pixels, (new_w, new_h), interpolation=interpolation)
    canvas = np.full((3, size, size), PAD_VALUE, np.uint8)
    canvas[:, pad_y : pad_y + new_h, pad_x : pad_x + new_w] = pixels.transpose(2, 0, 1)
    return canvas, box


def preprocess(data: bytes, size: int = 640, max_pixels: int = DEFAULT_MAX_PIXELS,
               header: Header | None = None) -> tuple[np.ndarray, Letterbox]:
    """Encoded image bytes -> (uint8 [3, size, size], Letterbox): complete RGB/grey JPEGs through OpenCV, the rest
    (and anything OpenCV cannot decode) through Pillow. `header`: `read_header(data, max_pixels)` when already read."""
    header = header or read_header(data, max_pixels)
    if header.jpeg:
        fast = decode_jpeg_letterboxed(data, header, size)
        if fast is not None:
            return fast
    image, original_size = decode_image(data, max_pixels, target=size, header=header)
    return letterbox(image, original_size, size)
