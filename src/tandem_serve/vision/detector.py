"""Load a detector (shipped safetensors, a user's state dict or TorchScript) and run it batched."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tandem_serve.errors import ConfigError, InvalidInputError, ModelFilesError
from tandem_serve.paths import shipped_weights
from tandem_serve.stage_config import DetectorConfig
from tandem_serve.text.bert import parse_dtype
from tandem_serve.threads import set_stage_threads
from tandem_serve.transfer import to_device
from tandem_serve.vision.nms import candidates
from tandem_serve.vision.yolo import YoloSpec, YoloV5

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


def load_detector(config: DetectorConfig, device: torch.device) -> torch.nn.Module:
    """The network in eval mode on `device`; its output is [B, N, 5 + classes] decoded predictions."""
    path = Path(config.weights).expanduser() if config.weights else default_weights()
    if not path.is_file():
        raise ModelFilesError(f"detector weights {path} do not exist")
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        size = config.size or metadata.get("size", "")
        num_classes = config.num_classes or int(metadata.get("num_classes", 0))
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
    model = YoloV5(YoloSpec.of_size(size, num_classes))
    try:
        model.load_state_dict({k: v.float() if v.dtype.is_floating_point else v for k, v in state.items()})
    except RuntimeError as exc:
        raise ModelFilesError(f"{path} does not fit a YOLOv5{size} with {num_classes} classes: {str(exc)[:300]}") from None
    return model.to(device).eval().requires_grad_(False)


class DetectStage:
    """uint8 letterboxed images -> per image [k, 6] candidates (x1, y1, x2, y2, score, class), filtered on the device."""

    def __init__(self, config: DetectorConfig, device: str | torch.device = "cpu"):
        self.config = config
        self.device = torch.device(device)
        set_stage_threads(self.device, config.cpu_threads)
        self.model = load_detector(config, self.device)
        self.dtype = parse_dtype(config.precision) if self.device.type == "cuda" else torch.float32
        logger.info("detector on %s (%s), prefilter %.3f", self.device, self.dtype, config.prefilter_conf)

    @staticmethod
    def check(pixels: torch.Tensor) -> torch.Tensor:
        if (pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3] or pixels.shape[2] % 32
                or pixels.shape[2] < 32):
            raise InvalidInputError(f"PIXELS must be uint8 [batch, 3, S, S] with S a positive multiple of 32, "
                                    f"got {list(pixels.shape)}")
        if pixels.dtype != torch.uint8:
            raise InvalidInputError(f"PIXELS must be uint8, got {pixels.dtype}")
        return pixels

    @torch.inference_mode()
    def filtered(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """uint8 [B, 3, S, S] on the device -> candidates [B, K, 6] padded with score -1 rows (K >= 1), still on
        the device, and the number of real rows per image."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            predictions = self.model(images).float()
        rows = []
        for image_predictions in predictions:
            found = candidates(image_predictions, self.config.prefilter_conf)
            if len(found) > self.config.max_candidates:
                found = found[found[:, 4].topk(self.config.max_candidates).indices]
            rows.append(found)
        counts = [len(r) for r in rows]
        padded = torch.full((len(rows), max(1, max(counts, default=0)), 6), -1.0, device=images.device)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = r
        return padded, counts

    def __call__(self, requests: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per request [b, 3, S, S] -> [b, k, 6], k the request's most candidates (>= 1); on the detector's device
        when `output_on_device` (the next step copies what it needs), else on the CPU."""
        sizes = [len(r) for r in requests]
        if len({r.device for r in requests}) > 1:  # a batch from CPU- and GPU-decoding preprocess instances
            images = torch.cat(to_device(list(requests), self.device))
        else:
            merged = requests[0] if len(requests) == 1 else torch.cat(list(requests))  # one transfer for the batch
            images = to_device([merged], self.device)[0]
        padded, counts = self.filtered(images)
        keep = self.config.output_on_device
        out, start = [], 0
        for size in sizes:
            width = max(1, max(counts[start : start + size], default=0))
            part = padded[start : start + size, :width]
            out.append(part.contiguous() if keep else part.cpu())
            start += size
        return out
