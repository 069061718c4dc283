"""The load generator's loops on an in-process target: counts, drops, errors, percentiles."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest

from tandem_serve.errors import ConfigError
from tandem_serve.loadgen import HostCpu, LoadSpec, measure, measure_async, percentile_ms, share


class Target:
    """An async target that takes `seconds` per request and fails the indices in `bad`."""

    def __init__(self, seconds: float, bad: set[int] = frozenset()):
        self.seconds, self.bad = seconds, bad
        self.served: list[int] = []
        self.in_flight = self.most_in_flight = 0

    async def __call__(self, index: int) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.seconds)
            if index in self.bad:
                raise ValueError(f"bad request {index}")
            self.served.append(index)
        finally:
            self.in_flight -= 1


def test_closed_loop_keeps_the_concurrency_and_counts_every_request():
    target = Target(0.01, bad={7})
    point = asyncio.run(measure_async(target, LoadSpec("closed", concurrency=4, seconds=0.5, warm_up=1)))
    assert target.most_in_flight == 4
    assert point.completed + 4 == len(target.served)  # the timed ones plus one warm-up round of 4
    assert point.errors == 1 and "bad request 7" in point.first_error
    assert 4 / 0.01 * 0.5 <= point.throughput <= 4 / 0.01 * 1.05  # four senders at 10 ms each: at most 400/s
    assert 10 <= point.p50_ms <= point.p90_ms <= point.p99_ms


def test_open_loop_offers_the_rate_and_drops_beyond_the_in_flight_cap():
    slow = Target(0.5)
    point = asyncio.run(measure_async(slow, LoadSpec("open", concurrency=2, rate=100, seconds=1.0, warm_up=0)))
    arrivals = point.completed + point.dropped
    assert 60 <= arrivals <= 140  # Poisson(100): four standard deviations
    assert point.completed <= 4 and point.dropped >= arrivals - 4 and slow.most_in_flight <= 2
    fast = Target(0.001)
    point = asyncio.run(measure_async(fast, LoadSpec("open", concurrency=64, rate=200, seconds=1.0, warm_up=0, seed=3)))
    assert point.dropped == 0 and 140 <= point.completed <= 260 and point.throughput <= 260


def test_open_loop_requests_overlap_when_the_target_is_slower_than_the_arrival_gap():
    # 50/s offered (20 ms apart on average), 100 ms per request: about five in flight, none dropped
    slow = Target(0.1)
    point = asyncio.run(measure_async(slow, LoadSpec("open", concurrency=1000, rate=50, seconds=1.0, warm_up=0)))
    assert point.dropped == 0 and point.p50_ms >= 100 and slow.most_in_flight >= 3


def test_percentiles_and_validation():
    ordered = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile_ms(ordered, 0.5) == pytest.approx(51) and percentile_ms(ordered, 0.99) == pytest.approx(100)
    assert percentile_ms([], 0.5) != percentile_ms([], 0.5)  # NaN
    for bad in (LoadSpec("sideways"), LoadSpec("open", rate=0), LoadSpec(concurrency=0), LoadSpec(seconds=0)):
        with pytest.raises(ConfigError):
            bad.validate()


class SleepingSender:
    """A picklable sender for spawned load processes: `seconds` per request; each process notes its pid and
    the most requests it had in flight in `record/<pid>`; `fail` makes entering raise."""

    def __init__(self, record: Path, seconds: float, fail: bool = False):
        self.record, self.seconds, self.fail = record, seconds, fail
        self.in_flight = self.most = 0

    async def __aenter__(self) -> "SleepingSender":
        if self.fail:
            raise ConnectionError("cannot reach the server")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        (self.record / str(os.getpid())).write_text(str(self.most))

    async def __call__(self, index: int) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(self.seconds)
        self.in_flight -= 1


def test_shares_split_senders_and_rate_between_processes():
    closed = LoadSpec("closed", concurrency=5)
    assert [share(closed, 2, k).concurrency for k in range(2)] == [3, 2]
    assert share(LoadSpec("closed", concurrency=1), 3, 1) is None  # fewer senders than processes
    opened = [share(LoadSpec("open", concurrency=64, rate=300.0, seed=1), 3, k) for k in range(3)]
    assert [o.rate for o in opened] == [100.0] * 3 and len({o.seed for o in opened}) == 3
    assert sum(o.concurrency for o in opened) == 64


def test_levels_spread_over_processes_keep_the_total_concurrency(tmp_path):
    sender = functools.partial(SleepingSender, tmp_path, 0.01)
    specs = [LoadSpec("closed", concurrency=6, seconds=0.6, warm_up=1), LoadSpec("closed", concurrency=1, seconds=0.3)]
    many, one = measure(sender, specs, processes=3)
    assert sorted(int(f.read_text()) for f in tmp_path.iterdir()) == [2, 2, 2]  # three processes, two senders each
    assert 6 / 0.01 * 0.5 <= many.throughput <= 6 / 0.01 * 1.05 and many.errors == 0
    assert one.completed > 0 and one.throughput <= 1 / 0.01 * 1.05  # one sender: one process sends
    assert many.client_cores is not None and many.client_cores > 0


def test_a_failing_load_process_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="cannot reach the server"):
        measure(functools.partial(SleepingSender, tmp_path, 0.01, True), [LoadSpec(seconds=0.2)], processes=2)


def _spin(seconds: float) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_host_cpu_counts_the_cores_other_processes_keep_busy():
    """A child spinning on one core for the whole block reads as about one busy core (the machine's other load on top)."""
    import multiprocessing

    with HostCpu() as host:
        child = multiprocessing.get_context("spawn").Process(target=_spin, args=(1.5,))
        child.start()
        child.join()
    assert host.cores is not None and 0.6 <= host.cores <= (os.cpu_count() or 1)


def test_process_tree_cpu_counts_a_busy_child_against_wall_time():
    """A shell whose child spins one core for ~0.6 s: the tree's CPU time is close to that wall time."""
    import subprocess
    import time

    from tandem_serve.loadgen import ProcessTreeCpu

    shell = subprocess.Popen(["bash", "-c", "python3 -c 'import time\nend = time.time() + 3\nwhile time.time() < end: pass' & wait"])
    try:
        time.sleep(0.3)  # the child is running
        with ProcessTreeCpu(shell.pid) as tree:
            start = time.perf_counter()
            time.sleep(0.6)
            wall = time.perf_counter() - start
        assert 0.6 * wall <= tree.seconds <= 1.2 * wall + 0.05, (tree.seconds, wall)
        assert set(tree.parts) == {"bash", "python3"} and tree.parts["python3"] >= 0.6 * wall, tree.parts
        with ProcessTreeCpu(None) as nothing:
            pass
        assert nothing.seconds is None
    finally:
        shell.kill()
        subprocess.run(["pkill", "-P", str(shell.pid)], check=False)
        shell.wait()
