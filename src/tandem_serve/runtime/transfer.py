"""Host <-> device copies: pinned staging, coalescing, non-blocking copies on the caller's stream.

Pinned buffers come from PyTorch's caching host allocator (`pin_memory=True`), which records an
event for each non-blocking copy and reuses a buffer only after its copy has finished. Data the
project itself produces (collated batches) is written straight into pinned memory
(`pinned_empty`, `stack_into_host`), so its transfer runs at the pinned peak.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ALIGN = 256  # bytes; every staged tensor starts on this boundary (any dtype's alignment)
STAGING_THRESHOLD = 512 << 10  # bytes: below this a pageable copy was faster on the H100 (bench/transfer.py)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pinned_empty(shape: Sequence[int], dtype: torch.dtype, pin: bool = True) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when `pin` (a CUDA device is the destination)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=pin and torch.cuda.is_available())


def stack_into_host(arrays: Sequence[np.ndarray], pin: bool) -> torch.Tensor:
    """np.stack(arrays) written straight into (pinned when `pin`) host memory: the collate copy is the staging copy."""
    first = arrays[0]
    out = pinned_empty((len(arrays), *first.shape), torch.from_numpy(np.empty(0, first.dtype)).dtype, pin)
    for slot, array in zip(out, arrays):
        if array.shape != first.shape:
            raise ValueError(f"cannot stack shapes {first.shape} and {array.shape}")
        slot.copy_(torch.from_numpy(np.ascontiguousarray(array)))  # torch's copy runs on its intra-op threads
    return out


def pad_into_host(tensors: Sequence[torch.Tensor], value: float, pin: bool) -> torch.Tensor:
    """Host [b_i, L_i, ...] tensors concatenated along dim 0, right-padded with `value` to the longest L_i, written
    straight into (pinned when `pin`) host memory through numpy views: one small copy per request, no torch calls."""
    first = tensors[0]
    length = max(t.shape[1] for t in tensors)
    out = pinned_empty((sum(t.shape[0] for t in tensors), length, *first.shape[2:]), first.dtype, pin)
    target = out.numpy()
    target.fill(value)
    row = 0
    for t in tensors:
        target[row : row + t.shape[0], : t.shape[1]] = t.numpy()
        row += t.shape[0]
    return out


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Tensors on `device`, by whichever path measured faster: pinned tensors straight, pageable ones through
    pinned staging from 512 KiB up (coalesced), direct copies below. Enqueued on the current stream."""
    device = torch.device(device)
    if device.type != "cuda" or all(t.device == device for t in tensors):
        return [t.to(device) for t in tensors]
    pageable = [t for t in tensors if t.device.type == "cpu" and not t.is_pinned()]
    if sum(_nbytes(t) for t in pageable) >= STAGING_THRESHOLD:
        staged = iter(stage_to_device(pageable, device))
        return [next(staged) if (t.device.type == "cpu" and not t.is_pinned()) else t.to(device, non_blocking=True)
                for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


def stage_to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copy CPU tensors to `device` through one pinned buffer (one memcpy each, one DMA), non-blocking on the
    current stream.

    Returns views into one device buffer with the inputs' dtypes and shapes. On a CPU device the
    tensors come back as they are. (Chunked copies overlapping the DMA measured no faster on the
    H100: staging moves every byte through host memory three times, and that bandwidth is the limit.)
    """
    device = torch.device(device)
    if device.type != "cuda":
        return list(tensors)
    flat = [t.detach().contiguous().reshape(-1) for t in tensors]
    offsets, total = [], 0
    for t in flat:
        offsets.append(total)
        total += _aligned(_nbytes(t))
    host = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(max(total, ALIGN), dtype=torch.uint8, device=device)
    for t, offset in zip(flat, offsets):
        if _nbytes(t):
            host[offset : offset + _nbytes(t)].copy_(t.view(torch.uint8))
    on_device.copy_(host, non_blocking=True)
    return [on_device[offset : offset + _nbytes(t)].view(t.dtype).view(original.shape)
            for t, offset, original in zip(flat, offsets, tensors)]


def copy_to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Enqueue non-blocking device -> pinned host copies on the current stream (CPU tensors pass through).

    Synchronise on an event recorded after this call before reading the results.
    """
    out = []
    for t in tensors:
        if t.device.type != "cuda":
            out.append(t)
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out.append(host)
    return out
