"""Wire vs system shared memory vs CUDA shared memory between a client and the embedded Triton.

Closed loop at concurrency 1 and 16 (one client per thread, each with its own regions) for
  object_detection  the ensemble, PNG images whose encoded size spans 64 KiB to 16 MiB
  detector          the GPU stage alone, uint8 PIXELS of 64 KiB to 64 MiB per request
Reports throughput and p50/p99 latency, and each as a ratio to the wire path. Prints a table and
writes JSON.

    python bench/shm.py --out shm.json [--requests 24]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import machine
from tandem_serve.clients.triton import TensorClient
from tandem_serve.triton.launcher import EmbeddedTriton

logger = logging.getLogger("bench.shm")
MODES = ("none", "system", "cuda")
CONCURRENCY = (1, 16)


def png_of_about(size_bytes: int, seed: int = 0) -> bytes:
    """A noisy RGB PNG whose encoded size is close to `size_bytes` (noise does not compress)."""
    side = max(32, int((size_bytes / 3) ** 0.5))
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def pixels_of(size_bytes: int) -> np.ndarray:
    """uint8 [b, 3, S, S] with S a multiple of 32 and about `size_bytes` in all (b <= 16)."""
    batch = 1 if size_bytes <= (4 << 20) else 16
    side = max(32, int(round((size_bytes / batch / 3) ** 0.5 / 32)) * 32)
    return np.random.default_rng(1).integers(0, 255, (batch, 3, side, side), dtype=np.uint8)


def run(url: str, model: str, inputs: list, outputs: list[str], mode: str, concurrency: int, requests: int,
        input_bytes: int, shm_key: str | None = None) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with TensorClient(url, "grpc", model, 300.0, shm=mode, shm_slots=1,
                              shm_bytes=max(input_bytes + (1 << 16), 2 << 20), shm_key=shm_key) as client:
                client.infer_tensors(inputs, outputs)  # warm-up, regions registered
                barrier.wait()
                for _ in range(requests):
                    start = time.perf_counter()
                    client.infer_tensors(inputs, outputs)
                    with lock:
                        latencies.append(time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    begin = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    if errors:
        raise RuntimeError(f"{model} {mode} c{concurrency}: {errors[0]}")
    latencies.sort()
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_shm.json"))
    parser.add_argument("--requests", type=int, default=24, help="per thread")
    parser.add_argument("--url", help="gRPC address of a running server (default: start the embedded one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    workloads = []
    for size in (64 << 10, 1 << 20, 16 << 20):
        image = png_of_about(size)
        workloads.append(("object_detection", len(image), [("image", np.frombuffer(image, np.uint8)[None])],
                          ["boxes", "scores", "classes"]))
    for size in (64 << 10, 1 << 20, 16 << 20, 64 << 20):
        pixels = pixels_of(size)
        workloads.append(("detector", pixels.nbytes, [("PIXELS", pixels)], ["CANDIDATES"]))
    server = None if args.url else EmbeddedTriton().start()
    url = args.url or server.grpc_url
    rows = []
    try:
        for model, nbytes, inputs, outputs in workloads:
            for concurrency in CONCURRENCY:
                requests = max(4, args.requests // (4 if nbytes >= (16 << 20) else 1))
                for mode in MODES:
                    logger.info("%s, %.2f MiB input, %d in flight, shm %s ...", model, nbytes / 2**20, concurrency, mode)
                    rows.append({"model": model, "input_bytes": nbytes, "concurrency": concurrency, "shm": mode,
                                 **run(url, model, inputs, outputs, mode, concurrency, requests, nbytes,
                                       server.keys.shm if server else None)})
    finally:
        if server:
            server.stop()
    for row in rows:
        wire = next(r for r in rows if r["model"] == row["model"] and r["input_bytes"] == row["input_bytes"]
                    and r["concurrency"] == row["concurrency"] and r["shm"] == "none")
        row["throughput_vs_wire"] = row["requests_per_s"] / wire["requests_per_s"]
        row["p50_vs_wire"] = row["p50_ms"] / wire["p50_ms"]
        row["p99_vs_wire"] = row["p99_ms"] / wire["p99_ms"]
    header = f"{'model':<17}{'input MiB':>10}{'conc':>6}{'shm':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'thr/wire':>10}{'p50/wire':>10}{'p99/wire':>10}"
    lines = [header] + [f"{r['model']:<17}{r['input_bytes'] / 2**20:>10.2f}{r['concurrency']:>6}{r['shm']:>8}"
                        f"{r['requests_per_s']:>9.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['throughput_vs_wire']:>10.2f}"
                        f"{r['p50_vs_wire']:>10.2f}{r['p99_vs_wire']:>10.2f}" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
