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


STAGING_THRESHOLD = 512 << 10  # bytes: below this a pageable copy was faster on the H100 (bench/transfer.py)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Tensors on `device`, by whichever path measured faster for their total size: pinned coalesced staging
    from 512 KiB up, direct (pageable) copies below. Enqueued on the current stream."""
    device = torch.device(device)
    if device.type != "cuda" or all(t.device == device for t in tensors):
        return [t.to(device) for t in tensors]
    if sum(t.numel() * t.element_size() for t in tensors) >= STAGING_THRESHOLD and all(t.device.type == "cpu" for t in tensors):
        return stage_to_device(tensors, device)
    return [t.to(device, non_blocking=True) for t in tensors]


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


def copy_pageable_to_device(source: torch.Tensor, target: torch.Tensor, chunk_bytes: int = 4 << 20, buffers: int = 3) -> None:
    """Copy a pageable CPU tensor into a same-size device tensor through rotating pinned chunks.

    The host copy of chunk i+1 into pinned memory overlaps the DMA of chunk i, so the transfer
    runs at the slower of host memcpy and PCIe instead of their sum. Enqueued on the current
    stream; the last chunks may still be in flight when this returns.
    """
    src = source.detach().contiguous().reshape(-1).view(torch.uint8)
    dst = target.reshape(-1).view(torch.uint8)
    if src.numel() != dst.numel():
        raise ValueError(f"size mismatch: {src.numel()} bytes to {dst.numel()}")
    stream = torch.cuda.current_stream(target.device)
    chunk = min(chunk_bytes, max(src.numel(), 1))
    pinned = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
    done: list[torch.cuda.Event | None] = [None] * buffers
    for index, start in enumerate(range(0, src.numel(), chunk)):
        slot = index % buffers
        if done[slot] is not None:
            done[slot].synchronize()  # its previous DMA has finished reading it
        size = min(chunk, src.numel() - start)
        pinned[slot][:size].copy_(src[start : start + size])
        dst[start : start + size].copy_(pinned[slot][:size], non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
        done[slot] = event


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
