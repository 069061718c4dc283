"""`tandem demo`: start the embedded Triton, embed sentences over gRPC and HTTP, report."""

from __future__ import annotations

import logging
import unicodedata
from typing import Callable

import numpy as np

from tandem_serve.client import TextEmbeddingClient, triton_client
from tandem_serve.stats import format_statistics, read_statistics
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions

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


def run_demo(options: TritonOptions | None = None, write: Callable[[str], None] = print) -> None:
    """Run the text demo end to end; `write` receives the report blocks."""
    with EmbeddedTriton(options) as server:
        with TextEmbeddingClient(server.grpc_url, "grpc") as grpc_client:
            by_grpc = grpc_client.embed(SENTENCES)
        with TextEmbeddingClient(server.http_url, "http") as http_client:
            by_http = http_client.embed(SENTENCES)
        agreement = float(np.min(np.sum(by_grpc * by_http, axis=1)))
        write(f"Embedded {len(SENTENCES)} sentences through 'text_embedding' over gRPC and HTTP "
              f"(dimension {by_grpc.shape[1]}; min cosine gRPC vs HTTP {agreement:.6f}).\n")
        write("Cosine similarity:\n" + format_similarity(SENTENCES, by_grpc) + "\n")
        client = triton_client(server.http_url, "http")
        stages = [s for s in read_statistics(client, "http") if s.model in TEXT_STAGES]
        client.close()
        stages.sort(key=lambda s: TEXT_STAGES.index(s.model))
        write("Per-stage statistics from Triton (means per request):\n" + format_statistics(stages))
