"""Surgery: cut one channel axis of one module down to the kept indices.

A handler per module type, found through the module's class hierarchy; register your own with
:func:`register_surgery`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import PruneError
from ..registry import Registry

SurgeryFn = Callable[[nn.Module, str, torch.Tensor], None]
SURGERY: Registry[type, SurgeryFn] = Registry("surgery", PruneError, describe=lambda t: t.__qualname__)


def register_surgery(*types: type, replace: bool = False):
    """Register ``fn(module, kind, keep)`` cutting ``module``'s ``kind`` axis (out/in/norm/depthwise) to ``keep``."""
    return SURGERY.decorator(*types, replace=replace)


def _cut(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    new = tensor.detach().index_select(dim, keep.to(tensor.device))  # a new tensor already
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:
        setattr(module, name, new)


@register_surgery(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(module, kind, keep):
    n = int(keep.numel())
    if kind == "out":
        _cut(module, "weight", 0, keep)
        _cut(module, "bias", 0, keep)
        module.out_channels = n
    elif kind == "in":
        _cut(module, "weight", 1, keep)
        module.in_channels = n
    elif kind == "depthwise":
        _cut(module, "weight", 0, keep)
        _cut(module, "bias", 0, keep)
        module.in_channels = module.out_channels = module.groups = n
    elif kind == "multiplier":  # depthwise with m outputs per input: ``keep`` lists m rows per kept input
        m = module.out_channels // module.in_channels
        _cut(module, "weight", 0, keep)
        _cut(module, "bias", 0, keep)
        module.out_channels = n
        module.in_channels = module.groups = n // m
    else:
        raise PruneError(f"convolution has no '{kind}' channel axis")


_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_surgery(*_CONV_TRANSPOSE)
def _conv_transpose(module, kind, keep):
    """A groups=1 transposed conv is cut through ``param:`` slots (weight axis 0 in, axis 1 out, bias); only the
    depthwise kind needs a handler. Sizes are updated by the fix-up."""
    if kind != "depthwise":
        raise PruneError(f"transposed convolution has no '{kind}' channel axis")
    _cut(module, "weight", 0, keep)
    _cut(module, "bias", 0, keep)
    module.groups = int(keep.numel())


@register_surgery(nn.PReLU)
def _prelu(module, kind, keep):
    _cut(module, "weight", 0, keep)
    module.num_parameters = int(keep.numel())


@register_surgery(nn.Linear)
def _linear(module, kind, keep):
    if kind == "out":
        _cut(module, "weight", 0, keep)
        _cut(module, "bias", 0, keep)
        module.out_features = int(keep.numel())
    elif kind == "in":
        _cut(module, "weight", 1, keep)
        module.in_features = int(keep.numel())
    else:
        raise PruneError(f"linear layer has no '{kind}' channel axis")


@register_surgery(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(module, kind, keep):
    for name in ("weight", "bias", "running_mean", "running_var"):
        _cut(module, name, 0, keep)
    module.num_features = int(keep.numel())


@register_surgery(nn.LayerNorm)
def _layer_norm(module, kind, keep):
    _cut(module, "weight", 0, keep)
    _cut(module, "bias", 0, keep)
    module.normalized_shape = (int(keep.numel()),)


@register_surgery(nn.GroupNorm)
def _group_norm(module, kind, keep):
    _cut(module, "weight", 0, keep)
    _cut(module, "bias", 0, keep)
    module.num_channels = int(keep.numel())


def _grouped_conv(module, keep: torch.Tensor) -> None:
    """A grouped conv whose output channel i is coupled to input channel i: keep the same positions on both
    sides; every group keeps the same count (the graph guarantees it), so ``groups`` is unchanged. A transposed
    conv's weight ``[in, out/groups, …]`` is the same layout with the roles swapped, so the same cut fits it."""
    width = module.in_channels // module.groups
    rows = []
    for j in range(module.groups):
        kept = [int(p) for p in keep if j * width <= int(p) < (j + 1) * width]
        local = torch.tensor([p - j * width for p in kept], dtype=torch.long)
        rows.append(module.weight.detach()[kept].index_select(1, local))
    weight = torch.cat(rows, 0).clone()
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    _cut(module, "bias", 0, keep)
    module.in_channels = module.out_channels = int(keep.numel())


FIXUPS: Registry[type, Callable[[nn.Module, str], None]] = Registry("fixup", PruneError,
                                                                   describe=lambda t: t.__qualname__)


def register_fixup(*types: type, replace: bool = False):
    """Register ``fn(module, path)`` run after a module's tensors were cut, to update sizes it stores."""
    return FIXUPS.decorator(*types, replace=replace)


@register_fixup(*_CONV_TRANSPOSE)
def _conv_transpose_sizes(module, path):
    module.in_channels = int(module.weight.shape[0])
    module.out_channels = int(module.weight.shape[1]) * module.groups


@register_fixup(nn.Embedding)
def _embedding_sizes(module, path):
    module.embedding_dim = int(module.weight.shape[1])


@register_fixup(nn.MultiheadAttention)
def _mha_sizes(module, path):
    embed = int(module.in_proj_weight.shape[1]) if module.in_proj_weight is not None else module.embed_dim
    if embed % module.num_heads:
        raise PruneError(f"attention '{path}' would keep {embed} channels for {module.num_heads} heads")
    module.embed_dim = module.kdim = module.vdim = embed
    module.head_dim = embed // module.num_heads


@register_fixup(nn.modules.instancenorm._InstanceNorm)
def _instance_norm_sizes(module, path):
    if module.weight is not None:
        module.num_features = int(module.weight.numel())


# Fix-ups for classes of optional or heavy packages, by qualified name, so this module imports none of them.
NAMED_FIXUPS: dict[str, Callable[[nn.Module, str], None]] = {}


def _vit_sizes(module, path):
    module.hidden_dim = int(module.conv_proj.out_channels)


def _maxvit_attention_sizes(module, path):
    module.head_dim = int(module.to_qkv.out_features) // (3 * module.n_heads)


def _timm_cross_stage_sizes(module, path):
    """timm's CSP stages split ``conv_exp``'s output with ``x.split(self.expand_chs // 2)``: the stored width
    follows the conv (the graph keeps the two halves equal)."""
    exp = getattr(module, "conv_exp", None)
    conv = getattr(exp, "conv", exp)
    if isinstance(conv, nn.Conv2d):
        module.expand_chs = int(conv.out_channels)


def _timm_res2net_sizes(module, path):
    """timm's Res2Net block splits ``conv1``'s output into ``scale`` parts of ``self.width`` channels."""
    module.width = int(module.conv1.out_channels) // module.scale


def _width(module: nn.Module, side: str) -> int:
    """Input (``"in"``) or output (``"out"``) width of the first conv or linear inside ``module`` (a timm
    ConvNorm, a projection Sequential…)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features if side == "in" else m.out_features)
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, _CONV_TRANSPOSE):
            return int(m.in_channels if side == "in" else m.out_channels)
    raise PruneError(f"no conv or linear inside {type(module).__name__} to read its width from")


def _timm_scale_sizes(module, path):
    """timm metaformer's ``Scale`` multiplies by ``scale.view(self.shape)`` with the width stored in ``shape``."""
    module.shape = (module.scale.numel(), *module.shape[1:])


def _timm_metaformer_attention_sizes(module, path):
    module.head_dim = _width(module.qkv, "out") // (3 * module.num_heads)
    module.attention_dim = module.head_dim * module.num_heads


def _timm_tiny_vit_attention_sizes(module, path):
    """TinyViT splits each head's qkv as ``[key_dim, key_dim, val_dim]`` (the scale stays the trained one)."""
    module.val_dim = _width(module.proj, "in") // module.num_heads
    module.key_dim = (_width(module.qkv, "out") // module.num_heads - module.val_dim) // 2
    module.out_dim = module.val_dim * module.num_heads


def _timm_efficientformer_v2_attention_sizes(module, path):
    module.dh = _width(module.v, "out")
    module.d = module.dh // module.num_heads
    module.key_dim = _width(module.k, "out") // module.num_heads


def _timm_mqa_sizes(module, path):
    """MobileNetV4's multi-query attention reshapes q into ``key_dim`` channels per head and k, v into one."""
    module.key_dim = _width(module.key.proj, "out")
    module.value_dim = _width(module.value.proj, "out")


for _name, _fn in {
        "timm.models.metaformer.Scale": _timm_scale_sizes,
        "timm.models.metaformer.Attention": _timm_metaformer_attention_sizes,
        "timm.models.tiny_vit.Attention": _timm_tiny_vit_attention_sizes,
        "timm.models.efficientformer_v2.Attention2d": _timm_efficientformer_v2_attention_sizes,
        "timm.models.efficientformer_v2.Attention2dDownsample": _timm_efficientformer_v2_attention_sizes,
        "timm.layers.attention2d.MultiQueryAttention2d": _timm_mqa_sizes}.items():
    NAMED_FIXUPS[_name] = _fn
NAMED_FIXUPS["torchvision.models.vision_transformer.VisionTransformer"] = _vit_sizes
NAMED_FIXUPS["timm.models.cspnet.CrossStage"] = _timm_cross_stage_sizes
NAMED_FIXUPS["timm.models.cspnet.CrossStage3"] = _timm_cross_stage_sizes
NAMED_FIXUPS["timm.models.res2net.Bottle2neck"] = _timm_res2net_sizes
NAMED_FIXUPS["torchvision.models.maxvit.RelativePositionalMultiHeadAttention"] = _maxvit_attention_sizes


def fix_sizes(module: nn.Module, path: str) -> None:
    """Run the registered fix-up for ``module``'s type, if any."""
    for t in type(module).__mro__:
        fn = FIXUPS.get(t) or NAMED_FIXUPS.get(f"{t.__module__}.{t.__qualname__}")
        if fn is not None:
            fn(module, path)
            return


def cut_axis(module: nn.Module, kind: str, keep: torch.Tensor, path: str) -> None:
    """Apply the registered handler for ``module``'s type (its closest registered base class).

    ``param:NAME:AXIS`` slots (layer scales, class tokens, position embeddings) cut that tensor along AXIS
    whatever the module type.
    """
    if kind.startswith("param:"):
        _, name, axis = kind.split(":")
        _cut(module, name, int(axis), keep)
        return
    if kind == "grouped" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_TRANSPOSE)):
        _grouped_conv(module, keep)
        return
    for t in type(module).__mro__:
        fn = SURGERY.get(t)
        if fn is not None:
            fn(module, kind, keep)
            return
    raise PruneError(f"no surgery for module '{path}' of type {type(module).__name__}; ignore it or register one "
                     "with trt_prune.pruning.register_surgery")
