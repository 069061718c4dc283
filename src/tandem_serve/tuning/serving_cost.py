"""What a Triton ensemble step costs beyond its stage's compute, measured on the embedded server.

A profile's stage timings are the stages' own work. Served by Triton, every stage is a Python-backend
model in an ensemble, and each step also costs the server scheduling it, a round trip to the model's
stub process, and the tensors it receives passing through shared memory. `measure_serving_cost`
chains 1 and 3 pass-through steps and times them one request at a time with a small and a large
payload: the differences give the cost of one more step and of each byte crossing between two
steps, free of the client's and the network's share. One request at a time is an upper bound for a
step whose requests are batched (the per-execution part is then shared).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
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
    """Per request: one more ensemble step, and each byte handed from one step to the next."""

    step_s: float
    byte_s: float
    payload_bytes: int
    latencies_s: dict[str, float]  # median round trip per (steps, payload) case, e.g. "3x1048576"

    def step_seconds(self, in_bytes: float) -> float:
        """One step that receives `in_bytes` from the previous one."""
        return self.step_s + self.byte_s * in_bytes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict | None) -> "ServingCost | None":
        return cls(**raw) if raw else None


def _tensor(name: str) -> mc.ModelInput:
    return mc.ModelInput(name=name, data_type=mc.TYPE_UINT8, dims=[-1])


def write_probe_repository(root: Path, lengths: tuple[int, ...] = (1, 3)) -> Path:
    """A model repository with the pass-through model and one ensemble `chain_N` per length."""
    from tandem_serve.tuning.render import write_config  # render imports the profile, which imports this

    model = mc.ModelConfig(name=STEP_MODEL, backend="python", max_batch_size=8,
                           input=[_tensor("DATA")], output=[mc.ModelOutput(name="DATA", data_type=mc.TYPE_UINT8, dims=[-1])],
                           instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)])
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


def measure_serving_cost(requests: int = 300, payload_bytes: int = 1 << 20, small_bytes: int = 16,
                         warm_up: int = 10) -> ServingCost:
    """Start the embedded Triton on a probe repository and derive the per-step and per-byte costs."""
    from tandem_serve.triton.launcher import EmbeddedTriton, TritonOptions

    with tempfile.TemporaryDirectory(prefix="tandem-probe-") as tmp:
        repository = write_probe_repository(Path(tmp) / "repository")
        with EmbeddedTriton(TritonOptions(model_repositories=[repository])) as server:
            cases = [(steps, size) for steps in (1, 3) for size in (small_bytes, payload_bytes)]
            logger.info("serving cost: %d requests per case over %s", requests, server.grpc_url)
            medians = _median_round_trips(server.grpc_url, cases, requests, warm_up)
    small_extra = medians[(3, small_bytes)] - medians[(1, small_bytes)]
    large_extra = medians[(3, payload_bytes)] - medians[(1, payload_bytes)]
    step_s = max(0.0, small_extra / 2)
    byte_s = max(0.0, (large_extra - small_extra) / 2 / (payload_bytes - small_bytes))
    cost = ServingCost(step_s, byte_s, payload_bytes, {f"{s}x{b}": v for (s, b), v in medians.items()})
    logger.info("serving cost: %.3f ms per step, %.3f ms per MiB crossing between steps",
                step_s * 1e3, byte_s * (1 << 20) * 1e3)
    return cost
