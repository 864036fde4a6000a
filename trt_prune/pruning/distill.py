"""Knowledge-distillation losses to add to your own training loss while a pruned model is fine-tuned.

The pruned model is the *student*; a frozen copy of the dense model taken before pruning is the *teacher*.
Matching the teacher's outputs recovers accuracy faster than training on labels alone, because every location
and every class carries a soft target, not only the labelled boxes.

* :func:`kl_logits` — the classifier term of Hinton et al.: ``KL(softmax(t/T) || softmax(s/T)) * T**2``.
* :class:`DetectorDistillLoss` — for sigmoid-style one-stage detectors (YOLO/FCOS-like): per pyramid level, a
  soft binary cross-entropy on the class logits plus a box regression term weighted by the teacher's
  confidence, so that background locations do not dominate.
* :func:`level_sizes_for` — locations per level for an input size and the level strides.

The teacher is always detached: no gradient ever reaches it.

Example::

    teacher = copy.deepcopy(dense).eval().requires_grad_(False)
    student = prune(dense, config).model.train()
    distill = DetectorDistillLoss(level_sizes=level_sizes_for((320, 320), (8, 16, 32)))
    for images, targets in loader:
        out = student(images)
        with torch.no_grad():
            ref = teacher(images)
        loss = task_loss(out, targets) + 0.5 * distill(out, ref)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log(distill.last_parts)  # {"cls/0": ..., "box/0": ..., "cls/1": ..., ...}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PruneError

__all__ = ["DetectorDistillLoss", "kl_logits", "level_sizes_for"]

REDUCTIONS = ("batchmean", "sum", "mean", "none")
BOX_LOSSES = ("l1", "smooth_l1", "mse")
DEFAULT_STRIDES = (8, 16, 32)
_EPS = 1e-6


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise PruneError(f"distillation temperature must be a finite number > 0, got {temperature!r}; "
                         "use 1.0 for plain matching or 2-8 for softer targets")
    return float(temperature)


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PruneError(f"{name} must be a finite number >= 0, got {value!r}; use 0 to switch a term off")
    return float(value)


def _check_float_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PruneError(f"{name} must be a torch.Tensor, got {type(t).__name__}; pass the model's raw output")
    if not t.is_floating_point():
        raise PruneError(f"{name} must be a floating-point tensor (logits), got dtype {t.dtype}; "
                         "pass the raw outputs, not labels or indices")
    return t


def kl_logits(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0,
              reduction: str = "batchmean") -> torch.Tensor:
    """Classifier distillation term ``KL(softmax(teacher/T) || softmax(student/T)) * T**2`` (Hinton et al.).

    ``student`` and ``teacher`` are logits of the same shape, at least 2-D, classes on axis 1 (``[B, C]``, or
    ``[B, C, H, W]`` for dense prediction). The ``T**2`` factor keeps gradient magnitudes comparable across
    temperatures. Computed from log-softmax in float32; the teacher is detached.

    ``reduction``: ``"batchmean"`` (sum divided by the batch size ``B``: the true KL per sample),
    ``"sum"``, ``"mean"`` (over every element, which also divides by the class count) or ``"none"``
    (per-element terms, the input's shape).
    """
    _check_float_tensor("student", student)
    _check_float_tensor("teacher", teacher)
    if student.shape != teacher.shape:
        raise PruneError(f"student and teacher logits differ in shape: student {tuple(student.shape)}, "
                         f"teacher {tuple(teacher.shape)}; distil outputs of the same head on the same batch")
    if student.dim() < 2:
        raise PruneError(f"logits need at least 2 dimensions [batch, classes, ...], got shape "
                         f"{tuple(student.shape)}; add the batch axis (e.g. logits.unsqueeze(0))")
    T = _check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise PruneError(f"unknown reduction {reduction!r}; use one of {', '.join(REDUCTIONS)}")
    log_p_t = F.log_softmax(teacher.detach().float() / T, dim=1)
    log_p_s = F.log_softmax(student.float() / T, dim=1)
    terms = log_p_t.exp() * (log_p_t - log_p_s) * (T * T)
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    return terms.sum() / student.shape[0]


def level_sizes_for(input_hw: Sequence[int], strides: Sequence[int] = DEFAULT_STRIDES) -> list[int]:
    """Locations per pyramid level, ``(H / s) * (W / s)`` for each stride ``s``, finest first.

    ``input_hw`` is the network input's ``(H, W)``; both must be multiples of every stride (the demo detector
    needs multiples of 32). ``level_sizes_for((320, 320))`` is ``[1600, 400, 100]``.
    """
    try:
        h, w = (int(v) for v in input_hw)
        ok = all(int(v) == v for v in input_hw)
    except (TypeError, ValueError):
        h = w = 0
        ok = False
    if not ok or h <= 0 or w <= 0:
        raise PruneError(f"input_hw must be two positive integers (height, width), got {input_hw!r}")
    try:
        steps = [int(s) for s in strides]
    except (TypeError, ValueError):
        steps = []
    if not steps or any(s <= 0 for s in steps):
        raise PruneError(f"strides must be one or more positive integers, got {strides!r}; e.g. (8, 16, 32)")
    strides = steps
    for s in strides:
        if h % s or w % s:
            raise PruneError(f"input {h}x{w} is not a multiple of stride {s}; resize the input to a multiple of "
                             f"{max(strides)} or pass level_sizes explicitly")
    return [(h // s) * (w // s) for s in strides]


def _infer_level_sizes(n: int, strides: Sequence[int]) -> list[int]:
    """Level sizes for ``n`` concatenated locations: with ``H`` and ``W`` multiples of every stride, level ``i``
    has ``H*W / s_i**2`` locations, so ``H*W`` follows from ``n`` alone."""
    scale = max(strides) ** 2
    units = sum(scale // (s * s) for s in strides)  # locations per (max stride)**2 pixels of input
    if n % units == 0:
        area = n // units * scale
        sizes = [area // (s * s) for s in strides]
        if sum(sizes) == n and all(area % (s * s) == 0 for s in strides):
            return sizes
    raise PruneError(f"cannot split {n} locations into levels of strides {tuple(strides)}; pass "
                     "level_sizes=level_sizes_for((H, W), strides) or the per-level counts explicitly")


class DetectorDistillLoss(nn.Module):
    """Distillation loss between a student and a teacher one-stage detector with sigmoid class outputs.

    ``forward(student, teacher)`` takes either

    (a) one tensor ``[B, box_channels + num_classes, N]`` (the built-in demo detector's raw output): channels
        ``0..box_channels-1`` are box regressions, the rest class logits, and ``N`` concatenates the levels'
        flattened grids, finest first. ``level_sizes`` splits ``N``; when it is None the sizes are derived from
        ``N`` and ``strides`` (correct whenever the input is a multiple of the coarsest stride); or
    (b) a list of per-level ``(box, cls)`` pairs of any shape, box channels and class logits on axis 1 and the
        same batch and spatial axes (``[B, 4, H, W]`` and ``[B, C, H, W]``, say).

    Per level:

    * class term: ``BCE_with_logits(s / T, sigmoid(t / T))`` averaged over elements, times ``T**2`` (as in
      :func:`kl_logits`; both sides are scaled so the optimum stays at ``s == t``). When student equals
      teacher this is the entropy of the teacher's probabilities, not zero; its gradient is zero.
    * box term: the ``box_loss`` (``l1``, ``smooth_l1`` with beta 1, or ``mse``) between the raw box outputs,
      summed over box channels, then averaged over locations weighted by the teacher's highest class
      probability ``max_c sigmoid(t)`` when ``weight_by_teacher`` (else uniformly): ``sum(w*l) / (sum(w)+eps)``.

    Total: ``sum_levels level_weight * (cls_weight * cls + box_weight * box)``. After each call ``last_parts``
    holds the unweighted per-level terms as floats, ``{"cls/0": ..., "box/0": ..., ...}``, for logging.
    """

    level_sizes_for = staticmethod(level_sizes_for)

    def __init__(self, box_channels: int = 4, level_sizes: Sequence[int] | None = None, cls_weight: float = 1.0,
                 box_weight: float = 1.0, level_weights: Sequence[float] | None = None, temperature: float = 1.0,
                 box_loss: str = "l1", weight_by_teacher: bool = True,
                 strides: Sequence[int] = DEFAULT_STRIDES):
        super().__init__()
        if isinstance(box_channels, bool) or not isinstance(box_channels, int) or box_channels < 1:
            raise PruneError(f"box_channels must be an integer >= 1, got {box_channels!r}; the demo detector "
                             "uses 4 (left, top, right, bottom)")
        self.box_channels = box_channels
        if level_sizes is not None:
            sizes = list(level_sizes)
            if not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in sizes):
                raise PruneError(f"level_sizes must be positive integers (locations per level), got "
                                 f"{level_sizes!r}; see level_sizes_for((H, W), strides)")
            level_sizes = sizes
        self.level_sizes = level_sizes
        self.cls_weight = _check_weight("cls_weight", cls_weight)
        self.box_weight = _check_weight("box_weight", box_weight)
        if level_weights is not None:
            level_weights = [_check_weight(f"level_weights[{i}]", w) for i, w in enumerate(level_weights)]
            if not level_weights:
                raise PruneError("level_weights is empty; give one weight per level or None for all 1.0")
        self.level_weights = level_weights
        self.temperature = _check_temperature(temperature)
        if box_loss not in BOX_LOSSES:
            raise PruneError(f"unknown box_loss {box_loss!r}; use one of {', '.join(BOX_LOSSES)}")
        self.box_loss = box_loss
        self.weight_by_teacher = bool(weight_by_teacher)
        try:
            self.strides = tuple(int(s) for s in strides)
        except (TypeError, ValueError):
            self.strides = ()
        if not self.strides or any(s <= 0 for s in self.strides):
            raise PruneError(f"strides must be one or more positive integers, got {strides!r}; e.g. (8, 16, 32)")
        self.last_parts: dict[str, float] = {}

    # -- input layouts ----------------------------------------------------------------------------------------

    def _split_concat(self, student: torch.Tensor, teacher: torch.Tensor):
        _check_float_tensor("student", student)
        _check_float_tensor("teacher", teacher)
        if student.shape != teacher.shape:
            raise PruneError(f"student and teacher outputs differ in shape: student {tuple(student.shape)}, "
                             f"teacher {tuple(teacher.shape)}; run both models on the same batch and input size")
        if student.dim() != 3:
            raise PruneError(f"a single output tensor must be [B, box_channels + num_classes, N], got shape "
                             f"{tuple(student.shape)}; pass a list of per-level (box, cls) pairs for other layouts")
        channels, n = student.shape[1], student.shape[2]
        if self.box_channels >= channels:
            raise PruneError(f"box_channels={self.box_channels} leaves no class channels in an output with "
                             f"{channels} channels; set box_channels to the number of box outputs (4 for the "
                             "demo detector)")
        sizes = self.level_sizes if self.level_sizes is not None else _infer_level_sizes(n, self.strides)
        if sum(sizes) != n:
            raise PruneError(f"level_sizes {sizes} sum to {sum(sizes)} but the output has N={n} locations; "
                             "use level_sizes_for((H, W), strides) for the input size actually used")
        b = self.box_channels
        pairs = []
        for s_lvl, t_lvl in zip(student.split(sizes, dim=2), teacher.split(sizes, dim=2), strict=True):
            pairs.append(((s_lvl[:, :b], s_lvl[:, b:]), (t_lvl[:, :b], t_lvl[:, b:])))
        return pairs

    def _pair_levels(self, student, teacher):
        if not isinstance(teacher, (list, tuple)):
            raise PruneError(f"student is a list of per-level (box, cls) pairs but teacher is a "
                             f"{type(teacher).__name__}; pass both in the same layout")
        if len(student) != len(teacher):
            raise PruneError(f"student has {len(student)} levels but teacher has {len(teacher)}; pass the same "
                             "pyramid levels for both")
        if not student:
            raise PruneError("no levels given; pass one (box, cls) pair per pyramid level")
        pairs = []
        for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
            for who, pair in (("student", s), ("teacher", t)):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise PruneError(f"{who} level {i} must be a (box, cls) pair of tensors, got "
                                     f"{type(pair).__name__}")
            for j, part in enumerate(("box", "cls")):
                _check_float_tensor(f"student level {i} {part}", s[j])
                _check_float_tensor(f"teacher level {i} {part}", t[j])
                if s[j].shape != t[j].shape:
                    raise PruneError(f"level {i} {part} outputs differ in shape: student {tuple(s[j].shape)}, "
                                     f"teacher {tuple(t[j].shape)}; run both models on the same batch and "
                                     "input size")
                if s[j].dim() < 2:
                    raise PruneError(f"level {i} {part} needs at least 2 dimensions [B, channels, ...], got "
                                     f"shape {tuple(s[j].shape)}")
            box, cls = s
            if box.shape[0] != cls.shape[0] or box.shape[2:] != cls.shape[2:]:
                raise PruneError(f"level {i} box {tuple(box.shape)} and cls {tuple(cls.shape)} must share the "
                                 "batch and location axes (all but axis 1)")
            pairs.append((tuple(s), tuple(t)))
        return pairs

    # -- loss -------------------------------------------------------------------------------------------------

    def _box_elementwise(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.box_loss == "l1":
            return F.l1_loss(s, t, reduction="none")
        if self.box_loss == "smooth_l1":
            return F.smooth_l1_loss(s, t, reduction="none", beta=1.0)
        return F.mse_loss(s, t, reduction="none")

    def forward(self, student, teacher) -> torch.Tensor:
        if isinstance(student, torch.Tensor):
            pairs = self._split_concat(student, teacher)
        elif isinstance(student, (list, tuple)):
            pairs = self._pair_levels(student, teacher)
        else:
            raise PruneError(f"student output must be a tensor [B, box+classes, N] or a list of per-level "
                             f"(box, cls) pairs, got {type(student).__name__}")
        weights = self.level_weights if self.level_weights is not None else [1.0] * len(pairs)
        if len(weights) != len(pairs):
            raise PruneError(f"level_weights has {len(weights)} values but the outputs have {len(pairs)} "
                             "levels; give one weight per level")
        T = self.temperature
        total = None
        parts: dict[str, float] = {}
        for i, (((s_box, s_cls), (t_box, t_cls)), lw) in enumerate(zip(pairs, weights, strict=True)):
            t_box, t_cls = t_box.detach().float(), t_cls.detach().float()
            s_box, s_cls = s_box.float(), s_cls.float()
            target = torch.sigmoid(t_cls / T)
            cls = F.binary_cross_entropy_with_logits(s_cls / T, target, reduction="mean") * (T * T)
            per_loc = self._box_elementwise(s_box, t_box).sum(dim=1)
            if self.weight_by_teacher:
                w = torch.sigmoid(t_cls).amax(dim=1)
                box = (per_loc * w).sum() / (w.sum() + _EPS)
            else:
                box = per_loc.mean()
            parts[f"cls/{i}"] = float(cls.detach())
            parts[f"box/{i}"] = float(box.detach())
            term = lw * (self.cls_weight * cls + self.box_weight * box)
            total = term if total is None else total + term
        self.last_parts = parts
        return total

    def extra_repr(self) -> str:
        return (f"box_channels={self.box_channels}, level_sizes={self.level_sizes}, cls_weight={self.cls_weight}, "
                f"box_weight={self.box_weight}, level_weights={self.level_weights}, "
                f"temperature={self.temperature}, box_loss={self.box_loss!r}, "
                f"weight_by_teacher={self.weight_by_teacher}")
