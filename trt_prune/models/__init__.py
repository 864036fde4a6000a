"""Model specs: how a model is named on the command line and in the API, and how weights load.

``builtin:NAME``, ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory``, ``path/to/model.onnx`` (its
body converted to torch for pruning, :mod:`trt_prune.onnx_import`), or a model folder written by
``prune``/``sparsify``. Weights load from ``.safetensors`` or from a state dict through
``torch.load(weights_only=True)``; a file that needs real unpickling is refused unless the caller opts in.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..artifacts import MODEL_JSON, MODEL_WEIGHTS, ModelMeta, is_model_folder, read_model_meta
from ..errors import ModelSpecError, WeightsError
from ..registry import Registry
from .cores import CORE_NAMES, core_spec, detection_core


@dataclass
class BuiltinModel:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    weights: str | None  # file name inside trt_prune/models/weights
    description: str
    task: str = "detection"


BUILTINS: Registry[str, BuiltinModel] = Registry("built-in model", ModelSpecError)


def register_builtin(name: str, factory, input_shape, weights=None, description="", task="detection",
                     replace: bool = False):
    """Add a model reachable as ``builtin:NAME``."""
    BUILTINS.register(name, BuiltinModel(factory, tuple(input_shape), weights, description, task), replace=replace)


def _demo_detector():
    from .demo_detector import DemoDetector

    return DemoDetector()


register_builtin("demo-detector", _demo_detector, (1, 3, 320, 320), "demo_detector.safetensors",
                 "anchor-free CSP/PAN detector, 4 road classes, 3.0 M parameters")


@dataclass
class LoadedModel:
    """A model plus what the stages need to know about it: ``meta`` is its :class:`ModelMeta` (for a folder,
    its ``model.json``; for a spec, the source, shape, task and weights), which the stages extend when they
    write a new folder."""

    model: nn.Module
    spec: str  # what the user named
    meta: ModelMeta
    onnx: object = None  # for an .onnx spec: the trt_prune.onnx_import.ImportedOnnx (its tail, opset, parity)

    @property
    def source(self) -> str:
        """The spec of the unpruned architecture (a folder's source, else ``spec``)."""
        return self.meta.source

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.meta.input_shape)

    @property
    def task(self) -> str:
        return self.meta.task


SPEC_HELP = ("builtin:NAME (" + ", ".join(f"builtin:{n}" for n in sorted(BUILTINS)) + "), torchvision:NAME, "
             "core:NAME (a torchvision detector's backbone and head: " + ", ".join(CORE_NAMES) + "), timm:NAME, "
             "path/to/file.py:factory, path/to/model.onnx, or a folder written by 'trt-prune prune' or 'sparsify'")


def builtin_weights_path(name: str) -> Path | None:
    entry = BUILTINS[name]
    if entry.weights is None:
        return None
    return Path(str(resources.files("trt_prune.models") / "weights" / entry.weights))


def load_weights(model: nn.Module, path: str | Path, allow_pickle: bool = False) -> nn.Module:
    """Load a state dict into ``model`` from ``.safetensors`` or a ``torch.save``'d state dict."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; check the path given to --weights")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"weights file '{path}' is not a readable safetensors file ({exc}); "
                               "re-export it or pass another file") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError… for bad files
            text = str(exc)
            if not allow_pickle:
                if "Unsupported global" in text:
                    raise WeightsError(
                        f"weights file '{path}' contains pickled Python objects, which can run arbitrary code; "
                        "save a state dict (or .safetensors) instead, or pass --allow-pickle if you trust it"
                    ) from exc
                raise WeightsError(f"weights file '{path}' could not be read ({type(exc).__name__}: "
                                   f"{text[:200]}); it may be corrupt") from exc
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise WeightsError(f"weights file '{path}' could not be read even with --allow-pickle "
                                   f"({type(exc2).__name__}: {str(exc2)[:200]})") from exc2
        if isinstance(state, nn.Module):
            state = state.state_dict()
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"weights file '{path}' does not hold a state dict (name -> tensor)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        raise WeightsError(f"weights file '{path}' does not match the model: {', '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


def _from_file(spec: str) -> nn.Module:
    """Build the module a ``file.py:factory`` spec names (this runs the file: callers decide whether that is
    allowed, see ``trust_code`` in :func:`load_model`)."""
    file, _, factory = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ModelSpecError(f"model file '{file}' does not exist (spec '{spec}'); expected path/to/file.py:factory")
    mod_name = f"_trt_prune_user_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ModelSpecError(f"importing '{file}' failed ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        names = sorted(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise ModelSpecError(f"'{file}' has no callable '{factory}'; callables there: {names}")
    try:
        model = fn()
    except Exception as exc:  # the user's factory: whatever it raises is a problem with the spec
        raise ModelSpecError(f"the factory '{spec}' raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                             "; fix the factory or choose another spec") from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_onnx(spec: str, weights, input_shape) -> LoadedModel:
    from ..onnx_import import import_onnx

    if weights is not None:
        raise ModelSpecError(f"'{spec}' is an ONNX file: its weights are inside it; drop --weights {weights}")
    imported = import_onnx(spec, input_shape)
    meta = ModelMeta(source=str(Path(spec).resolve()), input_shape=imported.input_shape, task=ONNX_TASK)
    return LoadedModel(imported.module, spec, meta, onnx=imported)


ONNX_TASK = "onnx"


def _build(spec: str, input_shape=None) -> tuple[nn.Module, tuple[int, ...], str]:
    """Build the architecture named by a non-folder spec, without weights."""
    if spec.lower().endswith(".onnx"):
        from ..onnx_import import import_onnx

        imported = import_onnx(spec, input_shape, check=False)
        return imported.module, imported.input_shape, ONNX_TASK
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelSpecError(f"unknown model spec '{spec}'; use {SPEC_HELP}")
    if kind == "builtin":
        entry = BUILTINS.get(name)
        if entry is None:
            raise ModelSpecError(f"unknown built-in model '{name}'; built-ins: {BUILTINS.names()}")
        return entry.factory(), entry.input_shape, entry.task
    if kind == "torchvision":
        import torchvision

        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError:
            raise ModelSpecError(f"torchvision has no model '{name}'; e.g. resnet18, resnet50, mobilenet_v3_large "
                                 "(torchvision.models.list_models() lists them)") from None
        detection = name in torchvision.models.list_models(module=torchvision.models.detection)
        kwargs = {"weights": None, "weights_backbone": None} if detection else {"weights": None}
        return builder(**kwargs), (1, 3, 224, 224), "detection" if detection else "classification"
    if kind == "core":
        spec_ = core_spec(name)  # unknown names raise, listing the valid ones
        return detection_core(name), (1, 3, spec_.input_size, spec_.input_size), "detection"
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ModelSpecError("timm:… specs need timm: pip install timm (or the dev extra)") from None
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as exc:
            raise ModelSpecError(f"timm has no model '{name}' ({exc})") from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        shape = (1, *cfg.get("input_size", (3, 224, 224)))
        return model, shape, "classification"
    if spec.rpartition(":")[0].endswith(".py"):
        return _from_file(spec), (1, 3, 224, 224), "custom"
    raise ModelSpecError(f"unknown model spec '{spec}'; use {SPEC_HELP}")


def _load_folder(folder: Path, trust_code: bool) -> LoadedModel:
    from ..pruning import apply_recipe

    meta = read_model_meta(folder)
    runs = meta.runs_code
    if runs is not None and not trust_code:
        raise ModelSpecError(f"the model folder '{folder}' is built by running '{runs}' (its {MODEL_JSON} names the "
                             f"source '{meta.source}'); loading it would execute that file. Pass --trust-code "
                             "(trust_code=True in Python) if you trust it")
    model, _, _ = _build(meta.source, meta.input_shape if meta.task == ONNX_TASK else None)
    if meta.recipe:
        model = apply_recipe(model, meta.recipe)
    load_weights(model, folder / MODEL_WEIGHTS, allow_pickle=False)
    return LoadedModel(model.eval(), str(folder), meta)


def load_model(spec: str, weights: str | Path | None = None, allow_pickle: bool = False,
               pretrained: bool = True, trust_code: bool = False, input_shape=None) -> LoadedModel:
    """Resolve ``spec`` to a model in eval mode.

    Built-in models come with their shipped weights unless ``weights`` is given or ``pretrained`` is False.
    A ``file.py:factory`` spec runs that file: naming it is the caller's choice. A model folder whose
    ``model.json`` names such a source would run a file the caller did not name, so it needs
    ``trust_code=True`` (``--trust-code``), as pickled weights need ``allow_pickle``.

    An ``.onnx`` file is converted (:func:`trt_prune.onnx_import.import_onnx`: its body becomes the module,
    checked against ONNX Runtime; ``input_shape`` is needed where its input has dynamic axes besides the
    batch); its weights are the file's, so ``weights`` is refused.
    """
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str) or not spec:
        raise ModelSpecError(f"empty model spec; use {SPEC_HELP}")
    path = Path(spec)
    if path.is_dir():
        if not is_model_folder(path):
            raise ModelSpecError(f"folder '{spec}' holds no {MODEL_JSON}; pass a folder written by "
                                 "'trt-prune prune' or 'sparsify', or a spec: " + SPEC_HELP)
        loaded = _load_folder(path, trust_code)
        if weights is not None:
            load_weights(loaded.model, weights, allow_pickle)
        return loaded
    if spec.lower().endswith(".onnx"):
        return _load_onnx(spec, weights, input_shape)
    model, shape, task = _build(spec)
    meta = ModelMeta(source=spec, input_shape=tuple(shape), task=task)
    if weights is not None:
        load_weights(model, weights, allow_pickle)
        meta.weights = str(weights)
    elif pretrained and spec.startswith("builtin:"):
        shipped = builtin_weights_path(spec.partition(":")[2])
        if shipped is not None and shipped.is_file():
            load_weights(model, shipped)
            meta.weights = f"shipped:{shipped.name}"
    return LoadedModel(model.eval(), spec, meta)


def check_runs(model: nn.Module, input_shape, error: type[Exception] = ModelSpecError) -> None:
    """Run ``model`` once on zeros of ``input_shape`` (one shape, or one per input); a failure — a wrong
    input shape, most often — is one ``error`` naming the module that rejected it and the shape to give."""
    shapes = [tuple(input_shape)] if input_shape and isinstance(input_shape[0], int) else [tuple(s) for s in
                                                                                          input_shape]
    first = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0))
    dtype = first.dtype if first.is_floating_point() else torch.float32
    example = tuple(torch.zeros(s, device=first.device, dtype=dtype) for s in shapes)
    try:
        with torch.no_grad():
            model(*example)
    except Exception as exc:  # the model's own code: any failure means it does not take this input
        from ..exporter import locate_failure

        where = locate_failure(model, exc)
        text = " ".join(str(exc).split())
        text = f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
        given = ", ".join("x".join(map(str, s)) for s in shapes)
        raise error(f"the model does not run on input shape {given}{f' ({where})' if where else ''}: {text}; "
                    "give the input shape the model takes (--input-shape NxCxHxW)") from exc
