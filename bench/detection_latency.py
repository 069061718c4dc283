"""Where the object_detection ensemble's latency goes at concurrency 1, with and without CUDA IPC between steps.

Serves the project's repositories twice: as shipped (the detector's CANDIDATES stay on the GPU
and reach nms through CUDA IPC) and with `output_on_device: false` (the detector copies them to
the host). Sends `--requests` images one at a time (after a warm-up) and reports the latency
percentiles and, from Triton's statistics, each step's mean queue and compute time and the
slowest single request. Prints a table and writes JSON.

    python bench/detection_latency.py --out detection_latency.json [--requests 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import machine
from tandem_serve.clients.triton import ObjectDetectionClient
from tandem_serve.loadgen import percentile_ms
from tandem_serve.paths import assets_root
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.triton.statistics import read_statistics, stats_delta
from tandem_serve.tuning.stage_timers import scenes

logger = logging.getLogger("bench.detection_latency")
STEPS = ("image_preprocess", "detector", "nms", "object_detection")


def repository(on_device: bool, work: Path) -> list[Path]:
    """The project's repositories, with the detector's output_on_device set."""
    root = assets_root()
    target = work / f"models-{'device' if on_device else 'host'}"
    shutil.copytree(root / "model_repository", target, ignore=shutil.ignore_patterns("__pycache__"))
    config = read_config(target / "detector" / "config.pbtxt")
    config.parameters["output_on_device"].string_value = "true" if on_device else "false"
    write_config(config, target / "detector" / "config.pbtxt")
    return [target, root / "ensembles"]


def measure(url: str, images: list[bytes], requests: int) -> tuple[list[float], list[int]]:
    """Latencies (ms) of `requests` sequential detections, and the boxes found per image."""
    latencies, found = [], []
    with ObjectDetectionClient(url, "grpc", timeout_s=120.0) as client:
        for i in range(8):
            client.detect(images[i % len(images)])
        for i in range(requests):
            start = time.perf_counter()
            detections = client.detect(images[i % len(images)])
            latencies.append((time.perf_counter() - start) * 1e3)
            found.append(len(detections.boxes))
    return latencies, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench_detection_latency.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    images = scenes(16, seed=11)
    rows, boxes = [], {}
    with tempfile.TemporaryDirectory(prefix="tandem-detlat-") as tmp:
        for on_device in (True, False):
            with EmbeddedTriton(TritonOptions(model_repositories=repository(on_device, Path(tmp)))) as server:
                from tritonclient.grpc import InferenceServerClient

                stats_client = InferenceServerClient(server.grpc_url)
                before = {s.model: s for s in read_statistics(stats_client, "grpc")}
                latencies, found = measure(server.grpc_url, images, args.requests)
                after = {s.model: s for s in read_statistics(stats_client, "grpc")}
                boxes[on_device] = found
                steps = {}
                for name in STEPS:
                    step = stats_delta(after[name], before[name])
                    steps[name] = {"requests": step.requests, "queue_ms": step.queue_ms, "compute_ms": step.compute_ms}
                ordered = sorted(seconds / 1e3 for seconds in latencies)  # the load generator's percentiles
                p50 = percentile_ms(ordered, 0.5)
                rows.append({"candidates": "GPU (CUDA IPC)" if on_device else "host copy", "p50_ms": p50,
                             "p90_ms": percentile_ms(ordered, 0.9), "p99_ms": percentile_ms(ordered, 0.99),
                             "max_ms": ordered[-1] * 1e3, "slow_requests": sum(x * 1e3 > 4 * p50 for x in ordered),
                             "steps": steps})
    assert boxes[True] == boxes[False], "the two paths found different numbers of boxes"
    lines = [f"{'candidates':<16}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'>4x p50':>8}  "
             + "  ".join(f"{s} q/c ms" for s in STEPS)]
    for r in rows:
        lines.append(f"{r['candidates']:<16}{r['p50_ms']:>8.1f}{r['p90_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['max_ms']:>8.1f}"
                     f"{r['slow_requests']:>8}  " + "  ".join(f"{r['steps'][s]['queue_ms']:.2f}/{r['steps'][s]['compute_ms']:.2f}"
                                                          for s in STEPS))
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "requests": args.requests, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
