"""One load level inside an event loop: the closed loop (fixed concurrency) and the open loop (Poisson arrivals)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Sequence

from tandem_serve.loadgen.samplers import GpuSampler, HostCpu, ProcessTreeCpu
from tandem_serve.loadgen.spec import LoadPoint, LoadSpec, Send, percentile_ms


class Tally:
    """Latencies and failures of the timed window."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.dropped = 0
        self.first_error = ""

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]


async def _closed(send: Send, spec: LoadSpec, tally: Tally) -> float:
    """`concurrency` senders back to back for `seconds` after the warm-up; the window's wall seconds."""
    counter = iter(range(1 << 62))
    for _ in range(spec.warm_up):  # fresh instances and new batch shapes pay one-off costs
        results = await asyncio.gather(*(send(next(counter)) for _ in range(spec.concurrency)), return_exceptions=True)
        if all(isinstance(r, BaseException) for r in results):
            break  # a failing target shows up in the window
    deadline = time.perf_counter() + spec.seconds

    async def sender() -> None:
        while time.perf_counter() < deadline:
            begin = time.perf_counter()
            try:
                await send(next(counter))
            except Exception as exc:  # noqa: BLE001 - counted, reported with the point
                tally.failed(exc)
                continue
            tally.latencies.append(time.perf_counter() - begin)

    began = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(spec.concurrency)))
    return time.perf_counter() - began


async def _open(send: Send, spec: LoadSpec, tally: Tally) -> float:
    """Poisson arrivals at `rate` for `seconds`, at most `concurrency` in flight; the window's wall seconds."""
    counter = iter(range(1 << 62))
    for _ in range(spec.warm_up):
        try:
            await send(next(counter))
        except Exception:  # noqa: BLE001
            break
    arrivals = random.Random(spec.seed)
    in_flight: set[asyncio.Task] = set()

    async def one(scheduled: float) -> None:
        try:
            await send(next(counter))
        except Exception as exc:  # noqa: BLE001
            tally.failed(exc)
            return
        tally.latencies.append(time.perf_counter() - scheduled)

    began = time.perf_counter()
    scheduled = began
    while True:
        scheduled += arrivals.expovariate(spec.rate)
        if scheduled - began >= spec.seconds:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= spec.concurrency:
            tally.dropped += 1
            continue
        task = asyncio.ensure_future(one(scheduled))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.gather(*in_flight)
    return time.perf_counter() - began


async def run_level(send: Send, spec: LoadSpec) -> tuple[Tally, float, float]:
    """The tally, wall seconds and this process's CPU seconds of one level."""
    tally, cpu = Tally(), time.process_time()
    wall = await (_closed(send, spec, tally) if spec.mode == "closed" else _open(send, spec, tally))
    return tally, wall, time.process_time() - cpu


def point_of(spec: LoadSpec, tallies: Sequence[Tally], wall: float, cpu_s: float, gpu: float | None) -> LoadPoint:
    """The point of one level from its tallies (one per load process), the longest wall time and their CPU time."""
    ordered = sorted(x for t in tallies for x in t.latencies)
    first_error = next((t.first_error for t in tallies if t.first_error), "")
    point = LoadPoint(spec.mode, spec.concurrency, spec.rate if spec.mode == "open" else 0.0, len(ordered) / wall,
                      percentile_ms(ordered, 0.5), percentile_ms(ordered, 0.9), percentile_ms(ordered, 0.99),
                      len(ordered), sum(t.errors for t in tallies), sum(t.dropped for t in tallies), gpu, first_error,
                      cpu_s / wall)
    point.warm_up_requests = spec.warm_up * (spec.concurrency if spec.mode == "closed" else 1)
    return point


async def measure_async(send: Send, spec: LoadSpec, server_pid: int | None = None) -> LoadPoint:
    """One load level against `send` (inside a running event loop); `server_pid`: also the CPU time of that process
    and its descendants over the level (the timed window and its warm-up)."""
    spec.validate()
    with GpuSampler() as gpu, HostCpu() as host, ProcessTreeCpu(server_pid) as server:
        tally, wall, cpu_s = await run_level(send, spec)
    point = point_of(spec, [tally], wall, cpu_s, gpu.mean)
    point.host_cores_busy, point.server_cpu_s, point.server_cpu_parts = host.cores, server.seconds, server.parts
    return point
