"""Draw detections on an image and save it as PNG."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from tandem_serve.vision.nms import Detections
from tandem_serve.vision.shapes import CLASS_NAMES

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def class_name(index: int) -> str:
    return CLASS_NAMES[index] if 0 <= index < len(CLASS_NAMES) else f"class {index}"


def draw_detections(data: bytes, found: Detections, out: Path) -> Path:
    """Save the decoded image with labelled boxes to `out` (PNG)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for box, score, cls in zip(found.boxes, found.scores, found.classes):
        colour = COLOURS[int(cls) % len(COLOURS)]
        draw.rectangle(box.tolist(), outline=colour, width=3)
        label = f"{class_name(int(cls))} {score:.2f}"
        x, y = float(box[0]), max(0.0, float(box[1]) - 12)
        draw.rectangle(draw.textbbox((x, y), label), fill=colour)
        draw.text((x, y), label, fill=(255, 255, 255))
    out = Path(out)
    image.save(out, format="PNG")
    return out
