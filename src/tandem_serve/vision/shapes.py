"""Synthetic detection scenes: solid circles, squares and upright triangles on noisy backgrounds.

Classes: 0 circle, 1 square (axis-aligned), 2 triangle (upright). 1 to 6 non-overlapping shapes
per image, 32 to 160 px wide, each a solid colour contrasting with the background; the
background is a random colour with noise or a gradient; widths 320 to 1280 at any aspect ratio;
saved as JPEG (quality 75-95) or PNG. Used to train the shipped detector, by the demo and tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle")
MIN_SIZE, MAX_SIZE = 32, 160


@dataclass(frozen=True)
class Scene:
    """An RGB image and its ground truth: boxes [n, 4] x1 y1 x2 y2 (pixels), classes [n]."""

    image: Image.Image
    boxes: np.ndarray
    classes: np.ndarray


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy or gradient background and its mean colour."""
    base = rng.uniform(0, 255, size=3)
    if rng.random() < 0.5:
        noise = rng.standard_normal((height, width, 3), dtype=np.float32)
        pixels = base.astype(np.float32) + noise * np.float32(rng.uniform(2, 20))
    else:
        other = rng.uniform(0, 255, size=3)
        t = np.linspace(0, 1, width if rng.random() < 0.5 else height)
        ramp = (base + (other - base) * t[:, None]).astype(np.float32)
        pixels = np.broadcast_to(ramp[None] if len(t) == width else ramp[:, None], (height, width, 3)).copy()
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(3)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return pixels, pixels.reshape(-1, 3).mean(axis=0)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    for _ in range(100):
        colour = rng.integers(0, 256, size=3)
        if np.linalg.norm(colour - background) > 120:
            return tuple(int(c) for c in colour)
    return tuple(int(c) for c in (255 - background))


def _overlaps(box: np.ndarray, placed: list[np.ndarray], margin: float = 4) -> bool:
    return any(box[0] < p[2] + margin and p[0] < box[2] + margin and box[1] < p[3] + margin and p[1] < box[3] + margin
               for p in placed)


def generate_scene(rng: np.random.Generator) -> Scene:
    """One random scene following the module's description."""
    width = int(rng.integers(320, 1281))
    height = int(np.clip(width * np.exp(rng.uniform(np.log(0.5), np.log(2.0))), 240, 1280))
    pixels, mean_colour = _background(rng, width, height)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    boxes, classes = [], []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(50):
            cls = int(rng.integers(0, 3))
            size = float(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            tall = size * np.sqrt(3) / 2 if cls == 2 else size
            x0 = float(rng.uniform(0, width - size))
            y0 = float(rng.uniform(0, height - tall))
            box = np.array([x0, y0, x0 + size, y0 + tall], dtype=np.float32)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        colour = _contrasting_colour(rng, mean_colour)
        if cls == 0:
            draw.ellipse(box.tolist(), fill=colour)
        elif cls == 1:
            draw.rectangle(box.tolist(), fill=colour)
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
        boxes.append(box)
        classes.append(cls)
    return Scene(image, np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int64))


def encode_scene(scene: Scene, rng: np.random.Generator) -> bytes:
    """The scene's image as JPEG (quality 75-95) or PNG bytes, chosen at random."""
    buffer = io.BytesIO()
    if rng.random() < 0.5:
        scene.image.save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
    else:
        scene.image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
