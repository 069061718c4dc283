"""A load level (`LoadSpec`) and what it measured (`LoadPoint`), with the percentile both use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from tandem_serve.errors import ConfigError
from tandem_serve.triton.statistics import StageStats

Send = Callable[[int], Awaitable[Any]]  # serves request i
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


def percentile_ms(ordered: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of sorted seconds, in ms; NaN when empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1e3
