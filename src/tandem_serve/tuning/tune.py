"""`tandem tune`: closed-loop tuning of one ensemble's stages against a running Triton.

The search (coordinate ascent on the bottleneck, not a grid):
1. measure the current configuration: closed-loop load at each concurrency level (the project's
   load generator, `tandem_serve.loadgen`; one text of the length mix or one JPEG per request, two
   untimed requests per sender first), throughput and p50/p99, and per-stage statistics;
2. the bottleneck is the composing model with the highest utilisation (compute time per second
   of wall time, per instance);
3. try, in order, one more instance of it (with instances of both kinds: one more of each kind, then one
   moved from one kind to the other), then twice its queue delay with a larger preferred batch; a
   change is applied through the model-control API (load with a config override) and kept if the
   objective improves by at least 3 %, else the previous config is reloaded;
4. repeat from 2 for `rounds`, stopping early when no change helps.
The objective is the highest throughput over the levels (or over the levels whose p99 meets the
bound). Prints the trials, writes the best configs, plots the curves before and after.
"""

from __future__ import annotations

import json
import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from tandem_serve.errors import ConfigError
from tandem_serve.loadgen import LoadPoint, LoadSpec, TritonSender, measure
from tandem_serve.triton.keys import ADMIN_HEADER, header_for
from tandem_serve.triton.model_config import config_json, write_config
from tandem_serve.triton.statistics import StageStats, read_statistics, stats_delta
from tandem_serve.workloads import OUTPUTS, ensemble_requests, pipeline_of

logger = logging.getLogger(__name__)
IMPROVEMENT = 1.03
WARM_UP = 2  # untimed requests per sender before each level


@dataclass(frozen=True)
class TuneOptions:
    """What to drive and how long."""

    url: str  # Triton gRPC address
    ensemble: str = "text_embedding"
    concurrencies: tuple[int, ...] = (1, 4, 16)
    seconds: float = 5.0  # per concurrency level
    rounds: int = 4
    p99_ms: float | None = None
    admin_key: str = ""  # the model-repository API's key (`tandem serve triton` prints where it is)
    timeout_s: float = 120.0
    client_processes: int = 1  # load processes (one Python process sends a few thousand requests/s at most)
    protocol: str = "grpc"  # the load's protocol; configs are always read and loaded over gRPC (`url`)
    http_url: str = ""  # Triton HTTP address, for protocol "http"
    shm: str = "none"  # none | system | cuda: the load's tensors through shared-memory regions
    shm_key: str | None = None  # the shared-memory API's key (None: the default keys file's)
    server_pid: int | None = None  # tritonserver's pid on this host: each point then carries the server's CPU time


@dataclass
class Trial:
    """One configuration measured."""

    change: str
    points: list[LoadPoint]
    stages: list[StageStats]
    value: float
    wall_s: float = 0.0
    kept: bool = False
    configs: dict[str, str] = field(default_factory=dict)  # model -> config JSON


class Tuner:
    """Measures, changes and reloads the composing models of one ensemble."""

    def __init__(self, options: TuneOptions):
        self.options = options
        self.client = grpcclient.InferenceServerClient(options.url)
        self.headers = header_for("grpc", ADMIN_HEADER, options.admin_key) if options.admin_key else None
        ensemble = self.config(options.ensemble)
        self.models = [step.model_name for step in ensemble.ensemble_scheduling.step]
        requests = ensemble_requests(options.ensemble, 64, seed=3)
        if options.protocol == "http" and not options.http_url:
            raise ConfigError("protocol 'http' needs the server's HTTP address (http_url)")
        load_url = options.http_url if options.protocol == "http" else options.url
        self.make = functools.partial(TritonSender, load_url, options.protocol, options.ensemble, requests,
                                      OUTPUTS[pipeline_of(options.ensemble)], shm=options.shm,
                                      timeout_s=30.0, shm_key=options.shm_key)  # picklable: processes

    def config(self, model: str) -> mc.ModelConfig:
        raw = self.client.get_model_config(model, as_json=True)["config"]
        return json_format.ParseDict(raw, mc.ModelConfig(), ignore_unknown_fields=True)

    def load(self, model: str, config: mc.ModelConfig) -> None:
        """Reload `model` with `config` and wait until the ensemble is ready again."""
        self.client.load_model(model, config=config_json(config), headers=self.headers,
                               client_timeout=self.options.timeout_s)
        deadline = time.monotonic() + self.options.timeout_s
        while not (self.client.is_model_ready(model) and self.client.is_model_ready(self.options.ensemble)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{model} did not become ready after reloading")
            time.sleep(0.2)

    def value(self, points: list[LoadPoint]) -> float:
        bound = self.options.p99_ms
        eligible = [p.throughput for p in points if not p.errors and (bound is None or p.p99_ms <= bound)]
        return max(eligible, default=0.0)

    def measure(self, change: str) -> Trial:
        before = {s.model: s for s in read_statistics(self.client, "grpc")}
        began = time.perf_counter()
        points = measure(self.make, [LoadSpec("closed", c, seconds=self.options.seconds, warm_up=WARM_UP)
                                     for c in self.options.concurrencies],
                         stats=(self.client, "grpc"), processes=self.options.client_processes,
                         server_pid=self.options.server_pid)
        wall = time.perf_counter() - began
        after = read_statistics(self.client, "grpc")
        stages = [stats_delta(s, before.get(s.model)) for s in after if s.model in self.models]
        trial = Trial(change, points, stages, self.value(points), wall,
                      configs={m: config_json(self.config(m)) for m in self.models})
        logger.info("%s: %.1f/s (%s)", change, trial.value,
                    ", ".join(f"c{p.concurrency} {p.throughput:.1f}/s p99 {p.p99_ms:.0f} ms" for p in points))
        return trial

    def bottleneck(self, trial: Trial) -> str:
        """The composing model busiest per instance during the trial."""
        def busy(s: StageStats) -> float:  # compute_ms per request ~ its batch's time: busy = executions x that
            instances = sum(g.count for g in self.config(s.model).instance_group) or 1
            return s.executions * s.compute_ms / 1e3 / trial.wall_s / instances
        return max(trial.stages, key=busy).model

    def candidates(self, model: str) -> list[tuple[str, mc.ModelConfig]]:
        """Changes to try on the bottleneck, in order (`candidate_changes` of its current config)."""
        return candidate_changes(model, self.config(model))

    def run(self) -> list[Trial]:
        """The trials in order; the search stops early (keeping what it has) if a reload fails or times out."""
        trials = [self.measure("as loaded")]
        trials[0].kept = True
        best = trials[0]
        try:
            for _ in range(self.options.rounds):
                model = self.bottleneck(best)
                improved = False
                for change, config in self.candidates(model):
                    previous = self.config(model)
                    self.load(model, config)
                    trial = self.measure(change)
                    trials.append(trial)
                    if trial.value > best.value * IMPROVEMENT:
                        trial.kept, best, improved = True, trial, True
                        break
                    self.load(model, previous)
                if not improved:
                    break
        except (InferenceServerException, TimeoutError) as exc:
            logger.error("tuning stopped: %s (the server may now run a configuration that was not kept; "
                         "the best one measured is reported)", str(exc).splitlines()[0][:300])
        return trials


def _kind_name(group: mc.ModelInstanceGroup) -> str:
    """"GPU", "CPU" or "AUTO"."""
    return mc.ModelInstanceGroup.Kind.Name(group.kind).removeprefix("KIND_")


def _with_counts(config: mc.ModelConfig, deltas: dict[int, int]) -> mc.ModelConfig:
    """A copy of `config` with instance group i's count changed by deltas[i]."""
    changed = mc.ModelConfig()
    changed.CopyFrom(config)
    for index, delta in deltas.items():
        changed.instance_group[index].count += delta
    return changed


def candidate_changes(model: str, current: mc.ModelConfig) -> list[tuple[str, mc.ModelConfig]]:
    """Changes to try on a bottleneck stage, in order: more instances, then twice its queue delay with a larger
    preferred batch (a model of max_batch_size 0 never batches: instances only).

    A stage with instance groups of both kinds (the CPU-GPU split of `image_preprocess` or an encoder) is tuned one
    kind at a time: one more GPU instance, one more CPU instance, then one instance moved from either kind to the
    other (where the kind it leaves keeps one), so the split itself can move.
    """
    groups = list(current.instance_group)
    kinds = {_kind_name(g) for g in groups}
    changes: list[tuple[str, mc.ModelConfig]] = []
    if len(kinds) > 1:
        order = sorted(range(len(groups)), key=lambda i: _kind_name(groups[i]) != "GPU")  # GPU groups first
        for i in order:
            changes.append((f"{model}: one more {_kind_name(groups[i])} instance ({groups[i].count + 1})",
                            _with_counts(current, {i: 1})))
        for source in order:
            for target in order:
                if _kind_name(groups[source]) != _kind_name(groups[target]) and groups[source].count > 1:
                    changes.append((f"{model}: one instance moved from {_kind_name(groups[source])} to "
                                    f"{_kind_name(groups[target])} ({groups[source].count - 1} + "
                                    f"{groups[target].count + 1})",
                                    _with_counts(current, {source: -1, target: 1})))
    else:
        more = _with_counts(current, {i: 1 for i in range(len(groups))})
        counts = "+".join(str(g.count) for g in more.instance_group)
        changes.append((f"{model}: {counts} instance(s)", more))
    if current.max_batch_size == 0:
        return changes
    batch = mc.ModelConfig()
    batch.CopyFrom(current)
    delay = max(500, 2 * batch.dynamic_batching.max_queue_delay_microseconds)
    batch.dynamic_batching.max_queue_delay_microseconds = delay
    top = max(list(batch.dynamic_batching.preferred_batch_size) or [1])
    if 2 * top <= batch.max_batch_size:
        batch.dynamic_batching.preferred_batch_size.append(2 * top)
    return changes + [(f"{model}: queue delay {delay} us, batches up to {2 * top}", batch)]


def best_trial(trials: list[Trial]) -> Trial:
    return max((t for t in trials if t.kept), key=lambda t: t.value)


def write_best(trials: list[Trial], repository: Path) -> list[Path]:
    """The best trial's configs into `repository`/<model>/config.pbtxt (existing model directories only)."""
    written = []
    for model, raw in best_trial(trials).configs.items():
        folder = repository / model
        if folder.is_dir():
            config = json_format.Parse(raw, mc.ModelConfig(), ignore_unknown_fields=True)
            write_config(config, folder / "config.pbtxt")
            written.append(folder / "config.pbtxt")
    return written


def format_trials(trials: list[Trial]) -> str:
    levels = [p.concurrency for p in trials[0].points]
    head = f"{'#':>2} {'change':<52}" + "".join(f"{'c' + str(c) + ' /s':>9}{'p99 ms':>8}" for c in levels) + f"{'value':>8} kept"
    lines = [head]
    for i, t in enumerate(trials):
        cells = "".join(f"{p.throughput:>9.1f}{p.p99_ms:>8.0f}" for p in t.points)
        lines.append(f"{i:>2} {t.change[:52]:<52}{cells}{t.value:>8.1f} {'yes' if t.kept else ''}")
    first, best = trials[0], best_trial(trials)
    lines.append(f"best: {best.change} -> {best.value:.1f}/s, {best.value / first.value if first.value else float('nan'):.2f}x "
                 f"the configuration as loaded")
    return "\n".join(lines)


def trial_record(trial: Trial) -> dict:
    """A trial as JSON-ready data (its configs left out)."""
    return {"change": trial.change, "value": trial.value, "kept": trial.kept,
            "points": [p.record() for p in trial.points], "stages": [s.__dict__ for s in trial.stages]}


def trials_json(trials: list[Trial]) -> str:
    return json.dumps([trial_record(t) for t in trials], indent=1)
