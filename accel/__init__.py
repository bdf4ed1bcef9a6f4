"""accel: make pruned, quantized and distilled PyTorch networks actually run faster."""

from . import engines
from .api import QuantConfig, SparsityConfig, format_report, load, quantize_, save, sparsify_
from .formats import BSRMatrix
from .modules import QuantConv2d, QuantEmbedding, QuantLinear, SparseConv2d, SparseLinear, SparseQuantLinear
from .ops import bsr_conv2d, bsr_linear, int8_bsr_linear, int8_conv2d, int8_linear
from .qat import calibrate, convert, prepare_qat
from .shrink import ShrinkPlan, apply_plan, layer_shapes, plan_shrink, resize_, shrink_

__version__ = "0.1.0"
__all__ = ["BSRMatrix", "QuantConfig", "QuantConv2d", "QuantEmbedding", "QuantLinear", "SparseConv2d",
           "SparseLinear", "SparseQuantLinear", "SparsityConfig", "bsr_conv2d", "bsr_linear", "calibrate", "convert",
           "engines", "format_report", "int8_bsr_linear", "int8_conv2d", "int8_linear", "load", "prepare_qat",
           "quantize_", "save", "sparsify_",
           "ShrinkPlan", "apply_plan", "layer_shapes", "plan_shrink", "resize_", "shrink_", "__version__"]
