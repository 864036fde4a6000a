"""Small helpers the bench scripts share: the commit a result came from, writing a stamped result, a quiet
ONNX Runtime CPU session, and the headless browser that renders HTML reports."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "headless_shell")


def commit() -> str:
    """Short hash of HEAD (``+dirty`` with uncommitted changes to tracked files); "unknown" outside git."""
    from trt_prune.provenance import git_commit

    return git_commit(ROOT) or "unknown"


def stamp() -> dict:
    """The provenance stamp (commit, uncommitted flag, date, machine) of a result computed now in this checkout."""
    from trt_prune.provenance import stamp as _stamp

    return _stamp(ROOT)


def save(json_path: str | Path, data: dict, markdown: str | None = None) -> dict[str, Path]:
    """Write ``data`` to ``json_path`` and ``markdown`` beside it (same name, ``.md``) through
    :func:`trt_prune.provenance.write_result`, which stamps both with the commit, date and machine."""
    from trt_prune.provenance import write_result

    path = Path(json_path)
    paths = write_result(path.stem, data, markdown, results_dir=path.parent, folder=ROOT)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr, flush=True)
    return paths


def find_browser() -> str | None:
    """A headless-capable Chromium on PATH (``chromium``, ``chromium-browser``, ``google-chrome`` or
    ``headless_shell``), or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def ort_session(model):
    """A CPU ``onnxruntime.InferenceSession`` of ``model`` (a path or an ``onnx.ModelProto``), warnings off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
