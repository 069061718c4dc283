"""`tandem demo`: start the embedded Triton, embed sentences over gRPC and HTTP, report."""

from __future__ import annotations

import logging
import unicodedata
from typing import Callable

import numpy as np

from pathlib import Path

from tandem_serve.clients.triton import ObjectDetectionClient, TextEmbeddingClient, triton_client
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.statistics import format_statistics, read_statistics

logger = logging.getLogger(__name__)

SENTENCES = (
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply today.",
    "Les marchés financiers ont fortement baissé aujourd'hui.",
    "今天股市大幅下跌。",
    "A cat sleeps on the warm windowsill. 🐈",
)
TEXT_STAGES = ("tokenizer", "token_embedding", "encoder", "text_embedding")
IMAGE_STAGES = ("image_preprocess", "detector", "nms", "object_detection")


def _fit(text: str, width: int) -> str:
    """Cut and pad `text` to `width` terminal columns (CJK characters take two)."""
    out, used = "", 0
    for char in text:
        w = 2 if unicodedata.east_asian_width(char) in "WF" else 1
        if used + w > width:
            break
        out, used = out + char, used + w
    return out + " " * (width - used)


def format_similarity(texts: tuple[str, ...], embeddings: np.ndarray) -> str:
    """Cosine-similarity matrix of unit-norm embeddings, rows labelled with the texts."""
    similarity = embeddings @ embeddings.T
    header = " " * 44 + "".join(f"{i:>7}" for i in range(len(texts)))
    rows = [header]
    for i, text in enumerate(texts):
        rows.append(_fit(f"{i} {text}", 44) + "".join(f"{v:>7.3f}" for v in similarity[i]))
    return "\n".join(rows)


def run_demo(options: TritonOptions | None = None, write: Callable[[str], None] = print,
             annotated: Path = Path("demo-detections.png")) -> None:
    """Run both demos end to end; `write` receives the report blocks."""
    with EmbeddedTriton(options) as server:
        with TextEmbeddingClient(server.grpc_url, "grpc") as grpc_client:
            by_grpc = grpc_client.embed(SENTENCES)
        with TextEmbeddingClient(server.http_url, "http") as http_client:
            by_http = http_client.embed(SENTENCES)
        agreement = float(np.min(np.sum(by_grpc * by_http, axis=1)))
        write(f"Embedded {len(SENTENCES)} sentences through 'text_embedding' over gRPC and HTTP "
              f"(dimension {by_grpc.shape[1]}; min cosine gRPC vs HTTP {agreement:.6f}).\n")
        write("Cosine similarity:\n" + format_similarity(SENTENCES, by_grpc) + "\n")
        write(_detection_demo(server, annotated) + "\n")
        client = triton_client(server.http_url, "http")
        stats = read_statistics(client, "http")
        client.close()
        order = TEXT_STAGES + IMAGE_STAGES
        stages = sorted((s for s in stats if s.model in order), key=lambda s: order.index(s.model))
        write("Per-stage statistics from Triton (means per request; ensembles end to end):\n" + format_statistics(stages))


def _detection_demo(server: EmbeddedTriton, annotated: Path) -> str:
    """Detect shapes in one generated scene; draw the boxes; report against the ground truth."""
    from tandem_serve.vision.draw import class_name, draw_detections
    from tandem_serve.vision.metrics import MatchCounts
    from tandem_serve.vision.shapes import encode_scene, generate_scene

    rng = np.random.default_rng(2026)
    scene = generate_scene(rng)
    data = encode_scene(scene, rng)
    with ObjectDetectionClient(server.grpc_url, "grpc") as client:
        found = client.detect(data)
    counts = MatchCounts()
    counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
    lines = [f"Detected {len(found.boxes)} shape(s) in a generated {scene.image.width}x{scene.image.height} image "
             f"holding {len(scene.boxes)} ({counts.tp} matched at IoU >= 0.5 with the right class):"]
    for box, score, cls in zip(found.boxes, found.scores, found.classes):
        lines.append(f"  {class_name(int(cls)):<10} {score:.3f}  [{box[0]:.0f}, {box[1]:.0f}, {box[2]:.0f}, {box[3]:.0f}]")
    lines.append(f"Annotated image: {draw_detections(data, found, annotated)}")
    return "\n".join(lines)
