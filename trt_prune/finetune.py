"""A short fine-tune of a (pruned or 2:4) detector on the synthetic road scenes, masks enforced."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .errors import TrtPruneError
from .sparsity.sparsify import SparseMasks


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: int = 16, batch_size: int = 16, img_size: int = 320,
                          seed: int = 77) -> None:
    """Re-estimate every BatchNorm's running statistics on training images (no gradients).

    After channels are removed, the layers that read them see a different input distribution, so the stored
    statistics are stale; re-estimating them is cheap and recovers much of the accuracy before any training.
    """
    from .data import RoadScenes

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    data = RoadScenes("train", length=batches * batch_size, size=img_size, seed=seed)
    was_training = model.training
    model.train()
    try:
        for i in range(batches):
            model(torch.stack([data[j][0] for j in range(i * batch_size, (i + 1) * batch_size)]))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)


def finetune_detector(model: nn.Module, steps: int, batch_size: int = 8, lr: float = 1e-3, img_size: int = 320,
                      masks: SparseMasks | None = None, seed: int = 1, workers: int = 0,
                      on_step: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps; returns ``{steps, seconds, loss_first, loss_last}``.

    AdamW with a short warm-up and cosine decay. ``masks`` (2:4) are re-applied after every step so zeros stay
    zeros. ``on_step(step, loss)`` reports progress.
    """
    from .data import RoadScenes, collate_detection
    from .detection.loss import DetectionLoss

    if steps < 0 or batch_size < 1:
        raise TrtPruneError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    if steps == 0:
        return {"steps": 0, "seconds": 0.0, "loss_first": None, "loss_last": None}
    torch.manual_seed(seed)
    # a seed of its own so the fine-tune sees scenes the original training did not start from
    data = RoadScenes("train", length=steps * batch_size, size=img_size, seed=10_000 + seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate_detection, drop_last=True)
    criterion = DetectionLoss(getattr(model, "num_classes", 4))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    was_training = model.training
    model.train()
    start = time.perf_counter()
    first = last = None
    try:
        for step, (images, targets) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            raw = model(images)
            loss, _ = criterion(raw, targets, images.shape[-2:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            if masks is not None:
                masks.apply(model)
            value = float(loss.detach())
            first = value if first is None else first
            last = value
            if on_step is not None:
                on_step(step + 1, value)
    finally:
        model.train(was_training)
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss_first": first, "loss_last": last}


def detector_taylor_inputs(model: nn.Module, batches: int = 4, batch_size: int = 8, img_size: int = 320,
                           seed: int = 123):
    """``(data, loss_fn)`` for Taylor importance on a detector with the demo detector's output layout: a few
    road-scene training batches and the detection loss it was trained with."""
    from .data import RoadScenes, collate_detection
    from .detection.loss import DetectionLoss

    scenes = RoadScenes("train", length=batches * batch_size, size=img_size, seed=seed)
    data = [collate_detection([scenes[j] for j in range(i * batch_size, (i + 1) * batch_size)])
            for i in range(batches)]
    criterion = DetectionLoss(getattr(model, "num_classes", 4))

    def loss_fn(m: nn.Module, batch) -> torch.Tensor:
        images, targets = batch
        return criterion(m(images), targets, images.shape[-2:])[0]

    return data, loss_fn
