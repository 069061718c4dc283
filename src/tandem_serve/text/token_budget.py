"""A token budget per encoder batch: rows grouped by length so that long texts do not pad short ones.

A dynamic batch merges requests padded to their own lengths; run as one tensor, every row computes as many
positions as the longest row (in the suite's mix one text in ten has 160 words, and most batches of 64 hold one).
With a budget of B tokens the encoder sorts the batch's rows by length and runs them in groups, each trimmed to
its own longest row and holding at most B tokens (rows x padded length; a row longer than B runs alone), as
text-embeddings-inference bounds a batch by `max_batch_tokens`.

Where to cut is chosen, not greedy: rows are bucketed by length (the ladder 16 24 32 48 64 ... that the CUDA
graphs use), and a dynamic programme over the buckets, longest first, minimises the tokens computed plus a fixed
cost per call of B / CALL_SHARE tokens. `tandem plan` sets B to the smallest batch at which the device reaches
~90 % of its best token rate, where a call's fixed part is about an eighth of its time: so a small batch (launch
bound) stays one call, and a large one splits where padding would cost more than the extra call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from tandem_serve.text.graphs import bucket, ladder

CALL_SHARE = 8  # one more call costs as much as B / CALL_SHARE tokens of compute
MIN_BUCKET = 16  # the shortest length bucket (as the CUDA graphs' ladder)
PAD_MULTIPLE = 8  # a group's length is its longest row rounded up to this (as the tokenizer pads)


@dataclass(frozen=True)
class LengthGroup:
    """Rows of a batch (indices, longest first) run as one call, trimmed to `length` positions."""

    rows: np.ndarray
    length: int

    @property
    def tokens(self) -> int:
        return len(self.rows) * self.length


def row_lengths(mask: np.ndarray) -> np.ndarray:
    """Per row of an attention mask [rows, width], the positions up to its last attended one (right padding
    trimmed; a left-padded row keeps its full width)."""
    mask = np.asarray(mask)
    if mask.shape[1] == 0:
        return np.zeros(mask.shape[0], dtype=np.int64)
    return mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1)


def _rounded(length: int, width: int) -> int:
    return min(width, -(-int(length) // PAD_MULTIPLE) * PAD_MULTIPLE)


def _run_cost(rows: int, length: int, budget: int) -> float:
    """Tokens computed plus the calls' fixed cost, for `rows` rows padded to `length` in calls of at most `budget`."""
    per_call = max(1, budget // length)
    return math.ceil(rows / per_call) * budget / CALL_SHARE + rows * length


def length_groups(lengths: np.ndarray, budget: int, width: int | None = None) -> list[LengthGroup]:
    """The calls a batch of rows of `lengths` runs as under a budget of `budget` tokens (0: one call of every row at
    `width`, the batch as it came); groups hold rows longest first, each trimmed to its longest row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    width = int(width if width is not None else (lengths.max() if len(lengths) else 0))
    if budget <= 0 or len(lengths) <= 1:
        return [LengthGroup(np.arange(len(lengths)), width)] if len(lengths) else []
    order = np.argsort(-lengths, kind="stable")
    sizes = ladder(max(width, 1), min(MIN_BUCKET, max(width, 1)))
    buckets = np.array([bucket(int(n), sizes) or width for n in lengths[order]])
    edges = [0] + [i for i in range(1, len(order)) if buckets[i] != buckets[i - 1]] + [len(order)]
    # best[j]: the cheapest split of the first j buckets (longest first); cut[j]: where its last run starts
    best, cut = [0.0] + [math.inf] * (len(edges) - 1), [0] * len(edges)
    for j in range(1, len(edges)):
        for i in range(j):
            cost = best[i] + _run_cost(edges[j] - edges[i], int(buckets[edges[i]]), budget)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(edges) - 1
    while j > 0:
        runs.append((edges[cut[j]], edges[j]))
        j = cut[j]
    groups = []
    for start, stop in reversed(runs):
        per_call = max(1, budget // int(buckets[start]))
        for first in range(start, stop, per_call):
            rows = order[first : min(stop, first + per_call)]
            groups.append(LengthGroup(rows, _rounded(lengths[rows[0]], width)))
    return groups


def run_groups(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: torch.Tensor, mask: torch.Tensor,
               groups: list[LengthGroup]) -> torch.Tensor:
    """`run(inputs, mask)` per group (rows gathered once, each group trimmed to its length), results in row order."""
    if len(groups) == 1:  # every row in one call: in its own order, trimmed to the longest
        return run(inputs[:, : groups[0].length], mask[:, : groups[0].length])
    order = torch.from_numpy(np.concatenate([g.rows for g in groups])).to(inputs.device)
    inputs, mask = inputs.index_select(0, order), mask.index_select(0, order)
    parts, start = [], 0
    for group in groups:
        stop = start + len(group.rows)
        parts.append(run(inputs[start:stop, : group.length].contiguous(), mask[start:stop, : group.length].contiguous()))
        start = stop
    out = parts[0].new_empty((len(order), parts[0].shape[1]))
    out[order] = torch.cat(parts)
    return out
