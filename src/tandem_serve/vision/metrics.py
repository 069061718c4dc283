"""Detection precision and recall at an IoU threshold, with the class required to match."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tandem_serve.vision.nms import iou_one_to_many


@dataclass
class MatchCounts:
    """True positives, false positives and misses accumulated over images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def add(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
            true_boxes: np.ndarray, true_classes: np.ndarray, iou_threshold: float = 0.5) -> None:
        """Greedy by score: each detection takes the best unmatched ground truth of its class."""
        matched = np.zeros(len(true_boxes), bool)
        for index in np.argsort(-np.asarray(scores), kind="stable"):
            candidates = np.flatnonzero(~matched & (true_classes == classes[index]))
            if candidates.size:
                ious = iou_one_to_many(np.asarray(boxes[index], np.float64), np.asarray(true_boxes[candidates], np.float64))
                best = int(np.argmax(ious))
                if ious[best] >= iou_threshold:
                    matched[candidates[best]] = True
                    self.tp += 1
                    continue
            self.fp += 1
        self.fn += int((~matched).sum())
