"""Host-to-device copy paths by size: pageable vs pinned peak vs the project's staging paths.

For each size (4 KiB to 256 MiB) and method, the median time of one host-to-device transfer of
data that starts in ordinary (pageable) host memory, except for the pinned peak, whose source
is already page-locked (the plain pinned cudaMemcpy ceiling):
  pageable        tensor.to(device)                       (torch's pageable cudaMemcpy)
  pinned-peak     pinned.to(device, non_blocking) + sync  (the ceiling)
  staging         stage_to_device: one memcpy into a pinned buffer, one async copy (the coalescing path)
  host-register   cudaHostRegister the source, async copy, cudaHostUnregister (pinning the buffer in place)
Then the collate step of a batch of 640 px images (8 and 32 of them): np.stack into pageable
memory + stage_to_device, vs stack_into_host (straight into pinned memory) + one async copy, which
is what the TorchServe detection pipeline does. (An earlier version also swept chunked staging with
1-16 memcpy threads overlapping the DMA: never above 58 % of the peak, no better than one memcpy;
bench/results/h100-2026-11-22-transfer-overlap-sweep.json.)
Prints tables (GB/s and fraction of the pinned peak) and writes JSON.

    python bench/transfer.py --out transfer.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from _common import machine
from tandem_serve.runtime.transfer import stack_into_host, stage_to_device
from tandem_serve.timing import median_seconds

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` (synchronised), after two warm-ups."""
    fn()  # median_seconds makes the second
    return median_seconds(fn, "cuda", repeats)


def host_register(source: torch.Tensor, target: torch.Tensor) -> None:
    cudart = torch.cuda.cudart()
    pointer, size = source.data_ptr(), source.numel() * source.element_size()
    if int(cudart.cudaHostRegister(pointer, size, 0)) != 0:
        raise RuntimeError("cudaHostRegister failed")
    try:
        target.copy_(source, non_blocking=True)
        torch.cuda.current_stream().synchronize()
    finally:
        cudart.cudaHostUnregister(pointer)


def label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def table(rows: list[dict], key: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sizes = list(dict.fromkeys(r[key] for r in rows))
    lines = [f"{key:>10}" + "".join(f"{m:>26}" for m in methods)]
    for size in sizes:
        cells = {r["method"]: r for r in rows if r[key] == size}
        lines.append(f"{size if isinstance(size, str) else label(size):>10}" + "".join(
            f"{cells[m]['gb_per_s']:>15.2f} GB/s {cells[m]['of_pinned_peak']:>5.0%}" if m in cells else " " * 26
            for m in methods))
    return "\n".join(lines)


def transfers(device: torch.device) -> list[dict]:
    rows = []
    for size in SIZES:
        repeats = 50 if size <= (4 << 20) else 15
        pageable = torch.randint(0, 255, (size,), dtype=torch.uint8)
        pinned = pageable.pin_memory()
        target = torch.empty(size, dtype=torch.uint8, device=device)
        methods = {
            "pageable": lambda: target.copy_(pageable),
            "pinned-peak": lambda: target.copy_(pinned, non_blocking=True),
            "staging": lambda: stage_to_device([pageable], device),
            "host-register": lambda: host_register(pageable, target),
        }
        seconds = {name: timed(fn, repeats) for name, fn in methods.items()}
        check = stage_to_device([pageable], device)[0]
        torch.cuda.synchronize()
        assert torch.equal(check.cpu(), pageable), "staging corrupted data"
        for name, s in seconds.items():
            rows.append({"bytes": size, "method": name, "seconds": s, "gb_per_s": size / s / 1e9,
                         "of_pinned_peak": seconds["pinned-peak"] / s})
    return rows


def collate(device: torch.device) -> list[dict]:
    rows = []
    for batch in (8, 32):
        images = [np.random.default_rng(i).integers(0, 255, (3, 640, 640), dtype=np.uint8) for i in range(batch)]
        size = sum(i.nbytes for i in images)
        peak_source = stack_into_host(images, pin=True)
        target = torch.empty(peak_source.shape, dtype=torch.uint8, device=device)
        methods = {
            "pinned-peak (copy only)": lambda: target.copy_(peak_source, non_blocking=True),
            "stack pageable + staging": lambda: stage_to_device([torch.from_numpy(np.stack(images))], device),
            "stack into pinned + copy": lambda: stack_into_host(images, pin=True).to(device, non_blocking=True),
        }
        seconds = {name: timed(fn, 15) for name, fn in methods.items()}
        moved = stack_into_host(images, pin=True).to(device, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(moved.cpu(), torch.from_numpy(np.stack(images))), "pinned collate corrupted data"
        for name, s in seconds.items():
            rows.append({"batch": f"{batch} x 640px", "bytes": size, "method": name, "seconds": s,
                         "gb_per_s": size / s / 1e9, "of_pinned_peak": seconds["pinned-peak (copy only)"] / s})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_transfer.json"))
    args = parser.parse_args()
    device = torch.device("cuda:0")
    rows = transfers(device)
    collated = collate(device)
    sys.stdout.write(table(rows, "bytes") + "\n\n" + table(collated, "batch") + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows,
                                    "collate": collated}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
