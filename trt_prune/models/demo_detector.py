"""``builtin:demo-detector``: a small anchor-free one-stage detector in the style used on vehicles.

CSP/C2f blocks (channel split + concat), SPPF, a PAN/FPN neck (upsample + concat), a decoupled
classification/box head per level, BN + SiLU. About 3 M parameters, any input that is a multiple of 32.

Output: one tensor ``[B, 4 + num_classes, N]``. ``N`` runs over the levels (strides 8, 16, 32), each level
row-major over its grid. Channels 0..3 are raw box regressions (left, top, right, bottom distances from the
anchor point, decoded as ``softplus(raw) * stride``), the rest are class logits (decoded with a sigmoid).
Decoding lives in :mod:`trt_prune.detection.decode` so torch and ONNX Runtime outputs share it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STRIDES = (8, 16, 32)
CLASS_NAMES = ("car", "truck", "pedestrian", "sign")


class ConvBNAct(nn.Module):
    """Conv2d (no bias) + BatchNorm + SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = ConvBNAct(c, c, 3)
        self.cv2 = ConvBNAct(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block: one 1x1 conv, split in two halves, a chain of bottlenecks on one half, concat all."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        c = c_out // 2
        self.cv1 = ConvBNAct(c_in, 2 * c, 1)
        self.m = nn.ModuleList(Bottleneck(c, shortcut) for _ in range(n))
        self.cv2 = ConvBNAct((2 + n) * c, c_out, 1)

    def forward(self, x):
        # chunk (not split with stored sizes) so that the block stays valid after its halves are pruned.
        ys = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            ys.append(m(ys[-1]))
        return self.cv2(torch.cat(ys, 1))


class SPPF(nn.Module):
    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        c = c_in // 2
        self.cv1 = ConvBNAct(c_in, c, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)
        self.cv2 = ConvBNAct(4 * c, c_out, 1)

    def forward(self, x):
        y0 = self.cv1(x)
        y1 = self.pool(y0)
        y2 = self.pool(y1)
        y3 = self.pool(y2)
        return self.cv2(torch.cat((y0, y1, y2, y3), 1))


class Backbone(nn.Module):
    def __init__(self, w: tuple[int, ...], d: tuple[int, ...]):
        super().__init__()
        self.stem = ConvBNAct(3, w[0], 3, 2)
        self.stage1 = nn.Sequential(ConvBNAct(w[0], w[1], 3, 2), C2f(w[1], w[1], d[0]))
        self.stage2 = nn.Sequential(ConvBNAct(w[1], w[2], 3, 2), C2f(w[2], w[2], d[1]))
        self.stage3 = nn.Sequential(ConvBNAct(w[2], w[3], 3, 2), C2f(w[3], w[3], d[2]))
        self.stage4 = nn.Sequential(ConvBNAct(w[3], w[4], 3, 2), C2f(w[4], w[4], d[3]), SPPF(w[4], w[4]))

    def forward(self, x):
        x = self.stage1(self.stem(x))
        p3 = self.stage2(x)
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        return p3, p4, p5


class Neck(nn.Module):
    """PAN: top-down (upsample + concat) then bottom-up (strided conv + concat)."""

    def __init__(self, w: tuple[int, ...]):
        super().__init__()
        c3, c4, c5 = w[2], w[3], w[4]
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, 1, shortcut=False)
        self.td3 = C2f(c4 + c3, c3, 1, shortcut=False)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bu4 = C2f(c3 + c4, c4, 1, shortcut=False)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bu5 = C2f(c4 + c5, c5, 1, shortcut=False)

    def forward(self, p3, p4, p5):
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        n3 = self.td3(torch.cat((self.up(t4), p3), 1))
        n4 = self.bu4(torch.cat((self.down3(n3), t4), 1))
        n5 = self.bu5(torch.cat((self.down4(n4), p5), 1))
        return n3, n4, n5


class HeadLevel(nn.Module):
    """Decoupled head for one level: a box branch and a class branch."""

    def __init__(self, c_in: int, c_box: int, c_cls: int, num_classes: int, stride: int):
        super().__init__()
        self.box = nn.Sequential(ConvBNAct(c_in, c_box, 3), ConvBNAct(c_box, c_box, 3), nn.Conv2d(c_box, 4, 1))
        self.cls = nn.Sequential(ConvBNAct(c_in, c_cls, 3), ConvBNAct(c_cls, c_cls, 3),
                                 nn.Conv2d(c_cls, num_classes, 1))
        # Priors: boxes start near two strides wide, classes near 1% positive (focal-loss practice).
        nn.init.constant_(self.box[-1].bias, math.log(math.e ** 2.0 - 1.0))
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, x):
        return torch.cat((self.box(x), self.cls(x)), 1)


class DemoDetector(nn.Module):
    """The built-in detector. ``widths`` are the five backbone widths, ``depths`` the C2f repeats."""

    strides = STRIDES

    def __init__(self, num_classes: int = len(CLASS_NAMES), widths: tuple[int, ...] = (16, 32, 64, 128, 256),
                 depths: tuple[int, ...] = (1, 2, 2, 1)):
        super().__init__()
        if len(widths) != 5 or len(depths) != 4:
            raise ValueError(f"widths needs 5 values and depths 4, got {widths} and {depths}")
        self.num_classes = num_classes
        self.backbone = Backbone(tuple(widths), tuple(depths))
        self.neck = Neck(tuple(widths))
        c_box = max(16, widths[2] // 4, 64)
        c_cls = max(widths[2], min(num_classes, 100))
        self.head = nn.ModuleList(
            HeadLevel(c, c_box, c_cls, num_classes, s) for c, s in zip(widths[2:], STRIDES, strict=True)
        )

    def forward(self, x):
        feats = self.neck(*self.backbone(x))
        return torch.cat([h(f).flatten(2) for h, f in zip(self.head, feats, strict=True)], 2)
