"""Texts per request: how close the plugin's text ensemble gets to the model-only ceiling when requests carry several.

Every request through Triton's Python backend costs CPU whatever it carries (the step between models, decoding,
checks, the response): with one text per request that cost, not the GPU, bounds MiniLM (the suite's table). This
serves one planned repository and measures the same closed-loop levels with 1, 4 and 16 texts per request, beside
the ceiling (the encoder alone on GPU-resident inputs, as in bench/suite.py), in one run. Prints a table, writes JSON.

`--utf8-instances N [M ...]` also serves `text_embedding_utf8` (tokenizer and encoder in one step, the text as UTF-8
bytes) at one text per request, its `encoder_utf8` set as the repository's encoder_fused (precision, CUDA graphs,
token budget, batch sizes) with N instances: on the same server as the ensemble's rows, then M ... on servers of
their own.

    python bench/items_per_request.py --repository PLANS/minilm/triton --out FILE [--items 1 4 16] [--utf8-instances 4]
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

import torch
import tritonclient.grpc as grpcclient

from _common import machine
from suite import ceiling, planned
from tandem_serve.loadgen import LoadSpec, TritonSender, measure
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.paths import assets_root
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.model_config import read_config, write_config
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


def with_utf8_encoder(repository: Path, instances: int) -> Path:
    """Add encoder_utf8 and text_embedding_utf8 to `repository`, the model set as its encoder_fused is, `instances`
    of it (KIND_AUTO: on the GPU where there is one)."""
    root = assets_root()
    shutil.copytree(root / "model_repository" / "encoder_utf8", repository / "encoder_utf8", dirs_exist_ok=True)
    shutil.copytree(root / "ensembles" / "text_embedding_utf8", repository / "text_embedding_utf8", dirs_exist_ok=True)
    fused = read_config(repository / "encoder_fused" / "config.pbtxt")
    config = read_config(repository / "encoder_utf8" / "config.pbtxt")
    for key in ("model_dir", "precision", "cuda_graph_max_batch", "max_batch_tokens", "cpu_threads"):
        config.parameters[key].string_value = fused.parameters[key].string_value
    config.max_batch_size = fused.max_batch_size
    config.dynamic_batching.CopyFrom(fused.dynamic_batching)
    del config.instance_group[:]
    config.instance_group.add(kind=fused.instance_group[0].kind, count=instances)
    config.output[0].dims[:] = fused.output[0].dims
    write_config(config, repository / "encoder_utf8" / "config.pbtxt")
    ensemble = read_config(repository / "text_embedding_utf8" / "config.pbtxt")
    ensemble.output[0].dims[:] = fused.output[0].dims
    write_config(ensemble, repository / "text_embedding_utf8" / "config.pbtxt")
    return repository


def measure_rows(server: EmbeddedTriton, model: str, items: int, label: str, top: dict | None,
                 args: argparse.Namespace) -> list[dict]:
    """Closed-loop levels of requests of `items` texts to `model` (text_embedding_utf8: one text's UTF-8 bytes)."""
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    requests = triton_requests("text", 64, seed=3, items=items, utf8=model == "text_embedding_utf8")
    sender = functools.partial(TritonSender, server.grpc_url, "grpc", model, requests, OUTPUTS["text"], timeout_s=60.0)
    specs = [LoadSpec("closed", c, seconds=args.seconds, warm_up=8) for c in args.concurrency]
    rows = []
    for point in measure(sender, specs, stats=(stats, "grpc"), processes=args.client_processes,
                         server_pid=server.process.pid):
        encoder = next((s for s in point.stages if s.model.startswith("encoder")), None)
        rows.append({"items": items, "label": label, "model": model, "concurrency": point.concurrency,
                     "requests_per_s": point.throughput, "texts_per_s": point.throughput * items,
                     "of_ceiling": point.throughput * items / top["items_per_s"] if top else None,
                     "p50_ms": point.p50_ms, "p99_ms": point.p99_ms, "errors": point.errors,
                     "gpu_util": point.gpu_util, "host_cores_busy": point.host_cores_busy,
                     "server_cpu_ms_per_request": point.server_cpu_ms_per_request,
                     "server_cpu_ms_by_part": point.server_cpu_ms_by_part(),
                     "encoder_mean_batch": encoder.mean_batch if encoder else None,
                     "encoder_compute_ms": encoder.compute_ms if encoder else None,
                     "stages": [dict(s.__dict__, mean_batch=s.mean_batch) for s in point.stages]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="a `tandem plan --out` triton/ folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--items", nargs="*", type=int, default=[1, 4, 16])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[16, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--encoder-max-batch", type=int,
                        help="serve a copy whose encoder batches up to N texts (max_batch_size N, preferred N/2 and N): "
                             "the plan sizes it for one text per request")
    parser.add_argument("--utf8-instances", nargs="*", type=int, default=[],
                        help="also text_embedding_utf8 at one text per request with N encoder_utf8 instances (the first "
                             "beside the ensemble, each further count on a server of its own)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ensemble = planned(args.repository, "text")["ensemble"]
    files = SentenceModelFiles.load()
    # without a GPU (the CPU machine) no ceiling: the rows still compare served rates and server CPU per request
    top = ceiling("text", files.root) if torch.cuda.is_available() else None
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "triton"
        if args.encoder_max_batch:
            with_encoder_batch(args.repository, repository, args.encoder_max_batch)
        else:
            shutil.copytree(args.repository, repository)
        if args.utf8_instances:
            with_utf8_encoder(repository, args.utf8_instances[0])
        with EmbeddedTriton(TritonOptions(model_repositories=[repository], startup_timeout_s=600)) as server:
            for items in args.items:
                rows += measure_rows(server, ensemble, items, f"{ensemble}", top, args)
            if args.utf8_instances:
                rows += measure_rows(server, "text_embedding_utf8", 1, f"utf8 x{args.utf8_instances[0]}", top, args)
        for count in args.utf8_instances[1:]:  # the UTF-8 model alone, `count` instances
            alone = Path(scratch) / f"utf8-{count}"
            shutil.copytree(repository / "encoder_fused", alone / "encoder_fused")
            with_utf8_encoder(alone, count)
            shutil.rmtree(alone / "encoder_fused")
            with EmbeddedTriton(TritonOptions(model_repositories=[alone], startup_timeout_s=600)) as server:
                rows += measure_rows(server, "text_embedding_utf8", 1, f"utf8 x{count}", top, args)
    bound = f"ceiling {top['items_per_s']:.0f} texts/s (batch {top['batch']})" if top else "no GPU: no ceiling"
    lines = [f"{machine()}; ensemble {ensemble} from {args.repository}; {bound}; {args.client_processes} load processes, gRPC",
             f"{'served':>22} {'texts/req':>9} {'conc':>5} {'req/s':>8} {'texts/s':>8} {'ceiling':>8} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'GPU %':>6} {'host cores':>10} {'server CPU ms/req':>17} {'enc batch':>9} {'enc ms':>7}"]
    for r in rows:
        lines.append(f"{r['label']:>22} {r['items']:>9} {r['concurrency']:>5} {r['requests_per_s']:>8.0f} "
                     f"{r['texts_per_s']:>8.0f} {format(r['of_ceiling'] or 0, '>8.0%')} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
                     f"{r['gpu_util'] or 0:>6.0f} {r['host_cores_busy'] or 0:>10.1f} "
                     f"{r['server_cpu_ms_per_request'] or 0:>17.3f} {r['encoder_mean_batch'] or 0:>9.1f} "
                     f"{r['encoder_compute_ms'] or 0:>7.2f}")
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "ensemble": ensemble, "ceiling": top, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
