"""``bsr_linear``: ``y = x @ W^T + bias`` for a block-sparse ``W``, with autograd and torch.compile support.

Three custom ops (``torch.library.custom_op`` + ``register_fake``) so ``torch.compile(fullgraph=True)``
sees opaque calls with correct shapes:

* ``accel::bsr_linear`` forward, with autograd registered below;
* ``accel::bsr_linear_dx`` ``dX = dY @ W`` through the transposed block structure;
* ``accel::bsr_sddmm`` ``dW`` at the stored blocks only.

Each op body calls :func:`_dispatch`, the one place that chooses the implementation: the Triton
kernel for CUDA tensors, the PyTorch path of ``accel.cpu.bsr`` for CPU tensors (see
``accel.ops._dispatch``).
"""

from __future__ import annotations

import math

import torch

from ..cpu import bsr as cpu_bsr
from ..formats import bsr_row_indices, bsr_transpose_structure
from ._dispatch import needs_op, use_triton


def _dispatch(name: str, *args, **kwargs) -> torch.Tensor:
    """Run op ``name`` ("bsr_dense_mm" or "bsr_sddmm") on Triton or the CPU path."""
    if use_triton(args[0], "bsr_linear"):
        from ..kernels import bsr_matmul

        return getattr(bsr_matmul, name)(*args, **kwargs)
    kwargs.pop("allow_tf32", None)
    return getattr(cpu_bsr, name + "_cpu")(*args, **kwargs)


def _check_fake(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, out_features: int):
    torch._check(x.dim() == 2, lambda: f"bsr_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(values.dim() == 3, lambda: f"bsr_linear: values must be [nnz, B, B], got {tuple(values.shape)}")
    torch._check(x.dtype == values.dtype, lambda: f"bsr_linear: x dtype {x.dtype} != values dtype {values.dtype}")
    torch._check(col.shape[0] == values.shape[0], lambda: "bsr_linear: col_indices and values disagree on nnz")


@torch.library.custom_op("accel::bsr_linear", mutates_args=())
def _bsr_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    allow_tf32: bool,
) -> torch.Tensor:
    return _dispatch("bsr_dense_mm", x, values, crow_indices, col_indices, out_features, bias, allow_tf32=allow_tf32)


@_bsr_linear_op.register_fake
def _(x, values, crow_indices, col_indices, out_features, bias, allow_tf32):
    _check_fake(x, values, crow_indices, col_indices, out_features)
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("accel::bsr_linear_dx", mutates_args=())
def _bsr_linear_dx_op(
    dy: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    allow_tf32: bool,
) -> torch.Tensor:
    bs = values.shape[1]
    crow_t, col_t, block_index = bsr_transpose_structure(crow_indices, col_indices, math.ceil(in_features / bs))
    return _dispatch(
        "bsr_dense_mm", dy, values, crow_t, col_t, in_features, None,
        blocks_transposed=True, block_index=block_index, allow_tf32=allow_tf32,
    )


@_bsr_linear_dx_op.register_fake
def _(dy, values, crow_indices, col_indices, in_features, allow_tf32):
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("accel::bsr_sddmm", mutates_args=())
def _bsr_sddmm_op(
    dy: torch.Tensor, x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, block_size: int,
    allow_tf32: bool,
) -> torch.Tensor:
    rows = bsr_row_indices(crow_indices, col_indices)
    return _dispatch("bsr_sddmm", dy, x, rows, col_indices, block_size, allow_tf32=allow_tf32)


@_bsr_sddmm_op.register_fake
def _(dy, x, crow_indices, col_indices, block_size, allow_tf32):
    return x.new_empty(col_indices.shape[0], block_size, block_size)


def _setup_context(ctx, inputs, output):
    x, values, crow, col, out_features, bias, allow_tf32 = inputs
    ctx.save_for_backward(x, values, crow, col)
    ctx.has_bias = bias is not None
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, dy):
    x, values, crow, col = ctx.saved_tensors
    dx = dvalues = dbias = None
    dy = dy.contiguous()
    if ctx.needs_input_grad[0]:
        dx = _bsr_linear_dx_op(dy, values, crow, col, x.shape[1], ctx.allow_tf32)
    if ctx.needs_input_grad[1]:
        dvalues = _bsr_sddmm_op(dy, x, crow, col, values.shape[1], ctx.allow_tf32)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        dbias = dy.sum(0)
    return dx, dvalues, None, None, None, dbias, None


_bsr_linear_op.register_autograd(_backward, setup_context=_setup_context)


def bsr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[..., K] @ W^T + bias`` with ``W`` of ``shape = (N, K)`` in BSR form (see ``accel.formats``).

    Raises ``TypeError``/``ValueError`` naming the offending dtype, device or shape.
    """
    out_features, in_features = shape
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"bsr_linear: values must be [nnz, B, B], got shape {tuple(values.shape)}")
    bs = values.shape[1]
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"bsr_linear: x must have shape [..., {in_features}], got {tuple(x.shape)}")
    if x.dtype != values.dtype:
        raise TypeError(f"bsr_linear: x dtype {x.dtype} must equal weight dtype {values.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bsr_linear: bias dtype {bias.dtype} must equal x dtype {x.dtype}")
    devices = {t.device for t in (x, values, crow_indices, col_indices) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"bsr_linear: tensors on different devices {sorted(map(str, devices))}")
    if crow_indices.numel() - 1 != math.ceil(out_features / bs):
        raise ValueError(
            f"bsr_linear: crow_indices has {crow_indices.numel() - 1} block rows, expected ceil({out_features}/{bs})"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bsr_linear: bias must have shape ({out_features},), got {tuple(bias.shape)}")
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if needs_op(x2, values, bias):
        y = _bsr_linear_op(x2, values, crow_indices, col_indices, out_features, bias, allow_tf32)
    else:
        y = _dispatch("bsr_dense_mm", x2, values, crow_indices, col_indices, out_features, bias, allow_tf32=allow_tf32)
    return y.view(*lead, out_features)
