"""The transfer paths on a GPU: staging (serial and overlapped), pinned collation, the to_device router.

Needs only torch: runs with --noconftest on a bare GPU machine (tests/gpu/run_h200.sh transfer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.runtime.transfer import stack_into_host, stage_to_device, to_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("sizes", [[0], [1], [4096 + 3], [(9 << 20) + 7], [(1 << 20) + 1, 5, 0, 3 << 20]])
def test_staging_is_exact(sizes):
    """Odd sizes, empty tensors and several tensors in one pinned buffer all arrive intact."""
    tensors = [torch.randint(0, 255, (size,), dtype=torch.uint8) for size in sizes]
    moved = stage_to_device(tensors, torch.device("cuda:0"))
    torch.cuda.synchronize()
    for original, copy in zip(tensors, moved):
        assert copy.is_cuda and torch.equal(copy.cpu(), original)


def test_pinned_collate_goes_straight_to_the_device():
    images = [np.full((3, 64, 64), i, dtype=np.uint8) for i in range(5)]
    batch = stack_into_host(images, pin=True)
    assert batch.is_pinned() and torch.equal(batch, torch.from_numpy(np.stack(images)))
    pageable = torch.randint(-9, 9, (1 << 18,), dtype=torch.int64)  # 2 MiB: staged
    moved, also = to_device([batch, pageable], torch.device("cuda:0"))
    torch.cuda.synchronize()
    assert torch.equal(moved.cpu(), batch) and torch.equal(also.cpu(), pageable)


@pytest.mark.parametrize("sizes", [[(3, 7)], [(64, 128), (64, 128)], [(1 << 20,)], [(300, 1000), (5,)]])
def test_to_device_is_exact_on_both_paths(sizes):
    tensors = [torch.randint(-1000, 1000, size, dtype=torch.int64) for size in sizes]
    moved = to_device(tensors, torch.device("cuda:0"))
    torch.cuda.synchronize()
    for original, copy in zip(tensors, moved):
        assert copy.is_cuda and torch.equal(copy.cpu(), original)
