"""Where the Python-backend stubs (and TorchServe workers) spend their host time: the cProfile dumps of
TANDEM_STUB_PROFILE, per stage.

    TANDEM_STUB_PROFILE=/tmp/prof tandem serve triton ...   # or bench/suite.py --stub-profile /tmp/prof
    python bench/stub_profile.py /tmp/prof --out /tmp/prof/summary

Per stage (all its instances' dumps merged): the batches run, host ms per batch inside `respond`, and the
functions with the most own time and the most cumulative time, per batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import pstats
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger("stub_profile")


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name  # a builtin, e.g. <method 'cpu' of 'torch._C.TensorBase' objects>
    parts = Path(filename).parts
    short = "/".join(parts[parts.index("tandem_serve"):]) if "tandem_serve" in parts else "/".join(parts[-2:])
    return f"{short}:{line}({name})"


def summarize(directory: Path, top: int) -> list[dict]:
    """One record per stage: batches, host ms per batch, top functions by own and cumulative time."""
    by_stage: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(directory.glob("*.prof")):
        by_stage[path.stem.rsplit("-", 1)[0]].append(path)
    records = []
    for stage, paths in sorted(by_stage.items()):
        stats = pstats.Stats(*map(str, paths))
        entries = stats.stats  # type: ignore[attr-defined]
        # process_requests runs once per batch (the profiled callee itself is not always recorded: Python 3.12); in
        # a TorchServe worker, whose profile stops and restarts under it, TorchServe's retrieve_msg counts them
        calls = [v[1] for k, v in entries.items() if k[2] == "retrieve_msg" and k[0].endswith("otf_message_handler.py")]
        calls = calls or [v[1] for k, v in entries.items() if k[2] == "process_requests" and k[0].endswith("per_request.py")]
        batches = calls[0] if calls else 0
        total = stats.total_tt  # type: ignore[attr-defined]
        per_batch = 1e3 / max(batches, 1)

        def ranked(index: int) -> list[dict]:
            rows = sorted(entries.items(), key=lambda kv: kv[1][index], reverse=True)[:top]
            return [{"function": _label(k), "calls_per_batch": v[1] / max(batches, 1),
                     "ms_per_batch": v[index] * per_batch} for k, v in rows]

        records.append({"stage": stage, "processes": len(paths), "batches": batches,
                        "host_ms_per_batch": total * per_batch, "own": ranked(2), "cumulative": ranked(3)})
    return records


def markdown(records: list[dict]) -> str:
    lines = []
    for r in records:
        lines += [f"## {r['stage']}: {r['batches']} batches in {r['processes']} process(es), "
                  f"{r['host_ms_per_batch']:.3f} host ms per batch in respond", "",
                  "| own time: function | calls/batch | ms/batch |", "|---|---|---|"]
        lines += [f"| `{e['function']}` | {e['calls_per_batch']:.1f} | {e['ms_per_batch']:.3f} |" for e in r["own"]]
        lines += ["", "| cumulative: function | calls/batch | ms/batch |", "|---|---|---|"]
        lines += [f"| `{e['function']}` | {e['calls_per_batch']:.1f} | {e['ms_per_batch']:.3f} |" for e in r["cumulative"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = parser.parse_args()
    records = summarize(args.directory, args.top)
    text = markdown(records)
    logger.info("%s", text)
    if args.out:
        args.out.with_suffix(".md").write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
