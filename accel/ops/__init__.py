"""Op dispatch: one public function per op, Triton on CUDA and the PyTorch path on CPU."""

from .bsr_conv import bsr_conv2d
from .bsr_linear import bsr_linear
from .int8 import int8_conv2d, int8_linear
from .int8_bsr_linear import int8_bsr_linear

__all__ = ["bsr_conv2d", "bsr_linear", "int8_bsr_linear", "int8_conv2d", "int8_linear"]
