"""LaneBalancer: routing by queued rows x measured time per row, against the best static split found by brute force."""

from __future__ import annotations

import pytest

from tandem_serve.runtime.balance import LaneBalancer

ROWS = 8  # rows per micro-batch


def burst_makespan(balancer: LaneBalancer, seconds_per_row: dict[str, float], batches: int) -> float:
    """Route a burst of micro-batches that all arrive at once; each lane serves its share in order.

    Returns when the last one finishes, and reports every micro-batch's service time back to the balancer."""
    busy = {name: 0.0 for name in seconds_per_row}
    routed = []
    for _ in range(batches):
        lane = balancer.choose(ROWS)
        busy[lane.name] += ROWS * seconds_per_row[lane.name]
        routed.append(lane)
    for lane in routed:
        balancer.done(lane, ROWS, ROWS * seconds_per_row[lane.name])
    return max(busy.values())


def best_static_split(seconds_per_row: dict[str, float], batches: int) -> float:
    """The shortest makespan over every way of giving k micro-batches to the first lane and the rest to the second."""
    first, second = seconds_per_row.values()
    return min(max(k * ROWS * first, (batches - k) * ROWS * second) for k in range(batches + 1))


@pytest.mark.parametrize("gpu, cpu", [(1e-3, 5e-3), (1e-3, 50e-3), (1e-3, 1e-3), (4e-3, 1e-3)])
def test_bursts_split_close_to_the_best_static_split(gpu, cpu):
    speeds = {"cuda:0": gpu, "cpu": cpu}
    balancer = LaneBalancer(list(speeds))
    for _ in range(3):  # the first burst measures both lanes; later ones use the measurements
        makespan = burst_makespan(balancer, speeds, batches=24)
    best = best_static_split(speeds, 24)
    slowest_batch = ROWS * max(gpu, cpu)
    assert best <= makespan <= best + slowest_batch  # greedy on exact times is within one micro-batch of optimal
    first_lane_only = 24 * ROWS * gpu
    if cpu * 24 < gpu * 23:  # the CPU lane can absorb a batch without becoming the bottleneck
        assert makespan < first_lane_only


def test_a_much_slower_lane_only_gets_work_when_the_fast_one_is_backed_up():
    speeds = {"cuda:0": 1e-3, "cpu": 100e-3}
    balancer = LaneBalancer(list(speeds))
    burst_makespan(balancer, speeds, batches=2)  # each lane tried once
    before = balancer.snapshot()["cpu"]["batches"]
    burst_makespan(balancer, speeds, batches=50)  # 400 ms of GPU backlog at most: less than one 800 ms CPU batch
    assert balancer.snapshot()["cpu"]["batches"] == before
    burst_makespan(balancer, speeds, batches=150)  # 1.2 s of GPU work: the CPU lane takes a batch or so
    assert 1 <= balancer.snapshot()["cpu"]["batches"] - before <= 2


def test_unmeasured_lanes_are_each_tried_once_then_the_first_wins_ties():
    balancer = LaneBalancer(["cuda:0", "cpu"])
    assert [balancer.choose(4).name for _ in range(3)] == ["cuda:0", "cpu", "cuda:0"]


def test_measurements_are_smoothed_and_failures_release_rows():
    balancer = LaneBalancer(["cuda:0", "cpu"], smoothing=0.5)
    gpu = balancer.choose(10)
    balancer.done(gpu, 10, 0.010)
    assert gpu.name == "cuda:0" and gpu.seconds_per_row == pytest.approx(1e-3)
    cpu = balancer.choose(10)  # not measured yet and idle: tried
    balancer.done(cpu, 10, 0.100)
    assert cpu.name == "cpu" and cpu.seconds_per_row == pytest.approx(10e-3)
    assert balancer.choose(10) is gpu
    balancer.done(gpu, 10, 0.030)
    assert gpu.seconds_per_row == pytest.approx(2e-3)  # halfway from 1 ms to 3 ms per row
    assert balancer.choose(5) is gpu and gpu.rows_in_flight == 5
    balancer.failed(gpu, 5)
    assert gpu.rows_in_flight == 0 and gpu.seconds_per_row == pytest.approx(2e-3)
    assert balancer.snapshot()["cuda:0"] == {"rows": 25, "batches": 3, "ms_per_row": pytest.approx(2.0)}


def test_a_lane_of_several_servers_counts_its_queue_shared_between_them():
    """A CPU lane of 4 pool threads at 4 ms per row keeps pace with a 1 ms-per-row GPU lane: bursts split about
    evenly, and the makespan (the CPU lane's micro-batches run 4 at a time) stays within a micro-batch of the best."""
    speeds = {"cuda:0": 1e-3, "cpu": 4e-3}
    balancer = LaneBalancer(list(speeds), servers=[1, 4])
    for _ in range(3):
        routed = [balancer.choose(ROWS) for _ in range(40)]
        for lane in routed:
            balancer.done(lane, ROWS, ROWS * speeds[lane.name])
    on_cpu = sum(lane.name == "cpu" for lane in routed)
    makespan = max((40 - on_cpu) * ROWS * speeds["cuda:0"], -(-on_cpu // 4) * ROWS * speeds["cpu"])
    best = min(max((40 - k) * ROWS * 1e-3, -(-k // 4) * ROWS * 4e-3) for k in range(41))
    assert 14 <= on_cpu <= 26
    assert makespan <= best + ROWS * speeds["cpu"]
    assert LaneBalancer(["a", "b"]).lanes[1].servers == 1


def test_bad_arguments():
    with pytest.raises(ValueError):
        LaneBalancer([])
    with pytest.raises(ValueError):
        LaneBalancer(["cpu"], smoothing=0)
    with pytest.raises(ValueError):
        LaneBalancer(["cuda:0", "cpu"], servers=[1, 0])
