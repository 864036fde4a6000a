"""2:4 lifecycle: prepare (masks as parametrizations, dense weights kept), step, masked fine-tuning, squash;
state dicts at every stage; DistributedDataParallel with two CPU processes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trt_prune.errors import SparsifyError
from trt_prune.sparsity.lifecycle import Sparsifier
from trt_prune.sparsity.pattern import holds_2of4, mask_2of4

HERE = Path(__file__).resolve().parent


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Flatten(), nn.Linear(64 * 4 * 4, 32))


def _weight(model, path):
    return model.get_submodule(path).weight.detach().numpy()


def test_prepare_keeps_dense_weights_and_masks_the_forward():
    model = _model()
    dense = {p: _weight(model, p).copy() for p in ("2", "6")}
    sp = Sparsifier(min_channels=32)
    sp.prepare(model)
    assert sp.prepared == ["2", "6"]  # conv 0 has 8 inputs (< 32); 4 is depthwise
    reasons = {r["module"]: r["reason"] for r in sp.report}
    assert "depthwise" in reasons["4"] and "too small" in reasons["0"]
    for p in ("2", "6"):
        m = model.get_submodule(p)
        assert torch.equal(m.parametrizations.weight.original, torch.from_numpy(dense[p]))  # dense kept
        assert holds_2of4(m.weight.detach().numpy(), axis=1)
        assert torch.equal(m.weight, torch.from_numpy(dense[p] * mask_2of4(dense[p], axis=1)))


def test_masks_hold_through_training_and_step_recomputes_them():
    model = _model()
    sp = Sparsifier(layers=["2", "6"])
    sp.prepare(model)
    before = sp.masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for i in range(5):
        loss = model(torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(i))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(holds_2of4(_weight(model, p), axis=1) for p in ("2", "6"))
    # the dense weights moved, including pruned positions (momentum, decay): step() re-ranks them
    sp.step(model)
    after = sp.masks(model)
    for p in ("2", "6"):
        original = model.get_submodule(p).parametrizations.weight.original.detach().numpy()
        assert torch.equal(after[p], torch.from_numpy(mask_2of4(original, axis=1)))
    assert any(not torch.equal(before[p], after[p]) for p in before)


def test_state_dict_round_trips_at_every_stage():
    model = _model()
    sp = Sparsifier(layers=["2", "6"])
    sp.prepare(model)
    x = torch.randn(2, 8, 4, 4)
    prepared_state = model.state_dict()
    assert "2.parametrizations.weight.original" in prepared_state
    assert "2.parametrizations.weight.0.mask" in prepared_state
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()  # different weights: everything must come from the state dict
    Sparsifier(layers=["2", "6"]).prepare(fresh)
    fresh.load_state_dict(prepared_state)
    assert torch.equal(fresh(x), model(x))
    sp.squash(model)
    squashed = model.state_dict()
    assert "2.weight" in squashed and not any("parametrizations" in k for k in squashed)
    plain = _model()
    plain.load_state_dict(squashed)
    assert torch.equal(plain(x), model(x))
    assert holds_2of4(_weight(plain, "2"), axis=1) and holds_2of4(_weight(plain, "6"), axis=1)


def test_bad_requests_are_clear_errors():
    with pytest.raises(SparsifyError, match="'4' cannot hold 2:4: depthwise"):
        Sparsifier(layers=["4"]).prepare(_model())
    with pytest.raises(SparsifyError, match="'0' cannot hold 2:4: input channels per group 6"):
        Sparsifier(layers=["0"]).prepare(nn.Sequential(nn.Conv2d(6, 8, 1), nn.Conv2d(8, 8, 1)))
    with pytest.raises(SparsifyError, match="no layer of this model is eligible"):
        Sparsifier().prepare(_model())  # default floor 256 channels: nothing here
    with pytest.raises(SparsifyError, match="not a Conv/Linear layer"):
        Sparsifier(layers=["1"]).prepare(_model())


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_ddp_two_cpu_processes_keep_masks_and_agree(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "ddp_sparse_worker.py"), str(tmp_path), _free_port()],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(all(r["held"]) and len(r["held"]) == 4 for r in ranks)  # 2:4 after every optimizer step
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys() and "3.weight" in s0
    # gradients were averaged: identical weights. BatchNorm statistics are DDP's usual exception: buffers are
    # broadcast from rank 0 before each forward, so only the last step's local update differs
    differ = sorted(k for k in s0 if not torch.equal(s0[k], s1[k]))
    assert differ == ["1.running_mean", "1.running_var"]
    assert holds_2of4(s0["3.weight"].numpy(), axis=1) and holds_2of4(s0["6.weight"].numpy(), axis=1)
    # and training did move them
    from ddp_sparse_worker import build  # noqa: E402 - the worker's model, for the starting weights

    start = build().state_dict()
    assert not torch.equal(start["6.weight"], s0["6.weight"])


def test_structured_then_24_in_one_plan():
    from trt_prune.models.demo_detector import DemoDetector
    from trt_prune.sparsity.combined import prune_then_sparsify

    torch.manual_seed(0)
    model = DemoDetector().eval()
    res = prune_then_sparsify(model, (1, 3, 64, 64), ratio=0.5, round_to=8, min_channels=64)
    rows = {r["module"]: r for r in res.layers}
    made = [r for r in rows.values() if r["made_24"]]
    assert made and all(r["eligible_pruned"] for r in made)
    for r in made:  # every 2:4 layer holds the pattern in the pruned, sparsified model
        assert holds_2of4(res.model.get_submodule(r["module"]).weight.detach().numpy(), axis=1)
    # a 128-channel layer halved to 64 stays eligible at 64; one pruned below 64 is reported as lost
    lost = [r for r in rows.values() if r["lost_to_pruning"]]
    assert lost and all("too small" in r["reason"] for r in lost)
    assert all(r["out_in_after"][0] <= r["out_in_before"][0] for r in rows.values())
    with pytest.raises(SparsifyError, match="round_to=2 would leave channel counts"):
        prune_then_sparsify(model, (1, 3, 64, 64), round_to=2)
