"""The pipeline's stages as plain functions over artifacts: prune → sparsify → export → clean → build → profile.

Each is the same function the CLI calls; this module only gives them their pipeline names.
"""

from __future__ import annotations

from pathlib import Path


def build(onnx_path: str | Path, backend: str = "onnxruntime", config=None):
    """Build a timed session for ``onnx_path`` on ``backend`` (``onnxruntime``, ``tensorrt``…)."""
    from .backends import BuildConfig, get_backend

    return get_backend(backend).build(onnx_path, config or BuildConfig())


def report(report_dict: dict, out_dir: str | Path) -> Path:
    """Write ``report_dict`` (the demo's report) as ``report.json`` and a self-contained ``report.html``."""
    from .artifacts import ensure_output_dir, write_json
    from .report import write_html

    out = ensure_output_dir(out_dir)
    write_json(out / "report.json", report_dict)
    return write_html(report_dict, out / "report.html", [])
