"""How many TorchServe workers a plan needs and the batches they take: a worker is one process serving its batches in
turn, so its main thread's per-request work, the frontend's and the plan's CPU stages share the cores while the GPU
bound caps the rest; TorchServe hands a free worker every queued request up to batchSize, so a batch larger than the
load in flight per worker leaves the other workers idle."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tandem_serve.tuning.plan import PipelinePlan

# TorchServe starts workers for a model only up to maxWorkers; it never answers requests that arrive while a model's
# only worker restarts (0.12): keep a second one.
MIN_WORKERS = 2
MAX_WORKERS_PER_GPU = 16  # each holds a CUDA context and the model; more were never measured
# the requests in flight the batches are sized for: the suite's highest closed-loop load
DESIGN_CONCURRENCY = 256


@dataclass(frozen=True)
class TorchServeCost:
    """Per-request CPU of the handler behind a real TorchServe, beside the plan's stage costs. Defaults measured on an
    H200 host on 2026-12-04 (bench/results/h200-2026-12-04-torchserve-text-orjson.md: text, orjson replies, async
    logging): a worker's processes 0.44-0.54 ms per request with the tokenizer, Java 0.16-0.34 ms."""

    request_ms: float = 0.40  # a worker's main thread: frames in, request parsing, the reply out
    frontend_ms: float = 0.25  # TorchServe's Java frontend: HTTP, batching, the worker socket
    main_thread_busy: float = 0.8  # the share of a worker's main thread it can be kept busy (it also waits on replies)

    def validate(self) -> None:
        if self.request_ms <= 0 or self.frontend_ms < 0 or not 0 < self.main_thread_busy <= 1:
            raise ValueError(f"TorchServe costs must be positive (request {self.request_ms} ms, frontend "
                             f"{self.frontend_ms} ms, main thread busy {self.main_thread_busy})")


@dataclass(frozen=True)
class TorchServeWorkers:
    """The workers a plan needs behind TorchServe and what they should serve."""

    workers: int
    throughput: float  # requests/s (one item each): the smallest bound
    cpu_bound: float
    gpu_bound: float
    worker_bound: float  # what `workers` main threads serve
    cpu_ms_per_request: float  # on the cores: a worker's request work, the frontend's and the CPU stages'
    cost: TorchServeCost
    batch_size: int = 0  # TorchServe's batchSize: the requests in flight per worker at `concurrency`
    micro_batch_size: int = 0  # the handler's GPU batches: the plan's, or half a TorchServe batch where that is larger
    concurrency: int = DESIGN_CONCURRENCY

    def explain(self) -> str:
        bounds = {"CPU": self.cpu_bound, "GPU": self.gpu_bound, "worker": self.worker_bound}
        return (f"TorchServe: {self.workers} workers, ~{self.throughput:.0f} items/s, {min(bounds, key=bounds.get)}-bound "
                f"(CPU bound {self.cpu_bound:.0f}/s at {self.cpu_ms_per_request:.3f} ms of CPU per request: a worker's "
                f"{self.cost.request_ms:g} ms + the frontend's {self.cost.frontend_ms:g} ms + the CPU stages batched in "
                f"the handler; GPU bound {self.gpu_bound:.0f}/s; each worker's main thread "
                f"{1e3 * self.cost.main_thread_busy / self.cost.request_ms:.0f}/s); batchSize {self.batch_size} "
                f"({self.concurrency} requests in flight over {self.workers} workers), micro-batches of "
                f"{self.micro_batch_size}")


def torchserve_batches(plan: "PipelinePlan", workers: int, concurrency: int) -> tuple[int, int]:
    """TorchServe's batchSize and the handler's micro-batch: a batch of the requests in flight per worker (a power of
    two), so that every worker gets one, and micro-batches of the plan's GPU batch or half a batch, the larger (two
    in turn keep the tokenizer and the GPU overlapped; each worker's CUDA context shares the GPU by time slices, so
    fewer, larger launches serve more)."""
    if concurrency < 1:
        raise ValueError(f"TorchServe's design concurrency must be >= 1, got {concurrency}")
    batch = 1 << max(0, (concurrency // workers).bit_length() - 1)
    return batch, max(1, min(batch, max(plan.device_stage.batch, batch // 2)))


def torchserve_workers(plan: "PipelinePlan", cpus: int, cost: TorchServeCost | None = None,
                       concurrency: int = DESIGN_CONCURRENCY,
                       handler_stage_ms: dict[str, float] | None = None) -> TorchServeWorkers:
    """Enough workers for the lower of the CPU bound (every request's CPU on `cpus` cores) and the plan's GPU bound,
    at least MIN_WORKERS and at most a core each (MAX_WORKERS_PER_GPU per GPU), and their batches for `concurrency`
    requests in flight. `handler_stage_ms` replaces a CPU stage's cost per item where the handler runs it otherwise
    than Triton (the tokenizer on a whole micro-batch, not a stub per request)."""
    cost = cost or TorchServeCost()
    cost.validate()
    handler_stage_ms = handler_stage_ms or {}
    stages_ms = sum(handler_stage_ms.get(s.stage, s.cost_per_item_ms) for s in plan.stages if s.device == "cpu")
    if plan.throughput > 0:  # a GPU stage's CPU share: the handler's CPU lane, the cores its instances take per item
        stages_ms += sum(1e3 * s.cpu_instances / plan.throughput for s in plan.stages if s.cpu_share)
    per_request_ms = cost.request_ms + cost.frontend_ms + stages_ms
    cpu_bound = cpus * 1e3 / per_request_ms
    rate = min(cpu_bound, plan.gpu_bound)
    per_worker = 1e3 * cost.main_thread_busy / cost.request_ms
    ceiling = max(MIN_WORKERS, min(cpus, MAX_WORKERS_PER_GPU * plan.gpus))
    workers = max(MIN_WORKERS, min(ceiling, math.ceil(rate / per_worker)))
    worker_bound = workers * per_worker
    batch, micro = torchserve_batches(plan, workers, concurrency)
    return TorchServeWorkers(workers, min(cpu_bound, plan.gpu_bound, worker_bound), cpu_bound, plan.gpu_bound,
                             worker_bound, per_request_ms, cost, batch, micro, concurrency)
