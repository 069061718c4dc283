"""Per-stage queue and compute times from Triton's statistics API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class StageStats:
    """Cumulative statistics of one model since the server started."""

    model: str
    requests: int
    executions: int
    inferences: int
    queue_ms: float  # mean per request
    compute_ms: float  # mean per request: input + infer + output
    input_ms: float = 0.0  # of compute_ms: the backend gathering the batch's inputs (for the Python backend: into the
    infer_ms: float = 0.0  # stub's shared memory), the model's execute (the stub's round trip), the outputs
    output_ms: float = 0.0

    @property
    def mean_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0


def _mean_ms(section: dict[str, Any]) -> tuple[int, float]:
    count = int(section.get("count", 0))
    return count, (int(section.get("ns", 0)) / count / 1e6 if count else 0.0)


def parse_statistics(raw: dict[str, Any]) -> list[StageStats]:
    """Parse the JSON of /v2/models/stats (HTTP) or its gRPC counterpart as JSON."""
    stages = []
    for model in raw.get("model_stats", []):
        inference = model.get("inference_stats", {})
        _, queue = _mean_ms(inference.get("queue", {}))
        parts = [_mean_ms(inference.get(k, {}))[1] for k in ("compute_input", "compute_infer", "compute_output")]
        stages.append(StageStats(
            model=model["name"],
            requests=int(inference.get("success", {}).get("count", 0)),
            executions=int(model.get("execution_count", 0)),
            inferences=int(model.get("inference_count", 0)),
            queue_ms=queue,
            compute_ms=sum(parts),
            input_ms=parts[0],
            infer_ms=parts[1],
            output_ms=parts[2],
        ))
    return stages


def stats_delta(now: StageStats, before: StageStats | None) -> StageStats:
    """Statistics of the interval between two cumulative readings of one model."""
    if before is None:
        return now
    requests = now.requests - before.requests

    def mean(a: float, b: float) -> float:
        return (a * now.requests - b * before.requests) / requests if requests else 0.0

    return StageStats(now.model, requests, now.executions - before.executions, now.inferences - before.inferences,
                      mean(now.queue_ms, before.queue_ms), mean(now.compute_ms, before.compute_ms),
                      mean(now.input_ms, before.input_ms), mean(now.infer_ms, before.infer_ms),
                      mean(now.output_ms, before.output_ms))


def read_statistics(client: Any, protocol: str) -> list[StageStats]:
    """Statistics of every model from a tritonclient client."""
    raw = client.get_inference_statistics(as_json=True) if protocol == "grpc" else client.get_inference_statistics()
    return parse_statistics(raw)


def format_statistics(stages: Iterable[StageStats]) -> str:
    """A fixed-width table of the stages."""
    lines = [f"{'model':<22}{'requests':>9}{'batches':>9}{'mean batch':>11}{'queue ms':>10}{'compute ms':>12}"]
    for s in stages:
        lines.append(f"{s.model:<22}{s.requests:>9}{s.executions:>9}{s.mean_batch:>11.1f}{s.queue_ms:>10.2f}{s.compute_ms:>12.2f}")
    return "\n".join(lines)
