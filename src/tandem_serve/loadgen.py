"""Load generation: asyncio closed loop (fixed concurrency) and open loop (Poisson arrivals at a rate).

A target is any `async send(i)` that serves request i (a Triton model through `TritonSender`, or an
in-process handler). Closed loop: `concurrency` senders issue requests back to back. Open loop:
requests arrive at `rate` per second whatever the server does; each latency is counted from the
request's scheduled arrival (so a slow server is not hidden by a waiting client), and an arrival
finding `concurrency` requests already in flight is counted as dropped. GPU utilisation is
sampled during the timed window when NVML (or nvidia-smi) is there, the machine's busy cores are
read through psutil, and per-stage Triton statistics are read before and after.

One Python process sends a few thousand small requests per second at most (tritonclient spends
~0.2-0.3 ms of CPU on each): `measure(..., processes=N)` spreads every level over N spawned
processes (each with its share of the concurrency or rate, the windows started together) and
merges their latencies. `LoadPoint.client_cores` tells whether the load generator itself was busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import queue
import random
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
import psutil

from tandem_serve.errors import ConfigError
from tandem_serve.stats import StageStats, read_statistics, stats_delta

logger = logging.getLogger(__name__)
Send = Callable[[int], Awaitable[Any]]
MODES = ("closed", "open")


@dataclass(frozen=True)
class LoadSpec:
    """One load level."""

    mode: str = "closed"  # closed: `concurrency` senders; open: Poisson arrivals at `rate`
    concurrency: int = 1  # closed: senders; open: the most requests in flight (further arrivals are dropped)
    rate: float = 0.0  # open: offered requests/s
    seconds: float = 5.0  # timed window
    warm_up: int = 2  # untimed requests per sender (open: in all) before the window
    seed: int = 0  # open: arrival times

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"load mode must be one of {MODES}, got {self.mode!r}")
        if self.concurrency < 1 or self.seconds <= 0 or self.warm_up < 0:
            raise ConfigError("load: concurrency >= 1, seconds > 0 and warm_up >= 0 required")
        if self.mode == "open" and self.rate <= 0:
            raise ConfigError("open-loop load needs a rate > 0 (requests/s)")

    @property
    def label(self) -> str:
        return f"c{self.concurrency}" if self.mode == "closed" else f"{self.rate:g}/s"


@dataclass
class LoadPoint:
    """What one load level measured."""

    mode: str
    concurrency: int
    offered_rate: float  # open loop; 0 for closed
    throughput: float  # completed requests/s over the window
    p50_ms: float
    p90_ms: float
    p99_ms: float
    completed: int
    errors: int
    dropped: int = 0
    gpu_util: float | None = None  # mean % over the window
    first_error: str = ""
    client_cores: float | None = None  # CPU of the load generator's processes / wall (in-process targets included)
    host_cores_busy: float | None = None  # whole machine: cores busy over the window (server, stubs and load), psutil
    server_cpu_s: float | None = None  # CPU seconds of the server's process tree (tritonserver + stubs) in the level
    server_cpu_parts: dict[str, float] = field(default_factory=dict)  # those seconds by process: server, stub:<model>
    warm_up_requests: int = 0  # sent before the timed window (the server's CPU time covers them too)
    stages: list[StageStats] = field(default_factory=list)  # Triton statistics of the window, per model

    @property
    def answered(self) -> int:
        """Requests the server answered in the level: completed, failed and the warm-up ones."""
        return self.completed + self.errors + self.warm_up_requests

    @property
    def server_cpu_ms_per_request(self) -> float | None:
        """The server's CPU time per request it answered in the level (ms; warm-up and errors included), apart from
        the load generator's."""
        return None if self.server_cpu_s is None or not self.answered else self.server_cpu_s / self.answered * 1e3

    def server_cpu_ms_by_part(self) -> dict[str, float]:
        """`server_cpu_ms_per_request` split by process (the server itself, each model's stubs)."""
        if not self.answered:
            return {}
        return {part: seconds / self.answered * 1e3 for part, seconds in sorted(self.server_cpu_parts.items())}

    def record(self) -> dict:
        """JSON-ready dict (stages as dicts)."""
        values = dict(self.__dict__, server_cpu_ms_per_request=self.server_cpu_ms_per_request,
                      server_cpu_ms_per_request_by_part=self.server_cpu_ms_by_part())
        values["stages"] = [dict(s.__dict__, mean_batch=s.mean_batch) for s in self.stages]
        return values


class _Tally:
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


async def _closed(send: Send, spec: LoadSpec, tally: _Tally) -> float:
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


async def _open(send: Send, spec: LoadSpec, tally: _Tally) -> float:
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


def percentile_ms(ordered: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of sorted seconds, in ms; NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e3


async def _run_level(send: Send, spec: LoadSpec) -> tuple[_Tally, float, float]:
    """The tally, wall seconds and this process's CPU seconds of one level."""
    tally, cpu = _Tally(), time.process_time()
    wall = await (_closed(send, spec, tally) if spec.mode == "closed" else _open(send, spec, tally))
    return tally, wall, time.process_time() - cpu


def _point(spec: LoadSpec, tallies: Sequence[_Tally], wall: float, cpu_s: float, gpu: float | None) -> LoadPoint:
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
        tally, wall, cpu_s = await _run_level(send, spec)
    point = _point(spec, [tally], wall, cpu_s, gpu.mean)
    point.host_cores_busy, point.server_cpu_s, point.server_cpu_parts = host.cores, server.seconds, server.parts
    return point


def host_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, over all cores (psutil); idle and iowait not busy."""
    times = psutil.cpu_times()
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already counted in user and nice
    total = sum(times) - guest
    return total - times.idle - getattr(times, "iowait", 0.0), total


class HostCpu:
    """Cores of this machine busy while the block runs (all processes, psutil); None where no time passed."""

    def __enter__(self) -> "HostCpu":
        self.cores: float | None = None
        self._start = host_busy_seconds()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = host_busy_seconds()
        if end[1] > self._start[1]:
            self.cores = (end[0] - self._start[0]) / (end[1] - self._start[1]) * psutil.cpu_count()


def _part_of(process: psutil.Process, root_pid: int) -> str:
    """What a process of the server's tree is, for the CPU breakdown: the root's name, a Python-backend stub's model
    ("stub:<model>"), else the process name."""
    from tandem_serve.triton.stubs import parse_stub

    if process.pid == root_pid:
        return process.name()
    stub = parse_stub(process.pid, process.cmdline())
    return f"stub:{stub.model}" if stub is not None else process.name()


class ProcessTreeCpu:
    """CPU seconds (user + system) a process and its descendants spend while the block runs (psutil); None without
    a pid. A process that starts inside the block counts from zero; one that ends inside it is lost. `parts` splits
    the seconds by what each process is (the server itself, each model's stubs)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.seconds: float | None = None
        self.parts: dict[str, float] = {}
        self._labels: dict[int, str] = {}

    def _sample(self) -> dict[int, float]:
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        times = {}
        for process in processes:
            try:
                cpu = process.cpu_times()
                times[process.pid] = cpu.user + cpu.system
                if process.pid not in self._labels:
                    self._labels[process.pid] = _part_of(process, root.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return times

    def __enter__(self) -> "ProcessTreeCpu":
        self._start = self._sample() if self.pid else {}
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.pid:
            end = self._sample()
            spent = {pid: max(0.0, seconds - self._start.get(pid, 0.0)) for pid, seconds in end.items()}
            self.seconds = sum(spent.values())
            for pid, seconds in spent.items():
                label = self._labels.get(pid, "?")
                self.parts[label] = self.parts.get(label, 0.0) + seconds


class GpuSampler:
    """Mean GPU utilisation (%) of device 0 while the block runs, from NVML or nvidia-smi; None without either."""

    def __init__(self, device: int = 0, interval_s: float = 0.1):
        self.device, self.interval_s = device, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None

    def __enter__(self) -> "GpuSampler":
        reader = self._nvml_reader()
        if reader is not None:
            self._thread = threading.Thread(target=self._poll, args=(reader,), daemon=True, name="gpu-sampler")
        elif shutil.which("nvidia-smi"):
            self._process = subprocess.Popen(
                ["nvidia-smi", f"--id={self.device}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(self.interval_s * 1000)}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True, name="gpu-sampler")
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _nvml_reader(self) -> Callable[[], float] | None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML here (CPU machine, or the package is missing)
            return None

    def _poll(self, read: Callable[[], float]) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(read())

    def _read_smi(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if self._stop.is_set():
                break
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                continue


class TritonSender:
    """`async send(i)`: request i % len(requests) to one model over gRPC or HTTP (tritonclient's asyncio clients),
    the inputs over the wire or through a shared-memory pool of `slots` ("system" or "cuda").

    `requests` holds, per request, its (input name, numpy array) pairs; outputs are read back as numpy.
    Use `async with`: closes the client and the pool (unregistering its regions).
    """

    def __init__(self, url: str, protocol: str, model: str, requests: Sequence[Sequence[tuple[str, np.ndarray]]],
                 outputs: Sequence[str], shm: str = "none", slots: int = 64, timeout_s: float = 60.0,
                 output_bytes: int = 1 << 16, shm_key: str | None = None):
        from tandem_serve.shm import KINDS

        if shm not in KINDS:
            raise ConfigError(f"shm must be one of {KINDS}, got {shm!r}")
        if not requests:
            raise ConfigError("a sender needs at least one request")
        self.url, self.protocol, self.model, self.shm = url, protocol, model, shm
        self.requests, self.outputs, self.slots, self.timeout_s = list(requests), list(outputs), slots, timeout_s
        self.output_bytes = output_bytes
        self.shm_key = shm_key  # None: the default keys file's (client.shm_headers)
        self.client: Any = None
        self.pool: Any = None
        self._setup_client: Any = None
        self._free: asyncio.Semaphore | None = None

    async def __aenter__(self) -> "TritonSender":
        from tandem_serve.client import shm_headers, triton_client
        from tandem_serve.shm import ShmPool

        if self.protocol == "grpc":
            import tritonclient.grpc.aio as aio

            self.client = aio.InferenceServerClient(self.url)
        elif self.protocol == "http":
            import tritonclient.http.aio as aio

            self.client = aio.InferenceServerClient(self.url, conn_limit=max(100, self.slots), conn_timeout=self.timeout_s)
        else:
            raise ConfigError(f"protocol must be 'grpc' or 'http', got {self.protocol!r}")
        if self.shm != "none":  # regions are server-wide: registered once through a synchronous client
            self._setup_client = triton_client(self.url, self.protocol, self.timeout_s)
            input_bytes = max(ShmPool.input_size([a for _, a in r]) for r in self.requests)
            self.pool = ShmPool(self._setup_client, self.shm, self.slots, input_bytes, self.output_bytes * len(self.outputs),
                                headers=shm_headers(self.protocol, self.shm_key))
            self._free = asyncio.Semaphore(self.slots)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
            if self._setup_client is not None:
                self._setup_client.close()
        finally:
            await self.client.close()

    async def __call__(self, index: int) -> dict[str, np.ndarray]:
        from tandem_serve.client import bind_slot, read_slot_outputs, tritonclient_module
        from tandem_serve.shm import numpy_datatype

        module = tritonclient_module(self.protocol)
        pairs = self.requests[index % len(self.requests)]
        inputs = [module.InferInput(name, list(array.shape), numpy_datatype(array)) for name, array in pairs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {"timeout": int(self.timeout_s * 1e6)}
        if self.pool is None:
            for tensor, (_, array) in zip(inputs, pairs):
                tensor.set_data_from_numpy(array)
            result = await self.client.infer(self.model, inputs, outputs=[module.InferRequestedOutput(n) for n in self.outputs],
                                             **kwargs)
            return {name: result.as_numpy(name) for name in self.outputs}
        async with self._free:  # a slot is always free here: as many permits as slots
            with self.pool.slot(timeout_s=0.0) as slot:
                requested, areas = bind_slot(self.protocol, self.pool, slot, inputs, [a for _, a in pairs], self.outputs)
                result = await self.client.infer(self.model, inputs, outputs=requested, **kwargs)
                return read_slot_outputs(self.protocol, self.pool, result, self.outputs, areas)


class PostSender:
    """`async send(i)`: body i % len(bodies) POSTed to `url` with `headers` (aiohttp, tritonclient's own HTTP
    dependency: one pool of keep-alive connections). A non-200 answer raises, naming its status and message.
    Picklable until entered (for `measure(..., processes=N)`)."""

    def __init__(self, url: str, bodies: Sequence[tuple[bytes, str]], headers: dict[str, str] | None = None,
                 timeout_s: float = 60.0, connections: int = 512):
        if not bodies:
            raise ConfigError("a sender needs at least one request body")
        self.url, self.bodies, self.headers = url, list(bodies), dict(headers or {})
        self.timeout_s, self.connections = timeout_s, connections
        self.session: Any = None

    async def __aenter__(self) -> "PostSender":
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.connections),
                                             timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.session.close()

    async def __call__(self, index: int) -> bytes:
        body, content_type = self.bodies[index % len(self.bodies)]
        async with self.session.post(self.url, data=body, headers={**self.headers, "Content-Type": content_type}) as response:
            raw = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {raw[:200].decode(errors='replace')}")
            return raw


class TorchServeSender(PostSender):
    """A PostSender to a TorchServe's `/predictions/<model>` with the inference token."""

    def __init__(self, url: str, model: str, bodies: Sequence[tuple[bytes, str]], token: str,
                 timeout_s: float = 60.0, connections: int = 512):
        super().__init__(f"{url.rstrip('/')}/predictions/{model}", bodies, {"Authorization": f"Bearer {token}"},
                         timeout_s, connections)


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

    async def run() -> list[tuple[_Tally, float, float]]:
        out = []
        async with make_sender() as send:
            for part in parts:
                start.wait(timeout_s)
                out.append((_Tally(), 0.0, 0.0) if part is None else await _run_level(send, part))
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
        point = _point(spec, tallies, max(walls), sum(cpu_s), gpu)
        point.host_cores_busy, point.server_cpu_s, point.stages = host_cores, server_s, stages
        point.server_cpu_parts = parts
        _log(spec, point)
        points.append(point)
    return points
