"""Turn the detector's raw ``[B, 4 + num_classes, N]`` output into boxes, scores and detections.

One code path for torch tensors and numpy arrays (an ONNX Runtime session returns numpy), so a torch model
and its exported graph are decoded and compared identically.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from trt_prune.errors import TrtPruneError
from trt_prune.models.demo_detector import STRIDES

# Score-ranked candidates kept per image before NMS: bounds its cost when the threshold is tiny.
PRE_NMS_TOPK = 3000


def anchor_points(h: int, w: int, strides=STRIDES, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres of an ``h`` x ``w`` input: ``(points [N, 2] (x, y) float32, strides [N] float32)``.

    Levels follow ``strides``; each level is row-major over a ``ceil(h/s)`` x ``ceil(w/s)`` grid
    (the grid a stride-2, padding-1 convolution chain produces), centres at ``((x + 0.5) s, (y + 0.5) s)``.
    """
    points, strides_out = [], []
    for s in strides:
        gh, gw = -(-int(h) // s), -(-int(w) // s)
        ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) * s
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((gx.reshape(-1), gy.reshape(-1)), 1))
        strides_out.append(torch.full((gh * gw,), float(s), device=device, dtype=torch.float32))
    return torch.cat(points, 0), torch.cat(strides_out, 0)


def as_tensor(raw) -> torch.Tensor:
    """A float32 torch view/copy of a raw output given as a torch tensor or a numpy array."""
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(np.ascontiguousarray(raw))
    elif not isinstance(raw, torch.Tensor):
        raise TrtPruneError(f"raw detector output must be a torch.Tensor or numpy.ndarray, got {type(raw).__name__}")
    return raw.float()


def distances_to_boxes(dist: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[..., N, 4]`` (left, top, right, bottom) pixel distances from ``points [N, 2]`` to xyxy boxes."""
    return torch.cat((points - dist[..., :2], points + dist[..., 2:]), -1)


def decode(raw, input_hw, strides=STRIDES) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode ``raw [B, 4 + nc, N]`` (torch or numpy) for an input of ``input_hw = (h, w)``.

    Returns ``(boxes [B, N, 4] xyxy pixels, scores [B, N, nc] sigmoid probabilities)``, float32 torch.
    """
    raw = as_tensor(raw)
    if raw.dim() != 3 or raw.shape[1] < 5:
        raise TrtPruneError(f"raw detector output must be [B, 4 + num_classes, N], got {tuple(raw.shape)}")
    h, w = int(input_hw[0]), int(input_hw[1])
    points, stride = anchor_points(h, w, strides, device=raw.device)
    if raw.shape[2] != points.shape[0]:
        raise TrtPruneError(
            f"raw output has N={raw.shape[2]} anchors but a {h}x{w} input with strides {tuple(strides)} "
            f"has {points.shape[0]}; pass the input size the model was run at")
    pred = raw.transpose(1, 2)
    dist = F.softplus(pred[..., :4]) * stride[:, None]
    return distances_to_boxes(dist, points), pred[..., 4:].sigmoid()


def postprocess(raw, input_hw, score_threshold: float = 0.001, iou_threshold: float = 0.6,
                max_detections: int = 100, strides=STRIDES) -> list[dict[str, torch.Tensor]]:
    """Decode, threshold, run per-class NMS; one ``{"boxes" [k,4], "scores" [k], "labels" [k]}`` per image.

    An anchor may yield one detection per class above ``score_threshold`` (the usual practice for mAP).
    Boxes are clipped to the image; detections come sorted by decreasing score.
    """
    boxes, scores = decode(raw, input_hw, strides)
    h, w = float(input_hw[0]), float(input_hw[1])
    nc = scores.shape[-1]
    results = []
    for b in range(boxes.shape[0]):
        flat = scores[b].reshape(-1)
        keep = torch.nonzero(flat > score_threshold).squeeze(1)
        if keep.numel() > PRE_NMS_TOPK:
            keep = keep[flat[keep].topk(PRE_NMS_TOPK).indices]
        anchor, label = keep // nc, keep % nc
        cand = boxes[b, anchor].clone()
        cand[:, 0::2] = cand[:, 0::2].clamp(0.0, w)
        cand[:, 1::2] = cand[:, 1::2].clamp(0.0, h)
        cand_scores = flat[keep]
        kept = torchvision.ops.batched_nms(cand, cand_scores, label, iou_threshold)[:max_detections]
        results.append({"boxes": cand[kept], "scores": cand_scores[kept], "labels": label[kept]})
    return results
