"""Load a detector (shipped safetensors, a user's YOLOv5 / YOLOv8 state dict, a torch.export program, an ONNX model
or TorchScript) and run it batched."""

from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.export.passes import move_to_device_pass

from tandem_serve.errors import ConfigError, InvalidInputError, ModelFilesError
from tandem_serve.paths import shipped_weights
from tandem_serve.runtime.threads import set_stage_threads
from tandem_serve.runtime.transfer import to_device
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.text.bert import parse_dtype
from tandem_serve.text.graphs import bucket, ladder
from tandem_serve.vision.nms import batched_candidates
from tandem_serve.vision.onnx_network import OnnxNetwork
from tandem_serve.vision.yolo import YoloSpec, YoloV5
from tandem_serve.vision.yolov8 import YoloV8, YoloV8Spec

logger = logging.getLogger(__name__)


def default_weights() -> Path:
    """The shipped shapes detector."""
    try:
        path = shipped_weights()
    except ConfigError as exc:
        raise ModelFilesError(f"{exc}; or set the detector's 'weights' parameter") from None
    if not path.is_file():
        raise ModelFilesError(f"cannot find the shipped detector weights {path}; set the detector's 'weights' parameter")
    return path


def _library_network(head_format: str, size: str, num_classes: int, path: Path) -> torch.nn.Module:
    """The library's network whose output has `head_format`: YOLOv5 (objectness) or the anchor-free YOLOv8."""
    if head_format == "yolov8":
        return YoloV8(YoloV8Spec.of_size(size, num_classes))
    if head_format == "yolov5":
        return YoloV5(YoloSpec.of_size(size, num_classes))
    raise ConfigError(f"{path}: a state dict is loaded into the library's YOLOv5 or YOLOv8 network (head_format "
                      f"yolov5 or yolov8); a network with head_format {head_format!r} comes as .pt2 or .onnx")


def _aoti_metadata(path: Path) -> dict[str, str] | None:
    """The device an AOTInductor package was compiled for (its wrapper's metadata), None for a torch.export program."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if "/data/aotinductor/" in n and n.endswith("wrapper_metadata.json")]
            return json.loads(archive.read(names[0])) if names else None
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def own_precision_and_device(weights: str) -> tuple[bool, str | None]:
    """Whether a detector file runs at its own precision (ONNX, AOTInductor: autocast does not reach them) and the
    only device type it runs on (an AOTInductor package's; None: any)."""
    path = Path(weights)
    if path.suffix == ".onnx":
        return True, None
    if path.suffix == ".pt2" and path.is_file() and (metadata := _aoti_metadata(path)) is not None:
        return True, metadata.get("AOTI_DEVICE_KEY") or None
    return False, None


def _load_aoti(path: Path, metadata: dict[str, str], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """An AOTInductor package, refused unless it was compiled for this kind of device (and GPU architecture)."""
    built_for = metadata.get("AOTI_DEVICE_KEY", "")
    if built_for != device.type:
        raise ConfigError(f"{path} was compiled by AOTInductor for {built_for or 'an unknown device'}; the detector "
                          f"runs on {device}: compile it there (tandem detector export --compile {device})")
    if device.type == "cuda":
        capability = "".join(map(str, torch.cuda.get_device_capability(device)))
        if metadata.get("AOTI_COMPUTE_CAPABILITY") not in ("", capability):
            raise ConfigError(f"{path} was compiled for GPUs of compute capability "
                              f"{metadata['AOTI_COMPUTE_CAPABILITY']}; {device} has {capability}")
    try:
        index = device.index if device.type == "cuda" and device.index is not None else -1
        return torch._inductor.aoti_load_package(str(path), device_index=index)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a package it cannot load
        raise ModelFilesError(f"{path} is an AOTInductor package torch cannot load here: {str(exc)[:300]}") from None


def load_detector(config: DetectorConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The network on `device` (eval mode): images [B, 3, S, S] -> its head's output, in `config.head_format`.

    By the file: .pt2 (torch.export, or an AOTInductor package compiled for this device) and .onnx (onnxruntime)
    carry their own network; .safetensors and state-dict
    .pt files are loaded into the library's YOLOv5 or YOLOv8 (by head_format); anything else is tried as
    TorchScript."""
    path = Path(config.weights).expanduser() if config.weights else default_weights()
    if not path.is_file():
        raise ModelFilesError(f"detector weights {path} do not exist")
    if path.suffix == ".pt2" and (metadata := _aoti_metadata(path)) is not None:
        return _load_aoti(path, metadata, device)
    if path.suffix == ".pt2":  # torch.export: the program carries its own network, any head format
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a bad archive
            raise ModelFilesError(f"{path} is not a torch.export program: {str(exc)[:300]}") from None
        # the supported move: constants and device arguments recorded at export (cpu) follow the program
        return move_to_device_pass(program, device).module()
    if path.suffix == ".onnx":
        return OnnxNetwork(path, device, config.cpu_threads)
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        size = config.size or metadata.get("size", "")
        num_classes = config.num_classes or int(metadata.get("num_classes", 0))
        written_for = metadata.get("head_format", "yolov5")
        if written_for != config.head_format:
            raise ConfigError(f"{path} holds a network with head_format {written_for!r}; the detector's head_format "
                              f"parameter is {config.head_format!r}")
        state = load_file(str(path))
    else:
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError:
            pass  # not TorchScript: a pickled state dict
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        size, num_classes = config.size, config.num_classes
    if not size or not num_classes:
        raise ConfigError(f"{path}: set the detector parameters 'size' and 'num_classes' (no metadata in the file)")
    model = _library_network(config.head_format, size, num_classes, path)
    try:
        model.load_state_dict({k: v.float() if v.dtype.is_floating_point else v for k, v in state.items()})
    except RuntimeError as exc:
        name = "YOLOv8" if config.head_format == "yolov8" else "YOLOv5"
        raise ModelFilesError(f"{path} does not fit a {name}{size} with {num_classes} classes: {str(exc)[:300]}") from None
    return model.to(device).eval().requires_grad_(False)


@dataclass
class _Slot:
    """One batch bucket's static input and, once captured, its graph and static outputs."""

    images: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    rows: torch.Tensor | None = None
    counts: torch.Tensor | None = None


class GraphedFilter:
    """`run(images) -> (rows, counts)` replayed from CUDA graphs captured per batch bucket (1 2 3 4 6 8 ... up to
    `max_batch`) and image size: one replay instead of the network's hundreds of launches per batch.

    A batch is copied into its bucket's static input (padding images are zeros; their rows are dropped);
    larger batches run eagerly. Buckets share one memory pool (captured largest first by `capture`), so the
    outputs are cloned after each replay.
    """

    def __init__(self, run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 max_batch: int):
        self.run, self.device = run, torch.device(device)
        self.batches = ladder(max_batch)
        self.slots: dict[tuple[int, int], _Slot] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self._inputs: dict[int, torch.Tensor] = {}  # per image size: one flat buffer every bucket's input views

    def capture(self, size: int) -> None:
        """Capture every bucket for images of `size` pixels now, largest first (the shared pool grows once)."""
        began = time.perf_counter()
        for batch in reversed(self.batches):
            self._slot(batch, size)
        logger.info("detector: CUDA graphs for batches %s at %d px captured in %.1f s", self.batches, size,
                    time.perf_counter() - began)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, size = images.shape[0], images.shape[-1]
        padded = bucket(batch, self.batches)
        if padded is None:
            return self.run(images)
        slot = self._slot(padded, size)
        slot.images[:batch].copy_(images)
        slot.images[batch:].zero_()
        slot.graph.replay()
        return slot.rows[:batch].clone(), slot.counts[:batch].clone()

    def _slot(self, batch: int, size: int) -> _Slot:
        slot = self.slots.get((batch, size))
        if slot is None:
            slot = self.slots[(batch, size)] = self._capture(batch, size)
        return slot

    @torch.inference_mode()
    def _capture(self, batch: int, size: int) -> _Slot:
        flat = self._inputs.get(size)
        if flat is None:
            flat = self._inputs[size] = torch.zeros(max(self.batches) * 3 * size * size, dtype=torch.uint8,
                                                    device=self.device)
        slot = _Slot(flat[: batch * 3 * size * size].view(batch, 3, size, size))
        slot.images.zero_()
        side = torch.cuda.Stream(self.device)  # warm-up (cuDNN's algorithm search) off the capture stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run(slot.images)
        torch.cuda.current_stream(self.device).wait_stream(side)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph, pool=self.pool, capture_error_mode="thread_local"):
            slot.rows, slot.counts = self.run(slot.images)
        return slot


class DetectStage:
    """uint8 letterboxed images -> per image [k, 6] candidates (x1, y1, x2, y2, score, class), filtered on the device.

    On a GPU with `cuda_graph_max_batch` > 0, the network and the filter replay CUDA graphs (GraphedFilter);
    the host then waits once per batch, for the candidate counts.
    """

    def __init__(self, config: DetectorConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        set_stage_threads(self.device, config.cpu_threads)
        self.model = load_detector(config, self.device)
        self.dtype = parse_dtype(config.precision) if self.device.type == "cuda" else torch.float32
        self.graphs: GraphedFilter | None = None
        # onnxruntime launches its own kernels: no torch CUDA graph can hold them
        if self.device.type == "cuda" and config.cuda_graph_max_batch and isinstance(self.model, torch.nn.Module):
            torch.backends.cudnn.benchmark = True  # fixed shapes per bucket: the fastest convolutions, chosen once
            self.graphs = GraphedFilter(self._filter, self.device, config.cuda_graph_max_batch)
        logger.info("detector on %s (%s), prefilter %.3f, CUDA graphs up to batch %s", self.device, self.dtype,
                    config.prefilter_conf, config.cuda_graph_max_batch if self.graphs else "none")

    def capture(self, size: int) -> None:
        """Check the network takes images of `size` and capture its CUDA graphs now (at load), not on the first
        batches."""
        if isinstance(self.model, OnnxNetwork):
            self.model.check_size(size)
        if self.graphs is not None:
            self.graphs.capture(size)

    @staticmethod
    def check(pixels: torch.Tensor) -> torch.Tensor:
        if (pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3] or pixels.shape[2] % 32
                or pixels.shape[2] < 32):
            raise InvalidInputError(f"PIXELS must be uint8 [batch, 3, S, S] with S a positive multiple of 32, "
                                    f"got {list(pixels.shape)}")
        if pixels.dtype != torch.uint8:
            raise InvalidInputError(f"PIXELS must be uint8, got {pixels.dtype}")
        return pixels

    def _filter(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network and the candidate filter, with fixed shapes and no host synchronisation."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            predictions = self.model(images)
        return batched_candidates(predictions, self.config.prefilter_conf, self.config.max_candidates,
                                  self.config.head_format)

    @torch.inference_mode()
    def enqueue(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, S, S] on the device -> rows [B, max_candidates, 6] (real rows first, then score -1 rows)
        and counts [B], both on the device, enqueued on the current stream without waiting for it."""
        return (self.graphs or self._filter)(images)

    def filtered(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """uint8 [B, 3, S, S] on the device -> candidates [B, K, 6] padded with score -1 rows (K >= 1), still on
        the device, and the number of real rows per image."""
        rows, counts = self.enqueue(images)
        counts = counts.tolist()  # the one wait for the device per batch
        return rows[:, : max(1, max(counts, default=0))], counts

    def __call__(self, requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per request [b, 3, S, S] -> [b, k, 6], k the request's most candidates (>= 1); on the detector's device
        when `output_on_device` (the next step copies what it needs), else on the CPU."""
        sizes = [len(r) for r in requests]
        # to the device first (one pinned staging copy for the host tensors), then one concatenation there
        on_device = to_device(list(requests), self.device)
        images = on_device[0] if len(on_device) == 1 else torch.cat(on_device)
        padded, counts = self.filtered(images)
        keep = self.config.output_on_device
        if not keep:
            padded = padded.cpu()  # one copy of the batch's candidates
        out, start = [], 0
        for size in sizes:
            width = max(1, max(counts[start : start + size], default=0))
            out.append(padded[start : start + size, :width].contiguous())
            start += size
        return out
