"""Files the stages write: atomic writes, output checks, and the model folder.

A model folder (what ``prune`` and ``sparsify`` write) holds ``model.json`` — the source spec, the pruning
recipe, the 2:4 layers, the input shape — and ``model.safetensors``. Every command that takes a model accepts
such a folder, so stages chain through folders. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

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
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
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


def save_model_folder(folder: str | os.PathLike, model, meta: dict) -> Path:
    """Write ``model``'s state dict and ``meta`` (source, recipe, sparsity, input_shape…) to ``folder``."""
    from safetensors.torch import save_file

    folder = ensure_output_dir(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    info = {"format": MODEL_FORMAT, "version": MODEL_VERSION, **meta}
    with atomic_path(folder / MODEL_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(folder / MODEL_JSON, info)
    return folder
