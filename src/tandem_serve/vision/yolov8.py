"""An anchor-free YOLOv8-style detector: CSP backbone with C2f blocks, SPPF, PAN neck, decoupled head with
distribution focal loss (DFL) box regression.

Written from the published description of the architecture (C2f: split, a chain of bottlenecks whose outputs
are all concatenated; the head: separate box and class branches per level, each side of a box predicted as a
distribution over `reg_max` bins whose expectation is its distance from the cell centre). Input: uint8 or float
images [B, 3, S, S] (S a multiple of 32); output: [B, 4 + classes, N] - cx, cy, w, h in input pixels, then
sigmoid class scores, no objectness (the `yolov8` head format); N = (S/8)^2 + (S/16)^2 + (S/32)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tandem_serve.vision.yolo import SPPF, STRIDES, Conv

# size: (depth, width, most channels)
SIZES = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024), "m": (0.67, 0.75, 768), "l": (1.0, 1.0, 512),
         "x": (1.0, 1.25, 512)}
REG_MAX = 16  # bins per box side


@dataclass(frozen=True)
class YoloV8Spec:
    """Depth and width multipliers, the channel cap and the class count."""

    num_classes: int
    depth: float
    width: float
    max_channels: int

    @classmethod
    def of_size(cls, size: str, num_classes: int) -> "YoloV8Spec":
        if size not in SIZES:
            raise ValueError(f"detector size {size!r} is not one of {sorted(SIZES)}")
        return cls(num_classes, *SIZES[size])

    def channels(self, c: int) -> int:
        return int(math.ceil(min(c, self.max_channels) * self.width / 8) * 8)

    def repeats(self, n: int) -> int:
        return max(round(n * self.depth), 1)


class Bottleneck(nn.Module):
    """Two 3x3 convolutions, with a residual connection where `shortcut`."""

    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """1x1 conv to two halves; the second feeds a chain of n bottlenecks; both halves and every bottleneck's
    output are concatenated and fused by a 1x1 conv."""

    def __init__(self, c1: int, c2: int, n: int, shortcut: bool):
        super().__init__()
        self.hidden = c2 // 2
        self.cv1 = Conv(c1, 2 * self.hidden, 1)
        self.cv2 = Conv((2 + n) * self.hidden, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class DetectV8(nn.Module):
    """Per level a box branch (4 x REG_MAX bin logits) and a class branch (class logits), and their decoding."""

    def __init__(self, num_classes: int, channels: tuple[int, int, int]):
        super().__init__()
        self.nc = num_classes
        box_c = max(16, channels[0] // 4, REG_MAX * 4)
        cls_c = max(channels[0], min(num_classes, 100))
        self.cv2 = nn.ModuleList(nn.Sequential(Conv(c, box_c, 3), Conv(box_c, box_c, 3), nn.Conv2d(box_c, 4 * REG_MAX, 1))
                                 for c in channels)
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, cls_c, 3), Conv(cls_c, cls_c, 3), nn.Conv2d(cls_c, num_classes, 1))
                                 for c in channels)
        self.register_buffer("bins", torch.arange(REG_MAX, dtype=torch.float32))
        self.register_buffer("stride", torch.tensor(STRIDES, dtype=torch.float32))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Feature maps of strides 8, 16, 32 -> [B, 4 + classes, N] (cx, cy, w, h in pixels, sigmoid scores)."""
        boxes, scores = [], []
        for level, x in enumerate(features):
            b, _, ny, nx = x.shape
            bins = self.cv2[level](x).float().view(b, 4, REG_MAX, ny * nx).softmax(dim=2)
            left_top_right_bottom = (bins * self.bins.view(1, 1, -1, 1)).sum(dim=2)  # [B, 4, cells], in strides
            gy, gx = torch.meshgrid(torch.arange(ny, device=x.device), torch.arange(nx, device=x.device), indexing="ij")
            centre = torch.stack((gx, gy)).view(1, 2, -1).float() + 0.5
            top_left = centre - left_top_right_bottom[:, :2]
            bottom_right = centre + left_top_right_bottom[:, 2:]
            boxes.append(torch.cat(((top_left + bottom_right) / 2, bottom_right - top_left), dim=1) * self.stride[level])
            scores.append(self.cv3[level](x).float().view(b, self.nc, ny * nx).sigmoid())
        return torch.cat((torch.cat(boxes, dim=2), torch.cat(scores, dim=2)), dim=1)

    def initialise_biases(self) -> None:
        """The usual prior: box bins flat, few objects per cell (a class score near 5 / (classes x cells))."""
        for box, cls, stride in zip(self.cv2, self.cv3, STRIDES):
            with torch.no_grad():
                box[-1].bias.fill_(1.0)
                cls[-1].bias.fill_(math.log(5 / self.nc / (640 / stride) ** 2))


class YoloV8(nn.Module):
    """The network: `forward(images) -> [B, 4 + classes, N]`."""

    def __init__(self, spec: YoloV8Spec):
        super().__init__()
        self.spec = spec
        c, n = spec.channels, spec.repeats
        self.model = nn.ModuleList([
            Conv(3, c(64), 3, 2),                      # 0  P1/2
            Conv(c(64), c(128), 3, 2),                 # 1  P2/4
            C2f(c(128), c(128), n(3), True),           # 2
            Conv(c(128), c(256), 3, 2),                # 3  P3/8
            C2f(c(256), c(256), n(6), True),           # 4
            Conv(c(256), c(512), 3, 2),                # 5  P4/16
            C2f(c(512), c(512), n(6), True),           # 6
            Conv(c(512), c(1024), 3, 2),               # 7  P5/32
            C2f(c(1024), c(1024), n(3), True),         # 8
            SPPF(c(1024), c(1024)),                    # 9
            nn.Upsample(scale_factor=2.0),             # 10
            nn.Identity(),                             # 11 concat with 6
            C2f(c(1024) + c(512), c(512), n(3), False),  # 12
            nn.Upsample(scale_factor=2.0),             # 13
            nn.Identity(),                             # 14 concat with 4
            C2f(c(512) + c(256), c(256), n(3), False),   # 15 P3 out
            Conv(c(256), c(256), 3, 2),                # 16
            nn.Identity(),                             # 17 concat with 12
            C2f(c(256) + c(512), c(512), n(3), False),   # 18 P4 out
            Conv(c(512), c(512), 3, 2),                # 19
            nn.Identity(),                             # 20 concat with 9
            C2f(c(512) + c(1024), c(1024), n(3), False),  # 21 P5 out
            DetectV8(spec.num_classes, (c(256), c(512), c(1024))),  # 22
        ])

    @property
    def head(self) -> DetectV8:
        return self.model[22]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 input is scaled to [0, 1] here (on the model's device)."""
        m = self.model
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        p3 = m[4](m[3](m[2](m[1](m[0](x)))))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h12 = m[12](torch.cat((m[10](p5), p4), 1))
        out3 = m[15](torch.cat((m[13](h12), p3), 1))
        out4 = m[18](torch.cat((m[16](out3), h12), 1))
        out5 = m[21](torch.cat((m[19](out4), p5), 1))
        return self.head([out3, out4, out5])
