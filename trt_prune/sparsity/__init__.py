"""2:4 semi-structured sparsity on TensorRT's reduction axis."""

from .pattern import holds_2of4, mask_2of4, pattern_possible
from .sparsify import DEFAULT_MIN_CHANNELS, Eligibility, SparseMasks, SparsifyResult, eligibility, sparsify

__all__ = ["DEFAULT_MIN_CHANNELS", "Eligibility", "SparseMasks", "SparsifyResult", "eligibility", "holds_2of4",
           "mask_2of4", "pattern_possible", "sparsify"]
