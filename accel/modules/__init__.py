from .quant_linear import QuantConv2d, QuantEmbedding, QuantLinear
from .sparse_conv import SparseConv2d
from .sparse_linear import SparseLinear
from .sparse_quant_linear import SparseQuantLinear

__all__ = ["QuantConv2d", "QuantEmbedding", "QuantLinear", "SparseConv2d", "SparseLinear", "SparseQuantLinear"]
