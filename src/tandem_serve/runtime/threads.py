"""How many torch threads a stage instance gets.

A GPU instance's own CPU work is small (collating a batch, checking inputs, staging copies), but
torch starts one OpenMP thread per core for it. Beside CPU stages that keep every core busy (other
Triton instances, each its own process), those threads spin at every parallel region's barrier
waiting for siblings that are not scheduled: on a 16-core H100 host the unfused text ensemble's GPU
encoder took ~190 ms per batch of three this way. A GPU instance therefore runs on one thread
unless told otherwise.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)
GPU_INSTANCE_THREADS = 1


def stage_threads(device: torch.device, requested: int) -> int | None:
    """The torch thread count for a stage instance on `device`: `requested` when > 0, else
    GPU_INSTANCE_THREADS on a GPU and None (torch's default, one per core) on the CPU."""
    if requested > 0:
        return requested
    return GPU_INSTANCE_THREADS if device.type == "cuda" else None


def shared_cpu_threads(instances: int) -> int:
    """Torch threads for each of a model's `instances` CPU instances: the cores torch would use, shared."""
    return max(1, torch.get_num_threads() // instances)


def set_stage_threads(device: torch.device, requested: int) -> int:
    """Set torch's intra-op threads (process-wide) for a stage instance on `device`; returns the count in use."""
    count = stage_threads(device, requested)
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)
        logger.info("torch threads: %d (%s instance)", count, device.type)
    return torch.get_num_threads()
