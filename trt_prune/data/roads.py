"""``RoadScenes``: a procedurally generated, seeded detection dataset of crude road scenes.

Every image is drawn on the fly from ``(seed, split, index)``, so the dataset needs no files, any length
is free, and the train and val streams never share an image. A scene has a sky and a ground with
gradients, a road with lane markings in perspective, clutter (buildings, wires, blobs, far trees, texture
noise) and objects of the four :data:`~trt_prune.models.demo_detector.CLASS_NAMES`:

- ``car``: body, cabin with windows, wheels, lights; ``truck``: larger and taller, a cargo box and a cab;
- ``pedestrian``: head, torso, arms and legs, tall and thin;
- ``sign``: a circle, triangle or diamond plate on a pole. The label box is the plate only (as in
  traffic-sign data sets); the pole is scenery that can still hide what is behind it.

Unlabelled distractors (trees, lamp posts, bollards, bushes, crates, rectangular billboards) share the
depth ordering. Objects sit on the ground plane: the closer they are to the horizon the smaller they get.
They are painted far to near, so nearer ones hide farther ones; a label box is the full extent of its
object (clipped to the image), and an object less than :data:`MIN_VISIBLE` visible (hidden or cut by the
image border) is drawn but not labelled.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from trt_prune.models.demo_detector import CLASS_NAMES

VAL_LENGTH = 500
TRAIN_LENGTH = 20000
MIN_VISIBLE = 0.4
SPLITS = {"train": 0, "val": 1}

CAR, TRUCK, PEDESTRIAN, SIGN = range(4)
# Relative frequencies of the classes, and of "a distractor instead of an object".
_CLASS_P = np.array([0.38, 0.14, 0.26, 0.22])
_DISTRACTOR_P = 0.3
# Unlabelled parts use this id in the occlusion mask; labelled objects use 1.._MAX_OBJECTS.
_SCENERY_ID = 255
_MAX_OBJECTS = 254

_VEHICLE_PALETTE = np.array([
    (235, 235, 235), (25, 25, 30), (160, 165, 170), (110, 115, 120), (180, 30, 30), (30, 60, 150),
    (20, 110, 60), (220, 180, 40), (120, 70, 40), (200, 90, 20), (90, 30, 110), (60, 150, 190),
], dtype=np.float64)
_SKIN = np.array([(255, 220, 185), (225, 180, 140), (190, 140, 100), (140, 95, 60), (95, 65, 45)],
                 dtype=np.float64)
_SIGN_COLORS = ((200, 20, 25), (25, 70, 180), (240, 200, 20), (245, 245, 245), (30, 140, 60))


def _color(rng: np.random.Generator, base, jitter: float = 20.0) -> tuple[int, int, int]:
    c = np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0.0, jitter, 3), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


def _rand_color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    c = rng.integers(lo, hi, 3)
    return int(c[0]), int(c[1]), int(c[2])


class _Shape:
    """One drawn object: a list of primitives, a depth key, and a label (-1 for scenery).

    Primitives are ``(kind, coords, fill, width, labelled)``; ``labelled`` parts make up the label box
    and the visible-area count, the other parts are scenery (a sign's pole).
    """

    __slots__ = ("prims", "depth", "label")

    def __init__(self, depth: float, label: int):
        self.prims: list[tuple] = []
        self.depth = depth
        self.label = label

    def add(self, kind: str, coords, fill, width: int = 0, labelled: bool = True) -> None:
        self.prims.append((kind, coords, fill, width, labelled))

    def box(self) -> tuple[float, float, float, float]:
        """Extent of the labelled parts, in continuous pixel coordinates (x1, y1 exclusive)."""
        xs: list[float] = []
        ys: list[float] = []
        for kind, coords, _, width, labelled in self.prims:
            if not labelled:
                continue
            pad = width / 2.0 if kind == "line" else 0.0
            cx = coords[0::2]
            cy = coords[1::2]
            xs.extend((min(cx) - pad, max(cx) + pad))
            ys.extend((min(cy) - pad, max(cy) + pad))
        return min(xs), min(ys), max(xs) + 1.0, max(ys) + 1.0


def _paint(draw: ImageDraw.ImageDraw, kind: str, coords, fill, width: int) -> None:
    if kind == "rect":
        draw.rectangle(coords, fill=fill)
    elif kind == "ellipse":
        draw.ellipse(coords, fill=fill)
    elif kind == "poly":
        draw.polygon(coords, fill=fill)
    else:
        draw.line(coords, fill=fill, width=max(1, int(round(width))))


# -- objects ---------------------------------------------------------------------------------------------

def _car(rng, cx: float, yb: float, h: float, depth: float) -> _Shape:
    s = _Shape(depth, CAR)
    w = h * rng.uniform(1.3, 2.5)
    x0, x1 = cx - w / 2, cx + w / 2
    body = _color(rng, _VEHICLE_PALETTE[rng.integers(len(_VEHICLE_PALETTE))])
    dark = tuple(int(v * 0.55) for v in body)
    glass = _color(rng, (60, 80, 100), 25)
    r = h * rng.uniform(0.14, 0.2)
    # Cabin first so that the body overlaps its lower edge.
    cab_lo, cab_hi = x0 + w * rng.uniform(0.12, 0.25), x1 - w * rng.uniform(0.12, 0.3)
    y_cab, y_body = yb - h, yb - h * rng.uniform(0.5, 0.6)
    slope = (cab_hi - cab_lo) * rng.uniform(0.05, 0.2)
    s.add("poly", [cab_lo, y_body, cab_lo + slope, y_cab, cab_hi - slope, y_cab, cab_hi, y_body], body)
    inset = max(1.0, h * 0.08)
    if cab_hi - cab_lo > 4 * inset:
        s.add("poly", [cab_lo + inset, y_body, cab_lo + slope + inset, y_cab + inset,
                       cab_hi - slope - inset, y_cab + inset, cab_hi - inset, y_body], glass)
        if h > 20:
            mid = (cab_lo + cab_hi) / 2
            s.add("line", [mid, y_cab + inset, mid, y_body], body, max(1.0, h * 0.04))
    s.add("rect", [x0, y_body, x1, yb - r * 0.9], body)
    s.add("rect", [x0, yb - r * 1.6, x1, yb - r * 0.9], dark)
    if h > 14:
        lw, lh = w * 0.09, h * 0.07
        s.add("rect", [x0 + 1, y_body + lh, x0 + 1 + lw, y_body + 2 * lh], _color(rng, (255, 240, 180), 10))
        s.add("rect", [x1 - 1 - lw, y_body + lh, x1 - 1, y_body + 2 * lh], _color(rng, (200, 30, 30), 10))
    tyre = _color(rng, (25, 25, 25), 5)
    for wx in (x0 + w * rng.uniform(0.14, 0.22), x1 - w * rng.uniform(0.14, 0.22)):
        s.add("ellipse", [wx - r, yb - 2 * r, wx + r, yb], tyre)
        if r > 3:
            s.add("ellipse", [wx - r * 0.45, yb - r * 1.45, wx + r * 0.45, yb - r * 0.55], (150, 150, 150))
    return s


def _truck(rng, cx: float, yb: float, h: float, depth: float) -> _Shape:
    s = _Shape(depth, TRUCK)
    w = h * rng.uniform(1.1, 2.6)
    x0, x1 = cx - w / 2, cx + w / 2
    r = h * rng.uniform(0.1, 0.14)
    cab_w = min(w * 0.35, h * rng.uniform(0.45, 0.6))
    cab_left = rng.random() < 0.5
    cab_x0, cab_x1 = (x0, x0 + cab_w) if cab_left else (x1 - cab_w, x1)
    box_x0, box_x1 = (cab_x1 + max(1.0, h * 0.03), x1) if cab_left else (x0, cab_x0 - max(1.0, h * 0.03))
    cargo = _color(rng, _VEHICLE_PALETTE[rng.integers(len(_VEHICLE_PALETTE))], 25)
    cab = _color(rng, _VEHICLE_PALETTE[rng.integers(len(_VEHICLE_PALETTE))], 25)
    y_cab = yb - h * rng.uniform(0.6, 0.75)
    s.add("rect", [box_x0, yb - h, box_x1, yb - r * 1.2], cargo)
    if h > 24:
        # Panel seams on the cargo box.
        seam = tuple(int(v * 0.7) for v in cargo)
        for k in range(1, int(rng.integers(2, 5))):
            sx = box_x0 + (box_x1 - box_x0) * k / 4
            s.add("line", [sx, yb - h + 2, sx, yb - r * 1.4], seam, 1)
    s.add("rect", [cab_x0, y_cab, cab_x1, yb - r * 1.2], cab)
    win_inset = max(1.0, cab_w * 0.15)
    s.add("rect", [cab_x0 + win_inset, y_cab + win_inset, cab_x1 - win_inset, y_cab + (yb - y_cab) * 0.45],
          _color(rng, (70, 90, 110), 25))
    s.add("rect", [x0, yb - r * 1.8, x1, yb - r * 1.1], _color(rng, (40, 40, 40), 10))
    tyre = _color(rng, (20, 20, 20), 5)
    n_wheels = 3 if w > 2.0 * h else 2
    for k in range(n_wheels):
        wx = x0 + r * 1.3 + (w - 2.6 * r) * k / (n_wheels - 1)
        s.add("ellipse", [wx - r, yb - 2 * r, wx + r, yb], tyre)
    return s


def _pedestrian(rng, cx: float, yb: float, h: float, depth: float) -> _Shape:
    s = _Shape(depth, PEDESTRIAN)
    w = h * rng.uniform(0.28, 0.4)
    head = h * rng.uniform(0.13, 0.16)
    shirt = _rand_color(rng, 10, 240)
    trousers = _color(rng, _VEHICLE_PALETTE[rng.integers(len(_VEHICLE_PALETTE))], 30)
    top = yb - h
    y_shoulder, y_hip = top + head * 1.05, top + h * rng.uniform(0.5, 0.56)
    torso = w * rng.uniform(0.5, 0.62)
    limb = max(1.0, w * 0.2)
    # Legs: stride varies from standing to walking; keep them inside the width budget.
    spread = w / 2 - limb / 2
    stride = spread * rng.uniform(0.2, 1.0)
    s.add("line", [cx - torso * 0.25, y_hip, cx - stride, yb - limb / 2], trousers, limb)
    s.add("line", [cx + torso * 0.25, y_hip, cx + stride, yb - limb / 2], trousers, limb)
    s.add("poly", [cx - torso / 2, y_shoulder, cx + torso / 2, y_shoulder, cx + torso * 0.42, y_hip,
                   cx - torso * 0.42, y_hip], shirt)
    arm = spread * rng.uniform(0.6, 1.0)
    y_hand = y_shoulder + (y_hip - y_shoulder) * rng.uniform(0.8, 1.1)
    s.add("line", [cx - torso / 2, y_shoulder + limb / 2, cx - arm, y_hand], shirt, limb * 0.8)
    s.add("line", [cx + torso / 2, y_shoulder + limb / 2, cx + arm, y_hand], shirt, limb * 0.8)
    s.add("ellipse", [cx - head / 2, top, cx + head / 2, top + head * 1.1],
          _color(rng, _SKIN[rng.integers(len(_SKIN))], 10))
    if rng.random() < 0.35:
        s.add("rect", [cx - head * 0.55, top, cx + head * 0.55, top + head * 0.35], _rand_color(rng))
    return s


def _sign(rng, cx: float, yb: float, d: float, pole_h: float, depth: float) -> _Shape:
    s = _Shape(depth, SIGN)
    y_c = yb - pole_h - d / 2
    pw = max(1.0, d * 0.1)
    s.add("rect", [cx - pw / 2, y_c, cx + pw / 2, yb], _color(rng, (120, 120, 125), 20), labelled=False)
    outer = _SIGN_COLORS[rng.integers(len(_SIGN_COLORS))]
    inner = (245, 245, 245) if outer != (245, 245, 245) else (200, 20, 25)
    if rng.random() < 0.3:
        inner = _SIGN_COLORS[rng.integers(len(_SIGN_COLORS))]
    shape = rng.integers(3)
    r = d / 2
    k = rng.uniform(0.65, 0.78) if d > 10 else 0.0
    if shape == 0:
        s.add("ellipse", [cx - r, y_c - r, cx + r, y_c + r], _color(rng, outer, 10))
        if k:
            s.add("ellipse", [cx - r * k, y_c - r * k, cx + r * k, y_c + r * k], _color(rng, inner, 10))
    elif shape == 1:
        up = rng.random() < 0.6
        sgn = -1.0 if up else 1.0
        s.add("poly", [cx, y_c + sgn * r, cx + r, y_c - sgn * r, cx - r, y_c - sgn * r], _color(rng, outer, 10))
        if k:
            kk = k * 0.8
            yc2 = y_c - sgn * r * 0.25
            s.add("poly", [cx, yc2 + sgn * r * kk, cx + r * kk, yc2 - sgn * r * kk * 0.7,
                           cx - r * kk, yc2 - sgn * r * kk * 0.7], _color(rng, inner, 10))
    else:
        s.add("poly", [cx, y_c - r, cx + r, y_c, cx, y_c + r, cx - r, y_c], _color(rng, outer, 10))
        if k:
            s.add("poly", [cx, y_c - r * k, cx + r * k, y_c, cx, y_c + r * k, cx - r * k, y_c],
                  _color(rng, inner, 10))
    if d > 16 and rng.random() < 0.5:
        # A glyph in the middle, so plates are not flat discs.
        g = d * 0.12
        s.add("rect", [cx - g, y_c - g * 1.5, cx + g, y_c + g * 1.5], _color(rng, (20, 20, 20), 10))
    return s


def _distractor(rng, cx: float, yb: float, scale: float, depth: float) -> _Shape:
    s = _Shape(depth, -1)
    kind = rng.integers(6)
    if kind == 0:  # tree
        h = scale * rng.uniform(0.8, 1.6)
        tw = max(1.0, h * 0.06)
        s.add("rect", [cx - tw, yb - h * 0.5, cx + tw, yb], _color(rng, (90, 60, 35), 15))
        cw = h * rng.uniform(0.25, 0.45)
        s.add("ellipse", [cx - cw, yb - h, cx + cw, yb - h * 0.35], _color(rng, (45, 110, 45), 25))
    elif kind == 1:  # lamp post
        h = scale * rng.uniform(1.0, 1.8)
        pw = max(1.0, h * 0.025)
        col = _color(rng, (90, 95, 100), 15)
        s.add("rect", [cx - pw, yb - h, cx + pw, yb], col)
        arm = h * 0.15 * (1 if rng.random() < 0.5 else -1)
        s.add("line", [cx, yb - h, cx + arm, yb - h], col, pw * 1.5)
    elif kind == 2:  # bollard
        h = scale * rng.uniform(0.2, 0.35)
        bw = max(1.0, h * 0.2)
        s.add("rect", [cx - bw, yb - h, cx + bw, yb], _color(rng, (200, 200, 200), 40))
        s.add("rect", [cx - bw, yb - h * 0.8, cx + bw, yb - h * 0.65], _color(rng, (200, 40, 40), 20))
    elif kind == 3:  # bush
        h = scale * rng.uniform(0.2, 0.45)
        for _ in range(int(rng.integers(2, 5))):
            ox, oy = rng.uniform(-h, h), rng.uniform(-h * 0.3, 0)
            r = h * rng.uniform(0.35, 0.6)
            s.add("ellipse", [cx + ox - r, yb + oy - 2 * r, cx + ox + r, yb + oy], _color(rng, (60, 120, 50), 25))
    elif kind == 4:  # crate or bin
        h = scale * rng.uniform(0.2, 0.45)
        w = h * rng.uniform(0.6, 1.6)
        s.add("rect", [cx - w / 2, yb - h, cx + w / 2, yb], _rand_color(rng, 30, 220))
    else:  # billboard: a rectangular plate on two posts, a near miss for "sign"
        h = scale * rng.uniform(0.25, 0.5)
        w = h * rng.uniform(1.0, 2.2)
        post = max(1.0, h * 0.05)
        col = _color(rng, (110, 110, 110), 15)
        s.add("rect", [cx - w * 0.35 - post, yb - h, cx - w * 0.35 + post, yb], col)
        s.add("rect", [cx + w * 0.35 - post, yb - h, cx + w * 0.35 + post, yb], col)
        s.add("rect", [cx - w / 2, yb - h * 1.6, cx + w / 2, yb - h * 0.8], _rand_color(rng, 20, 240))
    return s


# -- scene -----------------------------------------------------------------------------------------------

def _background(rng, hgt: int, wid: int) -> tuple[Image.Image, int, float, float]:
    """Sky and ground gradients; returns the image, the horizon row, the vanishing x, the road half-width."""
    horizon = int(hgt * rng.uniform(0.28, 0.5))
    img = np.empty((hgt, wid, 3), dtype=np.float32)
    sky_top = np.array(_color(rng, (90, 140, 210), 35), dtype=np.float32)
    sky_low = np.array(_color(rng, (190, 205, 220), 30), dtype=np.float32)
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None, None]
    img[:horizon] = sky_top * (1 - t) + sky_low * t
    g_far = np.array(_color(rng, (120, 125, 95), 30), dtype=np.float32)
    g_near = np.array(_color(rng, (80, 95, 60), 30), dtype=np.float32)
    t = np.linspace(0.0, 1.0, hgt - horizon, dtype=np.float32)[:, None, None]
    img[horizon:] = g_far * (1 - t) + g_near * t
    im = Image.fromarray(img.astype(np.uint8), "RGB")
    vx = wid * rng.uniform(0.25, 0.75)
    half = wid * rng.uniform(0.35, 0.9)
    return im, horizon, vx, half


def _scenery(rng, draw: ImageDraw.ImageDraw, hgt: int, wid: int, horizon: int, vx: float, half: float) -> None:
    """Buildings, far trees, the road with its markings, blobs and wires: never labelled, never occluding."""
    # Buildings and far tree lines standing on the horizon.
    for _ in range(int(rng.integers(0, 9))):
        bw = wid * rng.uniform(0.04, 0.2)
        bh = horizon * rng.uniform(0.1, 0.8)
        bx = rng.uniform(-bw / 2, wid)
        col = _color(rng, (140, 130, 120), 45)
        draw.rectangle([bx, horizon - bh, bx + bw, horizon], fill=col)
        if bh > 20 and bw > 12 and rng.random() < 0.7:
            win = _color(rng, (60, 70, 90) if rng.random() < 0.7 else (230, 220, 150), 20)
            step = max(5.0, bw / rng.integers(2, 5))
            for wy in np.arange(horizon - bh + 3, horizon - 4, step)[:8]:
                draw.line([bx + 2, wy, bx + bw - 2, wy], fill=win, width=max(1, int(step * 0.4)))
    for _ in range(int(rng.integers(0, 5))):
        r = wid * rng.uniform(0.01, 0.05)
        tx = rng.uniform(0, wid)
        draw.ellipse([tx - r, horizon - 2 * r, tx + r, horizon + 1], fill=_color(rng, (50, 90, 50), 20))
    # Road: a trapezoid towards the vanishing point, with edge lines and dashed lanes.
    top = max(1.0, half * 0.02)
    road = _color(rng, (95, 95, 100), 25)
    draw.polygon([vx - top, horizon, vx + top, horizon, vx + half, hgt, vx - half, hgt], fill=road)
    if rng.random() < 0.7:
        side = _color(rng, (170, 165, 155), 20)
        draw.polygon([vx - top, horizon, vx - top * 1.6, horizon, vx - half * 1.5, hgt, vx - half, hgt], fill=side)
        draw.polygon([vx + top, horizon, vx + top * 1.6, horizon, vx + half * 1.5, hgt, vx + half, hgt], fill=side)
    paint = _color(rng, (240, 240, 235) if rng.random() < 0.8 else (240, 200, 40), 10)
    depth = hgt - horizon
    for u in (-0.95, 0.95):
        draw.line([vx + u * top, horizon, vx + u * half, hgt], fill=paint, width=max(1, int(wid * 0.006)))
    n_lanes = int(rng.integers(1, 4))
    for k in range(1, n_lanes + 1):
        u = -1 + 2 * k / (n_lanes + 1)
        # Dashes evenly spaced on the ground: in the image their spacing shrinks towards the horizon.
        t = rng.uniform(0.02, 0.1)
        while t < 1.0:
            t_end = min(1.0, t * 1.25)
            ya, yb_ = horizon + depth * t, horizon + depth * t_end
            xa = vx + u * (top + (half - top) * t)
            xb = vx + u * (top + (half - top) * t_end)
            draw.line([xa, ya, xb, yb_], fill=paint, width=max(1, int(wid * 0.012 * t_end)))
            t = t_end * 1.3
    # Ground blobs (puddles, patches) and wires across the sky.
    for _ in range(int(rng.integers(0, 7))):
        y = rng.uniform(horizon, hgt)
        sc = (y - horizon) / depth
        rx, ry = wid * rng.uniform(0.01, 0.08) * (0.2 + sc), hgt * rng.uniform(0.005, 0.03) * (0.2 + sc)
        x = rng.uniform(0, wid)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=_rand_color(rng, 30, 200))
    for _ in range(int(rng.integers(0, 5))):
        draw.line([rng.uniform(-wid * 0.2, wid * 1.2), rng.uniform(0, horizon * 1.2),
                   rng.uniform(-wid * 0.2, wid * 1.2), rng.uniform(0, horizon * 1.2)],
                  fill=_rand_color(rng, 0, 120), width=int(rng.integers(1, 3)))


def _place(rng, hgt: int, wid: int, horizon: int, vx: float, half: float, depth_rows: float) -> list[_Shape]:
    """Objects and distractors on the ground plane, sized by their distance below the horizon."""
    shapes: list[_Shape] = []
    limit = min(hgt, wid) / 3.0
    n = int(rng.integers(0, 20))
    for _ in range(n):
        # Biased towards the horizon: more small, far objects, as on a real road.
        u = rng.random() ** 1.4
        yb = horizon + 2 + (hgt * 1.03 - horizon - 2) * u
        dist = yb - horizon  # image height of a ground-plane object scales with this
        road_half = half * dist / depth_rows

        def across(lo: float, hi: float, road_half: float = road_half) -> float:
            # Keep the centre inside the image: the border may cut an object, but not swallow it.
            return float(np.clip(vx + road_half * rng.uniform(lo, hi), wid * 0.02, wid * 0.98))

        if rng.random() < _DISTRACTOR_P:
            shapes.append(_distractor(rng, across(-3.0, 3.0), yb, min(dist * 0.6, limit * 1.3), yb))
            continue
        cls = int(rng.choice(4, p=_CLASS_P))
        jit = rng.uniform(0.75, 1.25)
        if cls == CAR:
            h = min(dist * 0.32 * jit, limit * 0.75)
            if h < 8:
                continue
            shapes.append(_car(rng, across(-0.9, 0.9), yb, h, yb))
        elif cls == TRUCK:
            h = min(dist * 0.48 * jit, limit)
            if h < 10:
                continue
            shapes.append(_truck(rng, across(-0.9, 0.9), yb, h, yb))
        elif cls == PEDESTRIAN:
            h = min(dist * 0.42 * jit, limit)
            if h < 14:
                continue
            shapes.append(_pedestrian(rng, across(-2.2, 2.2), yb, h, yb))
        else:
            d = min(dist * 0.17 * jit, limit * 0.6)
            if d < 8:
                continue
            cx = across(1.0, 1.9) if rng.random() < 0.5 else across(-1.9, -1.0)
            shapes.append(_sign(rng, cx, yb, d, dist * rng.uniform(0.25, 0.45), yb))
    shapes.sort(key=lambda s: s.depth)
    return shapes[:_MAX_OBJECTS]


def _noise(rng, im: Image.Image) -> np.ndarray:
    """Low-frequency shading, fine grain and a global brightness/contrast change; returns uint8 [H, W, 3]."""
    hgt, wid = im.height, im.width
    arr = np.asarray(im, dtype=np.float32)
    low = rng.normal(0.0, 12.0, (hgt // 32 + 1, wid // 32 + 1)).astype(np.float32)
    # Upsampling a tiny field through PIL is far cheaper than generating full-size smooth noise.
    shade = np.asarray(Image.fromarray(low, "F").resize((wid, hgt), Image.BILINEAR))
    grain = rng.standard_normal((hgt, wid, 1), dtype=np.float32)
    grain *= rng.uniform(2.0, 9.0)
    gain = rng.uniform(0.7, 1.2)
    # +0.5: the uint8 cast truncates, this makes it round.
    bias = rng.uniform(-20, 20) + 0.5
    # In place: this is the costliest step of a scene.
    arr += shade[..., None]
    arr += grain
    arr *= gain
    arr += bias
    return np.clip(arr, 0.0, 255.0, out=arr).astype(np.uint8)


def render_scene(rng: np.random.Generator, hgt: int, wid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one scene; returns ``(image [H,W,3] uint8, boxes [n,4] xyxy float32, labels [n] int64)``."""
    im, horizon, vx, half = _background(rng, hgt, wid)
    draw = ImageDraw.Draw(im)
    _scenery(rng, draw, hgt, wid, horizon, vx, half)
    shapes = _place(rng, hgt, wid, horizon, vx, half, float(hgt - horizon))

    mask = Image.new("L", (wid, hgt), 0)
    mdraw = ImageDraw.Draw(mask)
    full: dict[int, tuple[int, tuple[float, float, float, float]]] = {}
    for k, shape in enumerate(shapes, start=1):
        obj_id = k if shape.label >= 0 else _SCENERY_ID
        for kind, coords, fill, width, labelled in shape.prims:
            _paint(draw, kind, coords, fill, width)
            _paint(mdraw, kind, coords, obj_id if labelled else _SCENERY_ID, width)
        if shape.label < 0:
            continue
        box = shape.box()
        # Nothing nearer is drawn yet, so the object's own in-image area is what the mask holds now.
        crop = (max(0, int(box[0])), max(0, int(box[1])), min(wid, int(np.ceil(box[2]))),
                min(hgt, int(np.ceil(box[3]))))
        if crop[2] <= crop[0] or crop[3] <= crop[1]:
            continue
        area = int(np.count_nonzero(np.asarray(mask.crop(crop)) == k))
        if area:
            full[k] = (area, box)

    visible = np.bincount(np.asarray(mask).ravel(), minlength=256)
    boxes, labels = [], []
    for k, (area, box) in full.items():
        x0, y0, x1, y1 = box
        cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(wid), x1), min(float(hgt), y1)
        if cx1 - cx0 < 2 or cy1 - cy0 < 2:
            continue
        # Hidden by nearer things, and cut by the border (the crop only counted in-image pixels).
        inside = (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))
        if visible[k] / area * inside < MIN_VISIBLE:
            continue
        boxes.append((cx0, cy0, cx1, cy1))
        labels.append(shapes[k - 1].label)

    image = _noise(rng, im)
    return (image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))


def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, (int, np.integer)) for v in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise ValueError(f"size must be an int or an (h, w) pair of ints, got {size!r}")
    if min(hw) <= 0 or hw[0] % 32 or hw[1] % 32:
        raise ValueError(f"size must be a positive multiple of 32 (e.g. 320 or (256, 416)), got {size!r}")
    return hw


class RoadScenes(torch.utils.data.Dataset):
    """Procedural road scenes with boxes of cars, trucks, pedestrians and signs.

    ``split`` is ``"train"`` or ``"val"``; ``length`` defaults to 20000 (train) or :data:`VAL_LENGTH`
    (val); ``size`` is an int or ``(h, w)``, multiples of 32. Item ``i`` depends only on
    ``(seed, split, i)``: it is ``(image, target)`` with ``image`` a float32 ``[3, H, W]`` tensor in
    [0, 1] and ``target = {"boxes": float32 [n, 4] xyxy pixels, "labels": int64 [n]}``.

    Scenes are 8-bit, like camera images. ``uint8=True`` returns them as uint8 ``[3, H, W]`` (0..255,
    the float image times 255): a quarter of the memory between DataLoader workers and of the host-to-GPU
    copy; divide by 255 on the device.
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(self, split: str = "train", length: int | None = None, size=320, seed: int = 0,
                 uint8: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if length is None:
            length = VAL_LENGTH if split == "val" else TRAIN_LENGTH
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.split = split
        self.length = int(length)
        self.size = _parse_size(size)
        self.seed = int(seed)
        self.uint8 = bool(uint8)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for RoadScenes of length {self.length}")
        rng = np.random.default_rng((self.seed, SPLITS[self.split], int(index)))
        image, boxes, labels = render_scene(rng, *self.size)
        tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        if not self.uint8:
            tensor = tensor.float().div_(255.0)
        return tensor, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}

    def __repr__(self) -> str:
        return f"RoadScenes(split={self.split!r}, length={self.length}, size={self.size}, seed={self.seed})"


def collate_detection(batch):
    """Stack images of one size into ``[B, 3, H, W]`` and keep the targets as a list of dicts."""
    images, targets = zip(*batch, strict=True)
    return torch.stack(images, 0), list(targets)
