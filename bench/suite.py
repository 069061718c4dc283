"""The benchmark suite: per workload, the naive handler, the untuned Triton recipe, the model-only ceiling and the plugin.

Workloads (`--workloads`): minilm (all-MiniLM-L6-v2), bert-base (BERT-base-sized, random weights), yolov5s
(YOLOv5s-sized, random weights with YOLOv5's bias prior). Texts follow `workloads.LENGTH_MIX`; images are
JPEGs of `workloads.IMAGE_SIZES`. One item per request. Measured in one run on one machine:
  naive           a plain TorchServe-style handler in-process (pre -> infer -> post on the whole batch, pageable
                  copies, eager PyTorch), fed by a TorchServe-like batcher (batchSize 8, maxBatchDelay 5 ms, one worker)
  litserve        (text) the external peer: LitServe + sentence-transformers fp16 with LitServe's own batching
                  (bench/peers/litserve_text.py; `--litserve-arg` passes its flags), over HTTP/JSON from the same
                  load processes; skipped with a warning where litserve does not import
  ts-plugin       the plugin's TorchServe handler (micro-batch pipelining, pinned copies, CUDA graphs; images decoded
                  by nvJPEG and the CPU in tandem), same batcher, batchSize 32
  triton-shipped  the usual Triton recipe, untuned: Python tokenizer/preprocess + GPU model (+ NMS) ensemble,
                  the shipped configs (KIND_AUTO, fp32, eager: no CUDA graphs) pointed at the workload's model
  triton-plugin   the plan from `tandem plan` (`--plans DIR`, DIR/<workload>/triton), after `tandem tune`'s search
  ceiling         the network alone on GPU-resident pre-tokenized / pre-processed inputs at its best batch size
                  (text: the better of eager and CUDA-graph replay at each batch)
Closed loop at each `--concurrency` (the project's async load generator; `--protocol grpc|http`, `--shm
none|system|cuda` for the Triton systems), then open loop at 90 % of
the naive baseline's best throughput for p99 under the same offered load. Prints a Markdown table,
writes DIR/suite.json, DIR/suite.md and a latency-throughput plot per workload.

    python bench/suite.py --out DIR --plans PLANS [--workloads minilm bert-base yolov5s] [--seconds 3]
                          [--protocol grpc] [--shm none] [--triton-arg=--tritonserver-flag=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import stub_profile
from _common import machine
from peers.launcher import LitServePeer, litserve_missing
from tandem_serve.loadgen import LoadPoint, LoadSpec, PostSender, measure
from tandem_serve.profiling import ENV as STUB_PROFILE_ENV
from tandem_serve.torchserve.services import ObjectDetectionService, TextEmbeddingService
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.triton.repository import export_repository
from tandem_serve.triton.statistics import StageStats
from tandem_serve.tuning.plots import plot_curves
from tandem_serve.tuning.tune import TuneOptions, Tuner, best_trial
from tandem_serve.workloads import (
    IMAGE_SIZES,
    LENGTH_MIX,
    mixed_length_texts,
    mixed_size_jpegs,
    random_bert,
    random_yolov5,
)

logger = logging.getLogger("bench.suite")
WORKLOADS = {"minilm": "text", "bert-base": "text", "yolov5s": "detection"}
ENSEMBLES = {"text": "text_embedding_fused", "detection": "object_detection"}
# token budgets the text ceiling also tries (the encoder in groups of similar length, text/token_budget.py)
CEILING_BUDGETS = (4096, 16384)
NAIVE_BATCH, PLUGIN_BATCH, BATCH_DELAY_S = 8, 32, 0.005
LABELS = ["naive", "litserve", "ts-plugin", "triton-shipped", "triton-planned", "triton-plugin"]
SERVED = ("litserve", "triton-shipped", "triton-plugin")  # the systems whose server CPU per request is reported


class InProcessBatcher:
    """TorchServe's frontend batching in miniature: up to `batch_size` queued requests, waiting at most `delay_s`
    for more, handed to one worker (`service.handle`) at a time. `await batcher(i)` serves request i."""

    def __init__(self, service: Any, bodies: list[dict], batch_size: int, delay_s: float):
        self.service, self.bodies, self.batch_size, self.delay_s = service, bodies, batch_size, delay_s
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="worker")
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "InProcessBatcher":
        self.queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._batches())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.task.cancel()
        self.worker.shutdown(wait=True)

    async def __call__(self, index: int) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((self.bodies[index % len(self.bodies)], future))
        reply = await future
        if reply.status != 200:
            raise RuntimeError(f"HTTP {reply.status}: {reply.body[:200]!r}")
        return reply

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.delay_s
            while len(batch) < self.batch_size:
                try:
                    batch.append(self.queue.get_nowait() if self.queue.qsize() else
                                 await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            replies = await loop.run_in_executor(self.worker, self.service.handle, [body for body, _ in batch])
            for (_, future), reply in zip(batch, replies):
                if not future.done():
                    future.set_result(reply)


def make_service(pipeline: str, model: Path, pipelined: bool, micro_batch: int) -> Any:
    """The TorchServe handler's service on GPU 0, fp16, for the workload's model (naive: eager, no CUDA graphs)."""
    settings = {"micro_batch_size": micro_batch, "pipelined": pipelined, "cpu_threads": 8 if pipelined else 1}
    if pipeline == "text":
        encoder = {"precision": "fp16", "fuse_token_embedding": True, "cuda_graph_max_batch": 64 if pipelined else 0}
        config = {"handler": {"model_dir": str(model), "encoder": encoder, "pipeline": settings}}
        return TextEmbeddingService(model, config, gpu_id=0)
    decode = "auto" if pipelined else "cpu"  # the plugin: nvJPEG and the CPU in tandem where torchvision imports
    config = {"handler": {"decode": decode, "detector": {"precision": "fp16", "weights": str(model)}, "pipeline": settings}}
    return ObjectDetectionService(model.parent, config, gpu_id=0)


def bodies_of(pipeline: str, count: int) -> list[dict]:
    if pipeline == "text":
        return [{"body": {"text": t}} for t in mixed_length_texts(count, seed=3)]
    return [{"body": data} for data in mixed_size_jpegs(count, seed=11)]


def ceiling(pipeline: str, model: Path) -> dict:
    """The best items/s of the network alone on GPU-resident inputs, over batch sizes."""
    from tandem_serve.timing import median_seconds

    device = "cuda:0"
    results: dict[int, float] = {}
    by_mode: dict[str, dict[int, float]] = {}
    if pipeline == "text":
        from tandem_serve.model_files import SentenceModelFiles
        from tandem_serve.text.bert import load_sentence_encoder
        from tandem_serve.text.graphs import GraphedEncoder
        from tandem_serve.text.token_budget import length_groups, row_lengths, run_groups
        from tandem_serve.text.tokenize import TextTokenizer

        files = SentenceModelFiles.load(model)
        encoder = load_sentence_encoder(files, device, torch.float16, fused=True)
        batches = (1, 8, 32, 64, 128, 256)
        graphed = GraphedEncoder(encoder, torch.device(device), max(batches), files.max_seq_length,
                                 files.bert.pad_token_id, fused=True)  # captured on first use of each bucket
        tokenizer = TextTokenizer(files.tokenizer_json, files.max_seq_length, 8, files.bert.pad_token_id)
        for batch in batches:
            groups = [tokenizer(mixed_length_texts(batch, seed=s)) for s in range(4)]  # four batches of the mix
            tensors = [(torch.from_numpy(g.input_ids).to(device), torch.from_numpy(g.attention_mask).to(device)) for g in groups]
            calls = {"eager": [lambda t=t: encoder(*t) for t in tensors], "graphs": [lambda t=t: graphed(*t) for t in tensors]}
            # the rows in groups of similar length, as the encoder runs them under max_batch_tokens (grouped from the
            # host mask beforehand, as the stage does): the ceiling of a stage that no longer pads short rows
            for budget in CEILING_BUDGETS:
                calls[f"graphs, {budget} tokens/call"] = [
                    lambda t=t, s=length_groups(row_lengths(g.attention_mask), budget, g.attention_mask.shape[1]):
                    run_groups(graphed, *t, s) for g, t in zip(groups, tensors)]
            with torch.inference_mode():
                for label, fns in calls.items():
                    seconds = statistics.mean(median_seconds(fn, device, 10) for fn in fns)
                    by_mode.setdefault(label, {})[batch] = batch / seconds
            results[batch] = max(by_mode[label][batch] for label in calls)
        del graphed
    else:
        from tandem_serve.stage_config import DetectorConfig
        from tandem_serve.vision.detector import DetectStage

        stage = DetectStage(DetectorConfig(weights=str(model), precision="fp16"), device)
        for batch in (1, 4, 8, 16, 32, 64):
            pixels = torch.randint(0, 255, (batch, 3, 640, 640), dtype=torch.uint8, device=device)
            results[batch] = batch / median_seconds(lambda: stage.filtered(pixels), device, 10)
        del stage
    best = max(results, key=results.get)
    logger.info("ceiling: %s", {b: round(v) for b, v in results.items()})
    return {"items_per_s": results[best], "batch": best, "by_batch": results, "by_mode": by_mode}


def in_process(service: Any, bodies: list[dict], batch_size: int, specs: list[LoadSpec]) -> list[LoadPoint]:
    try:
        return measure(lambda: InProcessBatcher(service, bodies, batch_size, BATCH_DELAY_S), specs)
    finally:
        service.close()


def litserve(model: Path, bodies: list[dict], specs: list[LoadSpec], args: argparse.Namespace) -> list[LoadPoint]:
    """The LitServe peer on `model`, loaded over HTTP/JSON by the same load processes (server CPU from its process
    tree: API servers and inference worker)."""
    rest = [(json.dumps(b["body"]).encode(), "application/json") for b in bodies]
    with LitServePeer(model, extra_args=args.litserve_arg) as peer:
        sender = functools.partial(PostSender, peer.url, rest)
        return measure(sender, specs, processes=args.client_processes, server_pid=peer.process.pid)


def shipped_repository(models: dict[str, str], target: Path) -> Path:
    """The shipped models and ensembles in one repository (`tandem repository export`), pointed at the workload's
    model files, with the encoders run eagerly as the usual recipe does."""
    export_repository(target, models.get("model_dir") or None, models.get("detector_weights") or None, overwrite=True)
    for path in target.glob("*/config.pbtxt"):
        config = read_config(path)
        if "cuda_graph_max_batch" in config.parameters:
            config.parameters["cuda_graph_max_batch"].string_value = "0"
            write_config(config, path)
    return target


def planned(repository: Path, pipeline: str) -> dict:
    """What `tandem plan` chose for `pipeline` (ensemble, estimated throughput, stages), from the plan.json beside its
    triton/ folder."""
    return json.loads((repository.parent / "plan.json").read_text())["plans"][pipeline]


def triton_trials(repository: Path, ensemble: str, args: argparse.Namespace, rounds: int,
                  open_spec: list[LoadSpec], profile_dir: Path | None = None) -> tuple[list, list[LoadPoint]]:
    """`tandem tune`'s trials (rounds=0: the configs as loaded), then the open-loop level on the best one. With
    `profile_dir`, the server's stubs profile their batches there (TANDEM_STUB_PROFILE)."""
    if profile_dir is not None:
        os.environ[STUB_PROFILE_ENV] = str(profile_dir)  # the server and its stubs inherit it at their start
    try:
        return _triton_trials(repository, ensemble, args, rounds, open_spec)
    finally:
        os.environ.pop(STUB_PROFILE_ENV, None)


def _triton_trials(repository: Path, ensemble: str, args: argparse.Namespace, rounds: int,
                   open_spec: list[LoadSpec]) -> tuple[list, list[LoadPoint]]:
    options = TritonOptions(model_repositories=[repository], model_control=True, startup_timeout_s=600,
                            extra_args=list(args.triton_arg or []))
    with EmbeddedTriton(options) as server:
        tuner = Tuner(TuneOptions(server.grpc_url, ensemble, tuple(args.concurrency), args.seconds, rounds,
                                  admin_key=server.admin_key, client_processes=args.client_processes,
                                  protocol=args.protocol, http_url=server.http_url, shm=args.shm,
                                  shm_key=server.keys.shm, server_pid=server.process.pid))
        trials = tuner.run()  # the server is left on the best configuration (unless a reload failed: logged)
        return trials, measure(tuner.make, open_spec, processes=args.client_processes, server_pid=server.process.pid)


def run_workload(name: str, args: argparse.Namespace, scratch: Path) -> dict:
    pipeline = WORKLOADS[name]
    if name == "minilm":
        from tandem_serve.model_files import SentenceModelFiles

        model, models = SentenceModelFiles.load().root, {}
    elif name == "bert-base":
        model = random_bert("base", scratch)
        models = {"model_dir": str(model)}
    else:
        model = random_yolov5("s", scratch)
        models = {"detector_weights": str(model)}
    closed = [LoadSpec("closed", c, seconds=args.seconds) for c in args.concurrency]
    bodies = bodies_of(pipeline, 64)
    result: dict[str, Any] = {"pipeline": pipeline, "ensemble": ENSEMBLES[pipeline]}
    result["ceiling"] = ceiling(pipeline, model)
    logger.info("%s: naive", name)
    naive = in_process(make_service(pipeline, model, False, NAIVE_BATCH), bodies, NAIVE_BATCH, closed)
    saturating = max(p.throughput for p in naive)
    open_spec = [LoadSpec("open", 1024, rate=round(0.9 * saturating, 1), seconds=args.seconds)]
    naive += in_process(make_service(pipeline, model, False, NAIVE_BATCH), bodies, NAIVE_BATCH, open_spec)
    logger.info("%s: ts-plugin", name)
    micro = 16 if pipeline == "text" else 4
    ts_plugin = in_process(make_service(pipeline, model, True, micro), bodies, PLUGIN_BATCH, closed + open_spec)
    peer = None
    if pipeline == "text" and not args.skip_litserve:
        why = litserve_missing()
        if why:
            logger.warning("%s: the LitServe peer skipped (%s)", name, why)
        else:
            logger.info("%s: litserve", name)
            peer = litserve(model, bodies, closed + open_spec, args)
    logger.info("%s: triton-shipped", name)
    shipped_trials, shipped_open = triton_trials(shipped_repository(models, scratch / f"{name}-shipped"),
                                                 ENSEMBLES[pipeline], args, 0, open_spec)
    shipped = shipped_trials[0]
    plugin = None
    plan_repo = args.plans / name / "triton" if args.plans else None
    if plan_repo is not None and plan_repo.is_dir():
        chosen = planned(plan_repo, pipeline)
        ensemble = chosen["ensemble"]
        result["plan_estimate_per_s"] = chosen["throughput"]
        logger.info("%s: triton-plugin (%s planned, then tuned)", name, ensemble)
        profile_dir = scratch / f"{name}-stub-profile" if args.stub_profile else None
        trials, plugin_open = triton_trials(plan_repo, ensemble, args, args.tune_rounds, open_spec, profile_dir)
        if profile_dir is not None:
            records = stub_profile.summarize(profile_dir, 15)
            (args.out / f"stub-profile-{name}.md").write_text(stub_profile.markdown(records) + "\n")
            (args.out / f"stub-profile-{name}.json").write_text(json.dumps(records, indent=1) + "\n")
        plugin = {"planned": trials[0], "tuned": best_trial(trials), "trials": trials, "open": plugin_open}
        result["plugin_ensemble"] = ensemble
    else:
        logger.warning("%s: no plan under %s; triton-plugin skipped", name, plan_repo)
    result["points"] = {"naive": naive, "ts-plugin": ts_plugin, "triton-shipped": shipped.points + shipped_open}
    if peer is not None:
        result["points"]["litserve"] = peer
    if plugin:
        result["points"]["triton-planned"] = plugin["planned"].points
        result["points"]["triton-plugin"] = plugin["tuned"].points + plugin["open"]
        result["tuned_by"] = plugin["tuned"].change
        result["stages"] = {"triton-shipped": shipped.stages, "triton-plugin": plugin["tuned"].stages}
    return result


def best(points: list[LoadPoint]) -> float:
    return max((p.throughput for p in points if p.mode == "closed" and not p.errors), default=0.0)


def at(points: list[LoadPoint], mode: str, concurrency: int | None = None) -> LoadPoint | None:
    return next((p for p in points if p.mode == mode and (concurrency is None or p.concurrency == concurrency)), None)


def summary(name: str, r: dict) -> dict:
    """The issue's ratios for one workload."""
    points, ceiling_rate = r["points"], r["ceiling"]["items_per_s"]
    naive = points["naive"]
    out = {"workload": name, "ceiling_items_per_s": ceiling_rate, "ceiling_batch": r["ceiling"]["batch"]}
    for label, series in points.items():
        out[f"{label}_best_per_s"] = best(series)
        c1 = at(series, "closed", 1)
        out[f"{label}_p50_c1_ms"] = c1.p50_ms if c1 else None
        opened = at(series, "open")
        out[f"{label}_p99_open_ms"] = opened.p99_ms if opened else None
    for label in SERVED:  # the server's CPU time per request at its best closed level
        closed = [p for p in points.get(label, []) if p.mode == "closed" and not p.errors]
        top = max(closed, key=lambda p: p.throughput, default=None)
        out[f"{label}_server_cpu_ms"] = top.server_cpu_ms_per_request if top else None
    if r.get("plan_estimate_per_s") and "triton-planned" in points:  # what the plan predicted for its own configs
        out["plan_estimate_per_s"] = r["plan_estimate_per_s"]
        out["triton-planned/estimate"] = best(points["triton-planned"]) / r["plan_estimate_per_s"]
    for label in ("ts-plugin", "triton-plugin"):
        if label in points and best(naive):
            out[f"{label}/naive"] = best(points[label]) / best(naive)
            out[f"{label}/ceiling"] = best(points[label]) / ceiling_rate
            if out[f"{label}_p50_c1_ms"] and out["naive_p50_c1_ms"]:
                out[f"{label}/naive p50 c1"] = out[f"{label}_p50_c1_ms"] / out["naive_p50_c1_ms"]
        if label in points and best(points.get("litserve", [])):
            out[f"{label}/litserve"] = best(points[label]) / best(points["litserve"])
    return out


def markdown(rows: list[dict], labels: list[str]) -> str:
    lines = ["| workload | ceiling /s (batch) | " + " | ".join(f"{l} /s" for l in labels) +
             " | plugin/naive | plugin/ceiling | p50 c1 plugin/naive | p99 @0.9x naive sat.: naive / plugin ms |",
             "|---|---|" + "---|" * len(labels) + "---|---|---|---|"]
    for r in rows:
        plugin = max((l for l in ("ts-plugin", "triton-plugin") if f"{l}/naive" in r), key=lambda l: r[f"{l}_best_per_s"])
        cells = " | ".join(f"{r[f'{l}_best_per_s']:.0f}" if f"{l}_best_per_s" in r else "-" for l in labels)
        lines.append(f"| {r['workload']} | {r['ceiling_items_per_s']:.0f} ({r['ceiling_batch']}) | {cells} | "
                     f"{r.get(f'{plugin}/naive', float('nan')):.2f}x ({plugin}) | {r.get(f'{plugin}/ceiling', float('nan')):.0%} | "
                     f"{r.get(f'{plugin}/naive p50 c1', float('nan')):.2f}x | "
                     f"{r.get('naive_p99_open_ms') or float('nan'):.0f} / {r.get(f'{plugin}_p99_open_ms') or float('nan'):.0f} |")
    estimates = [f"{r['workload']}: `tandem plan` estimated {r['plan_estimate_per_s']:.0f}/s for the configs it rendered; "
                 f"served {r['triton-planned_best_per_s']:.0f}/s ({r['triton-planned/estimate']:.2f}x the estimate)"
                 for r in rows if "triton-planned/estimate" in r]
    peers = [f"{r['workload']}: LitServe + sentence-transformers {r['litserve_best_per_s']:.0f}/s "
             f"(server {r.get('litserve_server_cpu_ms') or float('nan'):.2f} ms CPU/request); the plugin serves "
             + ", ".join(f"{r[f'{l}/litserve']:.2f}x it ({l})" for l in ("ts-plugin", "triton-plugin") if f"{l}/litserve" in r)
             for r in rows if r.get("litserve_best_per_s")]
    notes = estimates + peers
    return "\n".join(lines + ([""] + notes if notes else []))


def stage_lines(name: str, r: dict) -> list[str]:
    """Where the plugin's time goes: per composing model at concurrency 1 and at its best closed level."""
    series = r["points"].get("triton-plugin") or []
    closed = [p for p in series if p.mode == "closed" and not p.errors]
    if not closed:
        return []
    levels = {p.concurrency: p for p in (at(series, "closed", 1), max(closed, key=lambda p: p.throughput)) if p}
    ensemble = r.get("plugin_ensemble", "")
    lines = []
    for point in levels.values():
        busy = "" if point.host_cores_busy is None else f", host {point.host_cores_busy:.1f} cores busy"
        if point.server_cpu_ms_per_request is not None:
            busy += f", server {point.server_cpu_ms_per_request:.2f} ms CPU/request"
        level = f"c{point.concurrency}: {point.throughput:.0f}/s, p50 {point.p50_ms:.1f} ms, GPU {point.gpu_util or 0:.0f} %{busy}"
        parts = point.server_cpu_ms_by_part()
        for s in point.stages:
            if s.model != ensemble:
                cpu = parts.pop(f"stub:{s.model}", None)
                split = f" ({s.input_ms:.2f} / {s.infer_ms:.2f} / {s.output_ms:.2f})" if s.infer_ms else ""
                lines.append(f"| {name} | {level} | {s.model} | {s.mean_batch:.1f} | {s.queue_ms:.2f} | {s.compute_ms:.2f}{split} | "
                             f"{'' if cpu is None else f'{cpu:.3f}'} |")
        for part, cpu in parts.items():  # tritonserver itself (gRPC, ensemble scheduling, backend IPC)
            lines.append(f"| {name} | {level} | ({part}) | | | | {cpu:.3f} |")
    return lines


def stage_table(results: dict[str, dict]) -> str:
    lines = [line for name, r in results.items() for line in stage_lines(name, r)]
    if not lines:
        return ""
    return ("Where the plugin's time goes (Triton's statistics of each level's window; compute = a batch's input, "
            "infer and output, per request, and in brackets those three apart; CPU = the CPU time of that model's stub processes, or of the server process "
            "itself, per request answered):\n\n| workload | level | model | mean batch | queue ms | compute ms | CPU ms |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def point_of(record: dict) -> LoadPoint:
    """A LoadPoint back from its JSON record."""
    stages = [StageStats(**{k: v for k, v in s.items() if k != "mean_batch"}) for s in record.get("stages", [])]
    fields = {f.name for f in dataclasses.fields(LoadPoint)}  # not the derived per-request figures
    return LoadPoint(**{**{k: v for k, v in record.items() if k in fields}, "stages": stages})


def render(paths: list[Path], out: Path) -> int:
    """The table of several suite.json files (e.g. one workload per run) in one suite.md."""
    results, headers = {}, []
    for path in paths:
        data = json.loads(path.read_text())
        args = data["args"]
        headers.append(f"- {path.name}: {data['machine']}; concurrency {args.get('concurrency')}, {args.get('seconds')} s "
                       f"per level; Triton systems over {args.get('protocol', 'grpc')}, shm {args.get('shm', 'none')}, "
                       f"{args.get('client_processes')} load process(es)")
        for name, r in data["workloads"].items():
            label = name if args.get("protocol", "grpc") == "grpc" and args.get("shm", "none") == "none" else \
                f"{name} ({args.get('protocol')}, shm {args.get('shm')})"
            results[label] = {**r, "points": {l: [point_of(p) for p in pts] for l, pts in r["points"].items()}}
    rows = [summary(name, r) for name, r in results.items()]
    text = ("\n".join(headers) + f"\n\nOne item per request; texts: words per text {LENGTH_MIX}; images: JPEG {IMAGE_SIZES}."
            "\n\n" + markdown(rows, LABELS) + "\n\n" + stage_table(results))
    sys.stdout.write(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plans", type=Path, help="DIR/<workload>/ from `tandem plan --out` per workload")
    parser.add_argument("--from-json", nargs="+", type=Path, metavar="SUITE_JSON",
                        help="measure nothing: render these suite.json files (one run each) into one OUT/suite.md")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tune-rounds", type=int, default=1)
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="the Triton systems' protocol")
    parser.add_argument("--shm", choices=["none", "system", "cuda"], default="none",
                        help="the Triton systems' inputs and outputs through shared memory regions")
    parser.add_argument("--stub-profile", action="store_true",
                        help="cProfile the triton-plugin system's stubs (TANDEM_STUB_PROFILE); OUT/stub-profile-<workload>.md")
    parser.add_argument("--triton-arg", action="append", metavar="ARG",
                        help="an extra tritonserver argument for every Triton system (repeatable), e.g. "
                             "--triton-arg=--cuda-memory-pool-byte-size=0:1073741824")
    parser.add_argument("--skip-litserve", action="store_true", help="leave the LitServe peer out")
    parser.add_argument("--litserve-arg", action="append", metavar="ARG", default=[],
                        help="an argument for bench/peers/litserve_text.py (repeatable), e.g. --litserve-arg=--max-batch-size=128")
    parser.add_argument("--client-processes", type=int, default=4,
                        help="load processes for the Triton systems (one Python process sends a few thousand requests/s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.from_json:
        return render(args.from_json, args.out)
    if not torch.cuda.is_available():
        logger.error("the suite measures a GPU; none is visible")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            results[name] = run_workload(name, args, Path(tmp))
            rows.append(summary(name, results[name]))
            plot_curves({label: [(p.throughput, p.p99_ms) for p in pts if p.mode == "closed"]
                         for label, pts in results[name]["points"].items()},
                        args.out / f"suite-{name}.png", f"{name} ({machine()['gpu']})")
            torch.cuda.empty_cache()
    table = markdown(rows, LABELS) + "\n\n" + stage_table(results)
    header = (f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; closed loop at concurrency {args.concurrency}, "
              f"{args.seconds:g} s per level, one item per request; Triton systems over {args.protocol}, shm "
              f"{args.shm}, {args.client_processes} load process(es); texts: words per text {LENGTH_MIX}; "
              f"images: JPEG {IMAGE_SIZES}.")
    sys.stdout.write(header + "\n\n" + table + "\n")
    (args.out / "suite.md").write_text(header + "\n\n" + table + "\n")
    (args.out / "suite.json").write_text(json.dumps({
        "machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - started, "summary": rows,
        "workloads": {n: {**{k: v for k, v in r.items() if k not in ("points", "stages")},
                          "points": {l: [p.record() for p in pts] for l, pts in r["points"].items()},
                          "stages": {l: [s.__dict__ for s in st] for l, st in r.get("stages", {}).items()}}
                      for n, r in results.items()}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
