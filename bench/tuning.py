"""Default configs vs the plan from `tandem plan` vs that plan after `tandem tune`, per pipeline, one machine.

1. the project's shipped model_repository/ + ensembles/ (KIND_AUTO, hand-set batching), measured;
2. the planned repository (`tandem plan --out DIR`: DIR/triton), measured as rendered;
3. the same after `tandem tune`'s search (`--rounds`).
Closed loop with the project's gRPC client, one text / image per request, at each concurrency.
Prints a table of the best throughput (and p99 at the highest concurrency) with the ratios, writes
JSON, and a latency-throughput plot per pipeline when matplotlib is there.

    python bench/tuning.py --plan DIR --out tuning.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from _common import machine
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.tuning.plots import plot_curves
from tandem_serve.tuning.tune import TuneOptions, Tuner, best_trial, format_trials, trial_record

logger = logging.getLogger("bench.tuning")


def measure(server: EmbeddedTriton, ensemble: str, args: argparse.Namespace, rounds: int) -> list:
    options = TuneOptions(server.grpc_url, ensemble, tuple(args.concurrency), args.seconds, rounds,
                          admin_key=server.admin_key)
    trials = Tuner(options).run()
    logger.info("%s\n%s", ensemble, format_trials(trials))
    return trials


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", type=Path, required=True, help="a `tandem plan --out` directory")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench_tuning.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    plans = json.loads((args.plan / "plan.json").read_text())["plans"]
    ensembles = {pipeline: plan["ensemble"] for pipeline, plan in plans.items()}
    results: dict[str, dict] = {p: {"ensemble": e} for p, e in ensembles.items()}
    with EmbeddedTriton(TritonOptions(model_control=True)) as server:
        for pipeline, ensemble in ensembles.items():
            results[pipeline]["default"] = measure(server, ensemble, args, rounds=0)[0]
    with EmbeddedTriton(TritonOptions(model_repositories=[args.plan / "triton"], model_control=True)) as server:
        for pipeline, ensemble in ensembles.items():
            trials = measure(server, ensemble, args, rounds=args.rounds)
            results[pipeline].update(planned=trials[0], tuned=best_trial(trials), trials=trials)
    lines = [f"{'pipeline':<10}{'ensemble':<22}{'default /s':>11}{'planned /s':>11}{'tuned /s':>10}"
             f"{'planned/default':>16}{'tuned/planned':>14}{'tuned/default':>14}"]
    for pipeline, r in results.items():
        d, p, t = r["default"].value, r["planned"].value, r["tuned"].value
        lines.append(f"{pipeline:<10}{r['ensemble']:<22}{d:>11.1f}{p:>11.1f}{t:>10.1f}{p / d:>16.2f}{t / p:>14.2f}{t / d:>14.2f}")
        lines.append(f"{'':<10}tuned by: {r['tuned'].change}")
        plot_curves({k: [(x.throughput, x.p99_ms) for x in r[k].points] for k in ("default", "planned", "tuned")},
                    args.out.with_name(f"{args.out.stem}-{pipeline}.png"), f"{r['ensemble']} ({machine()['gpu']})")
    sys.stdout.write("\n".join(lines) + "\n")

    args.out.write_text(json.dumps({"machine": machine(), "concurrency": args.concurrency, "seconds": args.seconds,
                                    "results": {p: {"ensemble": r["ensemble"], "default": trial_record(r["default"]),
                                                    "planned": trial_record(r["planned"]), "tuned": trial_record(r["tuned"]),
                                                    "trials": [trial_record(t) for t in r["trials"]]}
                                                for p, r in results.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
