"""COCO-style mAP for detections, computed in memory with pycocotools (imported lazily).

:func:`evaluate` runs any ``predict(images) -> raw output`` callable over a dataset, so the same code
scores a torch model, an ONNX Runtime session or a TensorRT engine.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from trt_prune.detection.decode import postprocess
from trt_prune.errors import TrtPruneError


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _import_coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise TrtPruneError("mAP needs pycocotools, which is not installed: pip install pycocotools") from exc
    return COCO, COCOeval


def _coco_dataset(items, num_classes: int, with_scores: bool) -> dict:
    images, annotations = [], []
    for image_id, item in enumerate(items, start=1):
        images.append({"id": image_id})
        boxes = _numpy(item["boxes"]).reshape(-1, 4).astype(np.float64)
        labels = _numpy(item["labels"]).reshape(-1).astype(np.int64)
        scores = _numpy(item["scores"]).reshape(-1).astype(np.float64) if with_scores else None
        if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
            raise TrtPruneError(f"image {image_id - 1}: {len(boxes)} boxes but {len(labels)} labels"
                                + (f" and {len(scores)} scores" if scores is not None else ""))
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise TrtPruneError(f"image {image_id - 1}: labels must lie in [0, {num_classes}), "
                                f"got {sorted(set(labels.tolist()))}")
        wh = boxes[:, 2:] - boxes[:, :2]
        for k in range(len(boxes)):
            ann = {
                # Ids start at 1: COCOeval uses 0 for "unmatched".
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": int(labels[k]) + 1,
                "bbox": [float(boxes[k, 0]), float(boxes[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
                "area": float(wh[k, 0] * wh[k, 1]),
                "iscrowd": 0,
            }
            if scores is not None:
                ann["score"] = float(scores[k])
            annotations.append(ann)
    categories = [{"id": c + 1, "name": str(c)} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_map(predictions, targets, num_classes: int) -> dict[str, float]:
    """COCO mAP of ``predictions`` against ``targets``: ``{"map50_95": float, "map50": float}``.

    ``predictions``: one ``{"boxes" [k,4] xyxy, "scores" [k], "labels" [k]}`` per image; ``targets``: one
    ``{"boxes" [n,4] xyxy, "labels" [n]}`` per image, in the same order (torch or numpy). Labels are
    0-based class indices. Classes without any ground truth are left out of the mean; with no ground truth
    at all, or no predictions, both values are 0.0.
    """
    if len(predictions) != len(targets):
        raise TrtPruneError(f"{len(predictions)} predictions for {len(targets)} targets; pass one per image")
    COCO, COCOeval = _import_coco()
    gt_data = _coco_dataset(targets, num_classes, with_scores=False)
    dt_data = _coco_dataset(predictions, num_classes, with_scores=True)
    if not gt_data["annotations"] or not dt_data["annotations"]:
        return {"map50_95": 0.0, "map50": 0.0}
    # pycocotools prints progress and the summary table; keep library calls quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        gt, dt = COCO(), COCO()
        gt.dataset, dt.dataset = gt_data, dt_data
        gt.createIndex()
        dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[0]: AP@[.50:.95], stats[1]: AP@.50, both at 100 detections per image; -1 means "no data".
    return {"map50_95": max(0.0, float(ev.stats[0])), "map50": max(0.0, float(ev.stats[1]))}


def evaluate(predict, dataset, batch_size: int = 16, limit: int | None = None, progress: bool = False,
             **postprocess_kwargs) -> dict[str, float]:
    """mAP of ``predict`` on ``dataset``: ``{"map50_95", "map50", "images"}``.

    ``predict(images [B, 3, H, W] float32 torch) -> raw [B, 4 + nc, N]`` (torch or numpy); put a torch
    model in eval mode and on its device inside ``predict``. ``dataset[i]`` is ``(image, target)`` as from
    :class:`~trt_prune.data.roads.RoadScenes`. ``limit`` caps the number of images; extra keyword
    arguments go to :func:`~trt_prune.detection.decode.postprocess`.
    """
    if batch_size < 1:
        raise TrtPruneError(f"batch_size must be at least 1, got {batch_size}")
    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    predictions, targets = [], []
    num_classes = 0
    bar = None
    if progress:
        from rich.progress import Progress  # only the interactive path needs rich

        bar = Progress(transient=True)
        task = bar.add_task("evaluating", total=n)
        bar.start()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                items = [dataset[i] for i in range(start, min(n, start + batch_size))]
                images = torch.stack([im for im, _ in items], 0)
                raw = predict(images)
                num_classes = int(raw.shape[1]) - 4
                predictions.extend(postprocess(raw, images.shape[-2:], **postprocess_kwargs))
                targets.extend(t for _, t in items)
                if bar is not None:
                    bar.update(task, advance=len(items))
    finally:
        if bar is not None:
            bar.stop()
    if n == 0:
        return {"map50_95": 0.0, "map50": 0.0, "images": 0}
    result = coco_map(predictions, targets, num_classes)
    result["images"] = n
    return result
