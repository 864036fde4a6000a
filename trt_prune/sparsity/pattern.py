"""2:4 patterns along TensorRT's reduction axis: pure array code, no torch or onnx needed.

TensorRT accepts a weight as 2:4 sparse when, along the reduction (input-channel) axis, every run of 4
consecutive values holds at least 2 zeros and that axis has a length divisible by 4. For a PyTorch Conv
weight ``[K, C, R, S]`` and a Linear weight ``[out, in]`` that is axis 1; for an ONNX MatMul's B input
``[K, N]`` it is axis 0.
"""

from __future__ import annotations

import numpy as np

GROUP = 4
KEEP = 2


def _grouped(values: np.ndarray, axis: int) -> np.ndarray:
    """View ``values`` as ``[..., n_groups, 4]`` with the reduction axis split into runs of 4."""
    moved = np.moveaxis(values, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // GROUP, GROUP)


def pattern_possible(shape: tuple[int, ...], axis: int) -> bool:
    """True when a tensor of ``shape`` can carry the pattern along ``axis``."""
    return len(shape) >= 2 and shape[axis] % GROUP == 0 and shape[axis] > 0


def mask_2of4(weight: np.ndarray, axis: int = 1) -> np.ndarray:
    """Boolean keep-mask: the 2 largest magnitudes of every 4 consecutive values along ``axis``.

    Ties keep the lower index, so the mask is deterministic.
    """
    if not pattern_possible(weight.shape, axis):
        raise ValueError(f"axis {axis} of shape {tuple(weight.shape)} is not a multiple of {GROUP}")
    groups = np.abs(_grouped(np.asarray(weight), axis))
    # stable argsort on the negated magnitudes: largest first, lower index first on ties
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :KEEP], True, axis=-1)
    moved_shape = np.moveaxis(np.empty(weight.shape, dtype=bool), axis, -1).shape
    return np.moveaxis(keep.reshape(moved_shape), -1, axis)


def holds_2of4(weight: np.ndarray, axis: int = 1) -> bool:
    """True when every run of 4 along ``axis`` has at most 2 non-zeros (and the axis divides by 4)."""
    if not pattern_possible(weight.shape, axis):
        return False
    nonzero = np.count_nonzero(_grouped(np.asarray(weight), axis), axis=-1)
    return bool((nonzero <= KEEP).all())


def kept_magnitude(weight: np.ndarray, axis: int = 1) -> float:
    """Sum of |w| that survives the 2:4 mask: what channel permutation search tries to raise."""
    return float(np.abs(weight)[mask_2of4(weight, axis)].sum())
