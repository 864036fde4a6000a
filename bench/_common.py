"""Small helpers the bench scripts share: the commit a result came from, a quiet ONNX Runtime CPU session."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short hash of HEAD (``+dirty`` with uncommitted changes to tracked files); "unknown" outside git."""
    from trt_prune.bench.runner import git_commit

    return git_commit(ROOT) or "unknown"


def ort_session(model):
    """A CPU ``onnxruntime.InferenceSession`` of ``model`` (a path or an ``onnx.ModelProto``), warnings off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
