"""Preprocess and NMS stages as the serving adapters call them (the detector is in detector.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tandem_serve.errors import InvalidInputError
from tandem_serve.stage_config import ImagePreprocessConfig, NmsConfig
from tandem_serve.vision.letterbox import Letterbox, preprocess
from tandem_serve.vision.nms import Detections, postprocess


class PreprocessStage:
    """Encoded image bytes (one image per request) -> PIXELS uint8 [1, 3, S, S], LETTERBOX fp32 [1, 5]."""

    def __init__(self, config: ImagePreprocessConfig):
        self.config = config

    @staticmethod
    def encoded(tensor: np.ndarray) -> bytes:
        """One request's IMAGE tensor as bytes; InvalidInputError unless it holds one image ([1, bytes])."""
        if tensor.ndim != 2 or tensor.shape[0] != 1:
            raise InvalidInputError(f"IMAGE must hold one encoded image per request ([1, bytes]), got {list(tensor.shape)}")
        return tensor[0].tobytes()

    def __call__(self, encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode and letterbox one request's IMAGE tensor; bad bytes raise InvalidInputError."""
        pixels, box = preprocess(self.encoded(encoded), self.config.image_size, self.config.max_pixels)
        return pixels[None], box.as_array()[None]


@dataclass(frozen=True)
class NmsRequest:
    """One request's candidates, letterbox and effective thresholds."""

    rows: np.ndarray
    letterbox: Letterbox
    conf: float
    iou: float
    max_det: int


class NmsStage:
    """Candidates -> final boxes in original pixels, with optional per-request threshold overrides."""

    def __init__(self, config: NmsConfig):
        self.config = config

    def thresholds(self, conf: float | None = None, iou: float | None = None,
                   max_det: int | None = None) -> tuple[float, float, int]:
        """One request's effective thresholds (defaults from the config); out of range raises InvalidInputError."""
        conf = self.config.conf_threshold if conf is None else conf
        iou = self.config.iou_threshold if iou is None else iou
        max_det = self.config.max_det if max_det is None else max_det
        if not 0 <= conf < 1:
            raise InvalidInputError(f"conf_threshold must lie in [0, 1), got {conf}")
        if not 0 < iou <= 1:
            raise InvalidInputError(f"iou_threshold must lie in (0, 1], got {iou}")
        if max_det < 1:
            raise InvalidInputError(f"max_det must be >= 1, got {max_det}")
        return conf, iou, max_det

    def request(self, candidates: np.ndarray, letterbox: np.ndarray, conf: float | None = None,
                iou: float | None = None, max_det: int | None = None) -> NmsRequest:
        """Validate one request; overrides outside their ranges raise InvalidInputError."""
        if candidates.ndim != 3 or candidates.shape[0] != 1 or candidates.shape[2] != 6:
            raise InvalidInputError(f"CANDIDATES must be [1, k, 6], got {list(candidates.shape)}")
        if letterbox.shape != (1, 5) or not np.isfinite(letterbox).all() or letterbox[0, 0] <= 0:
            raise InvalidInputError("LETTERBOX must be [1, 5] finite values with a positive scale")
        conf, iou, max_det = self.thresholds(conf, iou, max_det)
        return NmsRequest(candidates[0], Letterbox.from_array(letterbox[0]), conf, iou, max_det)

    @staticmethod
    def __call__(requests: Sequence[NmsRequest]) -> list[Detections]:
        return [postprocess(r.rows, r.letterbox, r.conf, r.iou, r.max_det) for r in requests]
