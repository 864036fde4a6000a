"""The pipeline's stages as plain functions over typed artifacts: load → prune → sparsify → export → clean → build
→ profile.

This module is the only place the stages are chained: the CLI, the demo, the regression runner and the bench
scripts all call these functions. Each takes an artifact and options and returns an artifact:

- a model — an ``nn.Module``, a :class:`~trt_prune.models.LoadedModel`, a model spec or a model folder;
- a model folder (``model.json`` = :class:`~trt_prune.artifacts.ModelMeta`, plus ``model.safetensors``),
  written by :func:`prune` / :func:`sparsify` when ``out`` is given, exactly as the CLI writes it;
- an ONNX file with its provenance (:class:`~trt_prune.artifacts.OnnxArtifact`, stamped into the file);
- a :class:`~trt_prune.backends.Session` from :func:`build`;
- a :class:`~trt_prune.profiling.result.ProfileResult` from :func:`profile`.

Which backend builds from what is the backend's own declaration (``Backend.builds_from``): a backend that
builds from ONNX gets the model exported and cleaned first, one that builds from the model gets the model.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .artifacts import ModelMeta, OnnxArtifact, ensure_output_dir, save_model_folder, write_json
from .errors import PruneError, SparsifyError, TrtPruneError

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------------------------------- models
def load(source: Any, *, weights=None, allow_pickle: bool = False, trust_code: bool = False, input_shape=None):
    """``source`` as a :class:`~trt_prune.models.LoadedModel`: a spec or folder is loaded, a loaded model
    passes through, a bare ``nn.Module`` is wrapped (with no source spec: it cannot be written to a folder
    unless the caller names one). ``input_shape`` is what an ``.onnx`` file with dynamic axes is converted at."""
    from .models import LoadedModel, load_model

    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, (str, Path)):
        return load_model(str(source), weights=weights, allow_pickle=allow_pickle, trust_code=trust_code,
                          input_shape=input_shape)
    from torch import nn

    if isinstance(source, nn.Module):
        return LoadedModel(source, type(source).__name__, ModelMeta(source="", input_shape=(1,)))
    raise TrtPruneError(f"a model must be an nn.Module, a model spec or a model folder; got {type(source).__name__}")


def _shape_of(loaded, input_shape) -> Shape:
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    if not loaded.meta.source:
        raise TrtPruneError(f"no input shape for {loaded.spec}: pass input_shape=(N, C, H, W)")
    return loaded.input_shape


def _folder_meta(loaded, shape: Shape, source: str | None, step: str, **changes) -> ModelMeta:
    """The :class:`ModelMeta` of a folder made by ``step`` from ``loaded``."""
    base = loaded.meta
    spec = source or base.source
    if not spec:
        raise TrtPruneError(f"writing a model folder needs the spec that rebuilds the architecture; pass the model "
                            f"as a spec or loaded model (trt_prune.load_model('torchvision:resnet18')), or give "
                            f"source='torchvision:resnet18' for this {loaded.spec}")
    return dataclasses.replace(base, source=spec, input_shape=tuple(shape), history=[*base.history, step], **changes)


def prune(model: Any, input_shape: Sequence[int] | None = None, config=None, *, out: str | Path | None = None,
          source: str | None = None, data=None, loss_fn=None, inplace: bool = False, check: bool = True,
          latency_table=None, on_estimate=None, on_progress=None, **overrides):
    """Structured pruning (:func:`trt_prune.pruning.prune`) of ``model`` — a module, loaded model, spec or
    folder. With ``out``, also write the model folder the CLI writes (``model.json``, ``model.safetensors``,
    ``recipe.json``); nothing is created when pruning fails. ``source`` names the spec that rebuilds a bare
    ``nn.Module``. A model that fails on ``input_shape`` is one clear error naming the module that rejected
    it. ``latency_table``, ``on_estimate`` and ``on_progress`` serve ``target_latency`` (see
    :func:`trt_prune.pruning.prune`). Returns the :class:`~trt_prune.pruning.PruneResult` (its
    ``folder`` set when written). An ONNX model (``model.onnx`` spec, or one loaded from it) also gets
    ``model.onnx`` in ``out``: the pruned body exported at the source's opset with the source's
    post-processing tail stitched back (:func:`trt_prune.onnx_import.prune_onnx`); ``result.report["onnx"]``
    says what was checked."""
    from .models import check_runs
    from .pruning import PruneConfig
    from .pruning import prune as prune_model

    config = config or PruneConfig()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise PruneError(f"unknown pruning option {key!r}; options: "
                             f"{', '.join(f.name for f in dataclasses.fields(PruneConfig))}")
        setattr(config, key, value)
    config.validate()
    loaded = load(model, input_shape=input_shape)
    if loaded.meta.recipe:
        raise PruneError(f"'{loaded.spec}' is already pruned; prune its source '{loaded.source}' again with a "
                         "higher ratio instead (recipes do not stack yet)")
    shape = _shape_of(loaded, input_shape)
    meta = _folder_meta(loaded, shape, source, "prune") if out is not None else None  # errors before any work
    try:
        result = prune_model(loaded.model, shape, config, inplace=inplace, check=check, data=data, loss_fn=loss_fn,
                             latency_table=latency_table, on_estimate=on_estimate, on_progress=on_progress)
    except TrtPruneError:
        raise
    except Exception:
        # diagnose on the happy path's dime: only a failed run pays for the plain forward pass that names
        # the module rejecting the input (a wrong input shape, most often); anything else is a bug to report
        check_runs(loaded.model, shape, PruneError)
        raise
    if out is not None:
        with tempfile.TemporaryDirectory() as staging:
            onnx_out = None
            if loaded.onnx is not None:  # staged first: a failure leaves no folder behind
                from .onnx_import import prune_onnx

                onnx_out = prune_onnx(loaded.onnx, result.model, Path(staging) / "model.onnx")
            folder = save_model_folder(out, result.model, dataclasses.replace(meta, recipe=result.recipe))
            write_json(folder / "recipe.json", result.recipe)
            result.folder = folder
            if onnx_out is not None:
                import shutil

                path, parity, outputs = onnx_out
                for staged in Path(staging).iterdir():  # model.onnx, and its .data file past protobuf's 2 GiB
                    shutil.move(staged, folder / staged.name)
                result.report["onnx"] = {"path": str(folder / "model.onnx"), "opset": loaded.onnx.opset,
                                         "outputs": outputs, "export_parity_max_abs": parity,
                                         "import": loaded.onnx.summary()}
    return result


def sparsify(model: Any, *, min_channels: int | None = None, only: Sequence[str] | None = None,
             exclude: Sequence[str] | None = None, permute_s: float | None = None,
             input_shape: Sequence[int] | None = None, out: str | Path | None = None, source: str | None = None,
             permute_scorer: str = "numpy"):
    """2:4 masks (:func:`trt_prune.sparsity.sparsify`) on ``model`` (module, loaded model, spec or folder),
    optionally after a channel-permutation search of ``permute_s`` seconds per group. With ``out``, also write
    the model folder. Returns the :class:`~trt_prune.sparsity.SparsifyResult` (``permutation`` holds the
    search's per-group record when it ran, ``folder`` the written folder). ``permute_scorer="kernel"`` scores the
    search on the GPU kernel of ``trt_prune.kernels.sparse24``."""
    from .sparsity import DEFAULT_MIN_CHANNELS
    from .sparsity import sparsify as sparsify_model

    loaded = load(model)
    floor = DEFAULT_MIN_CHANNELS if min_channels is None else min_channels
    if permute_s is not None and permute_s < 0:
        raise SparsifyError(f"permute_s must be >= 0 seconds, got {permute_s}")
    shape = _shape_of(loaded, input_shape) if (permute_s is not None or out is not None) else None
    meta = _folder_meta(loaded, shape, source, "sparsify") if out is not None else None
    target, permutation = loaded.model, None
    if permute_s is not None:
        from .sparsity.permute import permute_for_24

        permuted = permute_for_24(target, shape, min_channels=floor, time_budget_s=permute_s, scorer=permute_scorer)
        target, permutation = permuted.model, permuted.groups
    result = sparsify_model(target, min_channels=floor, only=list(only) if only else None,
                            exclude=list(exclude) if exclude else None)
    result.permutation = permutation
    if out is not None:
        sparsity = {"pattern": "2:4", "axis": "input channels", "layers": result.sparse_layers}
        result.folder = save_model_folder(out, result.model, dataclasses.replace(meta, sparsity=sparsity))
    return result


# ------------------------------------------------------------------------------------------------------- ONNX
def export(model: Any, out: str | Path, input_shape: Sequence[int] | None = None, *, trust_code: bool = False,
           **options):
    """Export ``model`` (module, loaded model, spec or folder) to ONNX at ``out`` with
    :func:`trt_prune.exporter.export_onnx` (``options`` are its keywords), and stamp the file's provenance.
    Returns the :class:`~trt_prune.exporter.ExportResult`."""
    from .exporter import export_onnx

    loaded = load(model, trust_code=trust_code)
    shape = _shape_of(loaded, input_shape)
    result = export_onnx(loaded.model, out, shape, **options)
    step = {"stage": "export", **{k: v for k, v in result.to_dict().items() if k != "path"}}
    _record_preprocess(step, loaded.model, shape)
    OnnxArtifact(Path(result.path), loaded.source or loaded.spec, shape, [step]).stamp()
    return result


def _record_preprocess(step: dict, model, shape) -> None:
    """Store the pre-processing the model was trained with (when known) in the export step: the deployment's
    letterbox kernel reads the transform the export assumed from the file instead of guessing it."""
    from .profiling.pipeline import default_spec

    if shape is not None and len(shape) == 4:
        spec = default_spec(model, (int(shape[2]), int(shape[3])))
        if spec is not None:
            step["preprocess"] = spec.to_dict()


def export_nms(model: Any, out: str | Path, input_shape: Sequence[int] | None = None, nms_options=None, *,
               trust_code: bool = False, **options):
    """``export`` with box decoding and NMS in the graph (:func:`trt_prune.detection.nms_export.
    export_detector_nms`); ``nms_options`` override the model's own post-processing settings."""
    from .detection.nms_export import decode_plan, export_detector_nms

    loaded = load(model, trust_code=trust_code)
    shape = _shape_of(loaded, input_shape)
    config = decode_plan(loaded.model, shape, options.get("opset")).config(**(nms_options or {}))
    result = export_detector_nms(loaded.model, out, shape, config, **options)
    step = {"stage": "export", "nms": True, **{k: v for k, v in result.to_dict().items() if k != "path"}}
    _record_preprocess(step, loaded.model, shape)
    OnnxArtifact(Path(result.path), loaded.source or loaded.spec, shape, [step]).stamp()
    return result


def clean(src: str | Path, out: str | Path, **options):
    """Clean the ONNX file ``src`` into ``out`` (:func:`trt_prune.cleaner.clean_onnx`; ``options`` are its
    keywords) and carry ``src``'s provenance over with one more step. Returns the ``CleanResult``."""
    from .cleaner import clean_onnx

    result = clean_onnx(src, out, **options)
    step = {"stage": "clean", **{k: v for k, v in result.to_dict().items() if k not in ("src", "dst")}}
    OnnxArtifact.read(src).with_step(out, step).stamp()
    return result


def fp16(src: str | Path, out: str | Path, **options):
    """fp16 ONNX (:func:`trt_prune.precision.to_fp16`; ``options`` are its keywords) with ``src``'s
    provenance carried over. Returns the ``Fp16Result``."""
    from .precision import to_fp16

    result = to_fp16(src, out, **options)
    step = {"stage": "fp16", **{k: v for k, v in result.to_dict().items() if k not in ("src", "dst")}}
    OnnxArtifact.read(src).with_step(out, step).stamp()
    return result


def to_onnx(source: Any, out: str | Path | None = None, *, workdir: str | Path | None = None,
            input_shape: Sequence[int] | None = None, name: str | None = None, exporter: str = "dynamo",
            trust_code: bool = False) -> OnnxArtifact:
    """``source`` as a cleaned ONNX file: an ONNX file is itself; a model (module, loaded model, spec, folder)
    is exported into ``workdir`` and cleaned into ``out`` (default ``workdir/<name>.onnx``)."""
    if isinstance(source, OnnxArtifact):
        return source
    if isinstance(source, (str, Path)) and str(source).lower().endswith(".onnx"):
        if not Path(source).is_file():
            raise TrtPruneError(f"ONNX file {str(source)!r} does not exist; export one first (trt-prune export)")
        return OnnxArtifact.read(source)
    loaded = load(source, trust_code=trust_code)
    if workdir is None and out is None:
        raise TrtPruneError("to_onnx needs out= or workdir= to write the exported file")
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or loaded.spec))[-60:] or "model"
    work = Path(workdir) if workdir is not None else Path(out).parent
    raw = work / f".{stem}.raw.onnx"
    final = Path(out) if out is not None else work / f"{stem}.onnx"
    try:
        export(loaded, raw, input_shape, exporter=exporter)
        clean(raw, final)
    finally:
        raw.unlink(missing_ok=True)
        for extra in work.glob(f".{stem}.raw.onnx*"):
            extra.unlink(missing_ok=True)
    return OnnxArtifact.read(final)


# ---------------------------------------------------------------------------------------------------- backends
def _input_shapes(specs, batch: int, input_shape) -> dict[str, Shape]:
    from .profiling.profile import resolve_input_shapes

    return resolve_input_shapes(specs, batch, input_shape)


def build(source: Any, backend: str = "onnxruntime", config=None, *, batch: int | None = None,
          input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
          workdir: str | Path | None = None, trust_code: bool = False):
    """A :class:`~trt_prune.backends.Session` of ``source`` on ``backend``.

    ``source`` is an ONNX file or a model (module, loaded model, spec, folder). A backend that builds from
    ONNX gets a model exported and cleaned first (into ``workdir``, or a temporary folder the session removes
    when it closes); one that builds from the model gets the model. With ``batch``, the config's shapes are
    fixed at that batch (and ``input_shape``'s other axes); the session's ``artifact`` is the ONNX it was built
    from (None for a model backend).
    """
    from .backends import backend_class, get_backend

    chosen = get_backend(backend)
    ok, reason = chosen.available()
    if not ok:  # before any export work
        from .errors import BackendUnavailableError

        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
    config = chosen.check_config(config)
    if "onnx" in backend_class(backend).builds_from:
        owned = None
        if workdir is None and not (isinstance(source, (str, Path)) and str(source).lower().endswith(".onnx")):
            owned = tempfile.TemporaryDirectory(prefix="trt_prune_build_")
            workdir = owned.name
        try:
            artifact = to_onnx(source, workdir=workdir, input_shape=_full_shape(input_shape, batch),
                               trust_code=trust_code)
            if batch is not None:
                from .backends.base import read_onnx_io

                inputs, _ = read_onnx_io(artifact.path)
                shapes = _input_shapes(inputs, batch, input_shape)
                config = dataclasses.replace(config, batch=(batch, batch, batch),
                                             shapes={n: (s, s, s) for n, s in shapes.items()})
            session = chosen.build(artifact.path, config)
        except BaseException:
            if owned is not None:
                owned.cleanup()
            raise
        session.artifact = artifact
        if owned is not None:
            session.own(owned.cleanup)
        return session
    loaded = load(source, trust_code=trust_code) if isinstance(source, (str, Path)) else source
    if batch is not None:
        shapes = dict(config.shapes)
        if input_shape is not None and not isinstance(input_shape, Mapping):
            full = (batch, *[int(d) for d in list(input_shape)[1:]])
            shapes = {"images": (full, full, full)}
        config = dataclasses.replace(config, batch=(batch, batch, batch), shapes=shapes)
    session = chosen.build(loaded, config)
    session.artifact = None
    return session


def _full_shape(input_shape, batch: int | None):
    """The export shape for a model source: ``input_shape`` with its batch axis set to ``batch``."""
    if input_shape is None or isinstance(input_shape, Mapping):
        return None
    shape = [int(d) for d in input_shape]
    return tuple([batch, *shape[1:]]) if batch is not None else tuple(shape)


def profile(source: Any, backend: str = "onnxruntime", *, batch: int = 1,
            input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None, warmup_s: float = 1.0,
            iterations: int = 200, min_duration_s: float = 1.0, threads: int | None = None, per_layer: bool = True,
            layer_runs: int = 20, module_map: Mapping[str, str | None] | Callable[[Any], str | None] | None = None,
            seed: int = 0, config=None, workdir: str | Path | None = None, trust_code: bool = False):
    """Build ``source`` on ``backend`` (:func:`build`) and measure it with random inputs of the given batch:
    latency statistics over at least ``iterations`` calls and ``min_duration_s`` seconds after ``warmup_s`` of
    warm-up, then per-layer times from a separate run of ``layer_runs`` inferences (``per_layer``).
    ``module_map`` maps ONNX node names to PyTorch module paths (a dict, or a function of an ONNX node); by
    default it comes from the node names. ``config`` supplies the other build options; its batch, shapes and
    (when given) threads are set here. Returns a :class:`~trt_prune.profiling.result.ProfileResult`."""
    from .backends import BuildConfig
    from .errors import ProfileError
    from .profiling.profile import measure, module_map_for

    if not isinstance(batch, int) or batch < 1:
        raise ProfileError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(source, (str, Path)) and str(source).lower().endswith(".onnx") and not Path(source).is_file():
        raise ProfileError(f"ONNX file {str(source)!r} does not exist; export the model first")
    base = config if config is not None else BuildConfig()
    if threads is not None:
        base = dataclasses.replace(base, threads=threads)
    with build(source, backend, base, batch=batch, input_shape=input_shape, workdir=workdir,
               trust_code=trust_code) as session:
        if session.artifact is None:  # built from the model: its input is fixed at the batch asked for
            shapes = {spec.name: tuple(int(d) for d in spec.shape) for spec in session.inputs}
        else:
            shapes = _input_shapes(session.inputs, batch, input_shape)
        mapping = module_map_for(session.artifact.path, module_map) if session.artifact else None
        label = str(session.artifact.path) if session.artifact else str(
            source if isinstance(source, (str, Path)) else getattr(session, "label", type(source).__name__))
        return measure(session, backend, label, batch, shapes, warmup_s, iterations, min_duration_s, per_layer,
                       layer_runs, mapping, seed)


def profile_pipeline(source: Any, frames: str | Sequence = "builtin", *, batch: int = 1, config=None,
                     input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None, iterations: int = 50,
                     warmup_s: float = 0.5, preprocess_impl: str = "auto", frame_size: tuple[int, int] = (1080, 1920),
                     threads: int | None = None, trust_code: bool = False) -> dict:
    """Time what a user sees per frame on the torch backend: pre-processing (the letterbox kernel of
    :mod:`trt_prune.kernels.preprocess`) + the model + decode/NMS, each part apart
    (:func:`~trt_prune.profiling.pipeline.time_pipeline`), on ``batch`` frames: ``"builtin"`` road scenes
    rendered at ``frame_size`` (H, W), a folder of images, or a list of uint8 HWC BGR arrays."""
    from .backends import BuildConfig
    from .errors import ProfileError
    from .profiling.pipeline import builtin_frames, folder_frames, time_pipeline

    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ProfileError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(frames, (str, Path)):
        if str(frames) == "builtin":
            frames = builtin_frames(batch, frame_size)
        elif Path(frames).is_dir():
            frames = folder_frames(frames, batch)
        else:
            raise ProfileError(f"--frames {str(frames)!r} is neither 'builtin' nor a folder of images")
    frames = list(frames)[:batch]
    base = config if config is not None else BuildConfig()
    if threads is not None:
        base = dataclasses.replace(base, threads=threads)
    with build(source, "torch", base, batch=len(frames), input_shape=input_shape, trust_code=trust_code) as session:
        return time_pipeline(session, frames, iterations=iterations, warmup_s=warmup_s, impl=preprocess_impl)


def report(report_dict: dict, out_dir: str | Path) -> Path:
    """Write ``report_dict`` (the demo's report) as ``report.json`` and a self-contained ``report.html``."""
    from .demo_report import write_html

    out = ensure_output_dir(out_dir)
    write_json(out / "report.json", report_dict)
    return write_html(report_dict, out / "report.html", [])
