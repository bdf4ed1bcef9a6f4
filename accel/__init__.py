"""accel: make pruned, quantized and distilled PyTorch networks actually run faster."""

from .formats import BSRMatrix
from .modules import QuantConv2d, QuantLinear, SparseLinear
from .ops import bsr_linear, int8_conv2d, int8_linear

__version__ = "0.1.0"
__all__ = ["BSRMatrix", "QuantConv2d", "QuantLinear", "SparseLinear", "bsr_linear", "int8_conv2d", "int8_linear",
           "__version__"]
