"""Image decoding and letterboxing: encoded bytes -> square uint8 network input.

Decoder: Pillow (libjpeg-turbo inside its wheels; every PNG mode). For JPEGs much larger than the
target, `Image.draft` lets libjpeg-turbo decode at 1/2, 1/4 or 1/8 scale in the DCT domain, which
is far cheaper than decoding full size and resizing. Pixels stay uint8 (3 x S x S): 4x fewer bytes
than fp32 cross to the GPU, where the detector normalises them.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from tandem_serve.errors import InvalidInputError

PAD_VALUE = 114  # YOLOv5's grey
DEFAULT_MAX_PIXELS = 50_000_000  # documented limit: about 8000 x 6000


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


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to RGB (possibly reduced by draft) and the original size; InvalidInputError if unusable."""
    if len(data) == 0:
        raise InvalidInputError("IMAGE is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInputError(f"image is {width}x{height}, above the limit of {max_pixels} pixels")
            if target and image.format == "JPEG":
                image.draft("RGB", (target, target))  # DCT-domain downscale, never below target
            image.load()
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"IMAGE is not a decodable image ({type(exc).__name__}: {exc})") from None
    if width < 2 or height < 2:
        raise InvalidInputError(f"image is {width}x{height}; at least 2x2 pixels are needed")
    return _to_rgb(image), (width, height)


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
    width, height = original_size
    scale = min(size / width, size / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_w, new_h), Image.BILINEAR) if image.size != (new_w, new_h) else image
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = np.asarray(resized)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)), Letterbox(scale, pad_x, pad_y, width, height)


def preprocess(data: bytes, size: int = 640, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, Letterbox]:
    """Encoded image bytes -> (uint8 [3, size, size], Letterbox)."""
    image, original_size = decode_image(data, max_pixels, target=size)
    return letterbox(image, original_size, size)
