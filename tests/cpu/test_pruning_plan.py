"""Planning: the fast dispatch tracer against torch.export, importance criteria (Taylor), global pruning, the
per-group maximum ratio, a parameter target, and in-place pruning."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from trt_prune.errors import PruneError
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.pruning import apply_recipe, prune, trace
from trt_prune.pruning.record import record


def _structure(graph):
    return sorted((g.key, g.size, g.pinned, g.segments, sorted((s.module, s.kind) for s in g.slots))
                  for g in graph.groups)


class _Tokens(nn.Module):
    """A small transformer encoder: attention heads, a class token, a layer scale."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 64, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 64))
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0)
        self.scale = nn.Parameter(torch.ones(64))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        t = self.layer(t) * self.scale
        return self.head(t[:, 0])


@pytest.mark.parametrize("build,shape", [
    (lambda: DemoDetector(), (1, 3, 128, 128)),
    (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    (lambda: torchvision.models.mobilenet_v3_small(), (1, 3, 64, 64)),
    (lambda: _Tokens(), (1, 3, 32, 32)),
], ids=["demo-detector", "resnet18", "mobilenet_v3_small", "transformer"])
def test_dispatch_tracer_matches_torch_export(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.rand(shape)
    fast, exported = trace(model, x, tracer="dispatch"), trace(model, x, tracer="export")
    assert _structure(fast) == _structure(exported)
    assert fast.macs() == exported.macs() > 0
    # the same ATen ops in the same order as torch.export shows them
    ops = [str(n.target) for n in record(model, x).graph.nodes if n.op == "call_function"
           and "getitem" not in str(n.target)]
    ep = torch.export.export(model, (x,), strict=False)
    ep_ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert ops == ep_ops


def test_recording_leaves_the_model_and_its_weights_alone():
    model = DemoDetector().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = trace(model, torch.rand(1, 3, 64, 64))
    assert model.training
    assert graph.outputs.device.type == "meta"  # traced on shapes only: no arithmetic
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the meta trace knows every conv by its module path
    assert {s.module for s in graph.slots.values()} >= {n for n, m in model.named_modules()
                                                        if isinstance(m, nn.Conv2d)}


class _DataDependent(nn.Module):
    """Control flow on tensor values: a shape-only (meta) run cannot decide the branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if y.mean() > -1.0:  # always true, but only a real run knows
            y = torch.relu(self.b(y))
        return self.c(y)


def test_data_dependent_model_is_recorded_from_a_real_run():
    model = _DataDependent().eval()
    graph = trace(model, torch.rand(1, 3, 16, 16))
    assert graph.outputs.device.type == "cpu"  # the meta run could not branch: a real run was recorded
    assert {g.key for g in graph.groups if not g.pinned} == {"a", "b"}
    result = prune(model, (1, 3, 16, 16), ratio=0.5, round_to=8)
    assert (result.model.a.out_channels, result.model.b.out_channels) == (16, 16)


def test_tracer_name_is_checked():
    with pytest.raises(PruneError, match="tracer must be one of"):
        trace(_DataDependent(), torch.rand(1, 3, 8, 8), tracer="fx")


class _TwoGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 32, 3, padding=1)
        self.b = nn.Conv2d(32, 32, 3, padding=1)
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def _keep_of(result, key):
    return next(g["keep"] for g in result.recipe["groups"] if g["key"] == key)


def test_taylor_importance_follows_the_loss_not_the_magnitude():
    torch.manual_seed(0)
    model = _TwoGroups().eval()
    with torch.no_grad():
        model.a.weight[:16] *= 10.0  # the largest weights of group 'a'...
        model.a.bias[:16] = -1e4  # ...are always cut off by the ReLU: the loss does not depend on them
    batches = [torch.rand(2, 3, 16, 16) for _ in range(2)]

    def loss_fn(m, batch):
        return m(batch).square().mean()

    l1 = prune(model, (1, 3, 16, 16), ratio=0.5, round_to=8, importance="l1")
    taylor = prune(model, (1, 3, 16, 16), ratio=0.5, round_to=8, importance="taylor", data=batches,
                   loss_fn=loss_fn)
    assert _keep_of(l1, "a") == list(range(16))
    assert _keep_of(taylor, "a") == list(range(16, 32))
    # gradients were taken without touching the user's model
    assert all(p.grad is None for p in model.parameters())


def test_taylor_without_data_is_a_clear_error():
    with pytest.raises(PruneError, match="taylor' needs gradients: pass data="):
        prune(_TwoGroups(), (1, 3, 16, 16), importance="taylor")


def _uneven():
    """Group 'a': every channel equally strong. Group 'b': half its channels near zero."""
    torch.manual_seed(0)
    model = _TwoGroups().eval()
    with torch.no_grad():
        model.a.weight.fill_(0.1)
        model.b.weight.normal_()
        model.b.weight[16:] *= 1e-3
    return model


def test_global_pruning_takes_the_weak_channels_wherever_they_are():
    model = _uneven()
    local = prune(model, (1, 3, 16, 16), ratio=0.25, round_to=8)
    glob = prune(model, (1, 3, 16, 16), ratio=0.25, round_to=8, global_pruning=True)
    assert (local.model.a.out_channels, local.model.b.out_channels) == (24, 24)
    assert (glob.model.a.out_channels, glob.model.b.out_channels) == (32, 16)
    assert _keep_of(glob, "b") == list(range(16))
    fresh = _uneven()
    replayed = apply_recipe(fresh, glob.recipe)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(replayed(x), glob.model(x))
    # no group loses more than max_ratio, rounded to whole multiples of round_to
    capped = prune(model, (1, 3, 16, 16), ratio=0.25, round_to=8, global_pruning=True, max_ratio=0.3)
    assert capped.model.b.out_channels == 24


def test_max_ratio_caps_a_uniform_ratio():
    result = prune(DemoDetector().eval(), (1, 3, 64, 64), ratio=0.9, round_to=8, max_ratio=0.5)
    dense = DemoDetector()
    for name, m in result.model.named_modules():
        if isinstance(m, nn.Conv2d):
            before = dense.get_submodule(name).out_channels
            assert m.out_channels >= before // 2 and (m.out_channels % 8 == 0 or m.out_channels == before)


def test_target_params_is_reached():
    result = prune(DemoDetector().eval(), (1, 3, 64, 64), round_to=8, target_params=0.5)
    kept = result.report["params_after"] / result.report["params_before"]
    assert abs(kept - 0.5) < 0.03
    assert result.recipe["config"]["target_params"] == 0.5
    with pytest.raises(PruneError, match="not both"):
        prune(DemoDetector(), (1, 3, 64, 64), target_params=0.5, target_macs=0.5)
    with pytest.raises(PruneError, match="max_ratio must be in"):
        prune(DemoDetector(), (1, 3, 64, 64), max_ratio=1.0)


def test_inplace_cuts_the_given_model_and_check_can_be_skipped():
    model = _TwoGroups().eval()
    result = prune(model, (1, 3, 16, 16), ratio=0.5, round_to=8, inplace=True, check=False)
    assert result.model is model and model.a.out_channels == 16
    copy_result = prune(_TwoGroups().eval(), (1, 3, 16, 16), ratio=0.5, round_to=8)
    assert copy_result.model.a.out_channels == 16

