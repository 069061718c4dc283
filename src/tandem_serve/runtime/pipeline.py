"""Micro-batch pipelining inside one worker: CPU stages on a thread pool overlap the device stage.

A batch of requests is cut into micro-batches. For each one, a pool thread prepares the requests
(decode, tokenize, letterbox: a bad request fails alone) and collates them into host tensors;
the calling thread copies them on a copy stream (coalesced through pinned memory when large), runs the
device stage on a compute stream once an event says the copy is done, and enqueues
non-blocking copies of the outputs to pinned memory; a pool thread waits for that micro-batch's
completion event and post-processes it (split per request, NMS). While the GPU runs micro-batch
i, the pool prepares i+1.. and finishes i-1. Without a GPU the same code overlaps CPU inference
on the calling thread with pool work. `pipelined=False` runs the same micro-batches one after
the other on the calling thread with pageable copies: the sequential baseline.

With `cpu_lane_threads` > 0 and a CPU copy of the stages, a pipelined GPU pipeline also runs the
device stage on the CPU: each micro-batch is routed, before it is collated, to the GPU or to the
CPU lane by `tandem_serve.runtime.balance.LaneBalancer` (queued rows x observed service time per row).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, Protocol, Sequence, TypeVar

import torch

from tandem_serve.errors import ConfigError, InvalidInputError
from tandem_serve.runtime.balance import Lane, LaneBalancer
from tandem_serve.runtime.per_request import Failure
from tandem_serve.runtime.transfer import copy_to_host, to_device

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Result = TypeVar("Result")


class PipelineStages(Protocol[Item, Prepared, Result]):
    """What a pipeline runs; every method but `infer` runs on the CPU."""

    def rows(self, item: Item) -> int:
        """Rows (texts, images) one request contributes to a micro-batch."""

    def prepare(self, item: Item) -> Prepared:
        """Per request, on a pool thread; InvalidInputError fails this request only."""

    def collate(self, prepared: list[Prepared]) -> list[torch.Tensor]:
        """A micro-batch's host tensors, on a pool thread."""

    def infer(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The device stage; inputs are on the pipeline's device."""

    def finish(self, outputs: list[torch.Tensor], prepared: list[Prepared]) -> list[Result]:
        """Host outputs of one micro-batch -> one result per request, on a pool thread."""


@dataclass(frozen=True)
class PipelineSettings:
    """How a handler cuts and overlaps its batches."""

    micro_batch_size: int = 8  # rows per micro-batch (a request larger than this forms one alone)
    cpu_threads: int = 2  # pool threads for prepare/collate/finish
    pipelined: bool = True  # false: the sequential baseline (same micro-batches, no overlap)
    timeout_s: float = 120.0  # longest wait for one pool task
    cpu_lane_threads: int = 0  # > 0: torch threads of a CPU copy of the device stage that takes micro-batches
    #                            whenever it would finish them before the GPU (pipelined, on a GPU only)

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.cpu_threads < 1 or self.timeout_s <= 0:
            raise ConfigError("pipeline: micro_batch_size >= 1, cpu_threads >= 1 and timeout_s > 0 required")
        if self.cpu_lane_threads < 0:
            raise ConfigError("pipeline: cpu_lane_threads must be >= 0 (0: no CPU lane)")


def micro_batches(rows: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive request indices grouped so that a group holds at most `size` rows (or one request)."""
    groups: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, count in enumerate(rows):
        if current and filled + count > size:
            groups.append(current)
            current, filled = [], 0
        current.append(index)
        filled += count
    if current:
        groups.append(current)
    return groups


@dataclass
class _Group(Generic[Prepared]):
    """One micro-batch on its way through the pipeline."""

    positions: list[int]  # request indices that survived prepare
    prepared: list[Prepared]
    inputs: list[torch.Tensor]
    rows: int = 0
    lane: Lane | None = None  # where the balancer sent it; None without a balancer (the pipeline's device)


class MicroBatchPipeline(Generic[Item, Prepared, Result]):
    """Runs `stages` over batches of requests; one result or Failure per request. Close when done."""

    def __init__(self, stages: PipelineStages[Item, Prepared, Result], device: str | torch.device,
                 settings: PipelineSettings | None = None, name: str = "pipeline",
                 cpu_stages: PipelineStages[Item, Prepared, Result] | None = None):
        self.stages = stages
        self.device = torch.device(device)
        self.settings = settings or PipelineSettings()
        self.settings.validate()
        self.name = name
        self.pool = ThreadPoolExecutor(self.settings.cpu_threads, thread_name_prefix=f"{name}-cpu")
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)
        self.balancer: LaneBalancer | None = None
        self.cpu_stages = cpu_stages
        if cpu_stages is not None and self.settings.cpu_lane_threads > 0 and self.settings.pipelined:
            primary = str(self.device) if self.device.type != "cpu" else "primary"  # a CPU device only in tests
            self.balancer = LaneBalancer([primary, "cpu"])
            self.cpu_lane = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-cpu-lane")
            torch.set_num_threads(self.settings.cpu_lane_threads)  # process-wide: the GPU lane needs few
            logger.info("%s: CPU lane with %d torch thread(s) beside %s", name, self.settings.cpu_lane_threads, self.device)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.balancer is not None:
            self.cpu_lane.shutdown(wait=True, cancel_futures=True)
            logger.info("%s: micro-batches per lane %s", self.name, self.balancer.snapshot())

    def __enter__(self) -> "MicroBatchPipeline[Item, Prepared, Result]":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, items: Sequence[Item]) -> list[Result | Failure]:
        """Process one batch of requests; never raises for a request's fault."""
        results: list[Result | Failure | None] = [None] * len(items)
        groups = micro_batches([self.stages.rows(item) for item in items], self.settings.micro_batch_size)
        if self.settings.pipelined:
            self._run_pipelined(items, groups, results)
        else:
            self._run_sequential(items, groups, results)
        for index, result in enumerate(results):
            if result is None:  # defensive: every path sets a result or a failure
                results[index] = Failure(f"{self.name}: no result produced", invalid=False)
        return results  # type: ignore[return-value]

    # -- the two schedules -------------------------------------------------------------------

    def _run_sequential(self, items: Sequence[Item], groups: list[list[int]], results: list) -> None:
        for indices in groups:
            try:
                group = self._prepare(items, indices, results)
                if group is None:
                    continue
                with torch.inference_mode():
                    inputs = [t.to(self.device) for t in group.inputs]
                    outputs = [t.cpu() for t in self.stages.infer(inputs)]
                self._finish(group, outputs, None, results)
            except Exception as exc:  # noqa: BLE001 - reported per request
                self._fail(indices, exc, results)

    def _run_pipelined(self, items: Sequence[Item], groups: list[list[int]], results: list) -> None:
        preparing = [(indices, self.pool.submit(self._prepare, items, indices, results)) for indices in groups]
        finishing: list[tuple[list[int], Future]] = []
        for indices, future in preparing:
            try:
                group = self._wait(future)
                if group is None:
                    continue
                if group.lane is not None and group.lane.name == "cpu":
                    finishing.append((group.positions, self.cpu_lane.submit(self._run_cpu_lane, group, results)))
                    continue
                started = time.perf_counter()
                try:
                    outputs, done, began = self._launch(group.inputs)
                except Exception:
                    self._release(group)
                    raise
                if group.lane is not None and done is None:  # a synchronous (CPU) device stage: timed here
                    self.balancer.done(group.lane, group.rows, time.perf_counter() - started)
                finishing.append((group.positions, self.pool.submit(self._finish, group, outputs, done, results, began)))
            except Exception as exc:  # noqa: BLE001 - reported per request
                self._fail(indices, exc, results)
        for positions, future in finishing:
            try:
                self._wait(future)
            except Exception as exc:  # noqa: BLE001
                self._fail(positions, exc, results)

    # -- steps -------------------------------------------------------------------------------

    def _prepare(self, items: Sequence[Item], indices: list[int], results: list) -> _Group | None:
        """Prepare each request (a bad one fails alone) and collate the rest."""
        positions, prepared = [], []
        for index in indices:
            try:
                prepared.append(self.stages.prepare(items[index]))
                positions.append(index)
            except InvalidInputError as exc:
                results[index] = Failure.of_input(self.name, exc)
        if not prepared:
            return None
        rows = sum(self.stages.rows(items[index]) for index in positions)
        lane = self.balancer.choose(rows) if self.balancer is not None else None
        stages = self.cpu_stages if lane is not None and lane.name == "cpu" else self.stages
        try:
            inputs = stages.collate(prepared)
        except Exception as exc:  # noqa: BLE001
            if lane is not None:
                self.balancer.failed(lane, rows)
            self._fail(positions, exc, results)
            return None
        return _Group(positions, prepared, inputs, rows, lane)

    def _launch(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None, torch.cuda.Event | None]:
        """Copy in, run the device stage, copy out; on a GPU everything is enqueued, nothing waited for.

        Returns the outputs, the event that marks them done, and (with a balancer) the event that marks
        the compute stream starting this micro-batch: the two time its service on the GPU."""
        with torch.inference_mode():
            if self.device.type != "cuda":
                return self.stages.infer(inputs), None, None
            with torch.cuda.stream(self.copy_stream):
                staged = to_device(inputs, self.device)
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
            self.compute_stream.wait_event(copied)
            timed = self.balancer is not None
            began = torch.cuda.Event(enable_timing=True) if timed else None
            with torch.cuda.stream(self.compute_stream):
                if began is not None:
                    began.record(self.compute_stream)
                for tensor in staged:
                    tensor.record_stream(self.compute_stream)  # allocated on the copy stream
                outputs = copy_to_host(self.stages.infer(staged))
                done = torch.cuda.Event(enable_timing=timed)
                done.record(self.compute_stream)
            return outputs, done, began

    def _finish(self, group: _Group, outputs: list[torch.Tensor], done: torch.cuda.Event | None, results: list,
                began: torch.cuda.Event | None = None) -> None:
        if done is not None:
            try:
                done.synchronize()
            except Exception:
                self._release(group)
                raise
        if group.lane is not None and began is not None:
            self.balancer.done(group.lane, group.rows, began.elapsed_time(done) / 1e3)
        for index, result in zip(group.positions, self.stages.finish(outputs, group.prepared)):
            results[index] = result

    def _run_cpu_lane(self, group: _Group, results: list) -> None:
        """The device stage of one micro-batch on the CPU copy, then its post-processing, on the CPU lane's thread."""
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                outputs = self.cpu_stages.infer(group.inputs)
        except Exception:
            self._release(group)
            raise
        self.balancer.done(group.lane, group.rows, time.perf_counter() - started)
        for index, result in zip(group.positions, self.cpu_stages.finish(outputs, group.prepared)):
            results[index] = result

    def _release(self, group: _Group) -> None:
        """A routed micro-batch failed before it finished: its rows leave the lane's queue."""
        if group.lane is not None:
            self.balancer.failed(group.lane, group.rows)

    def _wait(self, future: Future):
        try:
            return future.result(timeout=self.settings.timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"a {self.name} step took longer than {self.settings.timeout_s:.0f} s") from None

    def _fail(self, indices: Sequence[int], exc: Exception, results: list) -> None:
        """Fail the listed requests that have no result yet."""
        if isinstance(exc, InvalidInputError):
            failure = Failure.of_input(self.name, exc)
        else:
            logger.error("%s: a micro-batch of %d request(s) failed", self.name, len(indices), exc_info=exc)
            failure = Failure(f"{self.name}: internal error ({type(exc).__name__})", invalid=False)
        for index in indices:
            if results[index] is None:
                results[index] = failure
