"""The encoder step under a token budget: a dynamic batch of the suite's text mix in one padded call, or in groups
of similar length (`max_batch_tokens`, text/token_budget.py), as a Triton instance runs it.

    python bench/token_budget.py [--device cuda:0] [--batches 16 64 256] [--texts-per-request 1 16]
                                 [--budgets 0 1024 4096 16384] [--out bench/results/token-budget.json]

Each case is `EncoderStage.__call__` on per-request tokenized texts (each request padded to its own longest, as the
tokenizer hands them over), merged, copied to the device, encoded and copied back: the step without Triton. Per
batch of texts, texts per request and budget: texts/s (median of repeats over four batches of the mix), the
positions computed (rows x length summed over the calls) against one padded call, the calls per batch, and the
speed-up over budget 0 measured in the same run. On a GPU the stage replays CUDA graphs as served (fp16); on a CPU
it runs fp32 eagerly on the torch threads given.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from tandem_serve.stage_config import EncoderConfig  # noqa: E402
from tandem_serve.text.stages import EncoderStage  # noqa: E402
from tandem_serve.text.token_budget import length_groups, row_lengths  # noqa: E402
from tandem_serve.text.tokenize import TextTokenizer  # noqa: E402
from tandem_serve.timing import median_seconds  # noqa: E402
from tandem_serve.workloads import mixed_length_texts  # noqa: E402

logger = logging.getLogger("token_budget")


def requests_of(tokenizer: TextTokenizer, texts: list[str], per_request: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The texts as requests of `per_request` texts, each padded to its own longest (the tokenizer's output)."""
    out = []
    for start in range(0, len(texts), per_request):
        batch = tokenizer(texts[start : start + per_request])
        out.append((torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)))
    return out


def positions(requests: list[tuple[torch.Tensor, torch.Tensor]], budget: int) -> tuple[int, int, int]:
    """(positions computed under `budget`, positions of one padded call, calls) for one merged batch."""
    width = max(mask.shape[1] for _, mask in requests)
    lengths = torch.cat([torch.nn.functional.pad(mask, (0, width - mask.shape[1])) for _, mask in requests]).numpy()
    groups = length_groups(row_lengths(lengths), budget, width)
    return sum(g.tokens for g in groups), len(lengths) * width, len(groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", default="", help="a sentence-transformers directory (default: the shipped MiniLM)")
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 256], help="texts per dynamic batch")
    parser.add_argument("--texts-per-request", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--budgets", nargs="+", type=int, default=[0, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/token-budget.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    gpu = args.device.startswith("cuda")
    config = EncoderConfig(model_dir=args.model_dir, fuse_token_embedding=True, precision="fp16" if gpu else "fp32",
                           cpu_threads=args.threads, cuda_graph_max_batch=64 if gpu else 0)
    stage = EncoderStage(config, args.device)
    files = stage.files
    tokenizer = TextTokenizer(files.tokenizer_json, files.max_seq_length, 8, files.bert.pad_token_id)
    rows = []
    for batch in args.batches:
        mixes = [mixed_length_texts(batch, seed=s) for s in range(4)]  # four batches of the suite's mix
        for per_request in args.texts_per_request:
            if per_request > batch:
                continue
            cases = [requests_of(tokenizer, texts, per_request) for texts in mixes]
            base = None
            for budget in args.budgets:
                stage.max_batch_tokens = budget
                with torch.inference_mode():
                    seconds = statistics.mean(median_seconds(lambda c=c: stage(c), args.device, args.repeats)
                                              for c in cases)
                computed, padded, calls = (statistics.mean(v) for v in zip(*(positions(c, budget) for c in cases)))
                rate = batch / seconds
                base = base or rate
                rows.append({"batch": batch, "texts_per_request": per_request, "budget": budget, "texts_per_s": rate,
                             "ms_per_batch": seconds * 1e3, "positions": computed, "padded_positions": padded,
                             "calls": calls, "speedup": rate / base})
                logger.info("batch %d, %d text(s)/request, budget %d: %.0f texts/s (%.2fx), %.0f of %.0f positions, "
                            "%.1f calls", batch, per_request, budget, rate, rate / base, computed, padded, calls)
    result = {"machine": machine(), "device": args.device, "precision": config.precision, "model": str(files.root),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = ["| batch | texts/request | budget | texts/s | x budget 0 | positions / padded | calls |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['batch']} | {r['texts_per_request']} | {r['budget'] or 'none'} | {r['texts_per_s']:.0f} | "
                     f"{r['speedup']:.2f} | {r['positions'] / r['padded_positions']:.2f} | {r['calls']:.1f} |")
    args.out.with_suffix(".md").write_text(f"Encoder step on {args.device} ({config.precision}), "
                                           f"{machine().get('gpu') or 'CPU'}\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
