"""The handlers behind a real TorchServe frontend (Java, REST, token auth) on the GPU, against the naive handler and
the model-only ceiling, in one run.

Per pipeline (`--pipelines text detection`) an archive is built with `tandem archive`'s code (directory format) for
the suite's workload (text: all-MiniLM-L6-v2, one text per request of `workloads.LENGTH_MIX`; detection: YOLOv5s-sized
random weights, JPEGs of `workloads.IMAGE_SIZES`) and served by `EmbeddedTorchServe` with the shipped
model-config.yaml, once per `--workers` count (minWorkers = maxWorkers, all on GPU 0). The project's load generator
(`TorchServeSender`, `--client-processes` processes) runs a closed loop at each `--concurrency`. Beside it, on the
same bodies: the naive handler and the plugin's handler in-process (bench/suite.py's, behind its in-process
batcher) and the ceiling (bench/suite.py). Writes DIR/torchserve-served.json and .md.

    python bench/torchserve_served.py --out DIR [--pipelines text] [--workers 2 4] [--concurrency 1 64 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import tempfile
from pathlib import Path

from _common import machine
from suite import NAIVE_BATCH, PLUGIN_BATCH, bodies_of, ceiling, in_process, make_service
from tandem_serve.loadgen import LoadSpec, TorchServeSender, measure
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.torchserve.archive import build_archive
from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions
from tandem_serve.workloads import random_yolov5

logger = logging.getLogger("bench.torchserve_served")
ARCHIVE = {"text": "text_embedding", "detection": "object_detection"}


def rest_bodies(pipeline: str, bodies: list[dict]) -> list[tuple[bytes, str]]:
    """The in-process bodies as REST requests: JSON texts, raw JPEG bytes."""
    if pipeline == "text":
        return [(json.dumps(b["body"]).encode(), "application/json") for b in bodies]
    return [(b["body"], "application/octet-stream") for b in bodies]


def served(pipeline: str, model: Path, workers: int, bodies: list[tuple[bytes, str]], specs: list[LoadSpec],
           scratch: Path, processes: int) -> dict:
    """The archive behind a real TorchServe with `workers` workers, measured at each level."""
    store = scratch / f"store-{pipeline}-{workers}"
    overrides = {"minWorkers": workers, "maxWorkers": workers}
    if pipeline == "text":
        build_archive("text_embedding", store, model_dir=model, archive_format="dir", overrides=overrides)
    else:
        build_archive("object_detection", store, weights=model, archive_format="dir", overrides=overrides)
    options = TorchServeOptions(model_store=store, models=[ARCHIVE[pipeline]], workspace=scratch / f"ws-{pipeline}-{workers}")
    with EmbeddedTorchServe(options) as server:
        sender = functools.partial(TorchServeSender, server.inference_url, ARCHIVE[pipeline], bodies, server.key())
        points = measure(sender, specs, processes=processes, server_pid=server.process.pid)
    for p in points:
        logger.info("torchserve %s x%d c%d: %.0f/s, p50 %.1f ms, p99 %.1f ms, %d errors %s", pipeline, workers,
                    p.concurrency, p.throughput, p.p50_ms, p.p99_ms, p.errors, p.first_error[:120])
    return {"label": f"torchserve x{workers}", "points": [dataclasses.asdict(p) for p in points]}


def best(run: dict) -> float:
    return max((p["throughput"] for p in run["points"] if not p["errors"]), default=0.0)


def run_pipeline(pipeline: str, args: argparse.Namespace, scratch: Path) -> dict:
    model = SentenceModelFiles.load().root if pipeline == "text" else random_yolov5("s", scratch)
    specs = [LoadSpec("closed", c, seconds=args.seconds) for c in args.concurrency]
    bodies = bodies_of(pipeline, 64)
    report = {"ceiling": ceiling(pipeline, model), "runs": []}
    micro = 16 if pipeline == "text" else 4
    for label, pipelined, batch, size in (("naive in-process", False, NAIVE_BATCH, NAIVE_BATCH),
                                          ("ts-plugin in-process", True, PLUGIN_BATCH, micro)):
        points = in_process(make_service(pipeline, model, pipelined, size), bodies, batch, specs)
        report["runs"].append({"label": label, "points": [dataclasses.asdict(p) for p in points]})
        logger.info("%s %s: best %.0f/s", pipeline, label, best(report["runs"][-1]))
    for workers in args.workers:
        report["runs"].append(served(pipeline, model, workers, rest_bodies(pipeline, bodies), specs, scratch,
                                     args.client_processes))
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['gpu']}, {m['cpus']} cores, torch {m['torch']}.", ""]
    for pipeline, r in report["pipelines"].items():
        levels = sorted({p["concurrency"] for run in r["runs"] for p in run["points"]})
        naive = best(r["runs"][0])
        lines += [f"**{pipeline}** (ceiling {r['ceiling']['items_per_s']:.0f}/s at batch {r['ceiling']['batch']})", "",
                  "| system | " + " | ".join(f"c{c} /s" for c in levels) + " | best / naive | best / ceiling | p50 c1 ms |",
                  "|---|" + "---|" * len(levels) + "---|---|---|"]
        for run in r["runs"]:
            by_level = {p["concurrency"]: p for p in run["points"]}
            cells = " | ".join(f"{by_level[c]['throughput']:.0f}" + (f" ({by_level[c]['errors']} err)" if by_level[c]["errors"] else "")
                               if c in by_level else "-" for c in levels)
            c1 = by_level.get(1, {}).get("p50_ms")
            lines.append(f"| {run['label']} | {cells} | {best(run) / max(naive, 1e-9):.2f}x | "
                         f"{best(run) / r['ceiling']['items_per_s']:.0%} | {c1 if c1 is None else f'{c1:.1f}'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipelines", nargs="+", default=["text", "detection"], choices=sorted(ARCHIVE))
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--client-processes", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "pipelines": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for pipeline in args.pipelines:
            report["pipelines"][pipeline] = run_pipeline(pipeline, args, Path(scratch))
            (args.out / "torchserve-served.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "torchserve-served.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
