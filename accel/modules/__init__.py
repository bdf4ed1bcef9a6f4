from .quant_linear import QuantConv2d, QuantLinear
from .sparse_linear import SparseLinear

__all__ = ["QuantConv2d", "QuantLinear", "SparseLinear"]
