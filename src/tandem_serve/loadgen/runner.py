"""Each load level in turn, in this process or spread over N spawned ones, with Triton's statistics of its window."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import queue
import threading
from typing import Any, Callable, Sequence

from tandem_serve.loadgen.loops import Tally, measure_async, point_of, run_level
from tandem_serve.loadgen.samplers import GpuSampler, HostCpu, ProcessTreeCpu
from tandem_serve.loadgen.spec import LoadPoint, LoadSpec
from tandem_serve.triton.statistics import StageStats, read_statistics, stats_delta

logger = logging.getLogger("tandem_serve.loadgen")


def _log(spec: LoadSpec, point: LoadPoint) -> None:
    logger.info("%s %s: %.1f req/s, p50 %.1f ms, p99 %.1f ms, errors %d%s, client %.1f cores%s%s", spec.mode,
                spec.label, point.throughput, point.p50_ms, point.p99_ms, point.errors,
                "" if point.gpu_util is None else f", GPU {point.gpu_util:.0f} %", point.client_cores or 0.0,
                "" if point.host_cores_busy is None else f", host {point.host_cores_busy:.1f} cores busy",
                "" if point.server_cpu_ms_per_request is None else
                f", server {point.server_cpu_ms_per_request:.2f} ms CPU per request")


def _stages_since(stats: tuple[Any, str] | None, before: dict[str, StageStats]) -> list[StageStats]:
    """Per-model statistics of the window that began at `before` (models that served requests in it)."""
    if not stats:
        return []
    return [stats_delta(s, before.get(s.model)) for s in read_statistics(*stats)
            if s.requests > (before[s.model].requests if s.model in before else 0)]


def _stats_now(stats: tuple[Any, str] | None) -> dict[str, StageStats]:
    return {s.model: s for s in read_statistics(*stats)} if stats else {}


def measure(make_sender: Callable[[], Any], specs: Sequence[LoadSpec], stats: tuple[Any, str] | None = None,
            processes: int = 1, server_pid: int | None = None) -> list[LoadPoint]:
    """Each load level in turn with one sender (an async context manager that is also `send`).

    With `stats` = (a tritonclient client, its protocol), each point carries the per-model statistics
    of its window (warm-up included). With `processes` > 1 the levels run in that many spawned
    processes (`make_sender` must then be picklable, e.g. a functools.partial of TritonSender). With `server_pid`,
    each point carries the CPU time of that server's process tree (tritonserver and its stubs)."""
    for spec in specs:
        spec.validate()
    if processes > 1:
        return _measure_in_processes(make_sender, specs, stats, processes, server_pid)

    async def run() -> list[LoadPoint]:
        points = []
        async with make_sender() as send:
            for spec in specs:
                before = _stats_now(stats)
                point = await measure_async(send, spec, server_pid)
                point.stages = _stages_since(stats, before)
                _log(spec, point)
                points.append(point)
        return points

    return asyncio.run(run())


def share(spec: LoadSpec, processes: int, index: int) -> LoadSpec | None:
    """Process `index`'s part of a level: its share of the senders (closed) or of the rate and the in-flight cap
    (open); None where the level has fewer senders than processes and this one gets none."""
    concurrency = spec.concurrency // processes + (1 if index < spec.concurrency % processes else 0)
    if concurrency == 0:
        return None
    if spec.mode == "closed":
        return dataclasses.replace(spec, concurrency=concurrency)
    active = min(processes, spec.concurrency)
    return dataclasses.replace(spec, concurrency=concurrency, rate=spec.rate / active, seed=spec.seed * 1000 + index)


def _worker(make_sender: Callable[[], Any], parts: list[LoadSpec | None], start: Any, end: Any, results: Any,
            timeout_s: float) -> None:
    """A load process: each level between two barriers shared with the parent; results (or an error) on the queue."""

    async def run() -> list[tuple[Tally, float, float]]:
        out = []
        async with make_sender() as send:
            for part in parts:
                start.wait(timeout_s)
                out.append((Tally(), 0.0, 0.0) if part is None else await run_level(send, part))
                end.wait(timeout_s)
        return out

    try:
        results.put(asyncio.run(run()))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent, which must not wait forever
        start.abort()
        end.abort()
        results.put(f"{type(exc).__name__}: {exc}"[:500])


def _measure_in_processes(make_sender: Callable[[], Any], specs: Sequence[LoadSpec], stats: tuple[Any, str] | None,
                          processes: int, server_pid: int | None = None) -> list[LoadPoint]:
    context = multiprocessing.get_context("spawn")  # no fork: the parent may hold CUDA and gRPC state
    start, end = context.Barrier(processes + 1), context.Barrier(processes + 1)
    results = context.Queue()
    timeout_s = 300.0 + max(s.seconds for s in specs)
    workers = [context.Process(target=_worker, name=f"load-{k}", daemon=True,
                               args=(make_sender, [share(s, processes, k) for s in specs], start, end, results, timeout_s))
               for k in range(processes)]
    for w in workers:
        w.start()
    levels: list[tuple[float | None, float | None, float | None, dict[str, float], list[StageStats]]] = []
    try:
        for _ in specs:
            before = _stats_now(stats)
            start.wait(timeout_s)
            with GpuSampler() as gpu, HostCpu() as host, ProcessTreeCpu(server_pid) as server:
                end.wait(timeout_s)
            levels.append((gpu.mean, host.cores, server.seconds, server.parts, _stages_since(stats, before)))
    except threading.BrokenBarrierError:
        pass  # a worker failed: its message is on the queue
    try:
        reports = [results.get(timeout=60) for _ in workers]
    except queue.Empty:
        codes = [w.exitcode for w in workers]
        raise RuntimeError(f"a load process died without a report (exit codes {codes})") from None
    finally:
        for w in workers:
            w.join(timeout=30)
            if w.is_alive():
                w.terminate()
    failures = [r for r in reports if isinstance(r, str)]
    if failures:
        raise RuntimeError(f"a load process failed: {failures[0]}")
    points = []
    for index, (spec, (gpu, host_cores, server_s, parts, stages)) in enumerate(zip(specs, levels)):
        tallies, walls, cpu_s = zip(*(r[index] for r in reports))  # (tally, wall, CPU seconds) per process
        point = point_of(spec, tallies, max(walls), sum(cpu_s), gpu)
        point.host_cores_busy, point.server_cpu_s, point.stages = host_cores, server_s, stages
        point.server_cpu_parts = parts
        _log(spec, point)
        points.append(point)
    return points
