"""Training loss for the anchor-free detector: a task-aligned assigner, BCE on IoU-aware targets, CIoU.

The assigner scores every (ground truth, anchor point) pair by ``score^alpha * IoU^beta``, where ``score``
is the predicted probability of the ground truth's class and the IoU is between the predicted box and
the ground truth; only anchor points inside the box compete. Each ground truth takes its ``topk`` best;
an anchor claimed twice goes to the ground truth it overlaps most. Classification targets are the
alignment, normalised per ground truth so that its best anchor gets that anchor's IoU; the box loss is
``1 - CIoU`` (or GIoU) on the positives, weighted by those targets. Everything is divided by the sum of
the targets, so the loss does not depend on how many objects a batch holds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from trt_prune.detection.decode import anchor_points, as_tensor, distances_to_boxes
from trt_prune.errors import TrtPruneError
from trt_prune.models.demo_detector import STRIDES

_EPS = 1e-9


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor, kind: str = "iou") -> torch.Tensor:
    """Element-wise (broadcast) IoU, GIoU or CIoU of xyxy boxes ``a [..., 4]`` and ``b [..., 4]``."""
    ix = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    iy = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = ix * iy
    wa, ha = a[..., 2] - a[..., 0], a[..., 3] - a[..., 1]
    wb, hb = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    union = wa * ha + wb * hb - inter + _EPS
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    ch = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    if kind == "giou":
        hull = cw * ch + _EPS
        return iou - (hull - union) / hull
    if kind == "ciou":
        diag = cw ** 2 + ch ** 2 + _EPS
        centre = ((a[..., 0] + a[..., 2] - b[..., 0] - b[..., 2]) ** 2
                  + (a[..., 1] + a[..., 3] - b[..., 1] - b[..., 3]) ** 2) / 4
        v = (4 / math.pi ** 2) * (torch.atan(wb / (hb + _EPS)) - torch.atan(wa / (ha + _EPS))) ** 2
        with torch.no_grad():
            # v = 0 whenever the denominator is 0 (identical boxes), so clamping keeps alpha at 0, not NaN.
            alpha = v / (v - iou + 1).clamp(min=_EPS)
        return iou - (centre / diag + v * alpha)
    raise TrtPruneError(f"unknown IoU kind {kind!r}; use 'iou', 'giou' or 'ciou'")


def pad_targets(targets, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-image targets into ``boxes [B, M, 4]``, ``labels [B, M]``, ``valid [B, M]`` (M = most GTs)."""
    b = len(targets)
    m = max((len(t["labels"]) for t in targets), default=0)
    # Padded on the host and moved in one copy each: a copy per image costs more than the assigner on a GPU.
    boxes = torch.zeros(b, m, 4)
    labels = torch.zeros(b, m, dtype=torch.long)
    valid = torch.zeros(b, m, dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        if n:
            boxes[i, :n] = torch.as_tensor(t["boxes"], dtype=torch.float32).cpu()
            labels[i, :n] = torch.as_tensor(t["labels"], dtype=torch.long).cpu()
            valid[i, :n] = True
    return (boxes.to(device, non_blocking=True), labels.to(device, non_blocking=True),
            valid.to(device, non_blocking=True))


class DetectionLoss:
    """``loss(raw, targets, input_hw) -> (total, {"cls": ..., "box": ...})`` for ``raw [B, 4 + nc, N]``.

    ``targets``: one ``{"boxes" [n, 4] xyxy pixels, "labels" [n]}`` per image (n may be 0). The parts are
    detached scalars. Computed in float32 even under autocast.
    """

    def __init__(self, num_classes: int, strides=STRIDES, topk: int = 10, alpha: float = 0.5, beta: float = 6.0,
                 cls_weight: float = 0.5, box_weight: float = 7.5, box_loss: str = "ciou"):
        if box_loss not in ("giou", "ciou"):
            raise TrtPruneError(f"box_loss must be 'giou' or 'ciou', got {box_loss!r}")
        if num_classes < 1 or topk < 1:
            raise TrtPruneError(f"num_classes and topk must be at least 1, got {num_classes} and {topk}")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.cls_weight = cls_weight
        self.box_weight = box_weight
        self.box_loss = box_loss
        self._anchors: dict = {}

    def __call__(self, raw, targets, input_hw):
        raw = as_tensor(raw)
        device = raw.device
        with torch.autocast(device_type=device.type, enabled=False):
            return self._loss(raw.float(), targets, (int(input_hw[0]), int(input_hw[1])))

    @torch.no_grad()
    def assign(self, pred_boxes: torch.Tensor, pred_scores: torch.Tensor, points: torch.Tensor,
               gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_valid: torch.Tensor):
        """Task-aligned assignment. Returns ``(fg [B, N] bool, target_boxes [B, N, 4], target_scores [B, N, nc])``.

        ``pred_boxes [B, N, 4]``, ``pred_scores [B, N, nc]`` (probabilities), ``points [N, 2]``,
        ``gt_* [B, M, ...]`` padded with ``gt_valid`` marking real entries.
        """
        b, n, nc = pred_scores.shape
        m = gt_boxes.shape[1]
        # Anchor points inside each GT. A GT too small to contain any point falls back to its nearest one,
        # so that every labelled object is learnt.
        px, py = points[:, 0], points[:, 1]
        inside = ((px > gt_boxes[..., 0:1]) & (px < gt_boxes[..., 2:3])
                  & (py > gt_boxes[..., 1:2]) & (py < gt_boxes[..., 3:4]))  # [B, M, N]
        centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
        d2 = ((points[None, None] - centre[:, :, None]) ** 2).sum(-1)
        lonely = ~inside.any(-1)
        nearest = torch.zeros_like(inside).scatter_(-1, d2.argmin(-1, keepdim=True), True) & lonely[..., None]
        candidate = (inside | nearest) & gt_valid[..., None]

        iou = box_iou_pairs(gt_boxes[:, :, None], pred_boxes[:, None], "iou").clamp(min=0) * candidate
        cls_score = pred_scores.transpose(1, 2).gather(1, gt_labels[..., None].expand(b, m, n))
        align = cls_score.pow(self.alpha) * iou.pow(self.beta) * candidate

        # Candidates outrank non-candidates even when every alignment is still 0 early in training.
        k = min(self.topk, n)
        top = torch.where(candidate, align, torch.full_like(align, -1.0)).topk(k, dim=-1).indices
        pos = torch.zeros_like(candidate).scatter_(-1, top, True) & candidate

        # An anchor claimed by several GTs goes to the one it overlaps most.
        # Computed unconditionally: testing for conflicts first would cost a device sync per step.
        multi = pos.sum(1) > 1  # [B, N]
        best = F.one_hot(torch.where(pos, iou, torch.full_like(iou, -1.0)).argmax(1), m)  # [B, N, M]
        pos = torch.where(multi[:, None], best.transpose(1, 2).bool(), pos)
        fg = pos.any(1)
        gt_idx = pos.float().argmax(1)  # [B, N]

        target_boxes = gt_boxes.gather(1, gt_idx[..., None].expand(b, n, 4))
        target_labels = gt_labels.gather(1, gt_idx)
        align = align * pos
        iou_pos = iou * pos
        norm = align * (iou_pos.amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + _EPS))
        score = norm.amax(1) * fg  # [B, N]
        target_scores = F.one_hot(target_labels, nc).float() * score[..., None]
        return fg, target_boxes, target_scores

    def _loss(self, raw: torch.Tensor, targets, input_hw):
        if raw.dim() != 3 or raw.shape[1] != 4 + self.num_classes:
            raise TrtPruneError(f"raw output must be [B, {4 + self.num_classes}, N], got {tuple(raw.shape)}")
        if len(targets) != raw.shape[0]:
            raise TrtPruneError(f"{len(targets)} targets for a batch of {raw.shape[0]}")
        key = (input_hw, raw.device)
        if key not in self._anchors:
            # Built once per size and device: a dozen tiny kernels per step add up on a GPU.
            self._anchors[key] = anchor_points(*input_hw, self.strides, device=raw.device)
        points, stride = self._anchors[key]
        if raw.shape[2] != points.shape[0]:
            raise TrtPruneError(f"raw output has N={raw.shape[2]} anchors, a {input_hw[0]}x{input_hw[1]} input "
                                f"has {points.shape[0]}")
        pred = raw.transpose(1, 2)  # [B, N, 4 + nc]
        logits = pred[..., 4:]
        boxes = distances_to_boxes(F.softplus(pred[..., :4]) * stride[:, None], points)

        gt_boxes, gt_labels, gt_valid = pad_targets(targets, raw.device)
        if gt_boxes.shape[1] == 0:
            target_scores = torch.zeros_like(logits)
            fg = torch.zeros(logits.shape[:2], dtype=torch.bool, device=raw.device)
            target_boxes = torch.zeros_like(boxes)
        else:
            fg, target_boxes, target_scores = self.assign(boxes.detach(), logits.detach().sigmoid(), points,
                                                          gt_boxes, gt_labels, gt_valid)
        total_score = target_scores.sum().clamp(min=1.0)
        loss_cls = F.binary_cross_entropy_with_logits(logits, target_scores, reduction="sum") / total_score
        # With no positives these are empty sums: 0, still attached to the graph.
        weight = target_scores.sum(-1)[fg]
        iou = box_iou_pairs(boxes[fg], target_boxes[fg], self.box_loss)
        loss_box = ((1.0 - iou) * weight).sum() / total_score
        total = self.cls_weight * loss_cls + self.box_weight * loss_box
        return total, {"cls": loss_cls.detach(), "box": loss_box.detach()}
