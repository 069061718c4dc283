"""Peak memory of `tandem embed` against file size: the client's memory should stay flat.

Writes text files of N and 10 N lines (sentence lengths drawn from a stated mix), embeds each
with `tandem embed` in a child process against one embedded Triton, and reports the child's peak
RSS (its own VmHWM: wait4's ru_maxrss would keep this process's), its throughput, the output size,
and the RSS ratio large / small (flat: close to 1 while the output grows 10x). Prints a table and
writes JSON.

    python bench/bulk_memory.py --lines 20000 --out bulk_memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import machine, run_child
from tandem_serve.triton.launcher import EmbeddedTriton

logger = logging.getLogger("bench.bulk_memory")
WORDS = "the a of serving batch tensor memory token model queue latency pinned stream device host request".split()
LENGTH_MIX = {"words 3-8": 0.5, "words 9-30": 0.4, "words 31-120": 0.1}


def write_corpus(path: Path, lines: int, seed: int = 0) -> None:
    """`lines` sentences whose word counts follow LENGTH_MIX."""
    rng = np.random.default_rng(seed)
    bounds = [(3, 8), (9, 30), (31, 120)]
    kinds = rng.choice(len(bounds), size=lines, p=list(LENGTH_MIX.values()))
    with path.open("w") as handle:
        for kind in kinds:
            low, high = bounds[kind]
            handle.write(" ".join(rng.choice(WORDS, size=rng.integers(low, high + 1))) + "\n")


def embed(source: Path, out: Path, url: str, in_flight: int, batch: int) -> dict:
    """Run `tandem embed` as a child; its own peak RSS (VmHWM) and wall time."""
    command = [sys.executable, "-m", "tandem_serve.cli", "embed", str(source), "--out", str(out), "--url", url,
               "--in-flight", str(in_flight), "--batch", str(batch), "--quiet", "--restart"]
    run = run_child(command)
    if run.returncode:
        raise RuntimeError(f"tandem embed exited {run.returncode}")
    return {"seconds": run.seconds, "peak_rss_mib": run.peak_rss_mib}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=20000, help="the small file's lines; the large one has 10x")
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench_bulk_memory.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tandem-bulk-") as tmp, EmbeddedTriton() as server:
        for lines in (args.lines, 10 * args.lines):
            source, out = Path(tmp) / f"corpus-{lines}.txt", Path(tmp) / f"corpus-{lines}.npy"
            write_corpus(source, lines)
            logger.info("embedding %d lines", lines)
            measured = embed(source, out, server.grpc_url, args.in_flight, args.batch)
            vectors = np.load(out, mmap_mode="r")
            assert vectors.shape[0] == lines and np.isfinite(vectors[-1]).all() and abs(np.linalg.norm(vectors[-1]) - 1) < 1e-3
            rows.append({"lines": lines, "input_mib": source.stat().st_size / 2**20, "output_mib": out.stat().st_size / 2**20,
                         "texts_per_s": lines / measured["seconds"], **measured})
    small, large = rows
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    lines = [f"{'lines':>9} {'input MiB':>10} {'output MiB':>11} {'peak RSS MiB':>13} {'texts/s':>9}"]
    lines += [f"{r['lines']:>9} {r['input_mib']:>10.1f} {r['output_mib']:>11.1f} {r['peak_rss_mib']:>13.1f} {r['texts_per_s']:>9.0f}"
              for r in rows]
    lines.append(f"peak RSS, {large['lines']} / {small['lines']} lines: {ratio:.2f}x "
                 f"(output {large['output_mib'] / small['output_mib']:.0f}x larger)")
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "length_mix": LENGTH_MIX, "rows": rows,
                                    "rss_ratio_large_over_small": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
