"""Host-to-device copy paths by size: pageable vs pinned peak vs the project's staging paths.

For each size (4 KiB to 256 MiB) and method, the median time of one host-to-device transfer of
data that starts in ordinary (pageable) host memory, except for the pinned peak, whose source
is already page-locked (the plain pinned cudaMemcpy ceiling):
  pageable       tensor.to(device)                       (torch's pageable cudaMemcpy)
  pinned-peak    pinned.to(device, non_blocking) + sync  (the ceiling)
  staging        stage_to_device: one memcpy into a pinned buffer, one async copy (coalescing path)
  chunked        copy_pageable_to_device: pinned chunks, host copy of i+1 overlapping the DMA of i
  host-register  cudaHostRegister the source, async copy, cudaHostUnregister (pinning the buffer in place)
Prints a table (GB/s and fraction of the pinned peak) and writes JSON.

    python bench/transfer.py --out transfer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import machine
from tandem_serve.transfer import copy_pageable_to_device, stage_to_device

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` (synchronised), after two warm-ups."""
    for _ in range(2):
        fn()
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_transfer.json"))
    args = parser.parse_args()
    device = torch.device("cuda:0")
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
            "chunked": lambda: copy_pageable_to_device(pageable, target),
            "host-register": lambda: host_register(pageable, target),
        }
        seconds = {name: timed(fn, repeats) for name, fn in methods.items()}
        check = stage_to_device([pageable], device)[0]
        copy_pageable_to_device(pageable, target)
        torch.cuda.synchronize()
        assert torch.equal(check.cpu(), pageable) and torch.equal(target.cpu(), pageable), "a copy path corrupted data"
        for name, s in seconds.items():
            rows.append({"bytes": size, "method": name, "seconds": s, "gb_per_s": size / s / 1e9,
                         "of_pinned_peak": seconds["pinned-peak"] / s})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"{'size':>10}" + "".join(f"{m:>22}" for m in methods)]
    for size in SIZES:
        cells = {r["method"]: r for r in rows if r["bytes"] == size}
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        lines.append(f"{label:>10}" + "".join(f"{cells[m]['gb_per_s']:>12.2f} GB/s {cells[m]['of_pinned_peak']:>4.0%}" for m in methods))
    sys.stdout.write("\n".join(lines) + "\n")
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
