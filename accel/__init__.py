"""accel: make pruned, quantized and distilled PyTorch networks actually run faster."""

from .formats import BSRMatrix
from .modules import SparseLinear
from .ops import bsr_linear

__version__ = "0.1.0"
__all__ = ["BSRMatrix", "SparseLinear", "bsr_linear", "__version__"]
