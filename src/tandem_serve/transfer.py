"""Host <-> device copies: small tensors coalesced into one pinned transfer, non-blocking on a stream.

Pinned buffers come from PyTorch's caching host allocator (`pin_memory=True`), which records an
event for each non-blocking copy and reuses a buffer only after its copy has finished.
"""

from __future__ import annotations

from typing import Sequence

import torch

ALIGN = 256  # bytes; every staged tensor starts on this boundary (any dtype's alignment)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def stage_to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copy CPU tensors to `device` in one non-blocking transfer from pinned memory, on the current stream.

    Returns views into one device buffer with the inputs' dtypes and shapes. On a CPU device the
    tensors come back as they are.
    """
    if device.type != "cuda":
        return list(tensors)
    flat = [t.detach().contiguous().reshape(-1) for t in tensors]
    offsets, total = [], 0
    for t in flat:
        offsets.append(total)
        total += _aligned(t.numel() * t.element_size())
    host = torch.empty(max(total, ALIGN), dtype=torch.uint8, pin_memory=True)
    for t, offset in zip(flat, offsets):
        nbytes = t.numel() * t.element_size()
        if nbytes:
            host[offset : offset + nbytes].copy_(t.view(torch.uint8))
    on_device = host.to(device, non_blocking=True)
    views = []
    for t, offset, original in zip(flat, offsets, tensors):
        nbytes = t.numel() * t.element_size()
        views.append(on_device[offset : offset + nbytes].view(t.dtype).view(original.shape))
    return views


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
