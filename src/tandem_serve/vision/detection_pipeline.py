"""The object-detection pipeline for one worker: decode + letterbox and NMS on the CPU, detector on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tandem_serve.stage_config import DetectorConfig, ImagePreprocessConfig, NmsConfig
from tandem_serve.transfer import stack_into_host
from tandem_serve.vision.detector import DetectStage
from tandem_serve.vision.letterbox import Letterbox, preprocess
from tandem_serve.vision.nms import Detections, postprocess
from tandem_serve.vision.stages import NmsStage


@dataclass(frozen=True)
class VisionStageConfigs:
    """The stage settings a detection pipeline is built from (the same schemas as the Triton models)."""

    preprocess: ImagePreprocessConfig
    detector: DetectorConfig
    nms: NmsConfig


@dataclass(frozen=True)
class ImageRequest:
    """One encoded image and its effective NMS thresholds (validated by `DetectionStages.request`)."""

    data: bytes
    conf: float
    iou: float
    max_det: int


@dataclass(frozen=True)
class PreparedImage:
    """A letterboxed image and what NMS needs to map boxes back."""

    pixels: np.ndarray  # uint8 [3, S, S]
    letterbox: Letterbox
    request: ImageRequest


class DetectionStages:
    """PipelineStages for encoded images -> Detections (boxes in original pixels) per request."""

    def __init__(self, configs: VisionStageConfigs, device: torch.device):
        self.configs = configs
        self.detector = DetectStage(configs.detector, device)
        self.nms = NmsStage(configs.nms)

    def request(self, data: bytes, conf: float | None = None, iou: float | None = None,
                max_det: int | None = None) -> ImageRequest:
        """A request with thresholds filled from the config; bad overrides raise InvalidInputError."""
        return ImageRequest(data, *self.nms.thresholds(conf, iou, max_det))

    @staticmethod
    def rows(item: ImageRequest) -> int:
        return 1

    def prepare(self, item: ImageRequest) -> PreparedImage:
        config = self.configs.preprocess
        pixels, box = preprocess(item.data, config.image_size, config.max_pixels)
        return PreparedImage(pixels, box, item)

    def collate(self, prepared: list[PreparedImage]) -> list[torch.Tensor]:
        """The batch, stacked straight into pinned memory when the detector is on a GPU."""
        return [stack_into_host([p.pixels for p in prepared], pin=self.detector.device.type == "cuda")]

    def infer(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Candidate rows and counts, enqueued: the pipeline copies both to the host and waits once."""
        return list(self.detector.enqueue(inputs[0]))

    @staticmethod
    def finish(outputs: list[torch.Tensor], prepared: list[PreparedImage]) -> list[Detections]:
        rows, counts = outputs[0].numpy(), outputs[1].tolist()
        return [postprocess(r[:n], p.letterbox, p.request.conf, p.request.iou, p.request.max_det)
                for r, n, p in zip(rows, counts, prepared)]
