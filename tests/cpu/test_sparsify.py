"""2:4 masks and eligibility on TensorRT's axis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trt_prune.errors import SparsifyError
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.sparsity import eligibility, holds_2of4, mask_2of4, sparsify


def test_mask_keeps_two_largest_of_each_four_along_axis():
    w = np.array([[1.0, -5.0, 2.0, 0.5, 9.0, 8.0, -7.0, 6.0]])
    m = mask_2of4(w, axis=1)
    assert m.tolist() == [[False, True, True, False, True, True, False, False]]
    # conv weight [K, C, R, S]: groups run along C at each (k, r, s)
    w4 = np.random.default_rng(0).standard_normal((6, 8, 3, 3))
    m4 = mask_2of4(w4, axis=1)
    assert m4.reshape(6, 2, 4, 3, 3).sum(axis=2).max() == 2
    assert holds_2of4(w4 * m4, axis=1) and not holds_2of4(w4 * m4, axis=0)
    assert not holds_2of4(np.zeros((4, 6)), axis=1)  # 6 is not a multiple of 4


@pytest.mark.parametrize("kind, shape, groups, eligible, reason", [
    ("conv", (512, 256, 3, 3), 1, True, "eligible"),
    ("conv", (64, 3, 3, 3), 1, False, "not a multiple of 4"),
    ("conv", (256, 1, 3, 3), 256, False, "depthwise"),
    ("conv", (128, 128, 1, 1), 1, False, "too small to pay"),
    ("linear", (1024, 768), 1, True, "eligible"),
    ("linear", (1000, 130), 1, False, "not a multiple of 4"),
])
def test_eligibility(kind, shape, groups, eligible, reason):
    verdict = eligibility(kind, shape, groups)
    assert verdict.eligible is eligible and reason in verdict.reason


def test_sparsify_demo_detector():
    torch.manual_seed(0)
    model = DemoDetector().eval()
    result = sparsify(model, min_channels=64)
    modules = dict(result.model.named_modules())
    originals = dict(model.named_modules())
    made = [r for r in result.layers if r["made_24"]]
    assert len(made) > 30
    for row in result.layers:
        w = modules[row["module"]].weight.detach().numpy()
        if row["made_24"]:
            assert holds_2of4(w, axis=1), row["module"]
            assert np.count_nonzero(w) == w.size // 2
        else:
            assert np.array_equal(w, originals[row["module"]].weight.detach().numpy())
    assert {r["reason"] for r in result.layers if not r["made_24"]} >= {
        "input channels per group 3 not a multiple of 4"}
    # masks survive an optimizer step once re-applied
    opt = torch.optim.SGD(result.model.parameters(), lr=0.1)
    result.model.train()
    result.model(torch.rand(2, 3, 64, 64)).sum().backward()
    opt.step()
    result.masks.apply(result.model)
    assert all(holds_2of4(modules[r["module"]].weight.detach().numpy(), axis=1) for r in made)


def test_sparsify_default_floor_and_bad_input():
    model = nn.Sequential(nn.Conv2d(256, 256, 1), nn.Conv2d(256, 64, 1))
    result = sparsify(model)
    assert [r["made_24"] for r in result.layers] == [True, False]
    with pytest.raises(SparsifyError, match="min_channels"):
        sparsify(model, min_channels=-1)
