"""Wall-clock timing of a callable, with the device synchronised around each call."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: str | torch.device, repeats: int) -> float:
    """Median wall time of fn() (device synchronised), after one warm-up."""
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)
