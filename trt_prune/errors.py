"""One exception hierarchy for the whole package.

Every error a user can cause derives from :class:`TrtPruneError`; the CLI turns
those into a one-line message and exit code 2. Anything else is a bug.
"""

from __future__ import annotations


class TrtPruneError(Exception):
    """Base class: something the user asked for cannot be done as asked."""


class ModelSpecError(TrtPruneError):
    """A model spec (``builtin:…``, ``torchvision:…``, a folder, a file) could not be resolved."""


class WeightsError(TrtPruneError):
    """A weights file is missing, corrupt, does not match the model, or needs an opt-in."""


class PruneError(TrtPruneError):
    """Structured pruning cannot proceed (bad ratio, unsupported op, broken recipe)."""


class SparsifyError(TrtPruneError):
    """2:4 sparsification cannot proceed."""


class ExportError(TrtPruneError):
    """ONNX export failed or its outputs do not match torch."""


class CleanError(TrtPruneError):
    """Graph cleaning failed or changed what the graph computes."""


class PrecisionError(TrtPruneError):
    """Reduced-precision conversion failed, or its result differs from the fp32 model beyond tolerance."""


class BackendError(TrtPruneError):
    """A backend could not build or run a session."""


class BackendUnavailableError(BackendError):
    """The backend's libraries or hardware are missing; the message says which."""


class ProfileError(TrtPruneError):
    """Timing or per-layer profiling failed."""


class OutputError(TrtPruneError):
    """An output path cannot be written."""


class BenchError(TrtPruneError):
    """Bad input to the regression benchmarks: statistics, suite files, the result store, a comparison."""


class LatencyError(TrtPruneError):
    """A latency table is missing, corrupt or from another environment, or a latency budget cannot be met."""


class QuantizeError(TrtPruneError):
    """INT8 quantization: a bad model, calibration set or option (``trt-prune quantize``)."""


class KernelError(TrtPruneError):
    """Bad input to a kernel of ``trt_prune.kernels`` (frames, target size, weights), or a kernel unavailable."""
