"""Structured pruning: the channel graph, surgery, alignment, recipes — asserted on real models."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from trt_prune.errors import PruneError
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.pruning import apply_recipe, macs_of, prune, register_channel_rule, trace
from trt_prune.pruning.graph import CHANNEL_RULES, Channels

SHAPE = (1, 3, 128, 128)


def _conv_out_channels(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_graph_groups_of_demo_detector(detector):
    graph = trace(detector, torch.rand(SHAPE))
    groups = {g.key: g for g in graph.groups}
    # a C2f block: cv1's output is split in halves and the second half is added to each bottleneck's output
    key = "backbone.stage2.1.cv1.conv+backbone.stage2.1.m.0.cv2.conv+backbone.stage2.1.m.1.cv2.conv"
    assert key in groups
    g = groups[key]
    assert g.size == 64 and g.pinned is None
    assert g.segments == [list(range(32)), list(range(32, 64))]
    # the head's last convolutions feed the output: pinned, not pruned
    pinned = [g for g in graph.groups if g.pinned]
    assert {g.key for g in pinned} == {"head.0.box.2+head.1.box.2+head.2.box.2",
                                       "head.0.cls.2+head.1.cls.2+head.2.cls.2"}
    # MACs counted on the graph scale with the input area
    assert graph.macs() * 4 == trace(detector, torch.rand(1, 3, 256, 256)).macs()


def test_prune_keeps_outputs_and_aligns_channels(detector):
    result = prune(detector, SHAPE, ratio=0.4, round_to=8)
    x = torch.rand(2, 3, 128, 128)
    assert result.model(x).shape == detector(x).shape
    before, after = _conv_out_channels(detector), _conv_out_channels(result.model)
    changed = [n for n in before if after[n] != before[n]]
    assert len(changed) > 40
    assert all(after[n] % 8 == 0 for n in changed)
    assert after["head.0.box.2"] == 4 and after["head.0.cls.2"] == detector.num_classes
    rep = result.report
    assert rep["params_after"] == sum(p.numel() for p in result.model.parameters()) < rep["params_before"]
    assert rep["macs_after"] < 0.5 * rep["macs_before"]
    # the MACs predicted from the plan equal a recount on the pruned model's own trace
    assert macs_of(result.model, SHAPE) == rep["macs_after"]
    # the input model is untouched
    assert _conv_out_channels(detector) == before


def test_pruning_dead_channels_preserves_function(detector, kill_channels):
    """Channels whose every reader and writer is zero contribute nothing: pruning exactly them must not change
    the outputs. This checks the coupling of residuals, splits, concats and the neck end to end."""
    import copy

    model = copy.deepcopy(detector)
    kill_channels(model, trace(model, torch.rand(SHAPE)))
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, SHAPE, ratio=0.5, round_to=8)
    with torch.no_grad():
        got = result.model(x)
    assert result.report["params_after"] < 0.4 * result.report["params_before"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_recipe_replays_on_fresh_model(detector):
    result = prune(detector, SHAPE, ratio=0.3, round_to=16)
    recipe = json.loads(json.dumps(result.recipe))
    replayed = apply_recipe(detector, recipe)
    assert _conv_out_channels(replayed) == _conv_out_channels(result.model)
    x = torch.rand(1, 3, 128, 128)
    torch.testing.assert_close(replayed(x), result.model(x))
    assert all(c % 16 == 0 for n, c in _conv_out_channels(result.model).items() if "head" not in n or "2" not in n)


def test_recipe_for_other_architecture_is_refused(detector):
    recipe = prune(detector, SHAPE, ratio=0.3).recipe
    other = DemoDetector(widths=(16, 32, 64, 128, 192))
    with pytest.raises(PruneError, match="does not match"):
        apply_recipe(other, recipe)
    with pytest.raises(PruneError, match="format"):
        apply_recipe(detector, {"groups": []})


def test_target_macs_and_ignore(detector):
    result = prune(detector, SHAPE, target_macs=0.5, ignore=("backbone.stem",))
    frac = result.report["macs_after"] / result.report["macs_before"]
    assert 0.42 <= frac <= 0.58
    assert result.model.backbone.stem.conv.out_channels == 16
    rows = {r["module"]: r for r in result.report["layers"]}
    assert rows["backbone.stem.conv"]["left_alone"] == "ignored (backbone.stem)"
    # the stem's output is read by stage1.0.conv, whose input channels therefore stay whole
    assert result.model.backbone.stage1[0].conv.in_channels == 16


def test_ignored_container_is_opaque_and_reported(detector):
    """Ignoring a whole container (here the neck) leaves every layer inside it and every channel it touches
    alone, and the report says so: no silent partial pruning."""
    result = prune(detector, SHAPE, ratio=0.5, ignore=("neck",))
    before = {n: m.weight.shape for n, m in detector.named_modules() if isinstance(m, nn.Conv2d)}
    after = {n: m.weight.shape for n, m in result.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(after[n] == before[n] for n in before if n.startswith("neck."))
    rows = {r["module"]: r for r in result.report["layers"]}
    assert all(rows[n]["left_alone"] == "ignored (neck)" for n in before if n.startswith("neck."))
    # the backbone outputs the neck reads are pinned, with the reason
    skipped = {s["key"]: s["reason"] for s in result.report["skipped_groups"]}
    assert "read or written by ignored module 'neck'" in skipped["backbone.stage4.2.cv2.conv"]
    assert any(after[n] != before[n] for n in before if n.startswith("backbone."))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval(detector, ratio):
    with pytest.raises(PruneError, match="ratio must be in"):
        prune(detector, SHAPE, ratio=ratio)


class CumsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=2))


def test_unknown_op_is_an_error_then_a_registered_rule_works():
    model = CumsumNet().eval()
    with pytest.raises(PruneError, match=re.escape("no channel rule for op 'aten.cumsum.default' in module "
                                                   "'<top level>'")):
        prune(model, (1, 3, 16, 16), ratio=0.5)

    @register_channel_rule("cumsum")
    def _cumsum(state, node, args):  # cumsum over a spatial dim keeps channels in place
        return Channels(args[0].dim, list(args[0].elements))

    try:
        result = prune(model, (1, 3, 16, 16), ratio=0.5)
        assert result.model.a.out_channels == 8 and result.model.b.in_channels == 8
    finally:
        CHANNEL_RULES.unregister("cumsum")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_classifiers(name):
    import torchvision

    model = torchvision.models.get_model(name, weights=None).eval()
    result = prune(model, (1, 3, 64, 64), ratio=0.5)
    x = torch.rand(1, 3, 64, 64)
    assert result.model(x).shape == (1, 1000)
    assert result.report["macs_after"] < 0.5 * result.report["macs_before"]
    head = result.model.fc if name == "resnet18" else result.model.classifier[-1]
    assert head.out_features == 1000 and head.in_features % 8 == 0
    replayed = apply_recipe(model, json.loads(json.dumps(result.recipe)))
    torch.testing.assert_close(replayed(x), result.model(x))


def test_preferred_round_to_follows_the_hardware():
    from trt_prune.pruning.alignment import cpu_flags, preferred_round_to

    flags = cpu_flags("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert "avx512f" in flags
    assert preferred_round_to("onnxruntime", flags) == 16
    assert preferred_round_to("onnxruntime", {"avx2"}) == 8
    assert preferred_round_to("tensorrt", set()) == 32
