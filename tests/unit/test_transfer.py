"""Host-side parts of the transfer module (the device paths run in tests/gpu/test_transfer_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.runtime.transfer import stack_into_host, stage_to_device, to_device


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_stack_into_host_equals_numpy_stack(dtype):
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 200, (3, 17, 5)).astype(dtype) for _ in range(6)]
    arrays[2] = arrays[2][:, ::-1]  # a non-contiguous view
    stacked = stack_into_host(arrays, pin=False)
    assert stacked.dtype == torch.from_numpy(arrays[0]).dtype
    np.testing.assert_array_equal(stacked.numpy(), np.stack(arrays))


def test_stack_into_host_refuses_ragged_shapes():
    with pytest.raises(ValueError, match="cannot stack"):
        stack_into_host([np.zeros((3, 4, 4)), np.zeros((3, 4, 5))], pin=False)


def test_cpu_device_gets_the_tensors_back():
    tensors = [torch.arange(5), torch.ones(2, 2)]
    assert all(a is b for a, b in zip(stage_to_device(tensors, torch.device("cpu")), tensors))
    assert all(torch.equal(a, b) for a, b in zip(to_device(tensors, torch.device("cpu")), tensors))


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_pad_into_host_equals_concat_padded(trailing):
    from tandem_serve.runtime.batching import concat_padded
    from tandem_serve.runtime.transfer import pad_into_host

    rng = torch.Generator().manual_seed(0)
    tensors = [torch.randint(0, 100, (b, n, *trailing), generator=rng) for b, n in ((1, 5), (2, 9), (1, 1), (3, 9))]
    padded = pad_into_host(tensors, 7, pin=False)
    assert padded.dtype == torch.int64 and padded.shape == (7, 9, *trailing)
    torch.testing.assert_close(padded, concat_padded(tensors, 7), rtol=0, atol=0)
