"""Engine cache: keys, meta sidecars, and the checks that decide whether a stored engine may be loaded here.

Cache layout, with ``cache_dir`` set (see :func:`cache_paths`): per engine, ``<key>.engine`` (the serialised
engine), ``<key>.meta.json`` (its sidecar: TensorRT version, GPU name, compute capability, hardware
compatibility level, build-configuration hash and fields, ONNX sha256, engine size and sha256),
``<key>.log`` (builder log, INFO and worse), ``<key>.sparsity.json`` (parsed sparsity report) and
``<key>.inspector.json`` (engine-inspector JSON); one ``timing_<gpu>_trt<version>.cache`` per TensorRT
version and GPU. The engine is written first and the meta sidecar last, each atomically, so a sidecar marks
a complete entry. Before a stored engine is deserialised its sidecar is checked against this machine and
this build (:func:`check_engine_meta`) and its bytes against the sidecar (:func:`check_engine_bytes`): an
engine for another TensorRT version or GPU, a truncated file, or one TensorRT cannot deserialise is refused
with a :class:`BackendError` that names the file and says to delete the entry or use a new ``cache_dir``.
An engine without a sidecar (stored by an older trt_prune, or a build that was cut off) is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_prune.backends.base import BuildConfig
from trt_prune.backends.tensorrt.plan import build_fields
from trt_prune.errors import BackendError

META_FORMAT = 1
_META_KEYS = ("tensorrt", "gpu", "compute_capability")
# trt.HardwareCompatibilityLevel names. This backend builds with NONE; the others are honoured when reading a
# sidecar so that an engine built elsewhere in a compatibility mode is judged by that mode's rule.
HARDWARE_COMPATIBILITY = ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
_REBUILD = "rebuild it (delete the cache entry or pass a new cache_dir)"


def _cc_string(compute_capability: str | Sequence[int]) -> str:
    if isinstance(compute_capability, str):
        m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d+)", compute_capability.strip())
        if not m:
            raise BackendError(f"compute capability {compute_capability!r} is not of the form '9.0'")
        return f"{int(m.group(1))}.{int(m.group(2))}"
    parts = tuple(compute_capability)
    if len(parts) != 2 or not all(isinstance(p, int) and p >= 0 for p in parts):
        raise BackendError(f"compute capability must be (major, minor) integers, got {compute_capability!r}")
    return f"{parts[0]}.{parts[1]}"



def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str,
                     compute_capability: str | Sequence[int], config: BuildConfig) -> str:
    """File-name-safe key for a built engine, readable at the front and unique by a hash at the back.

    Engines do not move between GPU models or TensorRT versions, so the key covers the ONNX content hash,
    the TensorRT version, GPU name and compute capability, and every ``BuildConfig`` field that changes the
    engine: optimisation level, batch and shapes, precision, sparse weights and ``extra``. ``threads``
    (host threads), ``cache_dir`` (where the engine lives) and the run-time ``extra`` keys (``cuda_graph``,
    ``cuda_api``, ``pinned_host``) do not change the engine and are left out.
    """
    if not re.fullmatch(r"[0-9a-fA-F]{64}", onnx_sha256 or ""):
        raise BackendError(f"onnx_sha256 must be 64 hex digits (hashlib.sha256(...).hexdigest()), "
                           f"got {onnx_sha256!r}")
    if not gpu_name:
        raise BackendError("gpu_name must be a non-empty string, e.g. 'NVIDIA H100 80GB HBM3'")
    cc = _cc_string(compute_capability)
    payload = {"onnx": onnx_sha256.lower(), "tensorrt": str(trt_version), "gpu": gpu_name, "cc": cc,
               "build": build_fields(config)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    version = re.sub(r"[^0-9.]+", "", str(trt_version))
    return f"{slug}_sm{cc.replace('.', '')}_trt{version}_{digest[:24]}"



def build_config_sha256(config: BuildConfig) -> str:
    """SHA-256 of :func:`build_fields`: equal exactly when two configurations build the same engine."""
    return hashlib.sha256(json.dumps(build_fields(config), sort_keys=True, default=repr).encode()).hexdigest()


def cache_paths(cache_dir: str | os.PathLike, key: str) -> dict[str, Path]:
    """Where one cache entry's files live: ``engine``, ``meta``, ``log``, ``sparsity``, ``inspector``."""
    folder = Path(cache_dir)
    return {"engine": folder / f"{key}.engine", "meta": folder / f"{key}.meta.json",
            "log": folder / f"{key}.log", "sparsity": folder / f"{key}.sparsity.json",
            "inspector": folder / f"{key}.inspector.json"}



def engine_meta(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str | Sequence[int],
                config: BuildConfig, engine_bytes: bytes | None = None,
                hardware_compatibility: str = "NONE") -> dict[str, Any]:
    """The sidecar stored next to a cached engine: what it was built from, with and for.

    With ``engine_bytes``, also its size and SHA-256, so that a truncated or overwritten file is caught
    before TensorRT reads it.
    """
    if hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise BackendError(f"hardware_compatibility {hardware_compatibility!r} is not one of "
                           f"{list(HARDWARE_COMPATIBILITY)}")
    meta: dict[str, Any] = {
        "format": META_FORMAT, "tensorrt": str(trt_version), "gpu": gpu_name,
        "compute_capability": _cc_string(compute_capability), "hardware_compatibility": hardware_compatibility,
        "onnx_sha256": onnx_sha256.lower(), "build_config_sha256": build_config_sha256(config),
        "build": build_fields(config)}
    if engine_bytes is not None:
        meta["engine_bytes"] = len(engine_bytes)
        meta["engine_sha256"] = hashlib.sha256(engine_bytes).hexdigest()
    return meta


def _sm(cc: str) -> str:
    return "sm_" + cc.replace(".", "")


def check_engine_meta(meta: Mapping[str, Any], trt_version: str, gpu_name: str,
                      compute_capability: str | Sequence[int], *, onnx_sha256: str | None = None,
                      build_sha256: str | None = None, engine: str | os.PathLike = "the engine") -> None:
    """Raise :class:`BackendError` unless the engine ``meta`` describes can be loaded here.

    TensorRT engines load only under the TensorRT version that built them and, unless built in a hardware
    compatibility mode, on the GPU model they were built for: a mismatch names both sides. ``AMPERE_PLUS``
    engines load on any GPU of compute capability 8.0 or newer, ``SAME_COMPUTE_CAPABILITY`` ones on any GPU
    of the same compute capability. Given ``onnx_sha256`` or ``build_sha256`` (:func:`build_config_sha256`),
    the engine must also have been built from that ONNX and that build configuration.
    """
    name = os.fspath(engine)
    if not isinstance(meta, Mapping):
        raise BackendError(f"the meta sidecar of {name} must be a JSON object, got {type(meta).__name__}; "
                           f"{_REBUILD}")
    missing = [k for k in _META_KEYS if not meta.get(k)]
    if missing:
        raise BackendError(f"the meta sidecar of {name} lacks {missing} (it has {sorted(meta)}); {_REBUILD}")
    here_cc = _cc_string(compute_capability)
    try:
        built_cc = _cc_string(str(meta["compute_capability"]))
    except BackendError:
        raise BackendError(f"the meta sidecar of {name} has compute_capability {meta['compute_capability']!r}, "
                           f"not of the form '9.0'; {_REBUILD}") from None
    mode = meta.get("hardware_compatibility", "NONE")
    if mode not in HARDWARE_COMPATIBILITY:
        raise BackendError(f"the meta sidecar of {name} has hardware_compatibility {mode!r}, not one of "
                           f"{list(HARDWARE_COMPATIBILITY)}; {_REBUILD}")
    built_trt, built_gpu = str(meta["tensorrt"]).strip(), str(meta["gpu"]).strip()
    same_trt = built_trt == str(trt_version).strip()
    if mode == "AMPERE_PLUS":
        same_gpu = tuple(map(int, here_cc.split("."))) >= (8, 0)
    elif mode == "SAME_COMPUTE_CAPABILITY":
        same_gpu = built_cc == here_cc
    else:
        same_gpu = built_gpu == gpu_name.strip() and built_cc == here_cc
    if not (same_trt and same_gpu):
        differs = [what for what, same in (("TensorRT version", same_trt), ("GPU", same_gpu)) if not same]
        verb = "differs" if len(differs) == 1 else "differ"
        rule = "" if mode == "NONE" else f" (hardware compatibility {mode})"
        raise BackendError(f"engine {name} was built with TensorRT {built_trt} on {built_gpu} ({_sm(built_cc)})"
                           f"{rule}; this machine has TensorRT {trt_version} on {gpu_name} ({_sm(here_cc)}), so "
                           f"the {' and the '.join(differs)} {verb}: {_REBUILD}")
    if onnx_sha256 is not None and str(meta.get("onnx_sha256", "")).lower() != onnx_sha256.lower():
        raise BackendError(f"engine {name} was built from an ONNX with sha256 "
                           f"{str(meta.get('onnx_sha256'))[:16]}..., not from this model (sha256 "
                           f"{onnx_sha256[:16]}...): {_REBUILD}")
    if build_sha256 is not None and meta.get("build_config_sha256") != build_sha256:
        raise BackendError(f"engine {name} was built with another build configuration (sha256 "
                           f"{str(meta.get('build_config_sha256'))[:16]}..., fields {meta.get('build')}) than the "
                           f"one asked for (sha256 {build_sha256[:16]}...): {_REBUILD}")


def check_engine_bytes(meta: Mapping[str, Any], data: bytes, engine: str | os.PathLike = "the engine") -> None:
    """Raise :class:`BackendError` when ``data`` is not the engine the sidecar ``meta`` recorded: a different
    size (a truncated or partly written file) or a different SHA-256. Sidecars without the fields pass."""
    name = os.fspath(engine)
    size = meta.get("engine_bytes")
    if size is not None and size != len(data):
        raise BackendError(f"engine file {name} is {len(data)} bytes, but its meta sidecar recorded {size}: the "
                           f"file is truncated or was overwritten; delete it and its sidecars and build again "
                           f"(or pass a new cache_dir)")
    digest = meta.get("engine_sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise BackendError(f"engine file {name} does not match the sha256 its meta sidecar recorded "
                           f"({str(digest)[:16]}...): the file is corrupt or was replaced; delete it and its "
                           f"sidecars and build again (or pass a new cache_dir)")



def _read_json(path: Path, what: str, entry: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BackendError(f"cannot read the {what} {path}: {type(exc).__name__}: {exc}; delete it and the other "
                           f"files of its cache entry ({entry}) and build again, or pass a new cache_dir") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either complete or absent, even if the process dies mid-write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_cached_engine(paths: Mapping[str, Path], trt_version: str, gpu_name: str, compute_capability: str,
                       onnx_sha256: str, build_sha256: str, notes: list[str]) -> tuple[bytes | None, Any]:
    """The engine bytes and stored sparsity report of a cache entry, or ``(None, None)`` when there is none to
    use. Raises :class:`BackendError` when the entry is for another machine or build, or is damaged."""
    engine_file, meta_file = paths["engine"], paths["meta"]
    if not engine_file.is_file():
        return None, None
    if not meta_file.is_file():
        notes.append(f"cached engine {engine_file} has no {meta_file.name} (stored by an older trt_prune, or its "
                     f"build was cut off); rebuilding it")
        return None, None
    entry = f"{engine_file.stem}.*"  # keys hold dots (the TensorRT version): strip only ".engine"
    meta = _read_json(meta_file, "engine meta sidecar", entry)
    check_engine_meta(meta, trt_version, gpu_name, compute_capability, onnx_sha256=onnx_sha256,
                      build_sha256=build_sha256, engine=engine_file)
    data = engine_file.read_bytes()
    check_engine_bytes(meta, data, engine_file)
    sparsity = _read_json(paths["sparsity"], "sparsity report", entry) if paths["sparsity"].is_file() else None
    notes.append(f"engine loaded from cache {engine_file}")
    return data, sparsity


def timing_cache_path(cache_dir: str | os.PathLike, gpu_name: str, trt_version: str) -> Path:
    """The timing cache shared by every engine built with TensorRT ``trt_version`` on ``gpu_name``."""
    return Path(cache_dir) / f"timing_{re.sub(r'[^A-Za-z0-9]+', '-', gpu_name)}_trt{trt_version}.cache"


def write_cache_entry(paths: Mapping[str, Path], engine_bytes: bytes, log_lines: Sequence[str],
                      sparsity: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Store a freshly built engine with its builder log, sparsity report and meta sidecar (:func:`engine_meta`).

    The sidecar is written last: :func:`read_cached_engine` treats an engine without one as unfinished.
    """
    _write_atomic(paths["engine"], engine_bytes)
    paths["log"].write_text("\n".join(log_lines) + "\n", encoding="utf-8")
    paths["sparsity"].write_text(json.dumps(sparsity, indent=1), encoding="utf-8")
    _write_atomic(paths["meta"], json.dumps(meta, indent=1).encode())
