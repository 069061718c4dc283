"""The shipped Triton ensembles side by side, and how many load processes it takes to drive them.

Serves model_repository/ + ensembles/ (pointed at `--model-dir` / `--detector-weights` when given) and
drives each `--ensembles` entry closed-loop at each `--concurrency`, once per `--client-processes`
value. Answers two questions from one run on one machine: which text ensemble is faster served
(unfused: CPU token embedding, HIDDEN crossing to the GPU; fused: token ids only), and whether one
Python load process held a measurement back (`client cores` near 1.0 and more throughput with more
processes). Prints a table and writes JSON.

    python bench/ensembles.py --out ensembles.json [--ensembles text_embedding text_embedding_fused]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
from pathlib import Path

import tritonclient.grpc as grpcclient

from _common import machine
from suite import shipped_repository
from tandem_serve.loadgen import LoadSpec, TritonSender, measure
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.workloads import OUTPUTS, ensemble_requests, pipeline_of

logger = logging.getLogger("bench.ensembles")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ensembles", nargs="+", default=["text_embedding", "text_embedding_fused"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--client-processes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--model-dir", default="", help="sentence-transformers directory (default all-MiniLM-L6-v2)")
    parser.add_argument("--detector-weights", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    models = {k: v for k, v in (("model_dir", args.model_dir), ("detector_weights", args.detector_weights)) if v}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = shipped_repository(models, Path(tmp) / "repository")
        with EmbeddedTriton(TritonOptions(model_repositories=[repository], startup_timeout_s=600)) as server:
            stats = (grpcclient.InferenceServerClient(server.grpc_url), "grpc")
            for ensemble in args.ensembles:
                pipeline = pipeline_of(ensemble)
                sender = functools.partial(TritonSender, server.grpc_url, "grpc", ensemble,
                                           ensemble_requests(ensemble, 64, seed=3), OUTPUTS[pipeline], timeout_s=60.0)
                for processes in args.client_processes:
                    specs = [LoadSpec("closed", c, seconds=args.seconds) for c in args.concurrency]
                    for point in measure(sender, specs, stats=stats, processes=processes):
                        rows.append({"ensemble": ensemble, "processes": processes, **point.record()})
    lines = [f"{'ensemble':<24}{'procs':>6}{'conc':>6}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'client cores':>13}"
             f"{'GPU %':>7}  busiest stage (compute ms/request, mean batch)"]
    for r in rows:
        busiest = max((s for s in r["stages"] if not s["model"].startswith(("text_embedding", "object_detection"))),
                      key=lambda s: s["executions"] * s["compute_ms"], default=None)
        where = f"{busiest['model']} ({busiest['compute_ms']:.2f}, {busiest['mean_batch']:.1f})" if busiest else "-"
        lines.append(f"{r['ensemble']:<24}{r['processes']:>6}{r['concurrency']:>6}{r['throughput']:>9.0f}"
                     f"{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{r['client_cores'] or 0:>13.2f}{r['gpu_util'] or 0:>7.0f}  {where}")
    table = "\n".join(lines)
    sys.stdout.write(f"Machine: {machine()}\n\n{table}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows, "table": table}, indent=1,
                                   default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
