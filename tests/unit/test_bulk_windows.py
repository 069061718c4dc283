"""`tandem embed`'s windows: requests of texts of about the same length, rows written back in line order."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tandem_serve.clients.bulk import NpyRows, length_sorted_requests


def test_requests_cover_every_line_once_each_sorted_by_length():
    rng = np.random.default_rng(3)
    lines = [b"w" * int(n) for n in rng.integers(0, 400, size=1000)]
    for descending in (False, True):
        requests = length_sorted_requests(lines, 64, descending)
        assert [len(r) for r in requests] == [64] * 15 + [40]
        positions = np.concatenate(requests)
        assert sorted(positions.tolist()) == list(range(1000))
        lengths = [len(lines[p]) for p in positions]
        assert lengths == sorted(lengths, reverse=descending)
    # the spread of lengths within a request is a fraction of the window's
    spread = max(np.ptp([len(lines[p]) for p in r]) for r in length_sorted_requests(lines, 64))
    assert spread < 0.15 * np.ptp([len(line) for line in lines])


def test_npy_rows_writes_ranges_in_place(tmp_path):
    path = tmp_path / "rows.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(10, 3)).flush()
    rows = NpyRows(path)
    rows.write(4, np.arange(9, dtype=np.float32).reshape(3, 3))
    rows.write(9, np.full((1, 3), 7.0))  # converted to the file's float32
    rows.close()
    expected = np.zeros((10, 3), np.float32)
    expected[4:7] = np.arange(9).reshape(3, 3)
    expected[9] = 7
    np.testing.assert_array_equal(np.load(path), expected)


def test_the_command_line_client_does_not_load_torch():
    """`tandem embed` and `tandem infer` start without importing torch (seconds of start-up on a CUDA build)."""
    code = ("import sys; from tandem_serve.cli import build_parser; build_parser(); import tandem_serve.clients.bulk, "
            "tandem_serve.torchserve.client, tritonclient.grpc; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
