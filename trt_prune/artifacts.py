"""Files the stages write: atomic writes, output checks, and the model folder.

A model folder (what ``prune`` and ``sparsify`` write) holds ``model.json`` — the source spec, the pruning
recipe, the 2:4 layers, the input shape — and ``model.safetensors``. Every command that takes a model accepts
such a folder, so stages chain through folders. Nothing here unpickles anything.

The typed artifacts the stages pass along, each with a versioned ``to_dict``/``from_dict``:

- :class:`ModelMeta` — ``model.json`` of a model folder;
- :class:`OnnxArtifact` — an ONNX file and where it came from (kept in the file's ``metadata_props``, so the
  provenance travels with the file);
- :class:`~trt_prune.profiling.result.ProfileResult` — a profile run (its own module).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelSpecError, OutputError, TrtPruneError

MODEL_FORMAT = "trt_prune.model"
MODEL_VERSION = 1
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (a folder) if needed and prove it is writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to output folder '{path}' ({exc.strerror or exc}); "
                          "choose another --out") from exc
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be made or written, *without creating anything*: a command checks
    its outputs before long work and creates them only when it has something to write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write to output folder '{path}': a file of that name exists; choose another "
                          f"{flag}")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write to output folder '{path}': '{existing}' is a file, not a folder; choose "
                          f"another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to output folder '{path}' ('{existing}' is not writable); choose "
                          f"another {flag}")
    return path


def check_output_file(path: str | os.PathLike, flag: str = "-o") -> Path:
    """:func:`check_output_dir` for an output file: its folder could be made and written, and the path is
    not a folder. Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output '{path}' is a folder; give a file name, e.g. '{path / 'model.onnx'}'")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    return path


def ensure_output_file(path: str | os.PathLike) -> Path:
    """Check that the folder of output file ``path`` exists (created if needed) and is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output '{path}' is a folder; give a file name, e.g. '{path / 'model.onnx'}'")
    ensure_output_dir(path.parent if str(path.parent) else Path("."))
    return path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Readers never see a half-written file, and a failure leaves nothing behind.
    """
    path = Path(path)
    ensure_output_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(obj):
    """``json.dumps`` fallback for the records the stages write: ``to_dict``, numpy scalars/arrays, paths."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def is_model_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MODEL_JSON).is_file()


def _is_shape(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) >= 1
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value))


@dataclass
class ModelMeta:
    """``model.json`` of a model folder: how to rebuild the model before its weights load.

    ``source`` is the spec of the unpruned architecture (``builtin:…``, ``torchvision:…``, ``file.py:factory``);
    ``recipe`` the structured-pruning recipe replayed on it; ``sparsity`` the 2:4 layers; ``history`` the
    stages that made the folder, in order; ``weights`` where the source's weights came from.
    """

    source: str
    input_shape: tuple[int, ...]
    task: str = "classification"
    recipe: dict[str, Any] | None = None
    sparsity: dict[str, Any] | None = None
    history: list[str] = field(default_factory=list)
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "source": self.source,
                "input_shape": list(self.input_shape), "task": self.task, "recipe": self.recipe,
                "sparsity": self.sparsity, "history": list(self.history), "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Any, where: str = MODEL_JSON) -> ModelMeta:
        """Check and read a ``model.json`` dict; anything malformed is one :class:`ModelSpecError` naming it."""
        if not isinstance(data, dict):
            raise ModelSpecError(f"'{where}' must hold a JSON object, not {type(data).__name__}; re-create the "
                                 "folder with 'trt-prune prune' or 'sparsify'")
        if data.get("format") != MODEL_FORMAT:
            raise ModelSpecError(f"'{where}' is not a trt_prune model folder (format {data.get('format')!r}, "
                                 f"expected {MODEL_FORMAT!r})")
        version = data.get("version")
        if version != MODEL_VERSION:
            newer = isinstance(version, int) and not isinstance(version, bool) and version > MODEL_VERSION
            raise ModelSpecError(f"'{where}' is a model folder of version {version!r}; this trt_prune reads "
                                 f"version {MODEL_VERSION}" + ("; upgrade trt_prune" if newer else
                                                               "; re-create the folder"))
        source = data.get("source")
        if not isinstance(source, str) or not source:
            raise ModelSpecError(f"'{where}' names no source model (\"source\": {source!r})")
        shape = data.get("input_shape")
        if not _is_shape(shape):
            raise ModelSpecError(f"'{where}' has input_shape {shape!r}; it must be a list of positive integers "
                                 "like [1, 3, 320, 320]")
        task = data.get("task", "classification")
        history = data.get("history", [])
        weights = data.get("weights")
        for key, value, ok in (("task", task, isinstance(task, str)),
                               ("history", history, isinstance(history, list)
                                and all(isinstance(h, str) for h in history)),
                               ("weights", weights, weights is None or isinstance(weights, str))):
            if not ok:
                raise ModelSpecError(f"'{where}' has {key} {value!r} of the wrong type")
        for key in ("recipe", "sparsity"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ModelSpecError(f"'{where}' has {key} of type {type(data[key]).__name__}; expected an object "
                                     "or null")
        return cls(source, tuple(shape), task, data.get("recipe"), data.get("sparsity"), list(history), weights)

    @property
    def runs_code(self) -> str | None:
        """The Python file that rebuilding the source would execute (a ``file.py:factory`` source), else None."""
        file, sep, _ = self.source.rpartition(":")
        return file if sep and file.endswith(".py") else None


def read_model_meta(folder: str | os.PathLike) -> ModelMeta:
    """``model.json`` of ``folder``, checked."""
    path = Path(folder) / MODEL_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelSpecError(f"'{path}' is not readable JSON ({exc}); re-create the folder with 'trt-prune "
                             "prune' or 'sparsify'") from exc
    return ModelMeta.from_dict(data, str(path))


def save_model_folder(folder: str | os.PathLike, model, meta: ModelMeta) -> Path:
    """Write ``model``'s state dict and ``meta`` to ``folder`` (weights first, so ``model.json`` — what makes
    the folder a model folder — appears only once the weights are in place)."""
    from safetensors.torch import save_file

    if not isinstance(meta, ModelMeta):
        raise TypeError(f"meta must be a ModelMeta, got {type(meta).__name__}")
    folder = ensure_output_dir(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(folder / MODEL_JSON, meta.to_dict())
    return folder


ONNX_FORMAT = "trt_prune.onnx"
ONNX_VERSION = 1
ONNX_META_KEY = "trt_prune"  # the metadata_props key an OnnxArtifact is stored under


@dataclass
class OnnxArtifact:
    """An ONNX file and its provenance: what it was made from and by which stages.

    ``source`` is the model spec, folder or label it was exported from (None for a file made elsewhere);
    ``steps`` one record per stage that wrote it (``{"stage": "export", "exporter": …, "opset": …}``,
    ``{"stage": "clean", "nodes_before": …}``, ``{"stage": "fp16", …}``), oldest first.
    """

    path: Path
    source: str | None = None
    input_shape: tuple[int, ...] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": ONNX_FORMAT, "version": ONNX_VERSION, "path": str(self.path), "source": self.source,
                "input_shape": list(self.input_shape) if self.input_shape else None, "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "ONNX provenance") -> OnnxArtifact:
        if not isinstance(data, dict) or data.get("format") != ONNX_FORMAT:
            raise TrtPruneError(f"{where} is not a trt_prune ONNX record")
        if data.get("version") != ONNX_VERSION:
            raise TrtPruneError(f"{where} has version {data.get('version')!r}; this trt_prune reads "
                                f"version {ONNX_VERSION}")
        shape, steps, source = data.get("input_shape"), data.get("steps", []), data.get("source")
        if shape is not None and not _is_shape(shape):
            raise TrtPruneError(f"{where} has input_shape {shape!r}; expected positive integers")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise TrtPruneError(f"{where} has steps of the wrong type; expected a list of objects")
        if source is not None and not isinstance(source, str):
            raise TrtPruneError(f"{where} has source {source!r}; expected text")
        return cls(Path(str(data.get("path", ""))), source, tuple(shape) if shape else None, list(steps))

    def with_step(self, path: str | os.PathLike, step: dict[str, Any]) -> OnnxArtifact:
        """The artifact a stage makes from this one: the same source, one more step, a new path."""
        return OnnxArtifact(Path(path), self.source, self.input_shape, [*self.steps, step])

    @classmethod
    def read(cls, path: str | os.PathLike) -> OnnxArtifact:
        """The artifact for an ONNX file: its stored provenance, or a bare record for a file made elsewhere
        (or one whose record is unreadable: provenance is information, never a reason to refuse a file)."""
        import onnx

        path = Path(path)
        try:
            model = onnx.load(str(path), load_external_data=False)
            entry = next((p.value for p in model.metadata_props if p.key == ONNX_META_KEY), None)
            if entry is not None:
                found = cls.from_dict(json.loads(entry))
                found.path = path
                return found
        except Exception:  # noqa: BLE001 - a foreign or damaged record: the file is still the file
            pass
        return cls(path)

    def stamp(self) -> None:
        """Store this record in the ONNX file's ``metadata_props`` (rewritten atomically; external data, if
        any, stays where it is: only the graph file is rewritten)."""
        import onnx

        model = onnx.load(str(self.path), load_external_data=False)
        kept = [p for p in model.metadata_props if p.key != ONNX_META_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        record = self.to_dict()
        record.pop("path")  # where the file lies is not part of what it is
        model.metadata_props.add(key=ONNX_META_KEY, value=json.dumps(record, default=json_default))
        with atomic_path(self.path) as tmp:
            onnx.save(model, str(tmp))
