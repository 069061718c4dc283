"""Benchmark the two text-embedding placements through the embedded Triton (gRPC).

For `text_embedding` (token embedding on the CPU) and `text_embedding_fused` (on the encoder's
device): requests of one text at concurrency 1 and 16, and requests of 32 texts at concurrency 4.
Texts follow a stated length mix. Prints a table and writes JSON.

    python bench/text_pipeline.py --out results.json [--url HOST:PORT] [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from _common import machine
from tandem_serve.clients.triton import text_input
from tandem_serve.triton.launcher import EmbeddedTriton

logger = logging.getLogger("bench.text_pipeline")
MODELS = ("text_embedding", "text_embedding_fused")
# Words per text and their weights: mostly short queries and sentences, some paragraphs.
LENGTH_MIX = {4: 0.3, 16: 0.4, 48: 0.2, 160: 0.1}
SCENARIOS = ((1, 1), (1, 16), (32, 4))  # (texts per request, requests in flight)


def make_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = "the model serves tokens on a fast accelerator while the host prepares the next batch".split()
    lengths = rng.choice(list(LENGTH_MIX), size=count, p=list(LENGTH_MIX.values()))
    return [" ".join(rng.choice(words, size=int(n))) for n in lengths]


def run_scenario(url: str, model: str, batch: int, concurrency: int, requests: int, texts: list[str]) -> dict:
    """Send `requests` requests of `batch` texts with `concurrency` in flight; latency and throughput."""
    client = grpcclient.InferenceServerClient(url)
    window = threading.Semaphore(concurrency)
    done: queue.Queue = queue.Queue()
    latencies: list[float] = []

    def callback(start: float, result, error) -> None:
        done.put((time.perf_counter() - start, error))
        window.release()

    for i in range(min(8, requests)):  # warm-up
        client.infer(model, [text_input(texts[i : i + batch], "grpc")])
    begin = time.perf_counter()
    for i in range(requests):
        window.acquire()
        chunk = [texts[(i * batch + j) % len(texts)] for j in range(batch)]
        start = time.perf_counter()
        client.async_infer(model, [text_input(chunk, "grpc")], callback=lambda result, error, s=start: callback(s, result, error))
    for _ in range(requests):
        latency, error = done.get(timeout=300)
        if error is not None:
            raise RuntimeError(f"{model}: {error}")
        latencies.append(latency * 1e3)
    elapsed = time.perf_counter() - begin
    client.close()
    latencies.sort()
    return {
        "model": model, "texts_per_request": batch, "concurrency": concurrency, "requests": requests,
        "texts_per_s": requests * batch / elapsed, "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="gRPC address of a running server (default: start the embedded one)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench_text_pipeline.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    texts = make_texts(512)
    server = None if args.url else EmbeddedTriton().start()
    url = args.url or server.grpc_url
    rows = []
    try:
        for batch, concurrency in SCENARIOS:
            for model in MODELS:
                logger.info("%s: %d text(s) per request, %d in flight ...", model, batch, concurrency)
                rows.append(run_scenario(url, model, batch, concurrency, args.requests, texts))
    finally:
        if server:
            server.stop()
    header = f"{'model':<22}{'texts/req':>10}{'in flight':>10}{'texts/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
    lines = [header] + [f"{r['model']:<22}{r['texts_per_request']:>10}{r['concurrency']:>10}"
                        f"{r['texts_per_s']:>10.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}" for r in rows]
    ratios = {}
    for batch, concurrency in SCENARIOS:
        pair = [r for r in rows if r["texts_per_request"] == batch and r["concurrency"] == concurrency]
        ratios[f"fused_over_cpu_embedding_throughput_b{batch}_c{concurrency}"] = pair[1]["texts_per_s"] / pair[0]["texts_per_s"]
    lines += [f"{k}: {v:.2f}" for k, v in ratios.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "length_mix_words": LENGTH_MIX,
                                    "rows": rows, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
