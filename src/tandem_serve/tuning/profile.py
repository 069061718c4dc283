"""`tandem profile`: time every stage on every device and precision over batch and input sizes.

A profile is JSON: the machine, one `StageTiming` per (stage, device, precision, batch, size),
one `TransferTiming` per host-to-device copy size, and what one more Triton ensemble step costs
(`serving_cost.py`). CPU stages are timed on one thread, so a timing is core-seconds: the planner
shares the machine's cores between CPU stages from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from tandem_serve.errors import ConfigError
from tandem_serve.timing import median_seconds
from tandem_serve.tuning.serving_cost import ServingCost, measure_serving_cost, measure_tokenizer_cost

logger = logging.getLogger(__name__)

TEXT_STAGES = ("tokenize", "token_embedding", "encoder", "encoder_fused")
DETECTION_STAGES = ("image_preprocess", "detector", "nms")
WORDS = ("serving tensor memory token model queue latency pinned stream device host request batch shared "
         "embedding encoder detector image pipeline").split()


@dataclass(frozen=True)
class StageTiming:
    """Median time of one call of a stage on `batch` items of `size` (tokens or pixels per side)."""

    pipeline: str  # text | detection
    stage: str
    device: str  # cpu | cuda:N
    precision: str  # fp32 | fp16 | bf16 | int8 | - (no arithmetic to speak of)
    batch: int
    size: int
    seconds: float
    in_bytes: int  # per item, what the stage receives from the previous one
    out_bytes: int  # per item, what it hands on
    accuracy: float | None = None  # vs fp32 on the CPU: min cosine (encoders), box recall (detector)

    @property
    def items_per_s(self) -> float:
        return self.batch / self.seconds


@dataclass(frozen=True)
class TransferTiming:
    """One host-to-device copy of `bytes` bytes from pinned and from pageable memory."""

    bytes: int
    pinned_s: float
    pageable_s: float


@dataclass(frozen=True)
class ProfileOptions:
    """What to measure (the defaults take a few minutes on a GPU machine)."""

    pipelines: tuple[str, ...] = ("text", "detection")
    devices: tuple[str, ...] = ()  # empty: the CPU and every visible GPU
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    seq_lengths: tuple[int, ...] = (32, 128)
    image_sizes: tuple[int, ...] = (640,)
    detector_size: str = ""  # "": the shipped detector; n/s/m/l/x: random weights of that size (speed only)
    detector_weights: str = ""  # a user's detector (any file the detector stage loads); excludes detector_size
    head_format: str = "yolov5"  # what detector_weights outputs (stage_config.HEAD_FORMATS)
    repeats: int = 5
    cpu_max_batch: int = 16  # CPU stages beyond this batch size are skipped (they only get slower per call)
    model_dir: str = ""
    serving_cost: bool = True  # also time Triton's per-step costs on the embedded server

    def resolved_devices(self) -> list[str]:
        if self.devices:
            return list(self.devices)
        return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


@dataclass
class Profile:
    """All timings of one machine."""

    machine: dict
    stages: list[StageTiming] = field(default_factory=list)
    transfers: list[TransferTiming] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)  # model_dir / detector_weights profiled ("" or absent: shipped)
    serving: ServingCost | None = None  # None: not measured (the plan then counts stage compute only)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"machine": self.machine, "stages": [asdict(s) for s in self.stages],
                                    "transfers": [asdict(t) for t in self.transfers], "models": self.models,
                                    "serving": self.serving.to_json() if self.serving else None}, indent=1))

    @classmethod
    def load(cls, path: Path) -> "Profile":
        raw = json.loads(Path(path).read_text())
        return cls(raw["machine"], [StageTiming(**s) for s in raw["stages"]],
                   [TransferTiming(**t) for t in raw["transfers"]], raw.get("models", {}),
                   ServingCost.from_json(raw.get("serving")))


def machine_facts() -> dict:
    """The machine a profile describes: cores and GPUs."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"cpus": os.cpu_count() or 1, "gpus": gpus, "torch": torch.__version__, "host": os.uname().nodename,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Progress:
    """Logs `done/total` and the measurement just taken."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def step(self, what: str) -> None:
        self.done += 1
        logger.info("[%d/%d] %s", self.done, self.total, what)


def precisions_for(device: str, stage: str) -> list[str]:
    """The precisions a stage can run in on a device."""
    if stage in ("tokenize", "image_preprocess", "nms"):
        return ["-"]
    if stage == "token_embedding":
        return ["fp32"]
    if device == "cpu":
        return ["fp32", "int8"] if stage.startswith("encoder") else ["fp32"]
    return ["fp32", "fp16", "bf16"]


def transfer_timings(device: str, repeats: int) -> list[TransferTiming]:
    """Pinned and pageable host-to-device copies from 4 KiB to 64 MiB."""
    rows = []
    for size in (4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20):
        pageable = torch.randint(0, 255, (size,), dtype=torch.uint8)
        pinned = pageable.pin_memory()
        target = torch.empty(size, dtype=torch.uint8, device=device)
        rows.append(TransferTiming(size, median_seconds(lambda: target.copy_(pinned, non_blocking=True), device, repeats),
                                   median_seconds(lambda: target.copy_(pageable), device, repeats)))
    return rows


def run_profile(options: ProfileOptions) -> Profile:
    """Measure everything `options` asks for; progress is logged as it goes."""
    from tandem_serve.tuning.stage_timers import detection_timings, random_detector, text_timings

    devices = options.resolved_devices()
    profile = Profile(machine_facts())
    if options.model_dir:
        profile.models["model_dir"] = str(Path(options.model_dir).expanduser().resolve())
    if options.detector_size and options.detector_weights:
        raise ConfigError("profile either a random detector of a size or the detector weights given, not both")
    if options.detector_weights and "detection" in options.pipelines:
        profile.models["detector_weights"] = str(Path(options.detector_weights).expanduser().resolve())
        profile.models["detector_head_format"] = options.head_format
    elif options.detector_size and "detection" in options.pipelines:
        profile.models["detector_weights"] = str(random_detector(options.detector_size))
    plan = []
    if "text" in options.pipelines:
        plan.append(text_timings)
    if "detection" in options.pipelines:
        plan.append(detection_timings)
    for measure in plan:
        profile.stages.extend(measure(options, devices))
    for device in devices:
        if device.startswith("cuda"):
            logger.info("transfers to %s", device)
            profile.transfers.extend(transfer_timings(device, options.repeats))
    if options.serving_cost:
        from tandem_serve.triton.launcher import TritonStartError

        logger.info("Triton ensemble step costs (embedded server)")
        try:
            profile.serving = measure_serving_cost()
            if "text" in options.pipelines:  # the one-request stage measured as served, at the plan's default length
                from tandem_serve.tuning.stage_timers import sentences

                logger.info("the tokenizer served alone (embedded server)")
                texts = sentences(64, max(options.seq_lengths) - 2, seed=7)
                adapters = {"tokenize": measure_tokenizer_cost(options.model_dir, texts)}
                profile.serving = replace(profile.serving, adapters=adapters)
        except TritonStartError as exc:
            logger.warning("no serving costs in the profile (the plan counts stage compute only): %s", exc)
    return profile
