"""Pipelined vs sequential TorchServe handlers, in-process (no Java needed): same batch, same device.

Runs the handlers' service (`tandem_serve.torchserve.services`, what the handler's `handle`
calls) on one batch as TorchServe's batcher would hand it over, for three schedules:
  pipelined   micro-batches; CPU work on a thread pool overlaps the device (the shipped default)
  sequential  the same micro-batches one after the other on one thread, pageable copies
  whole-batch one batch: pre -> infer -> post in sequence (what a plain BaseHandler does)
  cpu-lane    pipelined, plus a CPU copy of the device stage taking micro-batches the balancer sends
              it (on a GPU only; `pipeline.cpu_lane_threads`)
Workloads: text embedding (all-MiniLM-L6-v2, one text per request, stated length mix) and
object detection (the shipped YOLOv5n, and a YOLOv5s with random weights for a heavier GPU
stage) on JPEGs of mixed original sizes. Prints a table and the ratios; writes JSON.

    python bench/torchserve_pipeline.py --out results.json [--repeats 20]
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

import torch

from _common import machine
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.torchserve.services import ObjectDetectionService, PipelineService, TextEmbeddingService
from tandem_serve.workloads import IMAGE_SIZES, LENGTH_MIX, mixed_length_texts, mixed_size_jpegs, random_yolov5

logger = logging.getLogger("bench.torchserve_pipeline")
SCHEDULES = {"pipelined": True, "sequential": False, "whole-batch": False, "cpu-lane": True}
CPU_LANE_THREADS = 4


def texts(count: int, seed: int = 0) -> list[dict]:
    return [{"body": {"text": t}} for t in mixed_length_texts(count, seed)]


def images(count: int, seed: int = 0) -> list[dict]:
    return [{"body": data} for data in mixed_size_jpegs(count, seed)]


def time_batches(service: PipelineService, batch: list[dict], repeats: int) -> float:
    """Median seconds per batch after two warm-up batches; every reply must be a 200."""
    for _ in range(2):
        service.handle(batch)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        replies = service.handle(batch)
        seconds.append(time.perf_counter() - start)
        if any(r.status != 200 for r in replies):
            raise RuntimeError(f"a request failed: {next(r.body for r in replies if r.status != 200)[:200]!r}")
    return statistics.median(seconds)


def run_workload(name: str, make_service, batch: list[dict], micro_batch: int, cpu_threads: int, repeats: int) -> list[dict]:
    rows = []
    for schedule, pipelined in SCHEDULES.items():
        if schedule == "cpu-lane" and not torch.cuda.is_available():
            continue
        pipeline = {"micro_batch_size": len(batch) if schedule == "whole-batch" else micro_batch,
                    "cpu_threads": cpu_threads, "pipelined": pipelined,
                    "cpu_lane_threads": CPU_LANE_THREADS if schedule == "cpu-lane" else 0}
        threads = torch.get_num_threads()
        service = make_service(pipeline)
        try:
            logger.info("%s: %s (micro-batch %d, %d CPU threads) on %s ...", name, schedule,
                        pipeline["micro_batch_size"], cpu_threads, service.device)
            seconds = time_batches(service, batch, repeats)
            lanes = service.pipeline.balancer.snapshot() if service.pipeline.balancer else None
        finally:
            service.close()
            torch.set_num_threads(threads)  # the CPU lane set it for the process
        rows.append({"workload": name, "schedule": schedule, "device": str(service.device), "batch": len(batch),
                     "micro_batch": pipeline["micro_batch_size"], "cpu_threads": cpu_threads,
                     "batch_ms": seconds * 1e3, "items_per_s": len(batch) / seconds, "lanes": lanes})
        if lanes:
            logger.info("%s: micro-batches per lane %s", name, lanes)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_torchserve_pipeline.json"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--image-batch", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gpu_id = 0 if torch.cuda.is_available() else None
    model_root = SentenceModelFiles.load().root
    rows = []
    text_batch = texts(args.text_batch)
    rows += run_workload("text MiniLM-L6", lambda p: TextEmbeddingService(
        model_root, {"handler": {"model_dir": str(model_root), "encoder": {"precision": "fp16"}, "pipeline": p}}, gpu_id),
        text_batch, micro_batch=16, cpu_threads=2, repeats=args.repeats)
    image_batch = images(args.image_batch)
    with tempfile.TemporaryDirectory() as tmp:
        for label, weights in (("detect YOLOv5n", ""), ("detect YOLOv5s", str(random_yolov5("s", Path(tmp))))):
            detector = {"precision": "fp16", **({"weights": weights} if weights else {})}
            rows += run_workload(label, lambda p, d=detector: ObjectDetectionService(
                Path(tmp), {"handler": {"detector": d, "pipeline": p}}, gpu_id),
                image_batch, micro_batch=4, cpu_threads=8, repeats=max(3, args.repeats // 2))
    header = f"{'workload':<16}{'schedule':<13}{'device':<8}{'batch':>6}{'micro':>6}{'threads':>8}{'batch ms':>10}{'items/s':>10}"
    lines = [header] + [f"{r['workload']:<16}{r['schedule']:<13}{r['device']:<8}{r['batch']:>6}{r['micro_batch']:>6}"
                        f"{r['cpu_threads']:>8}{r['batch_ms']:>10.1f}{r['items_per_s']:>10.1f}" for r in rows]
    ratios = {}
    for workload in dict.fromkeys(r["workload"] for r in rows):
        by = {r["schedule"]: r["items_per_s"] for r in rows if r["workload"] == workload}
        ratios[f"{workload}: pipelined / sequential"] = by["pipelined"] / by["sequential"]
        ratios[f"{workload}: pipelined / whole-batch"] = by["pipelined"] / by["whole-batch"]
        if "cpu-lane" in by:
            ratios[f"{workload}: cpu-lane / pipelined"] = by["cpu-lane"] / by["pipelined"]
    lines += [f"{k}: {v:.2f}x" for k, v in ratios.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "length_mix_words": LENGTH_MIX, "image_sizes": IMAGE_SIZES,
                                    "rows": rows, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
