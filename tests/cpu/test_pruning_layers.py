"""Pruning transposed convolutions, embeddings and PReLU inside small real networks: the right weight axis is
cut (the dead channels go and the outputs stay exactly the same), stored sizes follow, recipes replay on a
fresh model, and the dispatch tracer and torch.export see the same groups."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from trt_prune.errors import PruneError
from trt_prune.pruning import apply_recipe, macs_of, prune, trace

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial norm statistics and PReLU slopes, so that cutting the wrong index changes the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            elif isinstance(m, nn.PReLU):
                m.weight.uniform_(0.05, 0.5)
    return model.eval()


class Decoder(nn.Module):
    """Conv → BN → ReLU → ConvTranspose (2× upsampling, 32 → 48 channels) → BN → ReLU → Conv."""

    def __init__(self, dims: int = 2):
        super().__init__()
        self.enc = _CONV[dims](3, 32, 3, stride=2, padding=1)
        self.bn0 = _BN[dims](32)
        self.up = _CONV_T[dims](32, 48, 4, stride=2, padding=1)
        self.bn1 = _BN[dims](48)
        self.head = _CONV[dims](48, 5, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.enc(x)))
        return self.head(torch.relu(self.bn1(self.up(x))))


class GroupedDecoder(nn.Module):
    """Depthwise and grouped (2 groups) transposed convolutions between BN + ReLU."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.bn0 = nn.BatchNorm2d(32)
        self.dw = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, groups=32)
        self.bn1 = nn.BatchNorm2d(32)
        self.gc = nn.ConvTranspose2d(32, 32, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.enc(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        return self.head(torch.relu(self.bn2(self.gc(x))))


class TokenModel(nn.Module):
    """Embedding → Linear → LayerNorm → Linear over a sequence of 12 tokens. ``prune`` feeds a float example,
    so the token ids are made from it (the stand-in for a tokenizer upstream)."""

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, 32)
        self.fc1 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 7)

    def forward(self, x):
        ids = (x * self.vocab).long().clamp(0, self.vocab - 1)
        return self.fc2(self.norm(self.fc1(self.emb(ids))))


class PReLUNet(nn.Module):
    """Conv → BN → PReLU (one slope per channel) → Conv → PReLU (one shared slope) → Conv."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.act = nn.PReLU(32)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.act2 = nn.PReLU()
        self.c3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(self.act2(self.c2(self.act(self.bn(self.c1(x))))))


def _decoder_sizes(m: Decoder) -> dict:
    return {"enc.out": m.enc.out_channels, "up.in": m.up.in_channels, "up.out": m.up.out_channels,
            "up.weight": tuple(m.up.weight.shape), "up.bias": tuple(m.up.bias.shape), "bn1": m.bn1.num_features,
            "head.in": m.head.in_channels}


def _decoder_halved(dims: int) -> dict:
    return {"enc.out": 16, "up.in": 16, "up.out": 24, "up.weight": (16, 24) + (4,) * dims, "up.bias": (24,),
            "bn1": 24, "head.in": 24}


@dataclass
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    sizes: Callable[[nn.Module], dict]
    halved: dict  # sizes after prune(ratio=0.5, round_to=8)
    keep_alive: tuple[str, ...] = ()  # groups the dead-channel test leaves alone
    dead_ignore: tuple[str, ...] = ()  # and keeps whole


CASES = {
    **{f"conv_transpose{d}d": Case(lambda d=d: Decoder(d), (1, 3) + (16 if d < 3 else 8,) * d, _decoder_sizes,
                                   _decoder_halved(d)) for d in (1, 2, 3)},
    "grouped_conv_transpose": Case(
        GroupedDecoder, (1, 3, 16, 16),
        lambda m: {"enc.out": m.enc.out_channels, "dw": (m.dw.in_channels, m.dw.out_channels, m.dw.groups),
                   "dw.weight": tuple(m.dw.weight.shape), "gc": (m.gc.in_channels, m.gc.out_channels, m.gc.groups),
                   "gc.weight": tuple(m.gc.weight.shape), "gc.bias": tuple(m.gc.bias.shape),
                   "head.in": m.head.in_channels},
        {"enc.out": 16, "dw": (16, 16, 16), "dw.weight": (16, 1, 4, 4), "gc": (16, 16, 2),
         "gc.weight": (16, 8, 3, 3), "gc.bias": (16,), "head.in": 16}),
    "embedding": Case(
        TokenModel, (1, 12),
        lambda m: {"emb.dim": m.emb.embedding_dim, "emb.weight": tuple(m.emb.weight.shape),
                   "fc1": (m.fc1.in_features, m.fc1.out_features), "norm": m.norm.normalized_shape,
                   "fc2.in": m.fc2.in_features},
        {"emb.dim": 16, "emb.weight": (50, 16), "fc1": (16, 8), "norm": (8,), "fc2.in": 8},
        # LayerNorm's statistics include dead channels, so removing them is not exact: keep fc1's group whole
        keep_alive=("fc1",), dead_ignore=("norm",)),
    "prelu": Case(
        PReLUNet, (1, 3, 16, 16),
        lambda m: {"c1.out": m.c1.out_channels, "bn": m.bn.num_features, "act": m.act.num_parameters,
                   "act.weight": tuple(m.act.weight.shape), "c2": (m.c2.in_channels, m.c2.out_channels),
                   "act2.weight": tuple(m.act2.weight.shape), "c3.in": m.c3.in_channels},
        {"c1.out": 16, "bn": 16, "act": 16, "act.weight": (16,), "c2": (16, 8), "act2.weight": (1,),
         "c3.in": 8}),
}


def _build(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return _randomise(case.build())


def _input(case: Case, batch: int = 2) -> torch.Tensor:
    return torch.rand((batch,) + case.shape[1:], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(CASES))
def test_prune_halves_the_layer_and_runs(name):
    case = CASES[name]
    model = _build(case)
    result = prune(model, case.shape, ratio=0.5, round_to=8)
    assert case.sizes(result.model) == case.halved
    x = _input(case)
    with torch.no_grad():
        assert result.model(x).shape == model(x).shape
    assert result.report["params_after"] < result.report["params_before"]
    # the MACs predicted from the plan equal a recount on the pruned model's own trace
    assert macs_of(result.model, case.shape) == result.report["macs_after"] < result.report["macs_before"]


@pytest.mark.parametrize("name", list(CASES))
def test_dead_channels_are_the_ones_cut(name, kill_channels):
    """A random half of every group's channels (per split segment) is made dead, a different half in each group,
    so a cut on the wrong axis keeps the wrong positions: pruning must remove exactly the dead ones and leave
    the outputs unchanged."""
    case = CASES[name]
    model = _build(case)
    rng = np.random.default_rng(0)
    live: dict[str, list[int]] = {}

    def pick(group):
        if group.key in case.keep_alive:
            return []
        segs = group.segments or [list(range(group.size))]
        dead = {int(p) for seg in segs for p in rng.permutation(seg)[:len(seg) // 2]}
        live[group.key] = sorted(set(range(group.size)) - dead)
        return sorted(dead)

    kill_channels(model, trace(model, _input(case, 1)), pick=pick)
    assert live and all(len(keep) >= 8 for keep in live.values())
    x = _input(case)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, case.shape, ratio=0.5, round_to=8, ignore=case.dead_ignore)
    assert {g["key"]: g["keep"] for g in result.recipe["groups"]} == live
    with torch.no_grad():
        got = result.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_recipe_replays_on_fresh_model(name):
    case = CASES[name]
    result = prune(_build(case), case.shape, ratio=0.5, round_to=8)
    replayed = apply_recipe(_build(case), json.loads(json.dumps(result.recipe)))
    want, got = result.model.state_dict(), replayed.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert case.sizes(replayed) == case.halved
    x = _input(case)
    with torch.no_grad():
        assert torch.equal(replayed(x), result.model(x))


def _groups(graph) -> list:
    return [(g.key, g.size, g.pinned, g.segments, g.classes, sorted((s.module, s.kind) for s in g.slots))
            for g in graph.groups]


@pytest.mark.parametrize("name", list(CASES))
def test_dispatch_and_export_tracers_agree(name):
    case = CASES[name]
    model = _build(case)
    example = _input(case, 1)
    dispatch, export = trace(model, example, tracer="dispatch"), trace(model, example, tracer="export")
    assert _groups(dispatch) == _groups(export)
    assert dispatch.macs() == export.macs()


def test_conv_transpose_slots_and_macs():
    """The transposed conv produces its group through weight axis 1 (and its bias) and reads its input through
    weight axis 0; its MACs follow the input's positions, each scattering a [in, out, k, k] block."""
    graph = trace(Decoder(2).eval(), torch.rand(1, 3, 16, 16))
    groups = {g.key: g for g in graph.groups}
    assert set(groups) == {"enc", "up", "head"} and groups["head"].pinned
    assert sorted((s.module, s.kind) for s in groups["up"].slots) == [
        ("bn1", "norm"), ("head", "in"), ("up", "param:bias:0"), ("up", "param:weight:1")]
    assert ("up", "param:weight:0") in {(s.module, s.kind) for s in groups["enc"].slots}
    macs = {n.module: n.macs for n in graph.compute}
    assert macs == {"enc": 8 * 8 * 32 * 3 * 9, "up": 8 * 8 * 32 * 48 * 16, "head": 16 * 16 * 5 * 48}


def test_transposed_convolution_op_is_pruned():
    """``aten.convolution`` with transposed=True (a functional call) takes the same rule as conv_transpose2d."""

    class Functional(Decoder):
        def forward(self, x):
            x = torch.relu(self.bn0(self.enc(x)))
            x = torch.convolution(x, self.up.weight, self.up.bias, [2, 2], [1, 1], [1, 1], True, [0, 0], 1)
            return self.head(torch.relu(self.bn1(x)))

    torch.manual_seed(0)
    model = _randomise(Functional(2))
    result = prune(model, (1, 3, 16, 16), ratio=0.5, round_to=8)
    assert _decoder_sizes(result.model) == _decoder_halved(2)
    assert result.model(torch.rand(1, 3, 16, 16)).shape == (1, 5, 16, 16)


def test_grouped_transposed_conv_with_other_widths_is_kept_whole_or_refused_when_strict():
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
                          nn.ConvTranspose2d(32, 64, 3, groups=2), nn.ReLU(), nn.Conv2d(64, 5, 1)).eval()
    with pytest.raises(PruneError, match=r"grouped transposed convolution '4' \(groups=2, in=32, out=64\).*"
                                         r"strict"):
        prune(model, (1, 3, 16, 16), ratio=0.5, strict=True)
    result = prune(model, (1, 3, 16, 16), ratio=0.5)
    assert result.report["kept_whole"] == [{"module": "4", "op": "conv_transpose2d", "reason": (
        "grouped transposed convolution '4' (groups=2, in=32, out=64) has no pruning rule yet")}]
    skipped = {g["key"]: g["reason"] for g in result.report["skipped_groups"]}
    assert skipped["2"].startswith("conv_transpose2d in '4': grouped transposed convolution")
    # the group before the kept one is still pruned; the transposed conv and what it reads are untouched
    assert (result.model[0].out_channels, result.model[2].in_channels, result.model[2].out_channels) == (16, 16, 32)
    assert result.model(torch.rand(1, 3, 16, 16)).shape == (1, 5, 14, 14)


def test_shared_prelu_slope_passes_through():
    """A PReLU with one slope (num_parameters=1) is no slot of any group: its weight is never cut."""
    graph = trace(PReLUNet().eval(), torch.rand(1, 3, 16, 16))
    slots = {(s.module, s.kind) for g in graph.groups for s in g.slots}
    assert ("act", "norm") in slots and not any(m == "act2" for m, _ in slots)
