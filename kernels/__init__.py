"""Triton GPU kernels of accel, installed as ``accel.kernels`` (never as a top-level ``kernels``).

Each kernel module holds the ``@triton.jit`` kernels, their autotune config table and a typed
launcher that validates its inputs, allocates the output and launches. They are pure functions on
tensors; dispatch between these kernels and the CPU path lives in ``accel.ops``.
"""

from ._triton import HAS_TRITON, INTERPRET

__all__ = ["HAS_TRITON", "INTERPRET"]
