"""The request mixes the benchmarks and `tandem tune` send: texts of a stated length mix, JPEGs of mixed sizes."""

from __future__ import annotations

import io

import numpy as np

LENGTH_MIX = {4: 0.3, 16: 0.4, 48: 0.2, 160: 0.1}  # words per text: share of requests
IMAGE_SIZES = ((640, 480), (1280, 720), (1920, 1080), (800, 600))  # original sizes, cycled
WORDS = ("the model serves tokens on a fast accelerator while the host prepares the next batch of requests "
         "from shared memory queues").split()
OUTPUTS = {"text": ["embedding"], "detection": ["boxes", "scores", "classes"]}


def mixed_length_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts whose word counts follow LENGTH_MIX (about one token per word)."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice(list(LENGTH_MIX), size=count, p=list(LENGTH_MIX.values()))
    return [" ".join(rng.choice(WORDS, size=int(n))) for n in lengths]


def mixed_size_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """`count` synthetic scenes as JPEGs, resized to IMAGE_SIZES in turn."""
    from PIL import Image

    from tandem_serve.vision.shapes import generate_scene

    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        scene = generate_scene(rng).image.resize(IMAGE_SIZES[i % len(IMAGE_SIZES)], Image.BILINEAR)
        buffer = io.BytesIO()
        scene.save(buffer, format="JPEG", quality=quality)
        images.append(buffer.getvalue())
    return images


def pipeline_of(ensemble: str) -> str:
    """'text' or 'detection' for an ensemble name."""
    return "text" if ensemble.startswith("text") else "detection"


def triton_requests(pipeline: str, count: int, seed: int = 0) -> list[list[tuple[str, np.ndarray]]]:
    """Inputs of `count` one-item requests to a pipeline's ensemble, as (name, array) pairs."""
    if pipeline == "text":
        return [[("text", np.array([[t.encode("utf-8")]], dtype=object))] for t in mixed_length_texts(count, seed)]
    return [[("image", np.frombuffer(data, np.uint8)[None])] for data in mixed_size_jpegs(count, seed)]
