"""How to call the Rust tokenizer: CPU and wall time per text of `encode` one text at a time, `encode_batch_fast`
one text at a time, and `encode_batch_fast` over the whole batch, spread over the cores or, with
TOKENIZERS_PARALLELISM off, on the calling thread; on the suite's text mix.

The tokenizer stage (and encoder_utf8) tokenizes on one core per instance where the plan sizes instances a core each
(`parallel: false`), on all cores otherwise; CPU time per text is what bounds a server at one text per request.

    python bench/tokenizer_calls.py --out FILE [--batches 1 8 64] [--texts 4096] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

from _common import machine
from tandem_serve.model_files import SentenceModelFiles
from tandem_serve.workloads import mixed_length_texts

CALLS = {
    "encode, one text per call": lambda tok, texts: [tok.encode(t, add_special_tokens=True) for t in texts],
    "encode_batch_fast, one text per call": lambda tok, texts: [tok.encode_batch_fast([t], add_special_tokens=True)[0]
                                                                for t in texts],
    "encode_batch_fast, the batch in one call": lambda tok, texts: tok.encode_batch_fast(texts, add_special_tokens=True),
    "encode_batch_fast, the batch in one call, library serial": lambda tok, texts: serial(
        lambda: tok.encode_batch_fast(texts, add_special_tokens=True)),
}


def serial(call):
    """`call()` with TOKENIZERS_PARALLELISM off (what a stub of `parallel: false` sets at its start), then on again."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return call()
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"


def per_text(call, tok: Tokenizer, groups: list[list[str]]) -> tuple[float, float]:
    """Wall and CPU microseconds per text of `call` over `groups`, after one warm-up group."""
    call(tok, groups[0])
    texts = sum(len(g) for g in groups)
    cpu, wall = time.process_time(), time.perf_counter()
    for group in groups:
        call(tok, group)
    return (time.perf_counter() - wall) / texts * 1e6, (time.process_time() - cpu) / texts * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    files = SentenceModelFiles.load()
    tok = Tokenizer.from_file(str(files.tokenizer_json))
    tok.no_padding()
    tok.enable_truncation(max_length=files.max_seq_length)
    texts = mixed_length_texts(args.texts, seed=1)
    reference = [e.ids for e in (tok.encode(t, add_special_tokens=True) for t in texts[:256])]
    for label, call in CALLS.items():
        assert [e.ids for e in call(tok, texts[:256])] == reference, f"{label}: other token ids than encode's"
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):  # the calls interleaved round by round: drift on a shared machine hits all alike
        for batch in args.batches:
            groups = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
            for label, call in CALLS.items():
                samples.setdefault((label, batch), []).append(per_text(call, tok, groups))
    rows = [{"call": label, "batch": batch, "wall_us_per_text": statistics.median(w for w, _ in runs),
             "cpu_us_per_text": statistics.median(c for _, c in runs), "rounds": len(runs)}
            for (label, batch), runs in sorted(samples.items(), key=lambda kv: (list(CALLS).index(kv[0][0]), kv[0][1]))]
    base = {r["batch"]: r["cpu_us_per_text"] for r in rows if r["call"].startswith("encode,")}
    lines = [f"{machine()}; {args.texts} texts of the suite's mix, median of {args.rounds} interleaved rounds; CPU time "
             "of this process (the tokenizer's threads included)",
             "", "| call | texts per batch | wall us/text | CPU us/text | CPU vs encode |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['call']} | {r['batch']} | {r['wall_us_per_text']:.1f} | {r['cpu_us_per_text']:.1f} | "
                     f"{r['cpu_us_per_text'] / base[r['batch']]:.2f}x |")
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "texts": args.texts, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
