"""Triton Python-backend models of the detection pipeline; each `model.py` re-exports one of these."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from tandem_serve.stage_config import DetectorConfig, ImagePreprocessConfig, NmsConfig
from tandem_serve.triton import backend
from tandem_serve.vision.detector import DetectStage
from tandem_serve.vision.stages import NmsStage, PreprocessStage

logger = logging.getLogger(__name__)


class ImagePreprocessModel:
    """IMAGE (encoded bytes) -> PIXELS, LETTERBOX. A KIND_CPU instance decodes on its core; a KIND_GPU instance
    decodes a batch of JPEGs with nvJPEG and leaves PIXELS on the GPU for the detector (CUDA IPC)."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, ImagePreprocessConfig)
        size = settings.image_size
        backend.expect_dims(config, "output", "PIXELS", [3, size, size],
                            f"set PIXELS dims to [3, {size}, {size}] here and in the detector's config")
        self.stage = PreprocessStage(settings)
        self.outputs = backend.Outputs(config, {"PIXELS": torch.uint8, "LETTERBOX": torch.float32})
        device = backend.instance_device(args)
        self.gpu = None
        if device.startswith("cuda"):
            from tandem_serve.vision.gpu_decode import GpuDecoder

            self.gpu = GpuDecoder(size, device, settings.max_pixels)
        logger.info("image_preprocess decodes on %s", "the GPU (nvJPEG)" if self.gpu else "the CPU")

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.gpu is not None:
            return backend.respond(
                requests,
                decode=lambda r: self.gpu.check(self.stage.encoded(backend.input_tensor(r, "IMAGE").numpy())),
                compute=self.gpu,
                encode=lambda out: [self.outputs.tensor("PIXELS", out[0][None]),
                                    self.outputs.tensor("LETTERBOX", out[1].as_array()[None])],
                stage="image_preprocess",
            )
        return backend.respond(
            requests,
            decode=lambda r: self.stage(backend.input_tensor(r, "IMAGE").numpy()),
            compute=lambda items: items,
            encode=lambda out: [self.outputs.tensor("PIXELS", out[0]), self.outputs.tensor("LETTERBOX", out[1])],
            stage="image_preprocess",
        )


class DetectorModel:
    """PIXELS -> CANDIDATES (filtered on the detector's device)."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, DetectorConfig)
        graphs = min(settings.cuda_graph_max_batch, max(1, int(config.get("max_batch_size", 0))))
        self.stage = DetectStage(dataclasses.replace(settings, cuda_graph_max_batch=graphs),
                                 backend.instance_device(args))
        self.stage.capture(backend.tensor_dims(config, "input", "PIXELS")[-1])  # at load, not on the first batches
        self.outputs = backend.Outputs(config, {"CANDIDATES": torch.float32})

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=lambda r: self.stage.check(backend.input_tensor(r, "PIXELS")),
            compute=self.stage,
            encode=lambda rows: [self.outputs.tensor("CANDIDATES", rows)],
            stage="detector",
        )


def _optional_scalar(request: Any, name: str) -> float | None:
    tensor = backend.optional_input_tensor(request, name)
    return None if tensor is None else float(tensor.reshape(-1)[0])


class NmsModel:
    """CANDIDATES, LETTERBOX (+ optional CONF_THRESHOLD, IOU_THRESHOLD, MAX_DET) -> BOXES, SCORES, CLASSES."""

    def initialize(self, args: dict[str, str]) -> None:
        config, settings = backend.stage_settings(args, NmsConfig)
        self.stage = NmsStage(settings)
        self.outputs = backend.Outputs(config, {"BOXES": torch.float32, "SCORES": torch.float32, "CLASSES": torch.int32})
        self.seen_device = False

    def _candidates(self, request: Any):
        """CANDIDATES wherever the detector left them (a CUDA tensor via CUDA IPC): only these rows are copied."""
        tensor = backend.input_tensor(request, "CANDIDATES")
        if not self.seen_device:
            self.seen_device = True
            logger.info("nms: CANDIDATES arrive on %s", tensor.device)
        return tensor.cpu().numpy()

    def _decode(self, request: Any):
        max_det = _optional_scalar(request, "MAX_DET")
        return self.stage.request(
            self._candidates(request), backend.input_tensor(request, "LETTERBOX").numpy(),
            _optional_scalar(request, "CONF_THRESHOLD"), _optional_scalar(request, "IOU_THRESHOLD"),
            None if max_det is None else int(max_det),
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        return backend.respond(
            requests,
            decode=self._decode,
            compute=self.stage,
            encode=lambda d: [self.outputs.tensor("BOXES", d.boxes[None]),
                              self.outputs.tensor("SCORES", d.scores[None]),
                              self.outputs.tensor("CLASSES", d.classes[None])],
            stage="nms",
        )
