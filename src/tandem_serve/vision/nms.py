"""Detector post-processing: confidence filtering (GPU-side) and class-aware NMS (CPU-side).

NMS semantics: candidates are visited by descending score (ties: lower index first); a candidate
is suppressed when its IoU with an already kept box of the same class is strictly greater than
`iou_threshold`. Rows with NaN or Inf are dropped before NMS (and counted), never kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tandem_serve.stage_config import HEAD_FORMATS
from tandem_serve.vision.letterbox import Letterbox

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detections:
    """Final detections: boxes [n, 4] x1 y1 x2 y2 (original pixels), scores [n], classes [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))


def candidates(predictions: torch.Tensor, conf_threshold: float) -> torch.Tensor:
    """[N, 5 + classes] decoded predictions -> [k, 6] rows (x1, y1, x2, y2, score, class), score > threshold.

    Score = objectness x best class probability (one label per box). Runs on the predictions'
    device, so only candidates leave the GPU.
    """
    class_prob, cls = predictions[:, 5:].max(dim=1)
    score = predictions[:, 4] * class_prob
    keep = score > conf_threshold
    p, score, cls = predictions[keep], score[keep], cls[keep]
    half = p[:, 2:4] / 2
    return torch.cat((p[:, :2] - half, p[:, :2] + half, score[:, None], cls[:, None].to(p.dtype)), dim=1)


def batched_candidates(predictions: torch.Tensor, conf_threshold: float, max_candidates: int,
                       head_format: str = "yolov5") -> tuple[torch.Tensor, torch.Tensor]:
    """A detector's raw output -> rows [B, K, 6] (x1, y1, x2, y2, score, class) and counts [B]: per image the rows
    scoring above the threshold (at most `max_candidates`, the highest), in prediction order, then padding rows of
    -1; K = min(max_candidates, N). Head formats:
      yolov5                [B, N, 5 + classes]: cx, cy, w, h, objectness, class probabilities (score = obj x best)
      yolov8                [B, 4 + classes, N]: cx, cy, w, h, class scores, no objectness (score = best class)
      boxes-scores-classes  [B, N, 6]: x1, y1, x2, y2, score, class, already decoded

    Fixed shapes and no host synchronisation, so it runs inside a CUDA graph; the caller reads `counts` once
    per batch. Scores are computed in float32 from the predictions' own values, as `candidates` does.
    """
    if head_format == "yolov5":
        class_prob, cls = predictions[..., 5:].max(dim=2)
        score = predictions[..., 4].float() * class_prob.float()
        xywh = predictions[..., :4]
    elif head_format == "yolov8":
        predictions = predictions.transpose(1, 2)  # [B, N, 4 + classes]
        class_score, cls = predictions[..., 4:].max(dim=2)
        score, xywh = class_score.float(), predictions[..., :4]
    elif head_format == "boxes-scores-classes":
        score, cls, xywh = predictions[..., 4].float(), predictions[..., 5].round().long(), None
    else:
        raise ValueError(f"head format {head_format!r} is not one of {HEAD_FORMATS}")
    count = score.shape[1]
    keep = score > conf_threshold
    width = min(max_candidates, count)
    # kept rows first (the highest scores where more are kept than fit), then restored to prediction order
    top = torch.where(keep, score, torch.full_like(score, -torch.inf)).topk(width, dim=1).indices
    kept = keep.gather(1, top)
    order = torch.where(kept, top, top + count).sort(dim=1).values  # kept ones first, each part by index
    index = order % count
    valid = order < count
    if xywh is None:
        boxes = predictions[..., :4].gather(1, index[..., None].expand(-1, -1, 4)).float()
    else:
        p = xywh.gather(1, index[..., None].expand(-1, -1, 4)).float()
        half = p[..., 2:4] / 2
        boxes = torch.cat((p[..., :2] - half, p[..., :2] + half), dim=2)
    rows = torch.cat((boxes, score.gather(1, index)[..., None], cls.gather(1, index)[..., None].float()), dim=2)
    rows = torch.where(valid[..., None], rows, torch.full_like(rows, -1.0))
    return rows, valid.sum(dim=1)


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1 y1 x2 y2 box with each row of `boxes` (float64)."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_det: int) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, by descending score, at most `max_det`."""
    boxes = np.asarray(boxes, np.float64)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    classes = np.asarray(classes)
    kept: list[int] = []
    while order.size and len(kept) < max_det:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        same = classes[rest] == classes[best]
        overlap = np.zeros(rest.size, bool)
        overlap[same] = iou_one_to_many(boxes[best], boxes[rest[same]]) > iou_threshold
        order = rest[~overlap]
    return np.array(kept, np.int64)


def postprocess(
    rows: np.ndarray, letterbox: Letterbox, conf_threshold: float, iou_threshold: float, max_det: int
) -> Detections:
    """[k, 6] candidate rows (network-input pixels) -> final detections in original pixels."""
    rows = np.asarray(rows, np.float32).reshape(-1, 6)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        logger.warning("dropping %d candidate row(s) with NaN/Inf", int((~finite).sum()))
        rows = rows[finite]
    rows = rows[rows[:, 4] > conf_threshold]
    if rows.size == 0:
        return Detections.empty()
    keep = nms(rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64), iou_threshold, max_det)
    kept = rows[keep]
    boxes = letterbox.to_original(kept[:, :4])
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Detections(boxes[nonempty], kept[nonempty, 4].astype(np.float32), kept[nonempty, 5].astype(np.int32))
