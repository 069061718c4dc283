"""Train the shipped shapes detector on synthetic scenes; seeded and reproducible.

    python -m tandem_serve.vision.train --out models/detector/shapes-yolov5n.safetensors

Scenes come from `shapes.generate_scene`, are encoded (JPEG or PNG) and go through the serving
preprocessing, so the network trains on exactly what it is served. Loss: YOLOv5's (CIoU box loss,
objectness with IoU targets, class BCE; anchors matched by size ratio < 4 and neighbouring cells).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from tandem_serve.vision.letterbox import preprocess
from tandem_serve.vision.metrics import MatchCounts
from tandem_serve.vision.nms import candidates, postprocess
from tandem_serve.vision.shapes import CLASS_NAMES, encode_scene, generate_scene
from tandem_serve.vision.yolo import STRIDES, YoloSpec, YoloV5

logger = logging.getLogger("tandem_serve.vision.train")


class SceneStream(torch.utils.data.IterableDataset):
    """Endless seeded scenes: (uint8 [3, S, S], targets [n, 5] = class, cx, cy, w, h in input pixels)."""

    def __init__(self, seed: int, size: int):
        self.seed, self.size = seed, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            scene = generate_scene(rng)
            pixels, box = preprocess(encode_scene(scene, rng), self.size)
            xyxy = box.to_input(scene.boxes)
            targets = np.concatenate([scene.classes[:, None].astype(np.float32),
                                      (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], axis=1)
            yield torch.from_numpy(pixels), torch.from_numpy(targets)


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    targets = torch.cat([torch.cat((torch.full((len(b[1]), 1), i, dtype=torch.float32), b[1]), 1) for i, b in enumerate(batch)])
    return images, targets


def ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of paired cx, cy, w, h boxes."""
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    b1x1, b1x2, b1y1, b1y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x1, b2x2, b2y1, b2y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    inter = (torch.min(b1x2, b2x2) - torch.max(b1x1, b2x1)).clamp(0) * (torch.min(b1y2, b2y2) - torch.max(b1y1, b2y1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(b1x2, b2x2) - torch.min(b1x1, b2x1)
    ch = torch.max(b1y2, b2y2) - torch.min(b1y1, b2y1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi ** 2) * (torch.atan(w2 / (h2 + eps)) - torch.atan(w1 / (h1 + eps))) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


class YoloLoss:
    """YOLOv5's loss for the `Detect.raw` layout."""

    BALANCE = (4.0, 1.0, 0.4)
    OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5

    def __init__(self, model: YoloV5, box_gain: float = 0.05, obj_gain: float = 1.0, cls_gain: float = 0.5):
        self.head = model.head
        self.gains = (box_gain, obj_gain, cls_gain * self.head.nc / 80)
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, raw: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        device = raw[0].device
        lbox = lobj = lcls = torch.zeros((), device=device)
        for level, p in enumerate(raw):
            p = p.float()
            b, na, ny, nx, _ = p.shape
            tobj = torch.zeros((b, na, ny, nx), device=device)
            anchors = self.head.anchors[level] / STRIDES[level]
            t = targets.clone()
            t[:, 2:6] /= STRIDES[level]
            if len(t):
                anchor_index = torch.arange(na, device=device).view(na, 1).repeat(1, len(t))
                t = torch.cat((t.repeat(na, 1, 1), anchor_index[..., None]), 2)
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(2)[0] < 4.0]
                gxy = t[:, 2:4]
                gxi = torch.tensor([nx, ny], device=device) - gxy
                j, k = ((gxy % 1 < 0.5) & (gxy > 1)).T
                l, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
                use = torch.stack((torch.ones_like(j), j, k, l, m))
                t = t.repeat((5, 1, 1))[use]
                offsets = (torch.zeros_like(gxy)[None] + self.OFFSETS.to(device)[:, None])[use]
                image, cls = t[:, 0].long(), t[:, 1].long()
                gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
                gij = (gxy - offsets).long()
                gi, gj = gij[:, 0].clamp(0, nx - 1), gij[:, 1].clamp(0, ny - 1)
                ps = p[image, a, gj, gi]
                pbox = torch.cat((ps[:, :2].sigmoid() * 2 - 0.5, (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[a]), 1)
                iou = ciou(pbox, torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))
                lbox = lbox + (1 - iou).mean()
                tobj[image, a, gj, gi] = iou.detach().clamp(0)
                one_hot = torch.zeros_like(ps[:, 5:])
                one_hot[torch.arange(len(cls)), cls] = 1.0
                lcls = lcls + self.bce(ps[:, 5:], one_hot)
            lobj = lobj + self.bce(p[..., 4], tobj) * self.BALANCE[level]
        return (lbox * self.gains[0] + lobj * self.gains[1] + lcls * self.gains[2]) * raw[0].shape[0]


class ModelEMA:
    """Exponential moving average of weights, warming up as in YOLOv5."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000):
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        for ema_v, v in zip(self.ema.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                ema_v.mul_(d).add_(v.detach(), alpha=1 - d)


@torch.no_grad()
def evaluate(model: YoloV5, device: torch.device, seed: int, count: int, size: int = 640,
             conf: float = 0.25, iou: float = 0.45) -> MatchCounts:
    """Precision/recall at IoU 0.5 (class must match) on `count` fresh scenes, served-path preprocessing."""
    rng = np.random.default_rng(seed)
    counts = MatchCounts()
    model.eval()
    for _ in range(count):
        scene = generate_scene(rng)
        pixels, box = preprocess(encode_scene(scene, rng), size)
        predictions = model(torch.from_numpy(pixels)[None].to(device))[0]
        found = postprocess(candidates(predictions, conf).cpu().numpy(), box, conf, iou, 300)
        counts.add(found.boxes, found.scores, found.classes, scene.boxes, scene.classes)
    return counts


def save_detector(model: YoloV5, path: Path, size_name: str, image_size: int, extra: dict) -> None:
    """fp16 safetensors with the spec in its metadata (loaded back as fp32)."""
    state = {k: v.detach().to(torch.float16 if v.dtype.is_floating_point else v.dtype).cpu().contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"format": "tandem-yolov5", "size": size_name, "num_classes": str(model.spec.num_classes),
                "class_names": json.dumps(CLASS_NAMES), "image_size": str(image_size), "training": json.dumps(extra)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = YoloV5(YoloSpec.of_size(args.size, len(CLASS_NAMES))).to(device)
    model.head.initialise_biases()
    loss_fn = YoloLoss(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim == 4 else no_decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.937, 0.999))
    warmup = min(300, args.iterations // 10)
    progress = {"fraction": 0.0}  # of the run: iterations or minutes, whichever is further along

    def lr_factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / max(1, warmup))
        return ramp * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress["fraction"]))))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = ModelEMA(model)
    loader = torch.utils.data.DataLoader(SceneStream(args.seed, args.image_size), batch_size=args.batch,
                                         num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    start = time.monotonic()
    model.train()
    done = 0
    for iteration, (images, targets) in enumerate(loader):
        progress["fraction"] = max(iteration / args.iterations, (time.monotonic() - start) / (args.max_minutes * 60))
        if progress["fraction"] >= 1.0:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            raw = model.forward_raw(images)
        loss = loss_fn(raw, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        ema.update(model)
        done = iteration + 1
        if done % args.log_every == 0:
            logger.info("iteration %d/%d  loss %.3f  lr %.2e  %.0f images/s", done, args.iterations, loss.item(),
                        schedule.get_last_lr()[0], done * args.batch / (time.monotonic() - start))
    minutes = (time.monotonic() - start) / 60
    counts = evaluate(ema.ema, device, seed=args.seed + 1_000_003, count=args.eval_images, size=args.image_size)
    summary = {"seed": args.seed, "size": args.size, "iterations": done, "batch": args.batch, "minutes": round(minutes, 2),
               "eval_images": args.eval_images, "precision": round(counts.precision, 4), "recall": round(counts.recall, 4),
               "tp": counts.tp, "fp": counts.fp, "fn": counts.fn,
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    logger.info("evaluation on %d new scenes: precision %.4f recall %.4f", args.eval_images, counts.precision, counts.recall)
    save_detector(ema.ema, args.out, args.size, args.image_size, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the shapes detector on synthetic scenes.")
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors")
    parser.add_argument("--size", default="n", help="YOLOv5 size: n, s, m, l, x")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=1e9, help="stop early after this long")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = train(args)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
