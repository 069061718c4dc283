"""Merging ragged per-request tensors and splitting results back."""

import torch

from tandem_serve.runtime.batching import concat_padded, split_rows


def test_concat_pads_to_longest_and_split_restores_sizes():
    a = torch.arange(6).view(2, 3)
    b = torch.arange(5).view(1, 5)
    merged = concat_padded([a, b], value=-1)
    assert merged.shape == (3, 5)
    assert merged[:2, 3:].eq(-1).all() and merged[:2, :3].equal(a) and merged[2].equal(b[0])
    parts = split_rows(merged, [2, 1])
    assert [p.shape[0] for p in parts] == [2, 1]


def test_concat_keeps_trailing_dims():
    hidden = [torch.ones(1, 2, 4), torch.ones(2, 3, 4)]
    assert concat_padded(hidden).shape == (3, 3, 4)
