"""NMS against a brute-force reference; candidate filtering; post-processing edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem_serve.vision.letterbox import Letterbox
from tandem_serve.vision.nms import batched_candidates, candidates, nms, postprocess


def brute_force_nms(boxes, scores, classes, iou_threshold, max_det):
    """Textbook O(n^2) NMS in plain Python: visit by score (ties: lower index), drop overlaps > threshold."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    kept = []
    for i in order:
        if len(kept) == max_det:
            break
        if all(classes[k] != classes[i] or iou(boxes[k].tolist(), boxes[i].tolist()) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def random_boxes(rng, n, extent=640.0):
    xy = rng.uniform(0, extent, size=(n, 2))
    wh = rng.uniform(1, extent / 4, size=(n, 2))
    return np.concatenate([xy, xy + wh], axis=1)


@pytest.mark.parametrize("seed,n,num_classes", [(0, 10, 1), (1, 200, 3), (2, 500, 20), (3, 3000, 80), (4, 3000, 1)])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.45, 0.7])
def test_matches_brute_force_on_random_boxes(seed, n, num_classes, iou_threshold):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, n)
    scores = rng.uniform(0, 1, n).round(2)  # rounding makes many ties
    classes = rng.integers(0, num_classes, n)
    expected = brute_force_nms(boxes, scores, classes, iou_threshold, 300)
    assert nms(boxes, scores, classes, iou_threshold, 300).tolist() == expected


def test_identical_boxes_keep_the_first_of_equal_scores():
    boxes = np.tile([10.0, 10, 50, 50], (5, 1))
    assert nms(boxes, np.full(5, 0.9), np.zeros(5, int), 0.5, 300).tolist() == [0]
    assert nms(boxes, np.full(5, 0.9), np.arange(5), 0.5, 300).tolist() == [0, 1, 2, 3, 4]  # classes differ


def test_touching_boxes_do_not_suppress_and_threshold_is_strict():
    touching = np.array([[0.0, 0, 10, 10], [10, 0, 20, 10]])
    assert nms(touching, np.array([0.9, 0.8]), np.zeros(2, int), 0.0, 300).tolist() == [0, 1]
    half = np.array([[0.0, 0, 10, 10], [0, 0, 10, 5]])  # IoU exactly 0.5
    assert nms(half, np.array([0.9, 0.8]), np.zeros(2, int), 0.5, 300).tolist() == [0, 1]
    assert nms(half, np.array([0.9, 0.8]), np.zeros(2, int), 0.49, 300).tolist() == [0]


def test_max_det_and_empty_input():
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 1000, extent=100000)  # far apart: nothing suppressed
    assert len(nms(boxes, rng.uniform(size=1000), np.zeros(1000, int), 0.5, 7)) == 7
    assert nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5, 10).tolist() == []


def test_candidates_scores_and_boxes():
    predictions = torch.tensor([
        [100.0, 100, 20, 40, 0.9, 0.1, 0.8, 0.1],  # score 0.72, class 1
        [50.0, 50, 10, 10, 0.2, 0.9, 0.0, 0.0],    # score 0.18: filtered
    ])
    rows = candidates(predictions, 0.25)
    torch.testing.assert_close(rows, torch.tensor([[90.0, 80, 110, 120, 0.72, 1]]))


def test_postprocess_maps_back_clips_and_drops_non_finite():
    box = Letterbox(scale=0.5, pad_x=10, pad_y=20, width=100, height=80)
    rows = np.array([
        [20, 30, 60, 50, 0.9, 2],        # -> (20, 20, 100, 60)
        [0, 0, 200, 200, 0.8, 1],        # clipped to the image
        [np.nan, 0, 5, 5, 0.99, 0],      # dropped
        [0, 0, 5, 5, np.inf, 0],         # dropped
        [20, 30, 60, 50, 0.1, 0],        # below conf
    ], np.float32)
    found = postprocess(rows, box, 0.25, 0.45, 300)
    np.testing.assert_allclose(found.boxes, [[20, 20, 100, 60], [0, 0, 100, 80]])
    assert found.classes.tolist() == [2, 1] and found.scores.dtype == np.float32
    empty = postprocess(np.zeros((0, 6), np.float32), box, 0.25, 0.45, 300)
    assert empty.boxes.shape == (0, 4) and empty.classes.shape == (0,)


def _reference_rows(predictions: torch.Tensor, conf: float, max_candidates: int) -> torch.Tensor:
    """Per image: `candidates`, capped to the highest `max_candidates` scores, in prediction order."""
    class_prob, _ = predictions[:, 5:].max(dim=1)
    score = predictions[:, 4] * class_prob
    index = torch.nonzero(score > conf).flatten()
    if len(index) > max_candidates:
        index = index[score[index].topk(max_candidates).indices].sort().values
    mask = torch.zeros(len(predictions), dtype=torch.bool)
    mask[index] = True
    return candidates(predictions[mask], conf)


@pytest.mark.parametrize("max_candidates", [1, 7, 40, 1000])
def test_batched_candidates_match_the_per_image_filter(max_candidates):
    rng = torch.Generator().manual_seed(max_candidates)
    predictions = torch.rand(5, 300, 5 + 4, generator=rng) * torch.tensor([640, 640, 80, 80, 1, 1, 1, 1, 1])
    predictions[2, :, 4] = 0.0  # an image with nothing above the threshold
    rows, counts = batched_candidates(predictions, 0.3, max_candidates)
    assert rows.shape == (5, min(max_candidates, 300), 6)
    for image, count in zip(range(5), counts.tolist()):
        expected = _reference_rows(predictions[image], 0.3, max_candidates)
        assert count == len(expected)
        torch.testing.assert_close(rows[image, :count], expected, rtol=0, atol=0)
        assert (rows[image, count:] == -1).all()
    assert counts[2] == 0


def test_batched_candidates_in_half_precision_score_as_float32():
    predictions = torch.rand(2, 50, 7, generator=torch.Generator().manual_seed(1)).half()
    rows, counts = batched_candidates(predictions, 0.2, 50)
    assert rows.dtype == torch.float32
    for image in range(2):
        expected = candidates(predictions[image].float(), 0.2)
        torch.testing.assert_close(rows[image, : counts[image]], expected, rtol=0, atol=0)


def test_yolov8_and_decoded_head_formats_filter_like_the_yolov5_one():
    """The same boxes and scores given as a YOLOv8 head ([B, 4 + classes, N], no objectness) and as decoded rows
    ([B, N, 6]) keep the rows the YOLOv5 layout keeps."""
    rng = torch.Generator().manual_seed(3)
    xywh = torch.rand(3, 200, 4, generator=rng) * torch.tensor([640, 640, 80, 80])
    classes = torch.rand(3, 200, 5, generator=rng)
    v5 = torch.cat((xywh, torch.ones(3, 200, 1), classes), dim=2)  # objectness 1: score = best class
    want_rows, want_counts = batched_candidates(v5, 0.6, 50)
    rows, counts = batched_candidates(torch.cat((xywh, classes), dim=2).transpose(1, 2), 0.6, 50, "yolov8")
    torch.testing.assert_close(rows, want_rows, rtol=0, atol=0)
    assert counts.tolist() == want_counts.tolist()
    score, cls = classes.max(dim=2)
    decoded = torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2, score[..., None],
                         cls[..., None].float()), dim=2)
    rows, counts = batched_candidates(decoded, 0.6, 50, "boxes-scores-classes")
    torch.testing.assert_close(rows, want_rows, rtol=0, atol=0)
    with pytest.raises(ValueError, match="head format 'ssd'"):
        batched_candidates(decoded, 0.6, 50, "ssd")
