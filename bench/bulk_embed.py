"""Bulk embedding: `tandem embed` on a large file against sentence-transformers' `encode` on the same file, one run.

Writes N lines of the suite's text mix (`tandem_serve.workloads.mixed_length_texts`), then
- the peer: sentence-transformers `encode(lines, batch_size=256)` in a child process on the GPU (fp16 unless told
  fp32; its own length sorting), timed from after the model is loaded and warmed: its most favourable view;
- `tandem embed FILE` as a child process (its whole wall time: interpreter start, imports, reading, writing) against
  one embedded Triton serving `--repository` (default the shipped one), for each --batch x --in-flight x --window;
- `bulk.embed_file` called in this process for the first setting (the CLI's work without its start-up);
and checks every run's rows against the peer's (row-wise cosine). Prints a table and writes JSON.

    python bench/bulk_embed.py --lines 200000 --out FILE.json [--repository DIR] [--ensemble text_embedding_fused]
                               [--batch 64 ...] [--in-flight 16 ...] [--window 4096 ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from _common import machine, run_child
from items_per_request import with_encoder_batch
from tandem_serve.clients.bulk import BulkOptions, embed_file
from tandem_serve.model_files import default_model_dir
from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions
from tandem_serve.triton.statistics import read_statistics, stats_delta
from tandem_serve.workloads import LENGTH_MIX, mixed_length_texts

logger = logging.getLogger("bench.bulk_embed")


def write_corpus(path: Path, lines: int, seed: int = 0) -> None:
    """`lines` texts of the suite's length mix, one per line."""
    path.write_text("".join(text + "\n" for text in mixed_length_texts(lines, seed)), encoding="utf-8")


def encode_child(source: Path, out: Path, model: str, batch: int, precision: str, device: str) -> None:
    """(In the child) sentence-transformers' encode of every line into `out`; prints its timings as JSON."""
    import torch
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    encoder = SentenceTransformer(model, device=device)
    if precision == "fp16" and device != "cpu":
        encoder.half()
    lines = source.read_text(encoding="utf-8").split("\n")[:-1]
    encoder.encode(lines[:2048], batch_size=batch, convert_to_numpy=True)  # warm: kernels chosen, memory pooled
    if device != "cpu":
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    vectors = encoder.encode(lines, batch_size=batch, convert_to_numpy=True)
    seconds = time.perf_counter() - loaded
    np.save(out, vectors.astype(np.float32))
    print(json.dumps({"seconds": seconds, "load_seconds": loaded - started, "texts": len(lines)}))


def sentence_transformers_row(source: Path, out: Path, model: str, batch: int, precision: str, device: str) -> dict:
    """The peer's row: encode in a child process, whose GPU memory is freed before Triton starts."""
    command = [sys.executable, __file__, "--encode-child", str(source), str(out), model, str(batch), precision, device]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"sentence-transformers encode failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    kind = precision if device != "cpu" else "fp32 cpu"
    return {"system": f"sentence-transformers encode(batch_size={batch}) {kind}, in-process",
            "texts_per_s": measured["texts"] / measured["seconds"], "seconds": measured["seconds"],
            "load_seconds": measured["load_seconds"]}


def cli_row(source: Path, out: Path, url: str, model: str, batch: int, in_flight: int, window: int) -> dict:
    """`tandem embed` as a child: wall time from its start to its exit, its CPU time and its own peak RSS."""
    command = [sys.executable, "-m", "tandem_serve.cli", "embed", str(source), "--out", str(out), "--url", url,
               "--model", model, "--batch", str(batch), "--in-flight", str(in_flight), "--window", str(window),
               "--quiet", "--restart"]
    run = run_child(command)
    summary = json.loads(run.stdout.strip().splitlines()[-1]) if run.stdout.strip() else {}
    if run.returncode or not summary.get("complete"):
        raise RuntimeError(f"tandem embed exited {run.returncode} without completing: {summary}")
    texts = summary["texts"]
    return {"system": f"tandem embed --batch {batch} --in-flight {in_flight} --window {window}",
            "texts_per_s": texts / run.seconds, "seconds": run.seconds,
            "client_cpu_us_per_text": run.cpu_seconds / texts * 1e6, "peak_rss_mib": run.peak_rss_mib}


def stage_times(client, before: dict, seconds: float) -> dict:
    """Per model since `before` (a read_statistics snapshot): requests, mean batch, queue and compute ms per request,
    and instances busy (compute time per execution, which each request of a batch records, times executions, over
    the wall: 1.0 is one instance all the time)."""
    stages = {}
    for now in read_statistics(client, "grpc"):
        step = stats_delta(now, before.get(now.model))
        if step.requests:
            config = client.get_model_config(step.model).config
            instances = sum(group.count or 1 for group in config.instance_group)  # an ensemble has none
            busy = step.compute_ms * step.executions / 1000 / seconds
            stages[step.model] = {"requests": step.requests, "mean_batch": round(step.mean_batch, 1),
                                  "queue_ms": round(step.queue_ms, 3), "compute_ms": round(step.compute_ms, 3),
                                  "instances_busy": round(busy, 2), "instances": instances,
                                  "utilisation": round(busy / instances, 2) if instances else None}
    return stages


def held_by(stages: dict) -> str:
    """The stage whose instances were busiest (the one that holds the run), as 'model (NN % of its N instances)'."""
    used = {name: t for name, t in stages.items() if t["utilisation"] is not None}
    if not used:
        return "-"
    name, top = max(used.items(), key=lambda item: item[1]["utilisation"])
    return f"{name} ({top['utilisation']:.0%} of {top['instances']} instance(s))"


def in_process_row(source: Path, out: Path, url: str, model: str, batch: int, in_flight: int, window: int) -> dict:
    """`bulk.embed_file` called here: the CLI's work without the interpreter's start and imports."""
    start = time.perf_counter()
    summary = embed_file(source, out, BulkOptions(url=url, in_flight=in_flight, progress=False), model, batch,
                         restart=True, window=window)
    seconds = time.perf_counter() - start
    if not summary["complete"]:
        raise RuntimeError(f"embed_file did not complete: {summary}")
    return {"system": f"bulk.embed_file in-process --batch {batch} --in-flight {in_flight} --window {window}",
            "texts_per_s": summary["texts"] / seconds, "seconds": seconds}


def agreement(actual: Path, expected: np.ndarray) -> dict:
    """Row-wise cosine of a run's rows against the peer's."""
    rows = np.load(actual, mmap_mode="r")
    cosine = np.einsum("ij,ij->i", rows, expected) / (np.linalg.norm(rows, axis=1) * np.linalg.norm(expected, axis=1))
    return {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--encode-child":
        source, out, model, batch, precision, device = sys.argv[2:8]
        encode_child(Path(source), Path(out), model, int(batch), precision, device)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--out", type=Path, required=True, help="JSON results; the table goes next to it as .md")
    parser.add_argument("--repository", type=Path, help="a model repository (a `tandem plan --out` triton/ folder); "
                                                        "default the shipped one")
    parser.add_argument("--ensemble", default="text_embedding_fused")
    parser.add_argument("--batch", nargs="+", type=int, default=[64])
    parser.add_argument("--in-flight", nargs="+", type=int, default=[16])
    parser.add_argument("--window", nargs="+", type=int, default=[4096])
    parser.add_argument("--encoder-max-batch", type=int,
                        help="with --repository: serve a copy whose encoders batch up to N texts (several requests)")
    parser.add_argument("--st-batch", type=int, default=256, help="sentence-transformers' batch_size")
    parser.add_argument("--st-precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--model", default=str(default_model_dir()), help="the sentence-transformers directory")
    parser.add_argument("--st-device", default="cuda", help="where sentence-transformers runs (cpu: a smoke test)")
    args = parser.parse_args()
    if args.encoder_max_batch and not args.repository:
        parser.error("--encoder-max-batch needs --repository")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-bulk-embed-") as tmp:
        source, reference = Path(tmp) / "corpus.txt", Path(tmp) / "reference.npy"
        write_corpus(source, args.lines)
        logger.info("%d lines, %.1f MiB; sentence-transformers first", args.lines, source.stat().st_size / 2**20)
        peer = sentence_transformers_row(source, reference, args.model, args.st_batch, args.st_precision,
                                         args.st_device)
        rows.append(peer)
        expected = np.load(reference)
        repository = args.repository
        if args.encoder_max_batch:
            repository = with_encoder_batch(repository, Path(tmp) / "triton", args.encoder_max_batch)
        options = TritonOptions(model_repositories=[repository] if repository else [], startup_timeout_s=600)
        with EmbeddedTriton(options) as server:
            stats = grpcclient.InferenceServerClient(server.grpc_url)
            settings = list(itertools.product(args.batch, args.in_flight, args.window))
            for batch, in_flight, window in settings:
                logger.info("tandem embed --batch %d --in-flight %d --window %d", batch, in_flight, window)
                out = Path(tmp) / f"cli-{batch}-{in_flight}-{window}.npy"
                before = {stage.model: stage for stage in read_statistics(stats, "grpc")}
                row = cli_row(source, out, server.grpc_url, args.ensemble, batch, in_flight, window)
                rows.append({**row, **agreement(out, expected), "stages": stage_times(stats, before, row["seconds"])})
                out.unlink()
            batch, in_flight, window = settings[0]
            out = Path(tmp) / "in-process.npy"
            rows.append({**in_process_row(source, out, server.grpc_url, args.ensemble, batch, in_flight, window),
                         **agreement(out, expected)})
    for row in rows:
        row["over_sentence_transformers"] = row["texts_per_s"] / peer["texts_per_s"]
    header = ("| system | texts/s | seconds | / sentence-transformers | client CPU us/text | peak RSS MiB | min cosine "
              "| busiest stage |")
    table = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cpu, rss = row.get("client_cpu_us_per_text"), row.get("peak_rss_mib")
        table.append(f"| {row['system']} | {row['texts_per_s']:,.0f} | {row['seconds']:.1f} | "
                     f"{row['over_sentence_transformers']:.2f}x | {'-' if cpu is None else f'{cpu:.1f}'} | "
                     f"{'-' if rss is None else f'{rss:.0f}'} | {row.get('min_cosine', 1.0):.5f} | "
                     f"{held_by(row['stages']) if row.get('stages') else '-'} |")
    table += ["", "Per model during each `tandem embed` run (queue and compute ms per request; busy: compute time over "
              "the wall, 1.0 = one instance all the time, of its instances):", ""]
    for row in rows:
        if row.get("stages"):
            table.append(f"- {row['system']}: " + "; ".join(
                f"{name} batch {t['mean_batch']}, queue {t['queue_ms']:.2f}, compute {t['compute_ms']:.2f}, "
                f"busy {t['instances_busy']:.2f} of {t['instances']}" for name, t in row["stages"].items()
                if t["instances"]))  # the ensemble itself runs no instances
    text = (f"{args.lines:,} lines of the suite's text mix {LENGTH_MIX} (words: share); Triton repository "
            f"{args.repository or 'shipped'}"
            f"{f' with encoders batching up to {args.encoder_max_batch}' if args.encoder_max_batch else ''}, ensemble "
            f"{args.ensemble}; {machine()}\n\n" + "\n".join(table) + "\n")
    sys.stdout.write(text)
    args.out.with_suffix(".md").write_text(text)
    args.out.write_text(json.dumps({"machine": machine(), "lines": args.lines, "length_mix": LENGTH_MIX,
                                    "repository": str(args.repository or "shipped"), "ensemble": args.ensemble,
                                    "encoder_max_batch": args.encoder_max_batch,
                                    "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
