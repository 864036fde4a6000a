"""Pruning rules beyond plain CNNs: grouped convs, channel shuffle, flatten into a classifier, parameters used
directly (class tokens, position embeddings, layer scales), attention — each checked for exactness or shape."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from trt_prune.pruning import apply_recipe, prune, trace


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "shufflenet_v2_x0_5", "vgg11_bn"])
def test_dead_channels_prune_exactly(name, kill_channels):
    """Channels whose writers are all zero contribute nothing (BN + ReLU nets): pruning exactly them keeps the
    outputs. Covers grouped convs (ResNeXt, RegNet), channel shuffle (ShuffleNet) and flatten into Linear (VGG)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.bias.data.uniform_(-0.1, 0.1)
    shape = (1, 3, 64, 64)
    graph = trace(model, torch.rand(shape))
    kill_channels(model, graph)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, shape, ratio=0.5, round_to=1)
    with torch.no_grad():
        got = result.model(x)
    assert result.report["params_after"] < 0.75 * result.report["params_before"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class TinyViT(nn.Module):
    """Patch embedding, class token, position embedding, a pre-norm block with attention written out
    (reshape into heads, q·k, softmax, ·v), an MLP and a layer scale, and a head on the class token."""

    def __init__(self, dim=32, heads=4, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.gamma * self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x[:, 0])


def test_transformer_parameters_and_heads_are_pruned():
    torch.manual_seed(0)
    model = TinyViT().eval()
    result = prune(model, (1, 3, 32, 32), ratio=0.5, round_to=4)
    p = result.model
    dim = p.patch.out_channels
    assert dim == 16 and p.cls_token.shape == (1, 1, 16) and p.pos.shape == (1, 17, 16)
    assert p.gamma.shape == (16,) and p.norm1.normalized_shape == (16,) and p.head.in_features == 16
    # q, k and v keep the same positions in every head: 4 heads of 8 channels become 4 heads of 4
    assert p.qkv.out_features == 3 * 4 * 4 and p.proj.in_features == 4 * 4
    assert p(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    replayed = apply_recipe(model, json.loads(json.dumps(result.recipe)))
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(replayed(x), p(x))


def test_swin_prunes_and_runs():
    model = torchvision.models.swin_t(weights=None).eval()
    result = prune(model, (1, 3, 224, 224), ratio=0.5)
    assert result.model(torch.rand(1, 3, 224, 224)).shape == (1, 1000)
    assert result.report["params_after"] < 0.35 * result.report["params_before"]


def test_vit_embedding_and_heads_are_pruned():
    """torchvision's ViT: nn.MultiheadAttention (sizes kept in attributes), class token and position embedding
    all follow the embedding dim; every head keeps the same width."""
    model = torchvision.models.vit_b_16(weights=None, image_size=64).eval()
    result = prune(model, (1, 3, 64, 64), ratio=0.5)
    p = result.model
    attn = p.encoder.layers[0].self_attention
    assert p.conv_proj.out_channels == p.hidden_dim == attn.embed_dim == 384
    assert attn.num_heads == 12 and attn.head_dim == 32 and attn.in_proj_weight.shape == (3 * 384, 384)
    assert p.class_token.shape == (1, 1, 384) and p.encoder.pos_embedding.shape == (1, 17, 384)
    assert p.encoder.layers[0].mlp[0].out_features == 1536
    x = torch.rand(1, 3, 64, 64)
    assert p(x).shape == (1, 1000)
    replayed = apply_recipe(model, json.loads(json.dumps(result.recipe)))
    torch.testing.assert_close(replayed(x), p(x))
    # ignoring the attention modules keeps the embedding whole, and the report says why
    attn_paths = tuple(n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))
    kept = prune(copy.deepcopy(model), (1, 3, 64, 64), ratio=0.5, ignore=attn_paths)
    assert kept.model.conv_proj.out_channels == 768 and kept.model.encoder.layers[0].mlp[0].out_features == 1536
    reasons = {s["reason"] for s in kept.report["skipped_groups"]}
    assert any("ignored module 'encoder.layers.encoder_layer_0.self_attention'" in r for r in reasons)


@pytest.mark.parametrize("name", ["cspdarknet53", "res2net50_26w_4s"])
def test_timm_blocks_that_split_by_a_stored_width(name, kill_channels):
    """timm's CSP stages and Res2Net blocks split by a width stored on the module (``expand_chs``, ``width``):
    after the cut the stored width follows the convs, and pruning dead channels is exact."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    shape = (1, 3, 64, 64)
    kill_channels(model, trace(model, torch.rand(shape)))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, shape, ratio=0.5, round_to=8)
    with torch.no_grad():
        got = result.model(x)
    assert result.report["params_after"] < 0.4 * result.report["params_before"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    kinds = ("CrossStage", "Bottle2neck")
    dense = next(m for m in model.modules() if type(m).__name__ in kinds)
    block = next(m for m in result.model.modules() if type(m).__name__ in kinds)
    if hasattr(block, "expand_chs"):
        assert block.expand_chs == block.conv_exp.conv.out_channels < dense.expand_chs
    else:
        assert block.width * block.scale == block.conv1.out_channels and block.width < dense.width
