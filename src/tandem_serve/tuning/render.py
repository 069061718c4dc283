"""Write a plan as Triton configs (protobuf ModelConfig) and TorchServe model-config.yaml values."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import yaml
from tritonclient.grpc import model_config_pb2 as mc

from tandem_serve.paths import assets_root, handlers_dir
from tandem_serve.stage_config import setting_names
from tandem_serve.triton.model_config import read_config, write_config
from tandem_serve.triton.queue_policy import MIN_INSTANCES, instance_count, stalls
from tandem_serve.tuning.plan import TOKEN_BUDGET_STAGES, PipelinePlan, PlanReport, StagePlan
from tandem_serve.tuning.torchserve_workers import MIN_WORKERS, TorchServeWorkers

logger = logging.getLogger(__name__)
HANDLER_OF_PIPELINE = {"text": "text_embedding", "detection": "object_detection"}


def apply_stage(config: mc.ModelConfig, stage: StagePlan, min_batch: int, gpus: int = 1) -> mc.ModelConfig:
    """A copy of `config` with the stage's instances, batching and precision. With `gpus` > 1 a GPU stage's
    instances spread over GPUs 0..gpus-1 (Triton starts `count` instances on each listed GPU)."""
    out = mc.ModelConfig()
    out.CopyFrom(config)
    # a stage without preferred sizes (flat cost per item) keeps the shipped max_batch_size: Triton then hands one
    # execution whatever is queued, up to that; a model of max_batch_size 0 (one request per execution) keeps 0
    if config.max_batch_size == 0:
        out.max_batch_size = 0
    else:
        out.max_batch_size = max(stage.batch if stage.preferred_batches else config.max_batch_size, min_batch)
    del out.instance_group[:]
    if stage.device.startswith("cuda"):
        if gpus > 1:
            out.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=math.ceil(stage.instances / gpus),
                                   gpus=list(range(gpus)))
        else:
            out.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=stage.instances,
                                   gpus=[int(stage.device.split(":")[1])])
        if stage.cpu_share:
            out.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=stage.cpu_instances)
    else:
        out.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=stage.instances)
    if stalls(out):  # a queue-bounded model on one instance loses Triton's wake-ups (triton/queue_policy.py)
        out.instance_group[0].count += MIN_INSTANCES - instance_count(out)
    if out.max_batch_size > 0:  # one request per execution needs no batcher
        out.dynamic_batching.preferred_batch_size[:] = [b for b in stage.preferred_batches if b <= out.max_batch_size]
        out.dynamic_batching.max_queue_delay_microseconds = stage.queue_delay_us
    settings: dict[str, str] = {}
    if stage.precision not in ("-", "int8"):
        settings["precision"] = stage.precision
    if stage.stage in TOKEN_BUDGET_STAGES:
        settings["max_batch_tokens"] = str(stage.max_batch_tokens)
    if stage.device == "cpu" or stage.cpu_share:  # the plan counts a CPU instance as one core
        settings.update(cpu_threads="1", parallel="false")
    elif stage.host_cpu_per_item_ms:  # host work on the instance's own thread, as planned
        settings["parallel"] = "false"
    # each setting the model's settings class takes is written, listed in the source config or not (a user's config
    # without `precision` would otherwise serve fp32 where the plan chose fp16); one it does not take is not its own
    names = setting_names(out.name)
    takes = out.parameters if names is None else names  # a model of another name: the keys its config lists
    for key, value in settings.items():
        if key in takes:
            out.parameters[key].string_value = value
    return out


def apply_model_files(config: mc.ModelConfig, models: dict[str, str], sizes: tuple[int, int] | None) -> None:
    """Point a rendered config at the profiled model: its `model_dir` / `weights` / `head_format` parameter, and the
    model's (hidden, embedding) sizes in the dims of HIDDEN / EMBEDDING tensors (the adapters check them against the files)."""
    for key, value in (("model_dir", models.get("model_dir", "")), ("weights", models.get("detector_weights", "")),
                       ("head_format", models.get("detector_head_format", ""))):
        if value and key in config.parameters:
            config.parameters[key].string_value = value
    if sizes is None:
        return
    hidden, embedding = sizes
    for tensor in list(config.input) + list(config.output):
        if tensor.name.upper() == "EMBEDDING":
            tensor.dims[:] = [embedding]
        elif tensor.name.upper() == "HIDDEN":
            tensor.dims[:] = [-1, hidden]


def text_sizes_of(models: dict[str, str]) -> tuple[int, int] | None:
    """(hidden size, embedding size) of the profiled text model; None for the shipped one (its configs match)."""
    if not models.get("model_dir"):
        return None
    from tandem_serve.model_files import SentenceModelFiles

    files = SentenceModelFiles.load(models["model_dir"])
    return files.bert.hidden_size, files.embedding_size


def _ensemble_batch(ensembles: Path, name: str) -> int:
    return read_config(ensembles / name / "config.pbtxt").max_batch_size


def render_triton(plan: PipelinePlan, target: Path, models: Path | None = None, ensembles: Path | None = None,
                  model_files: dict[str, str] | None = None) -> list[Path]:
    """Copy the pipeline's models and ensemble into `target` (one repository) with planned configs."""
    root = assets_root()
    models = models or root / "model_repository"
    ensembles = ensembles or root / "ensembles"
    need = _ensemble_batch(ensembles, plan.ensemble)
    model_files = model_files or {}
    sizes = text_sizes_of(model_files) if plan.pipeline == "text" else None
    written = []
    for stage in plan.stages:
        source = models / stage.model
        destination = target / stage.model
        shutil.copytree(source, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        config = apply_stage(read_config(source / "config.pbtxt"), stage, need, plan.gpus)
        apply_model_files(config, model_files, sizes)
        write_config(config, destination / "config.pbtxt")
        written.append(destination / "config.pbtxt")
    shutil.copytree(ensembles / plan.ensemble, target / plan.ensemble, dirs_exist_ok=True)
    if sizes is not None:
        ensemble = read_config(target / plan.ensemble / "config.pbtxt")
        apply_model_files(ensemble, {}, sizes)
        write_config(ensemble, target / plan.ensemble / "config.pbtxt")
    return written


def render_torchserve(plan: PipelinePlan, target: Path, handlers: Path | None = None,
                      model_files: dict[str, str] | None = None, served: TorchServeWorkers | None = None) -> Path:
    """model-config.yaml for the pipeline's handler with the planned device, precision, (detection) where images are
    decoded, and the workers and batches of `served` (`torchserve_workers`; else the GPU stage's instances and
    batch, in micro-batches of a quarter)."""
    handler = HANDLER_OF_PIPELINE[plan.pipeline]
    source = (handlers or handlers_dir()) / handler / "model-config.yaml"
    values = yaml.safe_load(source.read_text()) or {}
    device_stage = plan.device_stage
    on_gpu = device_stage.device.startswith("cuda")
    workers = max(MIN_WORKERS, device_stage.instances if served is None else served.workers)
    batch = device_stage.batch if served is None else served.batch_size
    values.update({"batchSize": batch, "maxBatchDelay": max(1, round(device_stage.queue_delay_us / 1000)),
                   "minWorkers": workers, "maxWorkers": workers,
                   "deviceType": "gpu" if on_gpu else "cpu"})
    section = values.setdefault("handler", {})
    key = "encoder" if plan.pipeline == "text" else "detector"
    stage_values = section.setdefault(key, {})
    if device_stage.precision not in ("-", "int8"):
        stage_values["precision"] = device_stage.precision
    if plan.pipeline == "text":
        stage_values["fuse_token_embedding"] = plan.ensemble in ("text_embedding_fused", "text_embedding_utf8")
    model_files = model_files or {}
    if plan.pipeline == "text" and model_files.get("model_dir"):
        section["model_dir"] = model_files["model_dir"]
    preprocess = next((s for s in plan.stages if s.stage == "image_preprocess"), None)
    if preprocess is not None:  # the plan's decode placement; the handler's balancer routes the tandem's share at run time
        section["decode"] = ("cpu" if not preprocess.device.startswith("cuda") else
                             "tandem" if preprocess.cpu_share else "gpu")
    if plan.pipeline == "detection" and model_files.get("detector_weights"):
        stage_values["weights"] = model_files["detector_weights"]
        stage_values["head_format"] = model_files.get("detector_head_format", "yolov5")
    pipeline = section.setdefault("pipeline", {})
    pipeline["micro_batch_size"] = max(1, device_stage.batch // 4) if served is None else served.micro_batch_size
    # the balancer's CPU lane: the plan's CPU instances shared out among the workers
    pipeline["cpu_lane_threads"] = math.ceil(device_stage.cpu_instances / workers) if device_stage.cpu_share else 0
    path = target / "torchserve" / handler / "model-config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Rendered by `tandem plan`.\n" + yaml.safe_dump(values, sort_keys=False))
    return path


def render(report: PlanReport, target: Path, model_files: dict[str, str] | None = None) -> list[Path]:
    """Every chosen plan into `target`: a Triton repository in triton/ (models + ensembles), TorchServe
    model-config.yaml files in torchserve/, and plan.json. `model_files` (a profile's `models`) points the
    configs at the profiled model directory / detector weights."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for plan in report.chosen.values():
        written += render_triton(plan, target / "triton", model_files=model_files)
        served = report.torchserve.get(plan.pipeline)
        written.append(render_torchserve(plan, target, model_files=model_files, served=served))
    summary = {pipeline: {"ensemble": p.ensemble, "throughput": p.throughput, "latency_ms": p.latency_ms,
                          "stages": [s.__dict__ for s in p.stages]} for pipeline, p in report.chosen.items()}
    for pipeline, served in report.torchserve.items():
        summary[pipeline]["torchserve"] = {k: v for k, v in served.__dict__.items() if k != "cost"}
        summary[pipeline]["torchserve"]["cost"] = served.cost.__dict__
    (target / "plan.json").write_text(json.dumps({"objective": report.objective.__dict__, "plans": summary}, indent=1))
    return written
