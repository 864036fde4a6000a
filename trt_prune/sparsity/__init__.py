"""2:4 semi-structured sparsity on TensorRT's reduction axis."""

from .lifecycle import Mask24, Sparsifier
from .pattern import holds_2of4, mask_2of4, pattern_possible
from .sparsify import DEFAULT_MIN_CHANNELS, Eligibility, SparseMasks, SparsifyResult, eligibility, sparsify

__all__ = ["DEFAULT_MIN_CHANNELS", "Eligibility", "Mask24", "SparseMasks", "Sparsifier", "SparsifyResult",
           "eligibility", "holds_2of4", "mask_2of4", "pattern_possible", "sparsify"]
