"""trt_prune: prune, sparsify, export, clean, build and profile PyTorch models for TensorRT.

The stages are plain functions over artifacts; import them from here::

    from trt_prune import load_model, prune, sparsify, export, clean, build, profile

Each is a function of :mod:`trt_prune.stages`, the one place the stages are chained.

Names resolve lazily so that ``import trt_prune`` stays cheap and never needs onnx or TensorRT.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_model": ("trt_prune.models", "load_model"),
    "load_weights": ("trt_prune.models", "load_weights"),
    "prune": ("trt_prune.stages", "prune"),
    "apply_recipe": ("trt_prune.pruning", "apply_recipe"),
    "PruneConfig": ("trt_prune.pruning", "PruneConfig"),
    "ChannelPruner": ("trt_prune.pruning.gradual", "ChannelPruner"),
    "Schedule": ("trt_prune.pruning.gradual", "Schedule"),
    "sparsify": ("trt_prune.stages", "sparsify"),
    "Sparsifier": ("trt_prune.sparsity", "Sparsifier"),
    "prune_then_sparsify": ("trt_prune.sparsity.combined", "prune_then_sparsify"),
    "export": ("trt_prune.stages", "export"),
    "clean": ("trt_prune.stages", "clean"),
    "fp16": ("trt_prune.stages", "fp16"),
    "to_onnx": ("trt_prune.stages", "to_onnx"),
    "build": ("trt_prune.stages", "build"),
    "profile": ("trt_prune.stages", "profile"),
    "report": ("trt_prune.stages", "report"),
    "inspect_sparsity": ("trt_prune.sparsity.inspect", "inspect_sparsity"),
    "run_demo": ("trt_prune.demo", "run_demo"),
    "ModelMeta": ("trt_prune.artifacts", "ModelMeta"),
    "OnnxArtifact": ("trt_prune.artifacts", "OnnxArtifact"),
    "ProfileResult": ("trt_prune.profiling.result", "ProfileResult"),
    "TrtPruneError": ("trt_prune.errors", "TrtPruneError"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'trt_prune' has no attribute '{name}'") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
