"""Channel counts the target hardware likes.

Pruned channel counts are rounded to a multiple that the backend's kernels process in one block. Measured on
the 2-core AVX-512 CPU here by bench/round_to_sweep.py (ONNX Runtime, interleaved medians): the demo detector
pruned to half its MACs ran 1.30x faster than dense with counts rounded to 8 but 1.58x with counts rounded to
16, because ONNX Runtime's NCHWc convolution kernels work on blocks of 16 channels with AVX-512 (8 with AVX2).
On NVIDIA GPUs, fp16 tensor-core kernels want multiples of 8; REFERENCE.md §4 measured 32 faster still.
"""

from __future__ import annotations

from pathlib import Path


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where it does not exist)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def preferred_round_to(backend: str = "onnxruntime", flags: set[str] | None = None) -> int:
    """The channel multiple to prune to for ``backend`` on this machine (see the module docstring)."""
    if backend in ("tensorrt", "torch-cuda"):
        return 32
    flags = cpu_flags() if flags is None else flags
    return 16 if "avx512f" in flags else 8
