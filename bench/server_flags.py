"""One model repository served under several sets of tritonserver flags, measured the same way in one run.

For questions such as "does a larger CUDA memory pool or pre-sized stub shared memory change the detector step":
each `--variant NAME=FLAGS` starts the embedded Triton on `--repository` (e.g. a plan's triton/ folder) with those
extra flags, drives `--ensemble` (default: the one plan.json beside the repository names) closed-loop at each
`--concurrency`, and reads Triton's statistics per composing model (mean batch, queue, compute split into input,
infer and output) and the server's CPU time by process. `--delay-scales 1 0` also serves each variant with every
composing model's `max_queue_delay_microseconds` scaled (reloaded through the model-control API on the same server):
what the batching window costs at concurrency 1 and brings under load. Prints a Markdown table, writes
OUT/server-flags.{json,md}.

    python bench/server_flags.py --repository PLANS/yolov5s/triton --out DIR \\
        --variant base= --variant pool=--cuda-memory-pool-byte-size=0:1073741824 [--concurrency 1 64] \\
        [--delay-scales 1 0.25 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from _common import machine
from suite import planned, stage_lines

from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.tuning.tune import TuneOptions, Tuner

logger = logging.getLogger("bench.server_flags")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME=--flag=a --other=b' -> ('NAME', ['--flag=a', '--other=b']); 'base=' has no extra flags."""
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=FLAGS (FLAGS may be empty), got {text!r}")
    return name, flags.split()


def with_delay_scaled(config: mc.ModelConfig, scale: float) -> mc.ModelConfig:
    """A copy of `config` whose dynamic batcher waits `scale` times as long for a batch to fill."""
    scaled = mc.ModelConfig()
    scaled.CopyFrom(config)
    if scaled.HasField("dynamic_batching"):
        delay = scaled.dynamic_batching.max_queue_delay_microseconds
        scaled.dynamic_batching.max_queue_delay_microseconds = int(round(delay * scale))
    return scaled


def measure_variant(repositories: list[Path], ensemble: str, flags: list[str], args: argparse.Namespace) -> dict[float, dict]:
    """The ensemble's closed-loop levels under one set of flags (no tuning), per queue-delay scale (1: as loaded)."""
    options = TritonOptions(model_repositories=repositories, model_control=True, startup_timeout_s=600, extra_args=flags)
    results = {}
    with EmbeddedTriton(options) as server:
        tuner = Tuner(TuneOptions(server.grpc_url, ensemble, tuple(args.concurrency), args.seconds, 0,
                                  admin_key=server.admin_key, client_processes=args.client_processes,
                                  server_pid=server.process.pid))
        loaded = {model: tuner.config(model) for model in tuner.models}
        for scale in args.delay_scales:
            delays = {}
            for model, config in loaded.items():
                scaled = with_delay_scaled(config, scale)
                delays[model] = scaled.dynamic_batching.max_queue_delay_microseconds
                if scaled != tuner.config(model):
                    tuner.load(model, scaled)
            logger.info("queue delays x%g: %s", scale, delays)
            results[scale] = {"flags": flags, "delays_us": delays, "points": tuner.measure(f"delays x{scale:g}").points}
    return results


def markdown(results: dict[str, dict], ensemble: str) -> str:
    """Throughput per level and variant, then where each variant's time goes."""
    levels = sorted({p.concurrency for r in results.values() for p in r["points"]})
    lines = ["| variant | flags, queue delays us | " + " | ".join(f"c{c} /s (p50 ms)" for c in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for name, r in results.items():
        by_level = {p.concurrency: p for p in r["points"]}
        cells = " | ".join(f"{by_level[c].throughput:.0f} ({by_level[c].p50_ms:.1f})" if c in by_level else "-"
                           for c in levels)
        delays = ", ".join(f"{m} {d}" for m, d in r.get("delays_us", {}).items())
        lines.append(f"| {name} | `{' '.join(r['flags']) or '(none)'}` {delays} | {cells} |")
    stages = [line for name, r in results.items()
              for line in stage_lines(name, {"points": {"triton-plugin": r["points"]}, "plugin_ensemble": ensemble})]
    return ("\n".join(lines) + "\n\nPer composing model (compute ms: input / infer / output in brackets; CPU ms per "
            "request of its stubs):\n\n| variant | level | model | mean batch | queue ms | compute ms | CPU ms |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(stages) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, nargs="+", required=True,
                        help="a plan's triton/ folder, or the shipped model_repository and ensembles")
    parser.add_argument("--ensemble", help="default: plan.json's choice beside the repository")
    parser.add_argument("--pipeline", default="detection", help="which plan.json entry names the ensemble")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True, metavar="NAME=FLAGS")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--delay-scales", nargs="+", type=float, default=[1.0],
                        help="serve each variant with its models' queue delays scaled by each (1: as loaded)")
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ensemble = args.ensemble or planned(args.repository[0], args.pipeline)["ensemble"]
    results = {}
    for name, flags in args.variant:
        logger.info("variant %s: %s", name, " ".join(flags) or "(no extra flags)")
        for scale, result in measure_variant(args.repository, ensemble, flags, args).items():
            results[name if scale == 1 else f"{name} delay x{scale:g}"] = result
    header = (f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}; {' '.join(map(str, args.repository))} ({ensemble}), closed loop "
              f"{args.seconds:g} s per level, {args.client_processes} load process(es), one item per request.")
    text = header + "\n\n" + markdown(results, ensemble)
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server-flags.md").write_text(text)
    (args.out / "server-flags.json").write_text(json.dumps(
        {"machine": machine(), "ensemble": ensemble,
         "variants": {n: {"flags": r["flags"], "delays_us": r["delays_us"], "points": [p.record() for p in r["points"]]}
                      for n, r in results.items()}},
        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
