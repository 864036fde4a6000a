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
                      on_step: Callable[[int, float], None] | None = None, pruner=None,
                      teacher: nn.Module | None = None, distill_weight: float = 1.0, device: str | None = None) -> dict:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps; returns ``{steps, seconds, loss_first, loss_last}``.

    AdamW with a short warm-up and cosine decay. ``masks`` (2:4) are re-applied after every step so zeros stay
    zeros. ``pruner`` (a prepared :class:`~trt_prune.pruning.gradual.ChannelPruner`): its penalty joins the
    loss and its ``step()`` follows every optimizer step. ``teacher`` (the dense model, frozen): adds
    ``distill_weight`` × :class:`~trt_prune.pruning.distill.DetectorDistillLoss` to the loss. ``device``: where
    to train (default: where the model is). ``on_step(step, loss)`` reports progress.
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
    criterion = DetectionLoss(getattr(getattr(model, "module", model), "num_classes", 4))  # through a DDP wrapper
    if device is not None:
        model.to(device)
        if teacher is not None:
            teacher.to(device)
    where = next(model.parameters()).device
    distill = None
    if teacher is not None:
        from .pruning.distill import DetectorDistillLoss

        distill = DetectorDistillLoss()
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
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
            images = images.to(where, non_blocking=True)
            raw = model(images)
            loss, _ = criterion(raw, targets, images.shape[-2:])
            if distill is not None:
                with torch.no_grad():
                    reference = teacher(images)
                loss = loss + distill_weight * distill(raw, reference)
            if pruner is not None:
                loss = loss + pruner.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            if masks is not None:
                masks.apply(model)
            if pruner is not None:
                pruner.step()
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


def gradual_prune_detector(model: nn.Module, target_macs: float, steps: int, *, batch_size: int = 8,
                           lr: float = 1e-3, img_size: int = 320, importance: str = "taylor",
                           distill: bool = False, distill_weight: float = 1.0, sparsity: str | None = None,
                           sparsity_weight: float = 1e-4, sparse_share: float = 0.1, prune_share: float = 0.6,
                           round_to: int = 8, global_pruning: bool = False, max_ratio: float | None = None,
                           ignore: tuple[str, ...] = (), seed: int = 1, workers: int = 0, device: str | None = None,
                           on_step: Callable[[int, float, float], None] | None = None, out=None,
                           source: str | None = None, regrow: bool = True):
    """The built-in recipe: prune a detector with the demo detector's output layout (and its road scenes and
    loss) to ``target_macs`` *while* training it for ``steps`` steps, then cut it.

    The schedule: with ``sparsity`` the first ``sparse_share`` of the steps only add the sparse-training
    penalty; channels are then masked along the cubic schedule until ``prune_share`` of the steps, and the rest
    fine-tunes the final masks. ``distill`` adds the dense model (a frozen copy) as teacher. ``on_step(step,
    loss, macs_fraction)`` reports progress. ``out`` / ``source``: write the model folder as
    :meth:`~trt_prune.pruning.gradual.ChannelPruner.squash` does. Returns ``(PruneResult, training stats)``;
    the model is cut in place.
    """
    import copy

    from .pruning.gradual import ChannelPruner, Schedule

    rank, world, device = _distributed(device)

    if steps < 2:
        raise TrtPruneError(f"gradual pruning needs at least 2 training steps, got {steps}")
    if not 0 <= sparse_share < prune_share <= 1:
        raise TrtPruneError(f"need 0 <= sparse_share < prune_share <= 1, got {sparse_share} and {prune_share}")
    start = int(steps * sparse_share) if sparsity else 0
    end = max(start + 1, int(steps * prune_share))
    teacher = copy.deepcopy(model).eval() if distill else None
    device_of = next(model.parameters()).device
    pruner = ChannelPruner(model, (1, 3, img_size, img_size), target_macs=target_macs,
                           schedule=Schedule(steps=end, start=start), importance=importance, round_to=round_to,
                           global_pruning=global_pruning, max_ratio=max_ratio, ignore=ignore, sparsity=sparsity,
                           sparsity_weight=sparsity_weight if sparsity else 0.0, regrow=regrow)
    if device is not None:
        model.to(device)
    pruner.prepare()
    progress = None if on_step is None else (lambda step, loss: on_step(step, loss, pruner.current_macs()))
    trained = model
    if world > 1:  # under torchrun: every rank trains on its own scenes, gradients averaged, masks all-reduced
        ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    stats = finetune_detector(trained, steps, batch_size=batch_size, lr=lr, img_size=img_size, seed=seed + 1000 * rank,
                              workers=workers, on_step=progress, pruner=pruner, teacher=teacher,
                              distill_weight=distill_weight, device=device)
    model.to(device_of)
    result = pruner.squash(out=out if rank == 0 else None, source=source)  # one folder, written by rank 0
    stats.update(rank=rank, world_size=world)
    stats["history"] = pruner.history
    return result, stats


def _distributed(device: str | None) -> tuple[int, int, str | None]:
    """``(rank, world size, device)``; under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started
    (NCCL with CUDA, else gloo) and each rank takes the GPU of its ``LOCAL_RANK``."""
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device or "cpu"
