"""A YOLOv5 (v6.x layout) detector: CSP backbone with C3 blocks, SPPF, PANet neck, anchor head.

Module names follow Ultralytics YOLOv5's `model.N...` layout, so a state dict exported from a
YOLOv5 model with the same size and class count loads directly. Input: uint8 or float images
[B, 3, S, S] (S a multiple of 32); output: [B, N, 5 + classes] rows of (cx, cy, w, h, objectness,
class probabilities) in input pixels, N = 3 * (S/8)^2 + 3 * (S/16)^2 + 3 * (S/32)^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8, 16, 32)
SIZES = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75), "l": (1.0, 1.0), "x": (1.33, 1.25)}


@dataclass(frozen=True)
class YoloSpec:
    """Depth and width multipliers and the class count."""

    num_classes: int
    depth: float
    width: float

    @classmethod
    def of_size(cls, size: str, num_classes: int) -> "YoloSpec":
        if size not in SIZES:
            raise ValueError(f"detector size {size!r} is not one of {sorted(SIZES)}")
        depth, width = SIZES[size]
        return cls(num_classes, depth, width)

    def channels(self, c: int) -> int:
        return max(8, int(math.ceil(c * self.width / 8) * 8))

    def repeats(self, n: int) -> int:
        return max(round(n * self.depth), 1)


class Conv(nn.Module):
    """Conv2d + BatchNorm + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2 if p is None else p, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 1)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convolutions and n bottlenecks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = c2 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(c1, hidden, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden, 1)
        self.cv2 = Conv(hidden * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), dim=1))


class Detect(nn.Module):
    """Per-level 1x1 convolutions predicting 3 anchors x (5 + classes), and their decoding."""

    def __init__(self, num_classes: int, channels: tuple[int, int, int]):
        super().__init__()
        self.nc, self.no, self.na = num_classes, num_classes + 5, 3
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self.register_buffer("anchors", torch.tensor(ANCHORS, dtype=torch.float32).view(3, 3, 2))
        self.register_buffer("stride", torch.tensor(STRIDES, dtype=torch.float32))

    def raw(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level [B, 3, ny, nx, 5 + classes] logits (the training targets' layout)."""
        out = []
        for conv, x in zip(self.m, features):
            b, _, ny, nx = x.shape
            out.append(conv(x).view(b, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        return out

    def decode(self, raw: list[torch.Tensor]) -> torch.Tensor:
        """Logits -> [B, N, 5 + classes] boxes in input pixels with sigmoid scores."""
        decoded = []
        for level, p in enumerate(raw):
            b, na, ny, nx, no = p.shape
            y = p.float().sigmoid()
            gy, gx = torch.meshgrid(torch.arange(ny, device=p.device), torch.arange(nx, device=p.device), indexing="ij")
            grid = torch.stack((gx, gy), dim=-1).view(1, 1, ny, nx, 2).float()
            xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[level]
            wh = (y[..., 2:4] * 2) ** 2 * self.anchors[level].view(1, na, 1, 1, 2)
            decoded.append(torch.cat((xy, wh, y[..., 4:]), dim=-1).view(b, -1, no))
        return torch.cat(decoded, dim=1)

    def initialise_biases(self) -> None:
        """YOLOv5's prior: few objects per cell (objectness), classes near uniform."""
        for conv, stride in zip(self.m, STRIDES):
            bias = conv.bias.view(self.na, -1)
            with torch.no_grad():
                bias[:, 4] += math.log(8 / (640 / stride) ** 2)
                bias[:, 5:] += math.log(0.6 / (self.nc - 0.99))


class YoloV5(nn.Module):
    """The network; `forward` returns decoded predictions, `forward_raw` the per-level logits."""

    def __init__(self, spec: YoloSpec):
        super().__init__()
        self.spec = spec
        c, n = spec.channels, spec.repeats
        self.model = nn.ModuleList([
            Conv(3, c(64), 6, 2, 2),                 # 0  P1/2
            Conv(c(64), c(128), 3, 2),               # 1  P2/4
            C3(c(128), c(128), n(3)),                # 2
            Conv(c(128), c(256), 3, 2),              # 3  P3/8
            C3(c(256), c(256), n(6)),                # 4
            Conv(c(256), c(512), 3, 2),              # 5  P4/16
            C3(c(512), c(512), n(9)),                # 6
            Conv(c(512), c(1024), 3, 2),             # 7  P5/32
            C3(c(1024), c(1024), n(3)),              # 8
            SPPF(c(1024), c(1024)),                  # 9
            Conv(c(1024), c(512), 1, 1),             # 10
            nn.Upsample(scale_factor=2.0),           # 11
            nn.Identity(),                           # 12 concat with 6
            C3(c(1024), c(512), n(3), False),        # 13
            Conv(c(512), c(256), 1, 1),              # 14
            nn.Upsample(scale_factor=2.0),           # 15
            nn.Identity(),                           # 16 concat with 4
            C3(c(512), c(256), n(3), False),         # 17 P3 out
            Conv(c(256), c(256), 3, 2),              # 18
            nn.Identity(),                           # 19 concat with 14
            C3(c(512), c(512), n(3), False),         # 20 P4 out
            Conv(c(512), c(512), 3, 2),              # 21
            nn.Identity(),                           # 22 concat with 10
            C3(c(1024), c(1024), n(3), False),       # 23 P5 out
            Detect(spec.num_classes, (c(256), c(512), c(1024))),  # 24
        ])

    @property
    def head(self) -> Detect:
        return self.model[24]

    def forward_raw(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level logits; uint8 input is scaled to [0, 1] here (on the model's device)."""
        m = self.model
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images
        x = m[1](m[0](x))
        p3 = m[4](m[3](m[2](x)))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h10 = m[10](p5)
        h14 = m[14](m[13](torch.cat((m[11](h10), p4), 1)))
        out3 = m[17](torch.cat((m[15](h14), p3), 1))
        out4 = m[20](torch.cat((m[18](out3), h14), 1))
        out5 = m[23](torch.cat((m[21](out4), h10), 1))
        return self.head.raw([out3, out4, out5])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head.decode(self.forward_raw(images))
