"""Gradual channel pruning inside training (trt_prune.pruning.gradual.ChannelPruner)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trt_prune.errors import PruneError
from trt_prune.pruning import apply_recipe
from trt_prune.pruning.gradual import ChannelPruner, Schedule, mask_for_plan

HERE = Path(__file__).resolve().parent


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train(model, pruner, steps, seed=1, lr=0.05, optimizer=None, start=0):
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))
               for _ in range(start + steps)][start:]
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    records = []
    model.train()
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        records.append(pruner.step())
    return opt, records


def test_schedule_is_cubic_and_ends_on_the_last_step():
    s = Schedule(steps=100, start=10, every=10)
    assert s.progress(10) == 0.0 and s.progress(100) == 1.0 and s.progress(500) == 1.0
    assert s.progress(55) == pytest.approx(1 - 0.5 ** 3)  # AGP: 87.5 % of the removal at half the time
    assert Schedule(steps=100, kind="linear").progress(50) == pytest.approx(0.5)
    assert [t for t in range(1, 120) if s.is_pruning_step(t)] == list(range(20, 101, 10))
    assert Schedule(steps=300).every == 10  # about 30 pruning steps by default
    assert Schedule(steps=95, every=10).is_pruning_step(95)  # the last step always plans


def test_masks_tighten_on_schedule_and_squash_changes_nothing():
    model = small_net()
    pruner = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=Schedule(steps=8, every=2),
                           round_to=4).prepare()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    _, records = train(model, pruner, 10)
    done = [r for r in records if r is not None]
    assert [r["step"] for r in done] == [2, 4, 6, 8]
    targets = [r["target_macs"] for r in done]
    assert targets == sorted(targets, reverse=True) and targets[-1] == 0.5
    assert all(abs(r["macs"] - r["target_macs"]) < 0.08 for r in done)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # nothing cut before squash
    # masked channels are zero in every tensor that holds them, and stayed zero through two more steps
    for name, keep in pruner.masks.items():
        assert not dict(model.named_parameters(), **dict(model.named_buffers()))[name][~keep].any()
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    result = pruner.squash()
    with torch.no_grad():
        cut = model(x)
    torch.testing.assert_close(cut, masked, rtol=1e-5, atol=1e-5)
    assert result.report["macs_after"] / result.report["macs_before"] == pytest.approx(done[-1]["macs"])
    assert model[0].out_channels < 32 and model[3].out_channels < 48
    assert all(len(g["keep"]) % 4 == 0 for g in result.recipe["groups"])
    # the recipe replays on a fresh model to the same architecture
    replayed = apply_recipe(small_net(), result.recipe)
    assert [p.shape for p in replayed.parameters()] == [p.shape for p in model.parameters()]


def test_demo_detector_outputs_equal_before_and_after_squash(tmp_path):
    from trt_prune.models import load_model

    loaded = load_model("builtin:demo-detector")
    model = loaded.model
    pruner = ChannelPruner(model, (1, 3, 64, 64), target_macs=0.5, schedule=Schedule(steps=2, every=1),
                           importance="l1", round_to=8).prepare()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    for _ in range(2):
        loss = model(torch.rand(2, 3, 64, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    model.eval()
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        masked = model(x)
    result = pruner.squash(out=tmp_path / "pruned", source="builtin:demo-detector")
    with torch.no_grad():
        cut = model(x)
    torch.testing.assert_close(cut, masked, rtol=1e-4, atol=1e-4)
    assert 0.45 < result.report["macs_after"] / result.report["macs_before"] < 0.56
    # the folder loads back to the same model
    back = load_model(str(tmp_path / "pruned")).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), cut)


def test_a_masked_channel_comes_back_when_it_ranks_higher():
    model = small_net()
    pruner = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=Schedule(steps=4, every=2),
                           importance="l1", round_to=4).prepare()
    train(model, pruner, 2)
    key = next(k for k in pruner.plan if k == "3")  # the 48-channel conv's group
    dropped = sorted(set(range(48)) - set(pruner.plan[key]))[0]
    # make the dropped filter the strongest: its saved dense values are what l1 scores while it is masked
    boost = pruner.saved["3.weight"]
    boost[dropped] = 100.0
    rec = None
    while rec is None:
        _, recs = train(model, pruner, 1, seed=5)
        rec = recs[0]
    assert dropped in pruner.plan[key] and rec["revived_channels"] >= 1
    # restored from the saved values, except the input slices of channels still masked in the layer before
    live = pruner.masks["3.weight"][dropped]
    assert live.any() and torch.all(model[3].weight.detach()[dropped][live] == 100.0)
    assert not model[3].weight.detach()[dropped][~live].any()


def test_taylor_uses_batchnorm_gamma_beta_and_scores_masked_channels_from_memory():
    model = small_net()
    pruner = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=Schedule(steps=4, every=2),
                           round_to=4).prepare()
    train(model, pruner, 1)
    # HALP's |γ·∂L/∂γ + β·∂L/∂β| per channel, accumulated on the BN layers of the groups
    assert set(pruner.bn_scores) == {"1", "4", "7"}
    gamma, beta = model[1].weight, model[1].bias
    assert pruner.bn_scores["1"].shape == (32,)
    assert "0.weight" in pruner.saliency and "1.weight" not in pruner.saliency
    expected = (gamma * gamma.grad + beta * beta.grad).abs()
    torch.testing.assert_close(pruner.bn_scores["1"], expected.detach())
    train(model, pruner, 1, seed=2)  # pruning step: accumulators reset, scores kept per group
    assert pruner.accumulated == 0 and not pruner.bn_scores
    masked = sorted(set(range(48)) - set(pruner.plan["3"]))
    before = pruner.scores["3"][masked].copy()
    train(model, pruner, 2, seed=3)
    np.testing.assert_array_equal(pruner.scores["3"][[i for i in masked if i not in pruner.plan["3"]]],
                                  before[[j for j, i in enumerate(masked) if i not in pruner.plan["3"]]])


def test_state_dict_resume_gives_the_same_recipe():
    def run(split: int | None):
        model = small_net()
        pruner = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=Schedule(steps=8, every=2),
                               round_to=4).prepare()
        torch.manual_seed(3)
        if split is None:
            train(model, pruner, 10)
            return pruner.squash().recipe
        opt, _ = train(model, pruner, split)
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}
        torch.save(saved, buf := __import__("io").BytesIO())
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)
        fresh = small_net()
        fresh.load_state_dict(saved["model"])
        resumed = ChannelPruner(fresh, (1, 3, 16, 16), target_macs=0.5, schedule=Schedule(steps=8, every=2),
                                round_to=4).prepare()
        resumed.load_state_dict(saved["pruner"])
        opt2 = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
        opt2.load_state_dict(saved["opt"])
        train(fresh, resumed, 10 - split, optimizer=opt2, start=split)
        return resumed.squash().recipe

    whole = run(None)
    assert run(5) == whole  # mid-interval: accumulated importance and saved dense values travel
    assert run(4) == whole  # right after a pruning step


def test_penalties_match_their_definitions():
    model = small_net()
    l1 = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=4, round_to=4, sparsity="bn_l1",
                       sparsity_weight=0.01).prepare()
    expected = 0.01 * sum(model[i].weight.abs().sum() for i in (1, 4, 7))
    torch.testing.assert_close(l1.penalty(), expected)
    lasso = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=4, round_to=4,
                          sparsity="group_lasso", sparsity_weight=0.5).prepare()
    # group '0': conv0's filters and bias, bn1's γ/β and conv3's input slices, per channel
    c = 5
    own = (model[0].weight[c].square().sum() + model[0].bias[c].square() + model[1].weight[c].square()
           + model[1].bias[c].square() + model[3].weight[:, c].square().sum())
    total = lasso.penalty()
    total.backward()
    assert model[3].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
    assert total.item() > 0.5 * own.sqrt().item()
    parts = [own]
    for ch in range(32):
        if ch != c:
            parts.append(model[0].weight[ch].square().sum() + model[0].bias[ch].square()
                         + model[1].weight[ch].square() + model[1].bias[ch].square()
                         + model[3].weight[:, ch].square().sum())
    group0 = sum(p.sqrt() for p in parts)
    assert group0.item() * 0.5 < total.item()
    none = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=4, round_to=4).prepare()
    assert none.penalty().item() == 0.0


def test_mask_for_plan_marks_exactly_what_the_cut_removes():
    from trt_prune.pruning import trace

    model = small_net()
    graph = trace(model, torch.rand(1, 3, 16, 16))
    masks = mask_for_plan(graph, {"0": list(range(0, 32, 2))})
    assert set(masks) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                          "3.weight"}
    assert masks["0.weight"][1].sum() == 0 and masks["0.weight"][0].all()
    assert masks["3.weight"][:, 1].sum() == 0 and masks["3.weight"][:, 0].all()


def test_bad_inputs_are_one_clear_error_each():
    model = small_net()
    for bad in (0, 1.0, 1.5, -0.2):
        with pytest.raises(PruneError, match="target_macs is the fraction"):
            ChannelPruner(model, (1, 3, 16, 16), target_macs=bad, schedule=4)
    pruner = ChannelPruner(model, (1, 3, 16, 16), target_macs=0.5, schedule=4, round_to=4)
    with pytest.raises(PruneError, match=r"step\(\) before prepare\(\)"):
        pruner.step()
    pruner.prepare()
    pruner.squash()
    with pytest.raises(PruneError, match=r"squash\(\) was already called"):
        pruner.squash()
    with pytest.raises(PruneError, match="start < steps"):
        Schedule(steps=5, start=5)
    with pytest.raises(PruneError, match="example_inputs"):
        ChannelPruner(small_net(), "x", target_macs=0.5, schedule=4).prepare()
    # ignoring most of the network leaves too little to prune: the error names the largest groups left whole
    with pytest.raises(PruneError, match=r"cannot be reached.*Largest groups left whole: '3' \(\d+% of MACs\): "
                                         r"read or written by ignored module '6'"):
        ChannelPruner(small_net(), (1, 3, 16, 16), target_macs=0.1, schedule=4, round_to=4, ignore=["6"]).prepare()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_ddp_two_cpu_processes_prune_identically(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "ddp_channel_worker.py"), str(tmp_path), _free_port()],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["plans"]) == 3 and ranks[0]["plans"] == ranks[1]["plans"]  # same masks every step
    assert ranks[0]["recipe"] == ranks[1]["recipe"]
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)  # bit-identical ranks
    # the squashed model is rank 0's masked model on both ranks (squash gives every rank rank 0's BatchNorm
    # statistics, which DDP had left one local update apart)
    for r in ranks:
        torch.testing.assert_close(r["squashed"], ranks[0]["masked"], rtol=1e-5, atol=1e-5)
    assert s0["0.weight"].shape[0] < 32


def _cli(*args):
    from click.testing import CliRunner

    from trt_prune.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("args, message", [
    (["builtin:demo-detector", "--train", "4"], "give --target-macs"),
    (["builtin:demo-detector", "--train", "4", "--target-params", "0.5"], "not --target-params"),
    (["builtin:demo-detector", "--distill", "--target-macs", "0.5"], "--distill works while training"),
    (["torchvision:resnet18", "--train", "4", "--target-macs", "0.5"], "is not such a detector"),
    (["builtin:demo-detector", "--train", "4", "--target-macs", "0.5", "--importance", "nope"], "unknown importance"),
])
def test_prune_train_bad_inputs_are_one_line(tmp_path, args, message):
    result = _cli("prune", *args, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_prune_train_writes_a_folder_that_loads(tmp_path):
    import json

    from trt_prune.models import load_model

    result = _cli("prune", "builtin:demo-detector", "--target-macs", "0.5", "--train", "3", "--batch", "2",
                  "--input-shape", "1x3x64x64", "--device", "cpu", "--distill", "-o", tmp_path / "g", "--json")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.output)
    assert report["steps"] == 3 and report["world_size"] == 1
    assert 0.45 < report["macs_after"] / report["macs_before"] < 0.56
    assert [h["step"] for h in report["history"]] == [1]  # 60 % of 3 steps: one pruning step, the final one
    loaded = load_model(str(tmp_path / "g"))
    assert loaded.meta.recipe["config"]["gradual"]["steps"] == 1
    with torch.no_grad():
        assert loaded.model.eval()(torch.rand(1, 3, 64, 64)).shape[1] == 8


def test_prune_train_under_torchrun_two_cpu_processes(tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", _free_port(),
           "-m", "trt_prune.cli", "prune", "builtin:demo-detector", "--target-macs", "0.5", "--train", "3",
           "--batch", "2", "--input-shape", "1x3x64x64", "--device", "cpu", "-o", str(tmp_path / "g"), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0 alone prints the report
    assert report["world_size"] == 2 and proc.stdout.count('"world_size"') == 1
    assert (tmp_path / "g" / "recipe.json").exists()
