"""The TorchServe detection handler in-process with its decoding on the CPU, on the GPU (nvJPEG) and in tandem.

Per variant `DECODE:MICRO:BATCH[:GPU_THREADS]` (the handler's `decode`, its micro_batch_size, the batcher's batchSize,
its gpu_decode_threads) the handler
serves the suite's yolov5s load (random YOLOv5s-sized weights, fp16, CUDA graphs; JPEGs of `workloads.IMAGE_SIZES`,
one per request) behind the suite's in-process TorchServe-like batcher (maxBatchDelay 5 ms, one worker), closed
loop at each `--concurrency`; beside them the naive handler (CPU decode, sequential, batch 8) and the detector-only
ceiling of `bench/suite.py`, and nvJPEG alone (GpuDecoder on the same JPEGs, no load: the decode call, and decode +
letterbox + stack), all in one run. The tandem's lanes (micro-batches and ms per image on nvJPEG and on the
pool's CPU decoders) are recorded. Writes DIR/torchserve-decode.json and .md.

    python bench/torchserve_decode.py --out DIR [--variants cpu:4:32 gpu:16:64 tandem:16:64] [--concurrency 1 64 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from _common import machine
from suite import BATCH_DELAY_S, NAIVE_BATCH, InProcessBatcher, bodies_of, ceiling
from tandem_serve.loadgen import LoadSpec, measure
from tandem_serve.torchserve.services import ObjectDetectionService
from tandem_serve.workloads import random_yolov5

logger = logging.getLogger("bench.torchserve_decode")
DEFAULT_VARIANTS = ["cpu:4:32", "gpu:4:32", "tandem:4:32", "gpu:16:64", "tandem:16:64", "tandem:32:128"]


def service(weights: Path, decode: str, micro: int, pipelined: bool = True, cpu_threads: int = 8,
            gpu_threads: int = 1) -> ObjectDetectionService:
    """The handler's service on GPU 0 (the suite's settings: fp16, CUDA graphs, 8 pool threads)."""
    config = {"handler": {"decode": decode, "gpu_decode_threads": gpu_threads,
                          "detector": {"precision": "fp16", "weights": str(weights)},
                          "pipeline": {"micro_batch_size": micro, "pipelined": pipelined, "cpu_threads": cpu_threads}}}
    return ObjectDetectionService(weights.parent, config, gpu_id=0)


def run_variant(label: str, svc: ObjectDetectionService, bodies: list[dict], batch: int, specs: list[LoadSpec]) -> dict:
    logger.info("%s", label)
    try:
        points = measure(lambda: InProcessBatcher(svc, bodies, batch, BATCH_DELAY_S), specs)
        lanes = svc.stages.lanes()
    finally:
        svc.close()
    for p in points:
        logger.info("%s c%d: %.0f images/s, p50 %.1f ms, p99 %.1f ms, %d errors", label, p.concurrency, p.throughput,
                    p.p50_ms, p.p99_ms, p.errors)
    return {"label": label, "points": [dataclasses.asdict(p) for p in points], "lanes": lanes}


def nvjpeg_alone(bodies: list[dict], batch: int = 32, repeats: int = 5) -> dict:
    """ms per image of GpuDecoder without load: the nvJPEG call alone, and decode + letterbox + stack."""
    import torch

    from tandem_serve.vision.gpu_decode import GpuDecoder

    decoder = GpuDecoder(640, "cuda:0")
    items = [decoder.check(b["body"]) for b in bodies[:batch]]
    out = {}
    for label, step in (("decode", lambda: decoder._decode_batch([d for d, _ in items])), ("stacked", lambda: decoder.stacked(items))):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.cuda.stream(decoder.stream):
                step()
            decoder.stream.synchronize()
            times.append(time.perf_counter() - started)
        out[f"{label}_ms_per_image"] = statistics.median(times) / batch * 1e3
    logger.info("nvJPEG alone, batches of %d: %s", batch, out)
    return out


def best(run: dict) -> float:
    return max((p["throughput"] for p in run["points"] if not p["errors"]), default=0.0)


def p50_c1(run: dict) -> float | None:
    return next((p["p50_ms"] for p in run["points"] if p["concurrency"] == 1), None)


def markdown(report: dict) -> str:
    ceiling_rate, naive = report["ceiling"]["items_per_s"], report["naive"]
    levels = sorted({p["concurrency"] for r in report["runs"] for p in r["points"]})
    m = report["machine"]
    lines = [f"Machine: {m['gpu']}, {m['cpus']} cores, torch {m['torch']}. Ceiling (detector alone, GPU-resident pixels): {ceiling_rate:.0f} images/s "
             f"at batch {report['ceiling']['batch']}. Naive handler: best {best(naive):.0f} images/s, p50 at c1 "
             f"{p50_c1(naive) or float('nan'):.1f} ms. nvJPEG alone (batches of 32, ms per image): "
             f"decode {report['nvjpeg']['decode_ms_per_image']:.3f}, with letterbox and stack "
             f"{report['nvjpeg']['stacked_ms_per_image']:.3f}.", "",
             "| decode:micro:batch | " + " | ".join(f"c{c} /s" for c in levels) +
             " | best / ceiling | best / naive | p50 c1 ms (/ naive) | tandem lanes: batches, ms per image |",
             "|---|" + "---|" * len(levels) + "---|---|---|---|"]
    for run in report["runs"]:
        by_level = {p["concurrency"]: p for p in run["points"]}
        cells = " | ".join(f"{by_level[c]['throughput']:.0f}" if c in by_level else "-" for c in levels)
        c1 = p50_c1(run)
        lanes = "; ".join(f"{name} {v['batches']}, {v['ms_per_row'] or float('nan'):.2f}" for name, v in run["lanes"].items()) or "-"
        ratio = f"{c1:.1f} ({c1 / p50_c1(naive):.2f}x)" if c1 and p50_c1(naive) else "-"
        lines.append(f"| {run['label']} | {cells} | {best(run) / ceiling_rate:.0%} | {best(run) / max(best(naive), 1e-9):.2f}x | "
                     f"{ratio} | {lanes} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="DECODE:MICRO:BATCH")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 128])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [LoadSpec("closed", c, seconds=args.seconds) for c in args.concurrency]
    bodies = bodies_of("detection", 64)
    with tempfile.TemporaryDirectory() as scratch:
        weights = random_yolov5("s", Path(scratch))
        report = {"machine": machine(), "ceiling": ceiling("detection", weights), "runs": [],
                  "nvjpeg": nvjpeg_alone(bodies)}
        report["naive"] = run_variant("naive", service(weights, "cpu", NAIVE_BATCH, pipelined=False, cpu_threads=1),
                                      bodies, NAIVE_BATCH, specs)
        for variant in args.variants:
            decode, micro, batch, *threads = variant.split(":")
            svc = service(weights, decode, int(micro), gpu_threads=int(threads[0]) if threads else 1)
            report["runs"].append(run_variant(variant, svc, bodies, int(batch), specs))
    (args.out / "torchserve-decode.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "torchserve-decode.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
