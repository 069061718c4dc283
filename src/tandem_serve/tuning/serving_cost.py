"""What a Triton ensemble step costs beyond its stage's compute, measured on the embedded server.

A profile's stage timings are the stages' own work. Served by Triton, every stage is a Python-backend
model in an ensemble, and each step also costs the server scheduling it, a round trip to the model's
stub process, and the tensors it receives passing through shared memory. `measure_serving_cost`
chains 1 and 3 pass-through steps and times them one request at a time with a small and a large
payload: the differences give the cost of one more step and of each byte crossing between two
steps, free of the client's and the network's share. One request at a time is an upper bound for a
step whose requests are batched (the per-execution part is then shared).

Those round trips are latency. What bounds throughput is CPU time, so the chains are also run from
many client threads at once with the server's processes' CPU time counted (tritonserver and the
stubs, psutil): chains of a one-request pass-through (`single_N`) give a step's CPU time when every
execution holds one request (a stage that takes one request per execution pays that per item) and
its stub's part; the batching chains, how much of it a batch shares and what each byte costs; the
one-step chain less that step, a request's own CPU time in the server (its gRPC call, the ensemble).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from tandem_serve.triton.model_config import read_config, write_config

logger = logging.getLogger(__name__)
STEP_MODEL = "pass_through"  # batches what queues (max_batch_size 8)
SINGLE_MODEL = "pass_through_single"  # one request per execution (max_batch_size 0), as the tokenizer
MODEL_PY = ('"""Triton Python-backend model used by `tandem profile` to time ensemble steps."""\n\n'
            "from tandem_serve.triton.probe_models import PassThroughModel as TritonPythonModel\n\n"
            '__all__ = ["TritonPythonModel"]\n')


@dataclass(frozen=True)
class AdapterCost:
    """One real adapter served alone, one request per execution, under load: what its instance is busy with and
    what its stub spends per request (compute and the stub's own share of the step)."""

    model: str
    busy_s: float  # Triton's compute time per execution (input, execute, output)
    stub_cpu_s: float  # CPU seconds of the model's stub per request
    # the one instance's wall time per request while requests always waited for it: its compute and the hand-off
    # between executions that Triton's compute time leaves out (0 in profiles from before it was measured)
    period_s: float = 0.0

    @property
    def instance_s(self) -> float:
        """An instance's time per request: its measured period, or its compute time where no period was measured."""
        return max(self.busy_s, self.period_s)


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
    step_stub_cpu_s: float = 0.0  # the part of step_cpu_s spent in the step's stub (the rest: tritonserver)
    byte_cpu_s: float = 0.0  # CPU seconds per byte a step receives
    request_cpu_s: float = 0.0  # a request's CPU seconds in the server besides its steps (gRPC, the ensemble)
    batched_mean: float = 0.0  # requests per execution of the batching pass-through step in its run
    adapters: dict[str, AdapterCost] = field(default_factory=dict)  # by stage: real adapters measured served

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
        if not raw:
            return None
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["adapters"] = {stage: AdapterCost(**a) for stage, a in raw.get("adapters", {}).items()}
        return cls(**values)


def _tensor(name: str, dims: list[int]) -> mc.ModelInput:
    return mc.ModelInput(name=name, data_type=mc.TYPE_UINT8, dims=dims)


def _output(name: str, dims: list[int]) -> mc.ModelOutput:
    return mc.ModelOutput(name=name, data_type=mc.TYPE_UINT8, dims=dims)


def write_probe_repository(root: Path, lengths: tuple[int, ...] = (1, 3)) -> Path:
    """A model repository with the two pass-through models and ensembles `chain_N` (of the batching one) and
    `single_N` (of the one-request one) per length."""

    for name, batch in ((STEP_MODEL, 8), (SINGLE_MODEL, 0)):
        dims = [-1] if batch else [-1, -1]
        model = mc.ModelConfig(name=name, backend="python", max_batch_size=batch, input=[_tensor("DATA", dims)],
                               output=[_output("DATA", dims)],
                               instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
                               dynamic_batching=mc.ModelDynamicBatching())
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "1" / "model.py").write_text(MODEL_PY)
        write_config(model, root / name / "config.pbtxt")
        for length in lengths:
            ensemble = mc.ModelConfig(name=f"{'chain' if batch else 'single'}_{length}", platform="ensemble",
                                      max_batch_size=batch, input=[_tensor("data", dims)], output=[_output("out", dims)])
            names = ["data"] + [f"t{i}" for i in range(1, length)] + ["out"]
            for source, target in zip(names, names[1:]):
                ensemble.ensemble_scheduling.step.add(model_name=name, model_version=-1,
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
    """The server's CPU seconds per request of one chain and payload (all of it, and its stubs' part), and how many
    requests each execution of its step held."""

    cpu_s: float
    stub_s: float
    mean_batch: float


def _drive(url: str, server_pid: int, model: str, infer: str, inputs: list, requests: int, threads: int,
           warm: int = 5):
    """Send `requests` to `infer` from `threads` clients at once, cycling over `inputs` (the server kept busy: CPU
    time read while it idles would count waiting stubs): the server tree's CPU time, `model`'s statistics of the
    window, the number of requests sent and the window's wall seconds."""
    import tritonclient.grpc as grpcclient

    from tandem_serve.loadgen import ProcessTreeCpu
    from tandem_serve.triton.statistics import read_statistics, stats_delta

    clients = [grpcclient.InferenceServerClient(url) for _ in range(threads)]

    def send(client: grpcclient.InferenceServerClient, count: int, offset: int) -> None:
        for k in range(count):
            client.infer(infer, [inputs[(offset + k) % len(inputs)]])

    def stats():
        return next(s for s in read_statistics(clients[0], "grpc") if s.model == model)

    try:
        send(clients[0], warm, 0)
        per_thread = max(1, requests // threads)
        before = stats()
        with ProcessTreeCpu(server_pid) as cpu, ThreadPoolExecutor(threads) as pool:
            began = time.perf_counter()
            list(pool.map(send, clients, [per_thread] * threads, range(threads)))
            wall = time.perf_counter() - began
        window = stats_delta(stats(), before)
    finally:
        for client in clients:
            client.close()
    return cpu, window, per_thread * threads, wall


def _cpu_per_request(server_pid: int, url: str, chain: str, size: int, requests: int, threads: int) -> CpuRun:
    """The CPU time of the server's process tree per request of `chain`, sent from `threads` clients at once."""
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("data", [1, size], "UINT8")
    tensor.set_data_from_numpy(np.random.default_rng(size).integers(0, 255, (1, size), dtype=np.uint8))
    step = STEP_MODEL if chain.startswith("chain") else SINGLE_MODEL
    cpu, window, sent, _ = _drive(url, server_pid, step, chain, [tensor], requests, threads)
    stubs = sum(seconds for part, seconds in cpu.parts.items() if part.startswith("stub:"))
    return CpuRun((cpu.seconds or 0.0) / sent, stubs / sent, window.mean_batch)


def _fit_cpu(runs: dict[tuple[str, int], CpuRun], small: int, large: int) -> dict[str, float]:
    """Per-step (and its stub's part), per-execution, per-byte and per-request CPU seconds from the chains' CPU per
    request: `single_N` at one request per execution, `chain_N` batched."""
    step = max(0.0, (runs[("single_3", small)].cpu_s - runs[("single_1", small)].cpu_s) / 2)
    stub = min(step, max(0.0, (runs[("single_3", small)].stub_s - runs[("single_1", small)].stub_s) / 2))
    step_batched = max(0.0, (runs[("chain_3", small)].cpu_s - runs[("chain_1", small)].cpu_s) / 2)
    mean = runs[("chain_3", small)].mean_batch
    # step(b) = own + shared / b, seen at b = 1 (single) and b = mean (chain)
    shared = min(step, max(0.0, (step - step_batched) / (1 - 1 / mean))) if mean > 1.2 else 0.0
    extra_large = (runs[("chain_3", large)].cpu_s - runs[("chain_1", large)].cpu_s) / 2
    byte = max(0.0, (extra_large - step_batched) / (large - small))
    request = max(0.0, runs[("single_1", small)].cpu_s - step)
    return {"step_cpu_s": step, "step_cpu_shared_s": shared, "step_stub_cpu_s": stub, "byte_cpu_s": byte,
            "request_cpu_s": request, "batched_mean": mean}


def measure_serving_cost(requests: int = 300, payload_bytes: int = 1 << 20, small_bytes: int = 16,
                         warm_up: int = 10, threads: int = 16) -> ServingCost:
    """Start the embedded Triton on a probe repository and derive the per-step and per-byte costs: latency one
    request at a time, CPU time from `threads` clients at once."""
    from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions

    with tempfile.TemporaryDirectory(prefix="tandem-probe-") as tmp:
        repository = write_probe_repository(Path(tmp) / "repository")
        with EmbeddedTriton(TritonOptions(model_repositories=[repository])) as server:
            cases = [(steps, size) for steps in (1, 3) for size in (small_bytes, payload_bytes)]
            logger.info("serving cost: %d requests per case over %s", requests, server.grpc_url)
            medians = _median_round_trips(server.grpc_url, cases, requests, warm_up)
            # CPU time is read in clock ticks (10 ms): enough requests that a tick is a small part of a case
            runs = {(chain, size): _cpu_per_request(server.process.pid, server.grpc_url, chain, size,
                                                    requests * (8 if size == small_bytes else 1), threads)
                    for chain in ("single_1", "single_3", "chain_1", "chain_3")
                    for size in ((small_bytes, payload_bytes) if chain.startswith("chain") else (small_bytes,))}
    small_extra = medians[(3, small_bytes)] - medians[(1, small_bytes)]
    large_extra = medians[(3, payload_bytes)] - medians[(1, payload_bytes)]
    step_s = max(0.0, small_extra / 2)
    byte_s = max(0.0, (large_extra - small_extra) / 2 / (payload_bytes - small_bytes))
    cost = ServingCost(step_s, byte_s, payload_bytes, {f"{s}x{b}": v for (s, b), v in medians.items()},
                       **_fit_cpu(runs, small_bytes, payload_bytes))
    logger.info("serving cost: latency %.3f ms per step, %.3f ms per MiB crossing between steps; CPU %.3f ms per step "
                "(%.3f ms in its stub; %.3f ms per execution, batches of %.1f shared it), %.3f ms per MiB, %.3f ms per "
                "request", step_s * 1e3, byte_s * (1 << 20) * 1e3, cost.step_cpu_s * 1e3, cost.step_stub_cpu_s * 1e3,
                cost.step_cpu_shared_s * 1e3, cost.batched_mean, cost.byte_cpu_s * (1 << 20) * 1e3,
                cost.request_cpu_s * 1e3)
    return cost


def measure_tokenizer_cost(model_dir: str, texts: list[str], requests: int = 2000, threads: int = 8) -> AdapterCost:
    """The shipped tokenizer model served alone (one single-core instance, as `tandem plan` renders it), its texts
    sent one per request from `threads` clients: Triton's compute time and the stub's CPU time per request."""
    import shutil

    import tritonclient.grpc as grpcclient

    from tandem_serve.paths import assets_root
    from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions

    with tempfile.TemporaryDirectory(prefix="tandem-adapter-") as tmp:
        target = Path(tmp) / "repository" / "tokenizer"
        shutil.copytree(assets_root() / "model_repository" / "tokenizer", target)
        config = read_config(target / "config.pbtxt")
        config.instance_group[0].count = 1
        config.parameters["parallel"].string_value = "false"
        config.parameters["model_dir"].string_value = model_dir
        write_config(config, target / "config.pbtxt")
        with EmbeddedTriton(TritonOptions(model_repositories=[target.parent])) as server:
            inputs = []
            for text in texts:
                tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
                inputs.append(tensor)
            cpu, window, sent, wall = _drive(server.grpc_url, server.process.pid, "tokenizer", "tokenizer", inputs,
                                             requests, threads, warm=50)
    cost = AdapterCost("tokenizer", busy_s=window.compute_ms / 1e3, stub_cpu_s=cpu.parts.get("stub:tokenizer", 0.0) / sent,
                       period_s=wall / max(1, window.executions))
    logger.info("tokenizer served alone: busy %.3f ms per request (%.3f ms apart, hand-off included) and its stub %.3f "
                "ms of CPU per request (%d requests, %d executions)", cost.busy_s * 1e3, cost.period_s * 1e3,
                cost.stub_cpu_s * 1e3, window.requests, window.executions)
    return cost
