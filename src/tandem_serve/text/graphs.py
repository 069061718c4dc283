"""CUDA graphs of the sentence encoder at bucketed (batch, length) shapes: one replay instead of hundreds of launches.

At small batches the eager encoder is bound by Python and kernel launches, not by the GPU (on the H100
one MiniLM text took 3 ms eagerly). A batch is padded up to the next bucket of a ladder (1, 2, 3, 4, 6,
8, 12, ...: at most 50 % padding), copied into that bucket's static buffers and its graph replayed.
Padding changes no kept row: padded positions are masked out of attention and pooling, and padded rows
keep one token so that they stay finite; they are dropped from the result.

Graphs only pay where launches dominate: a bucket whose replay takes longer than the eager forward of
the smallest shape (the launch floor, measured once) is released and its batches run eagerly, unpadded
(eager time is about max(floor, GPU time), and the padded GPU time already exceeds the floor). So do
batches beyond the largest bucket.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tandem_serve.timing import median_seconds

logger = logging.getLogger(__name__)


def ladder(limit: int, start: int = 1) -> list[int]:
    """Bucket sizes from `start` up to `limit` (included): powers of two and 1.5x each, e.g. 1 2 3 4 6 8 12 16."""
    if limit < start:
        return []
    sizes, power = set(), 1
    while power <= limit:
        sizes.update(s for s in (power, power * 3 // 2) if start <= s <= limit)
        power *= 2
    sizes.add(limit)
    return sorted(sizes)


def bucket(size: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding `size`, or None when it exceeds them all."""
    return next((s for s in sizes if s >= size), None)


@dataclass
class _Bucket:
    """Static buffers of one (batch, length) shape and, on a GPU, the graph that reads and writes them."""

    inputs: torch.Tensor
    mask: torch.Tensor
    output: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
    replay_s: float = 0.0  # measured after capture
    eager: bool = False  # the replay was slower than the eager floor: run such batches eagerly


class GraphedEncoder:
    """Calls `module(inputs, mask)` through captured CUDA graphs where a bucket holds the batch, else eagerly.

    `inputs` are token ids [b, n] (fused) or hidden states [b, n, hidden]; the result is what the
    module returns for the unpadded batch. With `capture=False` (or on a CPU) the padded buffers are
    run eagerly: the same arithmetic as the graphs, for checking the padding without a GPU.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device, max_batch: int, max_length: int,
                 pad_id: int, fused: bool, capture: bool = True, min_length: int = 16):
        self.module, self.device, self.pad_id, self.fused = module, torch.device(device), pad_id, fused
        self.capture = capture and self.device.type == "cuda"
        self.batches = ladder(max_batch)
        self.lengths = ladder(max_length, min(min_length, max_length))
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.dtype = next(module.parameters()).dtype
        # every bucket's inputs and mask are views of the start of two flat buffers: one bucket runs at a time
        most = max(self.batches, default=0) * max(self.lengths, default=0)
        width = 1 if fused else module.config.hidden_size
        self._inputs = torch.empty(most * width, dtype=torch.int64 if fused else self.dtype, device=self.device)
        self._mask = torch.empty(most, dtype=torch.int64, device=self.device)
        self.floor_s: float | None = None  # the eager forward of the smallest bucket, measured before the first capture

    def covers(self, batch: int, length: int) -> bool:
        """Whether a bucket holds a batch of this shape (replayed, or eager where its replay was the slower)."""
        return bucket(batch, self.batches) is not None and bucket(length, self.lengths) is not None

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket now (largest first, so that the shared pool grows once); returns how many replay."""
        began = time.perf_counter()
        shapes = sorted(((b, n) for b in self.batches for n in self.lengths), key=lambda s: s[0] * s[1], reverse=True)
        for shape in shapes:
            self._bucket(*shape)
        kept = sum(1 for slot in self.buckets.values() if not slot.eager)
        logger.info("encoder: %d of %d CUDA graph(s) kept for batches %s x lengths %s (the others replay slower than "
                    "the %.2f ms eager floor and run eagerly), in %.1f s", kept, len(shapes), self.batches, self.lengths,
                    (self.floor_s or 0.0) * 1e3, time.perf_counter() - began)
        return kept

    @torch.inference_mode()
    def __call__(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length = mask.shape
        shape = (bucket(batch, self.batches), bucket(length, self.lengths))
        if None in shape:
            return self.module(inputs, mask)
        slot = self._bucket(*shape)
        if slot.eager:
            return self.module(inputs, mask)
        slot.inputs.fill_(self.pad_id if self.fused else 0)
        slot.inputs[:batch, :length].copy_(inputs)
        slot.mask.zero_()
        slot.mask[:batch, :length].copy_(mask)
        slot.mask[batch:, 0] = 1  # padded rows attend to one (pad) token: finite, and dropped below
        if slot.graph is None:
            return self.module(slot.inputs, slot.mask)[:batch]
        slot.graph.replay()
        return slot.output[:batch].clone()  # the static output is overwritten by the next replay

    def _bucket(self, batch: int, length: int) -> _Bucket:
        slot = self.buckets.get((batch, length))
        if slot is None:
            slot = self.buckets[(batch, length)] = self._new_bucket(batch, length)
        return slot

    def _new_bucket(self, batch: int, length: int) -> _Bucket:
        shape = (batch, length) if self.fused else (batch, length, self.module.config.hidden_size)
        inputs = self._inputs[: batch * length * (1 if self.fused else shape[2])].view(shape)
        inputs.fill_(self.pad_id if self.fused else 0)
        mask = self._mask[: batch * length].view(batch, length)
        mask.zero_()
        mask[:, 0] = 1
        slot = _Bucket(inputs, mask)
        if not self.capture:
            return slot
        side = torch.cuda.Stream(self.device)  # warm-up off the capture stream, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.module(inputs, mask)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.floor_s is None:
            first = min(self.lengths)
            floor_inputs = self._inputs[: first * (1 if self.fused else inputs.shape[2])].view(1, first, *inputs.shape[2:])
            floor_mask = self._mask[:first].view(1, first)
            # row 0 of this bucket, read only
            self.floor_s = median_seconds(lambda: self.module(floor_inputs, floor_mask), self.device, 5)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph, pool=self.pool, capture_error_mode="thread_local"):
            slot.output = self.module(inputs, mask)
        slot.replay_s = median_seconds(slot.graph.replay, self.device, 5)
        # slower than eager: such batches run eagerly. The graph stays alive: releasing the only graph of a shared
        # pool frees the pool, and the next capture into it fails (torch 2.11: CUDACachingAllocator use_count assert)
        slot.eager = slot.replay_s >= self.floor_s
        return slot
