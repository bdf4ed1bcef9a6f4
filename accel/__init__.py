"""accel: make pruned, quantized and distilled PyTorch networks actually run faster."""

from .api import QuantConfig, SparsityConfig, format_report, load, quantize_, save, sparsify_
from .formats import BSRMatrix
from .modules import QuantConv2d, QuantLinear, SparseLinear
from .ops import bsr_linear, int8_conv2d, int8_linear
from .qat import calibrate, convert, prepare_qat

__version__ = "0.1.0"
__all__ = ["BSRMatrix", "QuantConfig", "QuantConv2d", "QuantLinear", "SparseLinear", "SparsityConfig", "bsr_linear",
           "calibrate", "convert", "format_report", "int8_conv2d", "int8_linear", "load", "prepare_qat", "quantize_",
           "save", "sparsify_", "__version__"]
