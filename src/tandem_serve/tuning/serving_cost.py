"""What a Triton ensemble step costs beyond its stage's compute, measured on the embedded server.

A profile's stage timings are the stages' own work. Served by Triton, every stage is a Python-backend
model in an ensemble, and each step also costs the server scheduling it, a round trip to the model's
stub process, and the tensors it receives passing through shared memory. `measure_serving_cost`
chains 1 and 3 pass-through steps and times them one request at a time with a small and a large
payload: the differences give the cost of one more step and of each byte crossing between two
steps, free of the client's and the network's share. One request at a time is an upper bound for a
step whose requests are batched (the per-execution part is then shared).

Those round trips are latency. What bounds throughput is CPU time, so the same chains are also run
with the server's processes' CPU time counted (tritonserver and the stubs, psutil): one request at a
time, and from many client threads at once, where the pass-through step batches. The first gives a
step's CPU time when every execution holds one request (a stage that takes one request per
execution pays that per item), the second how much of it a batch shares; the chain of one step,
less that step, is a request's own CPU time in the server (its gRPC call and the ensemble).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

logger = logging.getLogger(__name__)
STEP_MODEL = "pass_through"
MODEL_PY = ('"""Triton Python-backend model used by `tandem profile` to time ensemble steps."""\n\n'
            "from tandem_serve.triton.probe_models import PassThroughModel as TritonPythonModel\n\n"
            '__all__ = ["TritonPythonModel"]\n')


@dataclass(frozen=True)
class ServingCost:
    """Per request: one more ensemble step, and each byte handed from one step to the next (latency); and the
    server's CPU time for the same (0 where not measured: the latency figures stand in for it)."""

    step_s: float
    byte_s: float
    payload_bytes: int
    latencies_s: dict[str, float]  # median round trip per (steps, payload) case, e.g. "3x1048576"
    step_cpu_s: float = 0.0  # CPU seconds of one more step, one request per execution
    step_cpu_shared_s: float = 0.0  # the part of step_cpu_s spent once per execution (a batch shares it)
    byte_cpu_s: float = 0.0  # CPU seconds per byte a step receives
    request_cpu_s: float = 0.0  # a request's CPU seconds in the server besides its steps (gRPC, the ensemble)
    batched_mean: float = 0.0  # requests per execution of the pass-through step in the concurrent run

    @property
    def cpu_measured(self) -> bool:
        return self.step_cpu_s > 0

    def step_seconds(self, in_bytes: float) -> float:
        """One step that receives `in_bytes` from the previous one."""
        return self.step_s + self.byte_s * in_bytes

    def step_cpu_seconds(self, in_bytes: float, batch: float = 1.0) -> float:
        """CPU seconds per request of one step receiving `in_bytes`, its executions holding `batch` requests."""
        if not self.cpu_measured:
            return self.step_seconds(in_bytes)
        own = self.step_cpu_s - self.step_cpu_shared_s
        return own + self.step_cpu_shared_s / max(1.0, batch) + self.byte_cpu_s * in_bytes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict | None) -> "ServingCost | None":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known}) if raw else None


def _tensor(name: str) -> mc.ModelInput:
    return mc.ModelInput(name=name, data_type=mc.TYPE_UINT8, dims=[-1])


def write_probe_repository(root: Path, lengths: tuple[int, ...] = (1, 3)) -> Path:
    """A model repository with the pass-through model and one ensemble `chain_N` per length."""
    from tandem_serve.tuning.render import write_config  # render imports the profile, which imports this

    model = mc.ModelConfig(name=STEP_MODEL, backend="python", max_batch_size=8,
                           input=[_tensor("DATA")], output=[mc.ModelOutput(name="DATA", data_type=mc.TYPE_UINT8, dims=[-1])],
                           instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
                           dynamic_batching=mc.ModelDynamicBatching())  # batches what queues (the CPU-time run)
    (root / STEP_MODEL / "1").mkdir(parents=True, exist_ok=True)
    (root / STEP_MODEL / "1" / "model.py").write_text(MODEL_PY)
    write_config(model, root / STEP_MODEL / "config.pbtxt")
    for length in lengths:
        ensemble = mc.ModelConfig(name=f"chain_{length}", platform="ensemble", max_batch_size=8, input=[_tensor("data")],
                                  output=[mc.ModelOutput(name="out", data_type=mc.TYPE_UINT8, dims=[-1])])
        names = ["data"] + [f"t{i}" for i in range(1, length)] + ["out"]
        for source, target in zip(names, names[1:]):
            ensemble.ensemble_scheduling.step.add(model_name=STEP_MODEL, model_version=-1,
                                                  input_map={"DATA": source}, output_map={"DATA": target})
        (root / ensemble.name / "1").mkdir(parents=True, exist_ok=True)
        write_config(ensemble, root / ensemble.name / "config.pbtxt")
    return root


def _median_round_trips(url: str, cases: list[tuple[int, int]], requests: int, warm_up: int) -> dict[tuple[int, int], float]:
    """Median latency per (steps, payload bytes), the cases interleaved so that drift hits all alike."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    inputs = {}
    for steps, size in cases:
        tensor = grpcclient.InferInput("data", [1, size], "UINT8")
        tensor.set_data_from_numpy(np.random.default_rng(size).integers(0, 255, (1, size), dtype=np.uint8))
        inputs[(steps, size)] = tensor
    samples: dict[tuple[int, int], list[float]] = {case: [] for case in cases}
    try:
        for round_ in range(warm_up + requests):
            for steps, size in cases:
                start = time.perf_counter()
                result = client.infer(f"chain_{steps}", [inputs[(steps, size)]])
                elapsed = time.perf_counter() - start
                if result.as_numpy("out").size != size:
                    raise RuntimeError(f"chain_{steps} returned {result.as_numpy('out').size} bytes, sent {size}")
                if round_ >= warm_up:
                    samples[(steps, size)].append(elapsed)
    finally:
        client.close()
    return {case: statistics.median(values) for case, values in samples.items()}


@dataclass(frozen=True)
class CpuRun:
    """The server's CPU seconds per request of one chain and payload, and the pass-through step's batching."""

    cpu_s: float
    mean_batch: float


def _cpu_per_request(server_pid: int, url: str, steps: int, size: int, requests: int, threads: int) -> CpuRun:
    """Send `requests` to chain_<steps> from `threads` clients at once; CPU time of the server's process tree."""
    import tritonclient.grpc as grpcclient

    from tandem_serve.loadgen import ProcessTreeCpu
    from tandem_serve.stats import read_statistics

    data = np.random.default_rng(size).integers(0, 255, (1, size), dtype=np.uint8)
    clients = [grpcclient.InferenceServerClient(url) for _ in range(threads)]

    def send(client: grpcclient.InferenceServerClient, count: int) -> None:
        tensor = grpcclient.InferInput("data", [1, size], "UINT8")
        tensor.set_data_from_numpy(data)
        for _ in range(count):
            client.infer(f"chain_{steps}", [tensor])

    def step_stats() -> tuple[int, int]:
        stats = next(s for s in read_statistics(clients[0], "grpc") if s.model == STEP_MODEL)
        return stats.requests, stats.executions

    try:
        send(clients[0], 5)  # warm
        per_thread = max(1, requests // threads)
        before = step_stats()
        with ProcessTreeCpu(server_pid) as cpu, ThreadPoolExecutor(threads) as pool:
            list(pool.map(send, clients, [per_thread] * threads))
        after = step_stats()
    finally:
        for client in clients:
            client.close()
    executions = max(1, after[1] - before[1])
    return CpuRun((cpu.seconds or 0.0) / (per_thread * threads), (after[0] - before[0]) / executions)


def _fit_cpu(seq: dict[tuple[int, int], CpuRun], batched: dict[int, CpuRun], small: int, large: int) -> dict[str, float]:
    """Per-step, per-execution, per-byte and per-request CPU seconds from the chains' CPU per request."""
    step = max(0.0, (seq[(3, small)].cpu_s - seq[(1, small)].cpu_s) / 2)
    step_batched = max(0.0, (batched[3].cpu_s - batched[1].cpu_s) / 2)
    mean = batched[3].mean_batch
    # step(b) = own + shared / b, seen at b = 1 and b = mean
    shared = min(step, max(0.0, (step - step_batched) / (1 - 1 / mean))) if mean > 1.2 else 0.0
    extra_large = (seq[(3, large)].cpu_s - seq[(1, large)].cpu_s) / 2
    byte = max(0.0, (extra_large - step) / (large - small))
    request = max(0.0, seq[(1, small)].cpu_s - step)
    return {"step_cpu_s": step, "step_cpu_shared_s": shared, "byte_cpu_s": byte, "request_cpu_s": request,
            "batched_mean": mean}


def measure_serving_cost(requests: int = 300, payload_bytes: int = 1 << 20, small_bytes: int = 16,
                         warm_up: int = 10, threads: int = 16) -> ServingCost:
    """Start the embedded Triton on a probe repository and derive the per-step and per-byte costs: latency one
    request at a time, CPU time one at a time and from `threads` clients at once."""
    from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions

    with tempfile.TemporaryDirectory(prefix="tandem-probe-") as tmp:
        repository = write_probe_repository(Path(tmp) / "repository")
        with EmbeddedTriton(TritonOptions(model_repositories=[repository])) as server:
            cases = [(steps, size) for steps in (1, 3) for size in (small_bytes, payload_bytes)]
            logger.info("serving cost: %d requests per case over %s", requests, server.grpc_url)
            medians = _median_round_trips(server.grpc_url, cases, requests, warm_up)
            pid = server.process.pid
            # CPU time is read in clock ticks (10 ms): enough requests that a tick is under 2 % of a case
            seq = {(steps, size): _cpu_per_request(pid, server.grpc_url, steps, size, requests * (4 if size == small_bytes else 1), 1)
                   for steps, size in cases}
            batched = {steps: _cpu_per_request(pid, server.grpc_url, steps, small_bytes, requests * 8, threads)
                       for steps in (1, 3)}
    small_extra = medians[(3, small_bytes)] - medians[(1, small_bytes)]
    large_extra = medians[(3, payload_bytes)] - medians[(1, payload_bytes)]
    step_s = max(0.0, small_extra / 2)
    byte_s = max(0.0, (large_extra - small_extra) / 2 / (payload_bytes - small_bytes))
    cpu = _fit_cpu(seq, batched, small_bytes, payload_bytes)
    cost = ServingCost(step_s, byte_s, payload_bytes, {f"{s}x{b}": v for (s, b), v in medians.items()}, **cpu)
    logger.info("serving cost: latency %.3f ms per step, %.3f ms per MiB crossing between steps; CPU %.3f ms per step "
                "(%.3f ms of it per execution, batches of %.1f shared it), %.3f ms per MiB, %.3f ms per request",
                step_s * 1e3, byte_s * (1 << 20) * 1e3, cost.step_cpu_s * 1e3, cost.step_cpu_shared_s * 1e3,
                cost.batched_mean, cost.byte_cpu_s * (1 << 20) * 1e3, cost.request_cpu_s * 1e3)
    return cost
