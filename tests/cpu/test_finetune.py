"""BatchNorm recalibration and the masked fine-tune loop."""

from __future__ import annotations

import torch
from torch import nn

from trt_prune.finetune import finetune_detector, recalibrate_batchnorm
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.sparsity import holds_2of4, sparsify


def test_recalibration_matches_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.1)).eval()
    recalibrate_batchnorm(model, batches=2, batch_size=4, img_size=64, seed=5)
    from trt_prune.data import RoadScenes

    data = RoadScenes("train", length=8, size=64, seed=5)
    with torch.no_grad():
        feats = model[0](torch.stack([data[i][0] for i in range(8)]))
    # two equal batches, cumulative average of per-batch means = overall mean
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_masked_finetune_keeps_24_and_lowers_loss():
    torch.manual_seed(0)
    sp = sparsify(DemoDetector(), min_channels=64)
    info = finetune_detector(sp.model, steps=6, batch_size=2, lr=1e-3, img_size=128, masks=sp.masks)
    assert info["steps"] == 6 and info["loss_last"] < info["loss_first"]
    modules = dict(sp.model.named_modules())
    assert all(holds_2of4(modules[p].weight.detach().numpy(), axis=1) for p in sp.sparse_layers)
