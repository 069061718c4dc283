"""Merge per-request padded tensors into one batch and split results back."""

from __future__ import annotations

from typing import Sequence

import torch


def pad_to_length(tensor: torch.Tensor, length: int, value: float = 0) -> torch.Tensor:
    """Right-pad dim 1 of `tensor` to `length`."""
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad_shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_full(pad_shape, value)], dim=1)


def concat_padded(tensors: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Concatenate [b_i, L_i, ...] tensors along dim 0 after padding all to the longest L_i."""
    if len(tensors) == 1:
        return tensors[0]
    length = max(t.shape[1] for t in tensors)
    return torch.cat([pad_to_length(t, length, value) for t in tensors], dim=0)


def split_rows(batch: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Split dim 0 of `batch` into consecutive pieces of `sizes`."""
    return list(torch.split(batch, list(sizes), dim=0))
