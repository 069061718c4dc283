"""The handlers behind a real TorchServe frontend (Java, REST, token auth) on the GPU, against the naive handler and
the model-only ceiling, in one run.

Per pipeline (`--pipelines text detection`) an archive is built with `tandem archive`'s code (directory format) for
the suite's workload (text: all-MiniLM-L6-v2, one text per request of `workloads.LENGTH_MIX`; detection: YOLOv5s-sized
random weights, JPEGs of `workloads.IMAGE_SIZES`) and served by `EmbeddedTorchServe` with the shipped
model-config.yaml changed by `--set KEY=VALUE` (dotted keys, YAML values, e.g. batchSize=64
handler.pipeline.micro_batch_size=32) and per `--variant` (a row of its own), once per `--workers` count (minWorkers =
maxWorkers, all on GPU 0); with `--naive-served` also the naive handler's settings (suite.py's: eager, not pipelined,
batches of 8) behind the same frontend. The project's load generator (`TorchServeSender`, `--client-processes`
processes) runs a closed loop at each `--concurrency`; the server's CPU per request is split into the Java frontend's
and the workers'. Beside it, on the same bodies: the naive handler and the plugin's handler in-process
(bench/suite.py's, behind its in-process batcher) and the ceiling (bench/suite.py). `--profile` cProfiles every
worker's main thread (TANDEM_STUB_PROFILE) and writes DIR/worker-profile-<pipeline>-<row>.md. `--planned PLAN ...`
adds a row per PLAN served with what `tandem plan --out PLAN` rendered (PLAN/torchserve/<handler>/model-config.yaml as it is,
its workers included; the archive's own model files). Writes DIR/torchserve-served.json and .md.

    python bench/torchserve_served.py --out DIR [--pipelines text] [--workers 2 4] [--concurrency 1 64 256]
        [--set batchSize=64 ...] [--variant NAME:KEY=VALUE,...] [--job-queue-size 1000] [--naive-served] [--profile]
        [--skip-in-process] [--planned PLAN ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

import stub_profile
import yaml
from _common import machine
from suite import NAIVE_BATCH, PLUGIN_BATCH, bodies_of, ceiling, in_process, make_service
from tandem_serve.loadgen import LoadSpec, TorchServeSender, measure
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.profiling import ENV as PROFILE_ENV
from tandem_serve.torchserve.archive import build_archive, merge
from tandem_serve.torchserve.launcher import EmbeddedTorchServe, TorchServeOptions
from tandem_serve.workloads import random_yolov5

logger = logging.getLogger("bench.torchserve_served")
ARCHIVE = {"text": "text_embedding", "detection": "object_detection"}
# suite.py's naive handler as archive settings: eager, not pipelined, one pool thread, batches of NAIVE_BATCH
NAIVE_SETTINGS = {"batchSize": NAIVE_BATCH, "handler": {"pipeline": {"micro_batch_size": NAIVE_BATCH, "pipelined": False,
                                                                      "cpu_threads": 1}}}
NAIVE_BY_PIPELINE = {"text": {"handler": {"encoder": {"cuda_graph_max_batch": 0}}},
                     "detection": {"handler": {"decode": "cpu"}}}


def dotted(assignments: list[str]) -> dict:
    """KEY=VALUE pairs (dotted keys, YAML values) as one nested mapping."""
    out: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set wants KEY=VALUE, got {assignment!r}")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def rest_bodies(pipeline: str, bodies: list[dict]) -> list[tuple[bytes, str]]:
    """The in-process bodies as REST requests: JSON texts, raw JPEG bytes."""
    if pipeline == "text":
        return [(json.dumps(b["body"]).encode(), "application/json") for b in bodies]
    return [(b["body"], "application/octet-stream") for b in bodies]


def served(pipeline: str, model: Path, label: str, overrides: dict, bodies: list[tuple[bytes, str]],
           specs: list[LoadSpec], scratch: Path, args: argparse.Namespace) -> dict:
    """The archive with `overrides` behind a real TorchServe, measured at each level."""
    name = label.replace(" ", "-")
    store = scratch / f"store-{pipeline}-{name}"
    if pipeline == "text":
        build_archive("text_embedding", store, model_dir=model, archive_format="dir", overrides=overrides)
    else:
        build_archive("object_detection", store, weights=model, archive_format="dir", overrides=overrides)
    options = TorchServeOptions(model_store=store, models=[ARCHIVE[pipeline]],
                                workspace=scratch / f"ws-{pipeline}-{name}", job_queue_size=args.job_queue_size)
    profile_dir = scratch / f"profile-{pipeline}-{name}"
    if args.profile:
        os.environ[PROFILE_ENV] = str(profile_dir)  # the frontend hands its environment to the workers
    try:
        with EmbeddedTorchServe(options) as server:
            sender = functools.partial(TorchServeSender, server.inference_url, ARCHIVE[pipeline], bodies, server.key())
            points = measure(sender, specs, processes=args.client_processes, server_pid=server.process.pid)
    finally:
        os.environ.pop(PROFILE_ENV, None)
    run = {"label": label, "overrides": overrides, "points": [dataclasses.asdict(p) for p in points]}
    for p in run["points"]:
        logger.info("%s %s c%d: %.0f/s, p50 %.1f ms, p99 %.1f ms, %d errors %s; CPU ms/request %s", label, pipeline,
                    p["concurrency"], p["throughput"], p["p50_ms"], p["p99_ms"], p["errors"], p["first_error"][:120],
                    cpu_per_request(p))
    if args.profile and profile_dir.is_dir():
        run["profile"] = stub_profile.summarize(profile_dir, 20)
        (args.out / f"worker-profile-{pipeline}-{name}.md").write_text(stub_profile.markdown(run["profile"]) + "\n")
    return run


def cpu_per_request(point: dict) -> dict[str, float]:
    """The server's CPU ms per request answered (warm-up included), by process name (java, python3), of a LoadPoint
    as a dict."""
    answered = point["completed"] + point["errors"] + point.get("warm_up_requests", 0)
    parts = point["server_cpu_parts"] or {}
    return {name: round(1e3 * seconds / max(answered, 1), 3) for name, seconds in parts.items()}


def best(run: dict) -> float:
    return max((p["throughput"] for p in run["points"] if not p["errors"]), default=0.0)


def run_pipeline(pipeline: str, args: argparse.Namespace, scratch: Path) -> dict:
    model = SentenceModelFiles.load().root if pipeline == "text" else random_yolov5("s", scratch)
    specs = [LoadSpec("closed", c, seconds=args.seconds) for c in args.concurrency]
    bodies = bodies_of(pipeline, 64)
    report = {"ceiling": ceiling(pipeline, model), "runs": []}
    micro = 16 if pipeline == "text" else 4
    in_process_runs = () if args.skip_in_process else (("naive in-process", False, NAIVE_BATCH, NAIVE_BATCH),
                                                        ("ts-plugin in-process", True, PLUGIN_BATCH, micro))
    for label, pipelined, batch, size in in_process_runs:
        points = in_process(make_service(pipeline, model, pipelined, size), bodies, batch, specs)
        report["runs"].append({"label": label, "points": [dataclasses.asdict(p) for p in points]})
        logger.info("%s %s: best %.0f/s", pipeline, label, best(report["runs"][-1]))
    changes, requests = dotted(args.set), rest_bodies(pipeline, bodies)
    for workers in args.workers:
        scale = {"minWorkers": workers, "maxWorkers": workers}
        if args.naive_served:
            naive = merge(merge(NAIVE_SETTINGS, NAIVE_BY_PIPELINE[pipeline]), scale)
            report["runs"].append(served(pipeline, model, f"naive torchserve x{workers}", naive,
                                         requests, specs, scratch, args))
        for variant in args.variant or [""]:
            name, _, assignments = variant.partition(":")
            overrides = merge(merge(changes, dotted([a for a in assignments.split(",") if a])), scale)
            report["runs"].append(served(pipeline, model, f"torchserve x{workers}" + (f" {name}" if name else ""),
                                         overrides, requests, specs, scratch, args))
    for plan in args.planned:
        rendered = planned_config(plan, pipeline)
        label = f"torchserve planned {plan.name} x{rendered['minWorkers']} b{rendered['batchSize']}"
        report["runs"].append(served(pipeline, model, label, rendered, requests, specs, scratch, args))
    return report


def planned_config(plan: Path, pipeline: str) -> dict:
    """The model-config.yaml `tandem plan` rendered for the pipeline's handler, less the model paths of the profiled
    machine (the archive stages its own)."""
    config = yaml.safe_load((plan / "torchserve" / ARCHIVE[pipeline] / "model-config.yaml").read_text())
    handler = config.get("handler", {})
    handler.pop("model_dir", None)
    handler.get("detector", {}).pop("weights", None)
    return config


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['gpu']}, {m['cpus']} cores, torch {m['torch']}.", ""]
    for pipeline, r in report["pipelines"].items():
        levels = sorted({p["concurrency"] for run in r["runs"] for p in run["points"]})
        naive = best(r["runs"][0])  # the first row: naive in-process, else the first naive served one
        lines += [f"**{pipeline}** (ceiling {r['ceiling']['items_per_s']:.0f}/s at batch {r['ceiling']['batch']}; "
                  f"best / naive against `{r['runs'][0]['label']}`)", "",
                  "| system | " + " | ".join(f"c{c} /s" for c in levels)
                  + " | best / naive | best / ceiling | p50 c1 ms | server CPU ms/request at best |",
                  "|---|" + "---|" * len(levels) + "---|---|---|---|"]
        for run in r["runs"]:
            by_level = {p["concurrency"]: p for p in run["points"]}
            cells = " | ".join(f"{by_level[c]['throughput']:.0f}" + (f" ({by_level[c]['errors']} err)" if by_level[c]["errors"] else "")
                               if c in by_level else "-" for c in levels)
            c1 = by_level.get(1, {}).get("p50_ms")
            top = max((p for p in run["points"] if not p["errors"]), key=lambda p: p["throughput"], default=None)
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in cpu_per_request(top).items()) if top else ""
            lines.append(f"| {run['label']} | {cells} | {best(run) / max(naive, 1e-9):.2f}x | "
                         f"{best(run) / r['ceiling']['items_per_s']:.0%} | {c1 if c1 is None else f'{c1:.1f}'} | "
                         f"{cpu} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipelines", nargs="+", default=["text", "detection"], choices=sorted(ARCHIVE))
    parser.add_argument("--workers", type=int, nargs="*", default=[2],
                        help="a row per worker count of the plugin's archive (none: `--workers` alone)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a model-config.yaml change for the plugin's archive (dotted key, YAML value); repeatable")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a plugin row of its own with these changes on top of --set; repeatable")
    parser.add_argument("--job-queue-size", type=int, default=100, help="TorchServe's job_queue_size")
    parser.add_argument("--naive-served", action="store_true", help="also the naive handler behind the same frontend")
    parser.add_argument("--profile", action="store_true", help="cProfile the workers' main threads")
    parser.add_argument("--skip-in-process", action="store_true", help="leave out the in-process rows")
    parser.add_argument("--planned", type=Path, nargs="+", default=[], metavar="PLAN",
                        help="also a row per PLAN served with `tandem plan --out PLAN`'s TorchServe model-config.yaml")
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
