"""Texts per request: how close the plugin's text ensemble gets to the model-only ceiling when requests carry several.

Every request through Triton's Python backend costs CPU whatever it carries (the step between models, decoding,
checks, the response): with one text per request that cost, not the GPU, bounds MiniLM (the suite's table). This
serves one planned repository and measures the same closed-loop levels with 1, 4 and 16 texts per request, beside
the ceiling (the encoder alone on GPU-resident inputs, as in bench/suite.py), in one run. Prints a table, writes JSON.

    python bench/items_per_request.py --repository PLANS/minilm/triton --out FILE [--items 1 4 16]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import tritonclient.grpc as grpcclient

from _common import machine
from suite import ceiling, planned
from tandem_serve.loadgen import LoadSpec, TritonSender, measure
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.tuning.render import read_config, write_config
from tandem_serve.workloads import OUTPUTS, triton_requests

logger = logging.getLogger("bench.items_per_request")


def with_encoder_batch(source: Path, target: Path, batch: int) -> Path:
    """A copy of the repository whose encoder models batch up to `batch` (preferred `batch // 2` and `batch`)."""
    shutil.copytree(source, target)
    for path in target.glob("encoder*/config.pbtxt"):
        config = read_config(path)
        config.max_batch_size = batch
        config.dynamic_batching.preferred_batch_size[:] = [batch // 2, batch]
        write_config(config, path)
    if (source.parent / "plan.json").exists():  # a planned repository's record goes with it
        shutil.copy(source.parent / "plan.json", target.parent / "plan.json")
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="a `tandem plan --out` triton/ folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--items", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--encoder-max-batch", type=int,
                        help="serve a copy whose encoder batches up to N texts (max_batch_size N, preferred N/2 and N): "
                             "the plan sizes it for one text per request")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ensemble = planned(args.repository, "text")["ensemble"]
    files = SentenceModelFiles.load()
    top = ceiling("text", files.root)
    rows = []
    scratch = tempfile.TemporaryDirectory()
    repository = args.repository
    if args.encoder_max_batch:
        repository = with_encoder_batch(args.repository, Path(scratch.name) / "triton", args.encoder_max_batch)
    with scratch, EmbeddedTriton(TritonOptions(model_repositories=[repository], startup_timeout_s=600)) as server:
        stats = grpcclient.InferenceServerClient(server.grpc_url)
        for items in args.items:
            sender = functools.partial(TritonSender, server.grpc_url, "grpc", ensemble,
                                       triton_requests("text", 64, seed=3, items=items), OUTPUTS["text"], timeout_s=60.0)
            specs = [LoadSpec("closed", c, seconds=args.seconds, warm_up=8) for c in args.concurrency]
            for point in measure(sender, specs, stats=(stats, "grpc"), processes=args.client_processes):
                encoder = next((s for s in point.stages if s.model.startswith("encoder")), None)
                rows.append({"items": items, "concurrency": point.concurrency, "requests_per_s": point.throughput,
                             "texts_per_s": point.throughput * items, "of_ceiling": point.throughput * items / top["items_per_s"],
                             "p50_ms": point.p50_ms, "p99_ms": point.p99_ms, "errors": point.errors,
                             "gpu_util": point.gpu_util, "host_cores_busy": point.host_cores_busy,
                             "encoder_mean_batch": encoder.mean_batch if encoder else None,
                             "encoder_compute_ms": encoder.compute_ms if encoder else None,
                             "stages": [dict(s.__dict__, mean_batch=s.mean_batch) for s in point.stages]})
    lines = [f"{machine()}; ensemble {ensemble} from {args.repository}; ceiling {top['items_per_s']:.0f} texts/s "
             f"(batch {top['batch']}); {args.client_processes} load processes, gRPC",
             f"{'texts/req':>9} {'conc':>5} {'req/s':>8} {'texts/s':>8} {'ceiling':>8} {'p50 ms':>7} {'p99 ms':>7} "
             f"{'GPU %':>6} {'host cores':>10} {'enc batch':>9} {'enc ms':>7}"]
    for r in rows:
        lines.append(f"{r['items']:>9} {r['concurrency']:>5} {r['requests_per_s']:>8.0f} {r['texts_per_s']:>8.0f} "
                     f"{r['of_ceiling']:>8.0%} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['gpu_util'] or 0:>6.0f} "
                     f"{r['host_cores_busy'] or 0:>10.1f} {r['encoder_mean_batch'] or 0:>9.1f} {r['encoder_compute_ms'] or 0:>7.2f}")
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "ensemble": ensemble, "ceiling": top, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
