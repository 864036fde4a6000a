"""Ops and blocks that used to stop pruning: element-wise ops of three tensors (GRN's addcmul), repeat,
reshape_as, statistics over the channel axis, a grouped conv fed by channels kept whole, and modules that read a
size they stored before the cut (kept whole and pruned again, or fixed up for the timm classes we know)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trt_prune.errors import PruneError
from trt_prune.pruning import prune, trace


def _bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.bias.uniform_(-0.2, 0.2)
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta", "pos")):
                p.uniform_(0.5, 1.5)
    return model.eval()


def _prune_dead_exactly(model: nn.Module, shape, kill) -> nn.Module:
    """Nothing kept whole; half of every group's channels made dead, pruned at 50 %: the outputs stay the same.
    Returns the pruned model."""
    graph = trace(model, torch.rand(shape))
    assert not graph.kept_whole
    kill(model, graph)
    x = torch.rand(2, *shape[1:])
    with torch.no_grad():
        expected = model(x)
    result = prune(model, shape, ratio=0.5, round_to=8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)
    return result.model


class GRNNet(nn.Module):
    """ConvNeXt-V2's global response normalisation: an L2 norm over the positions, divided by its mean over the
    channels, applied with ``addcmul(beta, gamma, x * n)``; then a channel statistic (a sum) gating the features."""

    def __init__(self):
        super().__init__()
        self.a = _bn_relu(3, 32)
        self.gamma = nn.Parameter(torch.zeros(32))
        self.beta = nn.Parameter(torch.zeros(32))
        self.b = _bn_relu(32, 32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.a(x)
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        x = x + torch.addcmul(self.beta.view(1, -1, 1, 1), self.gamma.view(1, -1, 1, 1), x * n)
        x = self.b(x)
        x = x / (x.abs().sum(dim=1, keepdim=True) + 1.0)  # zero channels add nothing to a sum: exact
        return self.head(x)


class TokenNet(nn.Module):
    """A position embedding repeated over the batch, and a BN over flattened tokens put back with reshape_as."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 16, 32))
        self.fc1 = nn.Linear(32, 48)
        self.bn = nn.BatchNorm1d(48)
        self.fc2 = nn.Linear(48, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # B, 16, 32
        t = t + self.pos.repeat(t.shape[0], 1, 1)
        h = self.fc1(t)
        h = torch.relu(self.bn(h.flatten(0, 1)).reshape_as(h))
        return self.head((t + self.fc2(h)).mean(1))


@pytest.mark.parametrize("make,shape", [(GRNNet, (1, 3, 16, 16)), (TokenNet, (1, 3, 16, 16))])
def test_new_rules_prune_dead_channels_exactly(make, shape, kill_channels):
    """addcmul binds its parameter operands to the channels, repeat and reshape_as pass them through, a
    statistic over the channels is taken over the kept ones: nothing is kept whole, and dead channels prune away
    with the outputs unchanged (except through GRN's channel mean, which divides by the channel count)."""
    model = _randomise(make())
    graph = trace(model, torch.rand(shape))
    assert not graph.kept_whole
    kill_channels(model, graph)
    x = torch.rand(2, *shape[1:])
    with torch.no_grad():
        expected = model(x)
    result = prune(model, shape, ratio=0.5, round_to=8)
    assert result.report["kept_whole"] == [] and result.report["groups_pruned"] >= 2
    assert result.report["params_after"] < 0.6 * result.report["params_before"]
    with torch.no_grad():
        got = result.model(x)
    if make is GRNNet:
        # GRN's channel mean divides by the channel count: halving it doubles n for every live channel, so the
        # outputs change (as LayerNorm's statistics do); the other ops are exact
        assert got.shape == expected.shape and result.model.gamma.numel() == 16
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert result.model.pos.shape == (1, 16, 16)


class GRNSumNet(GRNNet):
    """GRNNet with the channel mean replaced by a sum, so that pruning dead channels is exact throughout."""

    def forward(self, x):
        x = self.a(x)
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.sum(dim=1, keepdim=True) + 1e-6)
        x = x + torch.addcmul(self.beta.view(1, -1, 1, 1), self.gamma.view(1, -1, 1, 1), x * n)
        return self.head(self.b(x))


def test_addcmul_and_channel_sum_are_exact(kill_channels):
    m = _prune_dead_exactly(_randomise(GRNSumNet()), (1, 3, 16, 16), kill_channels)
    assert m.gamma.numel() == m.beta.numel() == m.a[0].out_channels == 16


def test_repeat_over_the_channel_axis_is_kept_whole():
    class Tiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = _bn_relu(3, 32)
            self.a = nn.Conv2d(32, 16, 3, padding=1)
            self.b = nn.Conv2d(32, 8, 1)

        def forward(self, x):
            return self.b(self.a(self.pre(x)).repeat(1, 2, 1, 1))

    result = prune(Tiled().eval(), (1, 3, 8, 8), ratio=0.5)
    kept = result.report["kept_whole"]
    assert [(k["module"], k["op"]) for k in kept] == [("<top level>", "repeat")]
    assert "tiles the channel axis 2 times" in kept[0]["reason"]
    assert (result.model.pre[0].out_channels, result.model.a.out_channels) == (16, 16)
    with pytest.raises(PruneError, match="tiles the channel axis"):
        prune(Tiled().eval(), (1, 3, 8, 8), ratio=0.5, strict=True)


class Rolled(nn.Module):
    """A roll over the channels (kept whole) feeding a depthwise conv: the conv's channels are as fixed as its
    input, and the rest of the model still prunes."""

    def __init__(self):
        super().__init__()
        self.a = _bn_relu(3, 32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.b = _bn_relu(32, 32)
        self.c = _bn_relu(32, 32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = self.dw(torch.roll(self.a(x), 1, dims=1))
        return self.head(self.c(self.b(x)))


def test_grouped_conv_after_a_kept_whole_op():
    result = prune(Rolled().eval(), (1, 3, 16, 16), ratio=0.5, round_to=8)
    assert [k["op"] for k in result.report["kept_whole"]] == ["roll"]
    m = result.model
    assert (m.a[0].out_channels, m.dw.out_channels, m.b[0].in_channels) == (32, 32, 32)
    assert (m.b[0].out_channels, m.c[0].out_channels) == (16, 16)
    assert m(torch.rand(1, 3, 16, 16)).shape == (1, 4, 16, 16)


class StoredWidth(nn.Module):
    """A layer scale that reshapes its parameter by a width stored at construction (timm's metaformer Scale
    before its fix-up): cut, it no longer runs."""

    def __init__(self, c: int):
        super().__init__()
        self.shape = (c, 1, 1)
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class StoredNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _bn_relu(3, 32)
        self.ls = StoredWidth(32)
        self.b = _bn_relu(32, 32)
        self.c = _bn_relu(32, 32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.c(self.b(self.ls(self.a(x)))))


def test_module_that_no_longer_runs_is_kept_whole_and_pruned_again():
    model = StoredNet().eval()
    result = prune(model, (1, 3, 16, 16), ratio=0.5, round_to=8)
    kept = result.report["kept_whole"]
    assert [(k["module"], k["op"]) for k in kept] == [("ls", "forward")]
    assert "is invalid for input of size 16" in kept[0]["reason"]
    assert result.recipe["config"]["ignore"] == ["ls"]  # the recipe replays the same cut
    m = result.model
    assert (m.a[0].out_channels, m.ls.scale.numel(), m.b[0].out_channels, m.c[0].out_channels) == (32, 32, 16, 16)
    assert m(torch.rand(2, 3, 16, 16)).shape == (2, 4, 16, 16)
    assert model.a[0].out_channels == 32 and model.b[0].out_channels == 32  # the user's model is untouched


def test_no_longer_runs_is_an_error_when_strict_or_in_place():
    with pytest.raises(PruneError, match=r"no longer runs in 'ls' \(RuntimeError: shape '\[32, 1, 1\]'"):
        prune(StoredNet().eval(), (1, 3, 16, 16), ratio=0.5, strict=True)
    with pytest.raises(PruneError, match="no longer runs in 'ls'"):
        prune(StoredNet().eval(), (1, 3, 16, 16), ratio=0.5, inplace=True)


@pytest.mark.parametrize("name,size,block,exact", [
    ("poolformerv2_s12", 64, "Scale", False),
    ("mobilenetv4_hybrid_medium", 256, "MultiQueryAttention2d", True),
])
def test_timm_stored_sizes_follow_the_cut(name, size, block, exact, kill_channels):
    """timm classes that store widths (metaformer's layer scales, MobileNetV4's multi-query attention) get
    fix-ups: nothing is kept whole for them, and pruning dead channels is exact (where no norm takes statistics
    over the channels: PoolFormerV2's GroupNorm(1) does, as a LayerNorm would)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    shape = (1, 3, size, size)
    kill_channels(model, trace(model, torch.rand(shape)))
    x = torch.rand(1, *shape[1:])
    with torch.no_grad():
        expected = model(x)
    result = prune(copy.deepcopy(model), shape, ratio=0.5, round_to=8)
    assert not [k for k in result.report["kept_whole"] if k["op"] == "forward"]
    assert result.report["macs_after"] < 0.35 * result.report["macs_before"]
    with torch.no_grad():
        got = result.model(x)
    assert got.shape == expected.shape
    if exact:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    dense = next(m for m in model.modules() if type(m).__name__ == block)
    cut = next(m for m in result.model.modules() if type(m).__name__ == block)
    if block == "Scale":
        assert cut.shape[0] == cut.scale.numel() < dense.shape[0]
    else:
        assert cut.key_dim == cut.key.proj.out_channels < dense.key_dim


class PaddedChannels(nn.Module):
    """Constant channels padded onto a feature map (EfficientViT's linear attention pads v with ones)."""

    def __init__(self):
        super().__init__()
        self.a = _bn_relu(3, 32)
        self.b = _bn_relu(35, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = nn.functional.pad(self.a(x), (0, 0, 0, 0, 1, 2), value=1.0)
        return self.head(self.b(x))


def test_constant_pad_of_the_channel_axis_prunes_the_rest_exactly(kill_channels):
    m = _prune_dead_exactly(_randomise(PaddedChannels()), (1, 3, 16, 16), kill_channels)
    assert (m.a[0].out_channels, m.b[0].in_channels, m.b[0].out_channels) == (16, 19, 8)


class Multiplier(nn.Module):
    """A depthwise conv with a channel multiplier of 2 (MobileOne/FastViT downsampling): input c writes outputs
    2c and 2c+1, so they are pruned with it."""

    def __init__(self):
        super().__init__()
        self.a = _bn_relu(3, 32)
        self.dw = nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=32)
        self.bn = nn.BatchNorm2d(64)
        self.b = _bn_relu(64, 32)
        self.head = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.head(self.b(torch.relu(self.bn(self.dw(self.a(x))))))


def test_depthwise_with_channel_multiplier_prunes_exactly(kill_channels):
    m = _prune_dead_exactly(_randomise(Multiplier()), (1, 3, 16, 16), kill_channels)
    assert (m.dw.in_channels, m.dw.groups, m.dw.out_channels, m.b[0].in_channels) == (16, 16, 32, 32)


def test_instance_norm_is_cut_with_its_channels(kill_channels):
    model = _randomise(nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
                                     nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1)))
    m = _prune_dead_exactly(model, (1, 3, 16, 16), kill_channels)
    assert m[1].weight.numel() == m[1].bias.numel() == m[1].num_features == m[0].out_channels == 16
