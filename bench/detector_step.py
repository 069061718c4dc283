"""The detector step as a Triton instance runs it, without Triton: per-request pageable host images in, candidates out.

    python bench/detector_step.py [--size s] [--batches 1 4 8 16] [--out bench/results/detector_step.json]

Variants, each on the same random-weight YOLOv5 (fp16) and the same images, one torch thread as a GPU instance has:
  per-image filter  the previous step: the batch concatenated on the host, one staging copy, the network
                    eagerly, then each image's candidates filtered with its own host waits
  eager             the batch staged per request into one pinned buffer, the network and the batched filter
                    eagerly, one wait for the counts
  graphs            the same, replayed from CUDA graphs (the default on a GPU)
Per variant and batch: images/s, host CPU ms per batch (this thread's CPU time: launches, copies, waits that spin)
and the wall ms per batch; the network alone on device-resident input (`enqueue` + sync) is the ceiling view.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.runtime.transfer import to_device  # noqa: E402
from tandem_serve.stage_config import DetectorConfig  # noqa: E402
from tandem_serve.vision.detector import DetectStage  # noqa: E402
from tandem_serve.vision.nms import candidates  # noqa: E402
from tandem_serve.workloads import random_yolov5  # noqa: E402

logger = logging.getLogger("detector_step")
DEVICE = torch.device("cuda:0")


def per_image_filter(stage: DetectStage, requests: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step as it was before batched filtering and graphs (kept here as the baseline)."""
    images = to_device([torch.cat(requests)], stage.device)[0]
    with torch.inference_mode(), torch.autocast("cuda", dtype=stage.dtype):
        predictions = stage.model(images).float()
    rows = []
    for image_predictions in predictions:
        found = candidates(image_predictions, stage.config.prefilter_conf)
        if len(found) > stage.config.max_candidates:
            found = found[found[:, 4].topk(stage.config.max_candidates).indices]
        rows.append(found)
    counts = [len(r) for r in rows]
    padded = torch.full((len(rows), max(1, max(counts)), 6), -1.0, device=stage.device)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    return [padded[i : i + 1, : max(1, counts[i])].contiguous() for i in range(len(rows))]


def timed(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall and host-CPU seconds of `call` (synchronised), after two warm-up calls."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="s")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    weights = random_yolov5(args.size, models)
    base = {"weights": str(weights), "precision": "fp16"}
    eager = DetectStage(DetectorConfig(**base, cuda_graph_max_batch=0), DEVICE)
    graphed = DetectStage(DetectorConfig(**base, cuda_graph_max_batch=max(args.batches)), DEVICE)
    graphed.capture(640)
    images = torch.randint(0, 255, (max(args.batches), 3, 640, 640), dtype=torch.uint8)
    rows = []
    for batch in args.batches:
        requests = [images[i : i + 1].clone() for i in range(batch)]  # pageable, one per request, as from shm
        on_device = images[:batch].to(DEVICE)
        cases = {"per-image filter": lambda: per_image_filter(eager, requests), "eager": lambda: eager(requests),
                 "graphs": lambda: graphed(requests), "network + filter on device, eager": lambda: eager.enqueue(on_device),
                 "network + filter on device, graphs": lambda: graphed.enqueue(on_device)}
        for name, call in cases.items():
            wall, cpu = timed(call, args.repeats)
            rows.append({"variant": name, "batch": batch, "images_per_s": batch / wall, "wall_ms": wall * 1e3,
                         "host_cpu_ms": cpu * 1e3})
            logger.info("batch %2d %-36s %7.0f images/s  wall %6.2f ms  host CPU %6.2f ms", batch, name,
                        batch / wall, wall * 1e3, cpu * 1e3)
    table = ["| batch | variant | images/s | wall ms | host CPU ms |", "|---|---|---|---|---|"]
    table += [f"| {r['batch']} | {r['variant']} | {r['images_per_s']:.0f} | {r['wall_ms']:.2f} | {r['host_cpu_ms']:.2f} |"
              for r in rows]
    text = f"Machine: {machine()}; YOLOv5{args.size} fp16 random weights, 640 px, one torch thread\n\n" + "\n".join(table)
    logger.info("%s", text)
    if args.out:
        args.out.write_text(json.dumps({"machine": machine(), "size": args.size, "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
