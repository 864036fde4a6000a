"""A small anchor-free detector in the style of YOLOv8/YOLO11, built from scratch for the pruning and export tests
(:mod:`test_detector_heads`): the parts real deployment teams have that used to stop pruning.

- backbone: Conv (conv + BatchNorm + SiLU) downsamplings, C2f blocks (1×1 conv, ``chunk(2, 1)``, a chain of
  bottlenecks on the second half, ``cat`` of every part, 1×1 conv) and an SPPF (max-pool chain + ``cat``);
- a C2PSA-style attention block on the stride-32 map: 1×1 conv, ``chunk(2, 1)``, on one half multi-head
  self-attention written out (q, k, v from one 1×1 conv, ``view`` into heads, q·kᵀ, softmax, ·v, a depthwise
  positional conv on v, a projection, a residual) and a conv FFN with a residual, ``cat``, 1×1 conv;
- an FPN/PAN neck: nearest upsampling and ``cat`` top-down, stride-2 convs and ``cat`` bottom-up;
- decoupled heads per level (a box branch ending in ``4 * reg_max`` channels, a class branch ending in
  ``num_classes``), concatenated on the channel axis per level, flattened and concatenated over levels;
- an integral (DFL) box decoder as Ultralytics writes it: ``view(B, 4, reg_max, A).transpose(2, 1).softmax(1)``,
  a fixed 1×1 conv whose weights are ``arange(reg_max)`` (``requires_grad=False``), giving 4 distances per anchor.

Output: ``[B, 4 + num_classes, A]``, like YOLOv8's exported head: xyxy boxes in input pixels (anchor point ∓ the
distances, times the stride) and sigmoid class scores; ``A`` runs over the levels (strides 8, 16, 32), each
row-major. The model declares that format in ``trt_prune_decoded_boxes`` (read by ``export --nms``).
"""

from __future__ import annotations

import torch
from torch import nn

STRIDES = (8, 16, 32)


class Conv(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + SiLU (or no activation)."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """YOLOv8's C2f: split the 1×1 conv's output in two halves, run ``n`` bottlenecks on the second, one after the
    other, and join every intermediate result."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        c = c2 // 2
        self.cv1 = Conv(c1, 2 * c, 1)
        self.m = nn.ModuleList(Bottleneck(c, shortcut) for _ in range(n))
        self.cv2 = Conv((2 + n) * c, c2, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int):
        super().__init__()
        c = c1 // 2
        self.cv1 = Conv(c1, c, 1)
        self.cv2 = Conv(4 * c, c2, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.pool(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class Attention(nn.Module):
    """Multi-head self-attention over the positions of a feature map, written out as Ultralytics' PSA does: one 1×1
    conv viewed as ``[B, heads, 3 * head_dim, H·W]`` and split into q, k, v on dim 2; softmax(qᵀk · scale) weighs
    v; a depthwise 3×3 conv on v adds position information; a 1×1 projection. Head widths come from the tensors
    (``view(B, heads, -1, N)``, ``chunk(3, 2)``), so the block runs after pruning."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = Conv(dim, 3 * dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, groups=dim, act=False)
        self.proj = Conv(dim, dim, 1, act=False)

    def forward(self, x):
        b, _, h, w = x.shape
        n = h * w
        q, k, v = self.qkv(x).view(b, self.heads, -1, n).chunk(3, 2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(-1)
        out = (v @ attn.transpose(-2, -1)).reshape(b, -1, h, w) + self.pe(v.reshape(b, -1, h, w))
        return self.proj(out)


class C2PSA(nn.Module):
    """YOLO11's C2PSA with one PSA block: attention and a conv FFN, each with a residual, on one half."""

    def __init__(self, c: int, heads: int = 2):
        super().__init__()
        self.c = c // 2
        self.cv1 = Conv(c, 2 * self.c, 1)
        self.attn = Attention(self.c, heads)
        self.ffn = nn.Sequential(Conv(self.c, 2 * self.c, 1), Conv(2 * self.c, self.c, 1, act=False))
        self.cv2 = Conv(2 * self.c, c, 1)

    def forward(self, x):
        a, b = self.cv1(x).chunk(2, 1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class DFL(nn.Module):
    """Integral box regression (distribution focal loss): softmax over ``reg_max`` bins, expectation by a fixed
    1×1 conv over the bins (weights ``0 … reg_max-1``, not trained), as Ultralytics' DFL does."""

    def __init__(self, reg_max: int = 16):
        super().__init__()
        self.reg_max = reg_max
        self.conv = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(reg_max, dtype=torch.float32).view(1, reg_max, 1, 1))

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class DetectHead(nn.Module):
    """Decoupled heads per level (``box.i``: 4·reg_max distance bins, ``cls.i``: class logits), joined per level on
    the channel axis and over levels on the anchor axis, then DFL-decoded into xyxy pixel boxes."""

    def __init__(self, channels: tuple[int, ...], num_classes: int = 4, reg_max: int = 16, width: int = 32):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.no = 4 * reg_max + num_classes
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, width, 3), Conv(width, width, 3), nn.Conv2d(width, 4 * reg_max, 1))
            for c in channels)
        self.cls = nn.ModuleList(
            nn.Sequential(Conv(c, width, 3), Conv(width, width, 3), nn.Conv2d(width, num_classes, 1))
            for c in channels)
        self.dfl = DFL(reg_max)

    def forward(self, feats):
        b = feats[0].shape[0]
        outs = [torch.cat((box(f), cls(f)), 1) for f, box, cls in zip(feats, self.box, self.cls, strict=True)]
        points, strides = [], []
        for f, s in zip(feats, STRIDES, strict=True):  # anchor centres in grid units, as make_anchors does
            h, w = f.shape[2:]
            ys = torch.arange(h, dtype=f.dtype, device=f.device) + 0.5
            xs = torch.arange(w, dtype=f.dtype, device=f.device) + 0.5
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack((gx, gy), 0).view(2, -1))
            strides.append(torch.full((1, h * w), float(s), dtype=f.dtype, device=f.device))
        points, strides = torch.cat(points, 1), torch.cat(strides, 1)
        x = torch.cat([o.view(b, self.no, -1) for o in outs], 2)
        box, cls = x.split((4 * self.reg_max, self.num_classes), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        boxes = torch.cat((points - lt, points + rb), 1) * strides
        return torch.cat((boxes, cls.sigmoid()), 1)


class HardDetector(nn.Module):
    """Backbone (C2f, SPPF, C2PSA) → FPN/PAN neck → decoupled DFL heads at strides 8, 16, 32."""

    #: the output is ``[B, 4 + C, A]``: xyxy boxes in input pixels, then class probabilities
    trt_prune_decoded_boxes = "xyxy"
    strides = STRIDES

    def __init__(self, num_classes: int = 4, reg_max: int = 16, widths=(16, 32, 48, 64, 96), head_width: int = 32):
        super().__init__()
        self.num_classes = num_classes
        c1, c2, c3, c4, c5 = widths
        self.stem = Conv(3, c1, 3, 2)  # /2
        self.down1 = Conv(c1, c2, 3, 2)  # /4
        self.c2f1 = C2f(c2, c2, 1)
        self.down2 = Conv(c2, c3, 3, 2)  # /8  P3
        self.c2f2 = C2f(c3, c3, 2)
        self.down3 = Conv(c3, c4, 3, 2)  # /16 P4
        self.c2f3 = C2f(c4, c4, 1)
        self.down4 = Conv(c4, c5, 3, 2)  # /32 P5
        self.c2f4 = C2f(c5, c5, 1)
        self.sppf = SPPF(c5, c5)
        self.psa = C2PSA(c5, heads=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.td4 = C2f(c5 + c4, c4, 1, shortcut=False)  # top-down, stride 16
        self.td3 = C2f(c4 + c3, c3, 1, shortcut=False)  # top-down, stride 8: N3
        self.bu3 = Conv(c3, c3, 3, 2)
        self.pan4 = C2f(c3 + c4, c4, 1, shortcut=False)  # bottom-up, stride 16: N4
        self.bu4 = Conv(c4, c4, 3, 2)
        self.pan5 = C2f(c4 + c5, c5, 1, shortcut=False)  # bottom-up, stride 32: N5
        self.head = DetectHead((c3, c4, c5), num_classes, reg_max, head_width)

    def forward(self, x):
        x = self.c2f1(self.down1(self.stem(x)))
        p3 = self.c2f2(self.down2(x))
        p4 = self.c2f3(self.down3(p3))
        p5 = self.psa(self.sppf(self.c2f4(self.down4(p4))))
        t4 = self.td4(torch.cat((self.up(p5), p4), 1))
        n3 = self.td3(torch.cat((self.up(t4), p3), 1))
        n4 = self.pan4(torch.cat((self.bu3(n3), t4), 1))
        n5 = self.pan5(torch.cat((self.bu4(n4), p5), 1))
        return self.head([n3, n4, n5])


def build(seed: int = 0, num_classes: int = 4) -> HardDetector:
    """A :class:`HardDetector` in eval mode with seeded random weights, BatchNorm statistics measured on random
    images (so activations keep unit scale through the depth and the outputs depend on the image, not only on
    the biases: near-equal scores would make NMS's choices turn on the last bit of a float) and random BatchNorm
    scales and shifts, so that cutting or reordering a norm's tensors wrongly changes the outputs."""
    torch.manual_seed(seed)
    model = HardDetector(num_classes)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.momentum = None  # a cumulative average over the calibration batch
        model.train()
        model(torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(seed)))
        for m in norms:
            m.momentum = 0.1
    return model.eval()
