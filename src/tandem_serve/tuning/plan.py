"""`tandem plan`: choose device, precision, instances, batch sizes and queue delay per stage from a profile.

The model (documented in the README, section Placement):
- a CPU stage costs c = seconds(b) / b core-seconds per item (profiled on one thread); the CPU
  stages share the machine's cores, less one core per GPU instance (its Python stub);
- a GPU stage costs g = seconds(b) / b GPU-seconds per item plus the transfer of what crosses
  between host and device (the profile's pageable copy time for b items' bytes, in and out);
  the GPU stages share each GPU;
- a GPU instance is one Python stub running one batch at a time, busy (g + its step cost) per item: a GPU
  stage gets enough instances (each taking a core, at most MAX_GPU_INSTANCES) for the rate the other
  bounds allow, and instances / (g + step) bounds it;
- pipeline throughput T = min(CPU cores / sum c, GPUs / sum g, the instance bounds); a stage allowed on both devices
  may give a share f of its items to CPU instances when that raises T (Triton hands each batch to
  whichever instance is free, so the split follows the instances' speeds);
- every stage is also one Triton ensemble step: the profile's measured serving cost (the server's and the
  stub's CPU time for a step, its per-execution part shared by the step's batch, plus the bytes it receives
  from the previous step), and each request's own CPU time in the server (gRPC, the ensemble), are CPU
  time per item (one item per request), charged to the shared cores; the step's latency counts in the
  instances' busy time and in latency; without serving costs in the profile only the stages' compute counts;
- latency = sum over stages of (queue delay + seconds(b) + transfer + step cost); the p99 objective keeps
  plans whose latency, doubled for queueing, stays under the bound.
Every (placement, precision, batch size) combination is scored; the best wins.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from tandem_serve.tuning.profile import Profile, StageTiming
from tandem_serve.tuning.serving_cost import AdapterCost, ServingCost
from tandem_serve.tuning.torchserve_workers import (DESIGN_CONCURRENCY, TorchServeCost, TorchServeWorkers,
                                                   torchserve_workers)

PIPELINES = {  # pipeline -> placements: (ensemble, stages in order)
    "text": [("text_embedding", ("tokenize", "token_embedding", "encoder")),
             ("text_embedding_fused", ("tokenize", "encoder_fused"))],
    "detection": [("object_detection", ("image_preprocess", "detector", "nms"))],
}
# What the text clients send: BYTES texts (any number per request; the placements above), or one text per request as
# its UTF-8 bytes (`text_embedding_utf8`, which only such clients can call: the plan does not change the API by itself)
TEXT_INPUTS = {"bytes": PIPELINES["text"], "utf8": [("text_embedding_utf8", ("encoder_utf8",))]}
MODEL_OF_STAGE = {"tokenize": "tokenizer", "token_embedding": "token_embedding", "encoder": "encoder",
                  "encoder_fused": "encoder_fused", "encoder_utf8": "encoder_utf8",
                  "image_preprocess": "image_preprocess", "detector": "detector", "nms": "nms"}
# Stages made of two profiled ones: (host part, device part). encoder_utf8's instance tokenizes its batch on its own
# thread (rendered `parallel: false`), then runs encoder_fused: the device part's timings, with the host part's CPU
# time per item added to the instance's busy time (on the core the plan reserves for each GPU instance).
COMBINED_STAGES = {"encoder_utf8": ("tokenize", "encoder_fused")}
DEVICE_STAGES = ("encoder", "encoder_fused", "encoder_utf8", "detector")  # the network's stage in each pipeline
# Stages that may run on both devices at once (Triton instance groups of both kinds): image_preprocess decodes
# JPEGs with nvJPEG on a KIND_GPU instance and on the cores of its KIND_CPU instances.
SPLITTABLE = {"encoder", "encoder_fused", "detector", "image_preprocess"}
# Stages that read the clients' BYTES take one request per execution (their models have max_batch_size 0): Triton's
# Python backend fails a whole batch when one request's string data is malformed, so such a stage never batches
# clients together (preferred sizes only steer a dynamic batcher: see model_repository/tokenizer).
ONE_REQUEST_STAGES = {"tokenize"}
LATENCY_SLACK = 2.0  # p99 ~ this x the no-queue latency estimate
CPU_BATCH_SLACK = 1.05  # a CPU stage batches no more than it takes to get within 5 % of its best cost per item
MAX_GPU_INSTANCES = 4  # per GPU stage and GPU (`tandem tune` may add more)
# A GPU stage that also works on the host (encoder_utf8) is busy mostly on its core: it may have up to this share
# of the cores as instances
MAX_HOST_WORK_INSTANCE_SHARE = 0.5
# CPU stages get instances for this much more than their share of the cores serves: served under load the tokenizer's
# instances were busier per request than profiled alone (0.48 vs 0.40 ms, H200, 2026-12-04) and capped the pipeline
# at their count, while an idle instance's stub costs no CPU
CPU_INSTANCE_HEADROOM = 1.25
MAX_CPU_SHARE = 0.9  # a split stage keeps at least this much off its CPU instances (more is the CPU placement)
# A GPU stage waits at most this long for a fuller batch when an instance is free. Under load the queue fills
# while every instance is busy, so batches grow without it; an idle pipeline only pays it in latency.
MAX_QUEUE_DELAY_US = 1000
NEAR_BEST = 0.98  # plans this close to the best throughput count as equal; the lower latency wins
# An encoder's token budget is the smallest profiled batch (rows x length) whose token rate is within this share of
# the best profiled rate: beyond it the device gains little from longer calls, so rows of very different lengths run
# apart (text/token_budget.py, whose cost per extra call assumes this share)
TOKEN_RATE_SHARE = 0.9
TOKEN_BUDGET_STAGES = {"encoder", "encoder_fused", "encoder_utf8"}


@dataclass(frozen=True)
class Objective:
    """Maximum throughput, or maximum throughput with p99 latency under `p99_ms`."""

    p99_ms: float | None = None
    min_accuracy: float = 0.99  # precisions whose accuracy vs fp32 falls below this are not considered

    def describe(self) -> str:
        return f"max throughput with p99 <= {self.p99_ms:g} ms" if self.p99_ms else "max throughput"


@dataclass(frozen=True)
class StagePlan:
    """Where and how one stage runs."""

    stage: str
    device: str  # cpu | cuda:N
    precision: str
    batch: int
    instances: int
    queue_delay_us: int
    cpu_share: float = 0.0  # of the items, for a stage split between a GPU and CPU instances
    cpu_instances: int = 0
    cost_per_item_ms: float = 0.0  # core-ms (CPU) or GPU-ms incl. transfers
    transfer_per_item_ms: float = 0.0
    serving_per_item_ms: float = 0.0  # the ensemble step around the stage (latency, any device)
    serving_cpu_per_item_ms: float = 0.0  # the same step's CPU time in the server and the stub, per item
    busy_per_item_ms: float = 0.0  # an instance's time per item where measured served (0: compute + step latency)
    latency_ms: float = 0.0
    input_copy_ms: float = 0.0  # per item, the H2D copy of its input (charged only when it comes from the host)
    host_input_step_ms: float = 0.0  # per item, the step's CPU cost of receiving its input through host memory
    max_batch_tokens: int = 0  # an encoder's token budget per call (0: none; see token_budget)
    host_cpu_per_item_ms: float = 0.0  # per item, CPU work the stage's own instance does beside its device compute

    @property
    def model(self) -> str:
        return MODEL_OF_STAGE[self.stage]

    @property
    def preferred_batches(self) -> list[int]:
        """Triton's preferred batch sizes. A stage of batch 1 gets none: a one-request stage never batches, any other
        is handed whatever is queued (up to max_batch_size) at once: its cost per item does not grow with the batch,
        and one execution amortises the stub's round trip."""
        if self.batch > 1 and self.stage not in ONE_REQUEST_STAGES:
            return sorted({max(1, self.batch // 2), self.batch})
        return []


@dataclass(frozen=True)
class PipelinePlan:
    """One scored plan of a pipeline."""

    pipeline: str
    ensemble: str
    size: int
    stages: tuple[StagePlan, ...]
    throughput: float  # items/s (model estimate)
    latency_ms: float
    cpu_bound: float
    gpu_bound: float
    instance_bound: float = math.inf  # what the GPU stages' instances (one batch at a time each) can serve
    gpus: int = 1  # GPUs of one host the GPU stages spread over (instances per GPU = ceil(instances / gpus))

    @property
    def device_stage(self) -> StagePlan:
        """The stage running the network (the encoder or the detector; the last stage where none is)."""
        return next((s for s in self.stages if s.stage in DEVICE_STAGES), self.stages[-1])

    @property
    def bottleneck(self) -> str:
        bounds = {"CPU": self.cpu_bound, "GPU": self.gpu_bound, "GPU-instance": self.instance_bound}
        return min(bounds, key=bounds.get)

    def placement(self) -> str:
        parts = []
        for s in self.stages:
            where = s.device if not s.cpu_share else f"{s.device}+cpu({s.cpu_share:.0%})"
            parts.append(f"{s.stage}@{where}" + (f"/{s.precision}" if s.precision != "-" else ""))
        return " -> ".join(parts)


@dataclass
class PlanReport:
    """The chosen plan per pipeline, the alternatives it beat, and the precisions left out for accuracy."""

    objective: Objective
    chosen: dict[str, PipelinePlan] = field(default_factory=dict)
    alternatives: dict[str, list[PipelinePlan]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    serving: ServingCost | None = None  # the profile's per-step costs the scores include
    cpus: int = 1  # the cores planned for
    torchserve: dict[str, TorchServeWorkers] = field(default_factory=dict)  # per pipeline, behind a real TorchServe


class TimingTable:
    """Profile lookups: the stage timings at one input size, and host<->device copy times."""

    def __init__(self, profile: Profile):
        self.profile = profile

    def sizes(self, pipeline: str) -> list[int]:
        return sorted({t.size for t in self.profile.stages if t.pipeline == pipeline})

    def options(self, stage: str, size: int, min_accuracy: float) -> dict[tuple[str, str], list[StageTiming]]:
        """(device, precision) -> timings by batch, each batch at the profiled size nearest `size` (texts of the same
        words pad to longer lengths in bigger batches: one size for all would drop the other batch sizes). A combined
        stage has its device part's, where its host part was profiled too."""
        if stage in COMBINED_STAGES:
            host, device = COMBINED_STAGES[stage]
            return self.options(device, size, min_accuracy) if self.options(host, size, min_accuracy) else {}
        nearest: dict[tuple[str, str, int], StageTiming] = {}
        for t in self.profile.stages:
            # int8 is profiled for its accuracy and speed, but no stage config offers it yet
            if t.stage != stage or t.precision == "int8" or (t.accuracy is not None and t.accuracy < min_accuracy):
                continue
            key = (t.device, t.precision, t.batch)
            if key not in nearest or abs(t.size - size) < abs(nearest[key].size - size):
                nearest[key] = t
        found: dict[tuple[str, str], list[StageTiming]] = {}
        for (device, precision, _), t in nearest.items():
            found.setdefault((device, precision), []).append(t)
        return {k: sorted(v, key=lambda t: t.batch) for k, v in found.items()}

    def copy_seconds(self, nbytes: float) -> float:
        """One host<->device copy of `nbytes` from pageable memory (what the Python backend's inputs are in),
        interpolated linearly between profiled sizes; 0 without transfer timings."""
        rows = sorted(self.profile.transfers, key=lambda t: t.bytes)
        if not rows or nbytes <= 0:
            return 0.0
        if nbytes <= rows[0].bytes:
            return rows[0].pageable_s
        for low, high in zip(rows, rows[1:]):
            if nbytes <= high.bytes:
                w = (nbytes - low.bytes) / (high.bytes - low.bytes)
                return low.pageable_s + w * (high.pageable_s - low.pageable_s)
        last = rows[-1]
        return last.pageable_s * nbytes / last.bytes

    def step_seconds(self, in_bytes: float) -> float:
        """One ensemble step per request that receives `in_bytes`; 0 where the profile has no serving costs."""
        serving = self.profile.serving
        return serving.step_seconds(in_bytes) if serving else 0.0

    def step_cpu_seconds(self, in_bytes: float, batch: int) -> float:
        """The server's and stub's CPU seconds per request of a step receiving `in_bytes` in batches of `batch`."""
        serving = self.profile.serving
        return serving.step_cpu_seconds(in_bytes, batch) if serving else 0.0

    def host_seconds(self, stage: str, size: int, batch: int) -> float:
        """A combined stage's host part, CPU seconds per item at `batch` items (the profiled batch nearest it, at the
        size nearest `size`); 0 for other stages."""
        if stage not in COMBINED_STAGES:
            return 0.0
        rows = [t for t in self.profile.stages if t.stage == COMBINED_STAGES[stage][0] and t.device == "cpu"]
        if not rows:
            return 0.0
        nearest = min(rows, key=lambda t: (abs(t.size - size), abs(t.batch - batch)))
        return nearest.seconds / nearest.batch

    def token_budget(self, stage: str, device: str, precision: str) -> int:
        """An encoder's tokens per call (rows x length) from its profiled (batch, length) timings: the fewest at which
        it runs within TOKEN_RATE_SHARE of its best token rate; 0 (no budget) when that is the largest profiled
        batch (the rate still climbing: nothing says where to cut) or fewer than two batches were profiled."""
        stage = COMBINED_STAGES.get(stage, ("", stage))[1]  # a combined stage's encoder is its device part
        rows = [t for t in self.profile.stages if t.stage == stage and t.device == device and t.precision == precision]
        if len({t.batch * t.size for t in rows}) < 2:
            return 0
        rate = {}
        for t in rows:
            tokens = t.batch * t.size
            rate[tokens] = max(rate.get(tokens, 0.0), tokens / t.seconds)
        best = max(rate.values())
        knee = min(tokens for tokens, r in rate.items() if r >= TOKEN_RATE_SHARE * best)
        return 0 if knee == max(rate) else knee

    def adapter(self, stage: str) -> "AdapterCost | None":
        """The stage's real adapter as measured served alone, if the profile has it."""
        serving = self.profile.serving
        return serving.adapters.get(stage) if serving else None

    def server_step_cpu_seconds(self, in_bytes: float) -> float:
        """tritonserver's own CPU seconds per request of a one-request step (the step's CPU less its stub's part)."""
        serving = self.profile.serving
        if not serving:
            return 0.0
        return serving.step_cpu_s - serving.step_stub_cpu_s + serving.byte_cpu_s * in_bytes

    def request_cpu_seconds(self) -> float:
        """A request's CPU seconds in the server besides its steps (0 where not measured)."""
        serving = self.profile.serving
        return serving.request_cpu_s if serving else 0.0


def _cpu_batch(rows: list[StageTiming]) -> list[StageTiming]:
    """A CPU stage's batch: the smallest within 5 % of its best cost per item (larger only adds latency)."""
    best = min(t.seconds / t.batch for t in rows)
    return [next(t for t in sorted(rows, key=lambda t: t.batch) if t.seconds / t.batch <= CPU_BATCH_SLACK * best)]


def _batch_choices(stage: str, device: str, rows: list[StageTiming]) -> list[StageTiming]:
    """The batch sizes the plan may give a stage: one request for ONE_REQUEST_STAGES, one batch for a CPU stage."""
    if stage in ONE_REQUEST_STAGES:  # one request per execution: the per-item cost of its smallest profiled batch
        smallest = min(rows, key=lambda t: t.batch)
        return [replace(smallest, batch=1, seconds=smallest.seconds / smallest.batch)]
    return _cpu_batch(rows) if device == "cpu" else rows


def _stage_plan(stage: str, timing: StageTiming, previous_on_gpu: bool, table: TimingTable,
                next_on_gpu: bool = False) -> StagePlan:
    """Cost per item of one stage at one batch size, transfers included for a GPU stage: its input unless the
    previous stage left it on the GPU, its output unless the next stage reads it there (CUDA IPC)."""
    on_gpu = timing.device.startswith("cuda")
    transfer = 0.0
    if on_gpu:
        if not previous_on_gpu:
            transfer += table.copy_seconds(timing.in_bytes * timing.batch)
        if not next_on_gpu:
            transfer += table.copy_seconds(timing.out_bytes * timing.batch)
    seconds = timing.seconds + transfer
    # an input the previous GPU stage left on the GPU crosses by CUDA IPC: no bytes through host memory
    received = 0 if on_gpu and previous_on_gpu else timing.in_bytes
    step = table.step_seconds(received)
    step_cpu = table.step_cpu_seconds(received, timing.batch)
    host_input_step = table.step_cpu_seconds(timing.in_bytes, timing.batch) - table.step_cpu_seconds(0, timing.batch)
    input_copy = table.copy_seconds(timing.in_bytes * timing.batch) / timing.batch
    adapter = table.adapter(stage) if stage in ONE_REQUEST_STAGES else None
    if adapter is not None:  # measured served: its stub's CPU (compute and its side of the step), the server's side
        return StagePlan(stage, timing.device, timing.precision, 1, 1, 0, cost_per_item_ms=adapter.stub_cpu_s * 1e3,
                         serving_per_item_ms=step * 1e3,
                         serving_cpu_per_item_ms=table.server_step_cpu_seconds(received) * 1e3,
                         busy_per_item_ms=adapter.instance_s * 1e3, latency_ms=adapter.busy_s * 1e3 + step * 1e3,
                         input_copy_ms=input_copy * 1e3, host_input_step_ms=host_input_step * 1e3)
    if stage in ONE_REQUEST_STAGES:
        delay = 0
    else:
        delay = int(min(MAX_QUEUE_DELAY_US, 0.5 * timing.seconds * 1e6)) if on_gpu and timing.batch > 1 else 100
    host = table.host_seconds(stage, timing.size, timing.batch)  # a combined stage's host part, before its compute
    return StagePlan(stage, timing.device, timing.precision, timing.batch, 1, delay,
                     cost_per_item_ms=seconds / timing.batch * 1e3, transfer_per_item_ms=transfer / timing.batch * 1e3,
                     serving_per_item_ms=step * 1e3, serving_cpu_per_item_ms=step_cpu * 1e3,
                     latency_ms=(seconds + host * timing.batch + step) * 1e3 + delay / 1e3,
                     input_copy_ms=input_copy * 1e3, host_input_step_ms=host_input_step * 1e3,
                     host_cpu_per_item_ms=host * 1e3)


def _instance_seconds(stage: StagePlan) -> float:
    """Seconds an instance of the stage is busy per item: as measured served, else its compute and copies plus its
    ensemble step, and any host work of its own."""
    return (stage.busy_per_item_ms or stage.cost_per_item_ms + stage.serving_per_item_ms + stage.host_cpu_per_item_ms) / 1e3


def _max_instances(stage: StagePlan, cpus: int, gpus: int) -> int:
    """The most instances the plan gives a GPU stage: MAX_GPU_INSTANCES per GPU, more for one whose instances work on
    the host (they are busy on their cores, not on the GPU)."""
    if stage.host_cpu_per_item_ms:
        return max(MAX_GPU_INSTANCES * gpus, int(MAX_HOST_WORK_INSTANCE_SHARE * cpus))
    return MAX_GPU_INSTANCES * gpus


def score(pipeline: str, ensemble: str, size: int, stages: list[StagePlan], cpus: int, gpus: int,
          split_options: dict[int, StagePlan], request_cpu_s: float = 0.0) -> PipelinePlan:
    """Throughput bounds, instance counts and an optional CPU share for a splittable GPU stage."""
    gpu_stages = [s for s in stages if s.device.startswith("cuda")]
    busiest = max(gpu_stages, key=lambda g: g.cost_per_item_ms).stage if gpu_stages else None
    counts = {s.stage: 2 if s.stage == busiest else 1 for s in gpu_stages}  # two overlap the busiest's Python work
    # every step's stub and server work, and each request's own, on the cores; a GPU stage's own host work
    # (host_cpu_per_item_ms) runs on its instances' cores, reserved below, and counts in their busy time
    serving = sum(s.serving_cpu_per_item_ms for s in stages) / 1e3 + request_cpu_s
    sum_c = sum(s.cost_per_item_ms + s.host_cpu_per_item_ms for s in stages if s.device == "cpu") / 1e3 + serving
    sum_g = sum(s.cost_per_item_ms for s in gpu_stages) / 1e3
    gpu_bound = gpus / sum_g if sum_g else math.inf
    for _ in range(2):  # a GPU instance is one stub process doing one batch at a time: enough of them, a core each
        cores = max(1, cpus - sum(counts.values()))
        cpu_bound = cores / sum_c if sum_c else math.inf
        wanted = min(cpu_bound, gpu_bound)
        counts = {g.stage: max(counts[g.stage], min(_max_instances(g, cpus, gpus), math.ceil(wanted * _instance_seconds(g))))
                  for g in gpu_stages}
    cores = max(1, cpus - sum(counts.values()))
    cpu_bound = cores / sum_c if sum_c else math.inf
    planned = list(stages)
    for index, cpu_variant in split_options.items():
        g_e, c_e = planned[index].cost_per_item_ms / 1e3, cpu_variant.cost_per_item_ms / 1e3
        share = (cores * sum_g / gpus - sum_c) / (cores * g_e / gpus + c_e)  # equalises both bounds
        if share > 0.05 and gpu_bound < cpu_bound:
            share = min(share, MAX_CPU_SHARE)
            # the CPU share's output reaches a next GPU stage from the host: that stage pays its copy for them,
            # and its step receives those bytes through host memory (CPU time)
            after_on_gpu = index + 1 < len(planned) and planned[index + 1].device.startswith("cuda")
            handoff = planned[index + 1].input_copy_ms / 1e3 if after_on_gpu else 0.0
            handoff_step = planned[index + 1].host_input_step_ms / 1e3 if after_on_gpu else 0.0
            sum_c, sum_g = sum_c + share * (c_e + handoff_step), sum_g - share * (g_e - handoff)
            cpu_bound, gpu_bound = cores / sum_c, (gpus / sum_g if sum_g > 0 else math.inf)
            planned[index] = replace(planned[index], cpu_share=round(share, 3))
    instance_bound = min((counts[g.stage] / (_instance_seconds(g) * (1 - g.cpu_share)) for g in planned
                          if g.device.startswith("cuda") and g.cpu_share < 1), default=math.inf)
    throughput = min(cpu_bound, gpu_bound, instance_bound)
    final = []
    for index, s in enumerate(planned):
        if s.device == "cpu":
            instances = max(1, math.ceil(CPU_INSTANCE_HEADROOM * cores * _instance_seconds(s) / sum_c)) if sum_c else 1
            final.append(replace(s, instances=min(instances, cores)))
        else:
            extra = {}
            if s.cpu_share:
                cpu_variant = split_options[index]
                extra = {"cpu_instances": max(1, math.ceil(s.cpu_share * throughput * cpu_variant.cost_per_item_ms / 1e3)),
                         "latency_ms": max(s.latency_ms, cpu_variant.latency_ms)}  # items on the CPU take longer
            final.append(replace(s, instances=counts[s.stage], **extra))
    latency = sum(s.latency_ms for s in final)
    return PipelinePlan(pipeline, ensemble, size, tuple(final), throughput, latency, cpu_bound, gpu_bound, instance_bound,
                        gpus)


def plan_pipeline(table: TimingTable, pipeline: str, objective: Objective, size: int | None = None,
                  gpus: int | None = None, cpus: int | None = None, text_input: str = "bytes") -> list[PipelinePlan]:
    """Every scored combination for one pipeline, best first (the objective's feasible plans lead). `gpus`: plan for
    that many GPUs of the profiled kind in one host (default the profiled machine's); `cpus`: for that many cores
    (default the profiled machine's); `text_input`: what text clients send (TEXT_INPUTS)."""
    cpus = cpus or int(table.profile.machine.get("cpus", 1))
    request_cpu = table.request_cpu_seconds()
    gpus = gpus or max(1, len(table.profile.machine.get("gpus", [])))
    sizes = table.sizes(pipeline)
    if not sizes:
        return []
    size = size or max(sizes)
    plans = []
    for ensemble, stage_names in (TEXT_INPUTS[text_input] if pipeline == "text" else PIPELINES[pipeline]):
        options = [table.options(stage, size, objective.min_accuracy) for stage in stage_names]
        if any(not o for o in options):
            continue
        choices = [[(key, t) for key, rows in o.items() for t in _batch_choices(stage, key[0], rows)]
                   for stage, o in zip(stage_names, options)]
        for combo in itertools.product(*choices):
            stages, split, previous_on_gpu = [], {}, False
            on_gpu = [key[0].startswith("cuda") for key, _ in combo] + [False]
            for index, (stage, ((device, precision), timing)) in enumerate(zip(stage_names, combo)):
                planned = _stage_plan(stage, timing, previous_on_gpu, table, on_gpu[index + 1])
                if stage in TOKEN_BUDGET_STAGES:
                    planned = replace(planned, max_batch_tokens=table.token_budget(stage, device, precision))
                stages.append(planned)
                if stage in SPLITTABLE and device.startswith("cuda"):
                    cpu_rows = [t for (d, p), rows in options[index].items() if d == "cpu" for t in rows]
                    if cpu_rows:
                        best = min(cpu_rows, key=lambda t: t.seconds / t.batch)
                        split[index] = _stage_plan(stage, best, False, table)
                previous_on_gpu = device.startswith("cuda")
            plans.append(score(pipeline, ensemble, size, stages, cpus, gpus, {}, request_cpu))
            if split:  # the same placement with CPU instances helping the GPU stage: a plan of its own
                helped = score(pipeline, ensemble, size, stages, cpus, gpus, split, request_cpu)
                if any(s.cpu_share for s in helped.stages):
                    plans.append(helped)

    best = max((p.throughput for p in plans if feasible(p, objective)), default=0.0)

    def rank(p: PipelinePlan) -> tuple:
        if not feasible(p, objective):
            return (2, p.latency_ms, -p.throughput)  # nothing meets the bound: the closest first
        if p.throughput >= NEAR_BEST * best:
            return (0, p.latency_ms, -p.throughput)  # within 2 % of the best: the lowest latency wins
        return (1, -p.throughput, p.latency_ms)

    return sorted(plans, key=rank)


def handler_stage_costs(table: TimingTable, plan: PipelinePlan, objective: Objective) -> dict[str, float]:
    """ms per item of the plan's one-request CPU stages as the TorchServe handler runs them: the profiled compute on
    batches up to the GPU stage's (the handler tokenizes a micro-batch at once), without Triton's stub per request."""
    device_batch = max(s.batch for s in plan.stages)
    out = {}
    for stage in plan.stages:
        if stage.stage in ONE_REQUEST_STAGES and stage.device == "cpu":
            rows = [t for t in table.options(stage.stage, plan.size, objective.min_accuracy).get(("cpu", stage.precision), [])
                    if t.batch <= device_batch]
            if rows:
                out[stage.stage] = rows[-1].seconds / rows[-1].batch * 1e3
        if stage.stage in COMBINED_STAGES:  # its host part (encoder_utf8 tokenizing) runs in the handler too
            out[COMBINED_STAGES[stage.stage][0]] = stage.host_cpu_per_item_ms
    return out


def make_plan(profile: Profile, objective: Objective, sizes: dict[str, int] | None = None,
              gpus: int | None = None, cpus: int | None = None,
              torchserve_cost: TorchServeCost | None = None,
              torchserve_concurrency: int = DESIGN_CONCURRENCY, text_input: str = "bytes") -> PlanReport:
    """The best plan for each pipeline in the profile (for `gpus` GPUs like the profiled one and `cpus` cores,
    when given; text for clients sending `text_input`), and the TorchServe workers each needs (at `torchserve_cost`
    per request, default the measured) with their batches for `torchserve_concurrency` requests in flight."""
    if text_input not in TEXT_INPUTS:
        raise ValueError(f"text_input must be one of {sorted(TEXT_INPUTS)}, got {text_input!r}")
    table = TimingTable(profile)
    cpus = cpus or int(profile.machine.get("cpus", 1))
    report = PlanReport(objective, serving=profile.serving, cpus=cpus)
    seen = {(t.stage, t.device, t.precision): t.accuracy for t in profile.stages if t.accuracy is not None}
    for (stage, device, precision), accuracy in sorted(seen.items()):
        if precision == "int8" or accuracy < objective.min_accuracy:
            why = "below the accuracy floor" if accuracy < objective.min_accuracy else "no stage config offers int8"
            report.rejected.append(f"{stage} {device} {precision}: accuracy {accuracy:.4f} vs fp32 ({why})")
    for pipeline in PIPELINES:
        ranked = plan_pipeline(table, pipeline, objective, (sizes or {}).get(pipeline), gpus, cpus, text_input)
        if ranked:
            report.chosen[pipeline] = ranked[0]
            report.alternatives[pipeline] = ranked
            report.torchserve[pipeline] = torchserve_workers(ranked[0], cpus, torchserve_cost, torchserve_concurrency,
                                                             handler_stage_costs(table, ranked[0], objective))
    return report


def feasible(plan: PipelinePlan, objective: Objective) -> bool:
    return objective.p99_ms is None or plan.latency_ms * LATENCY_SLACK <= objective.p99_ms
