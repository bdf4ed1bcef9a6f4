"""``int8_bsr_linear``: ``act(x @ dequant(W_q)^T + bias)`` for an int8 block-sparse ``W_q``.

One custom op (``torch.library.custom_op`` + ``register_fake``) with one dispatch point,
``accel::int8_bsr_linear(x, values_q, w_scale, crow, col, out_features, bias, activation, act_qmax)``:

* ``x`` (fp16/bf16/fp32) is quantized per token to ``act_qmax`` (127 or 63; 0: 127 on CUDA, this
  machine's native range on the CPU, ``accel.engines.native_act_qmax``) by accel's rule
  (``accel.quant``); tokens holding NaN/inf give NaN rows;
* ``values_q [nnz, B, B]`` int8 blocks (each ``[out, in]``) in the BSR layout of ``accel.formats``,
  ``w_scale [out_features]`` fp32, one scale per output channel;
* int32 accumulation, then ``act(((acc * x_scale) * w_scale) + bias)`` in fp32, returned in ``x``'s dtype.

CUDA: ``quantize_rows`` + the Triton kernel ``accel.kernels.int8_bsr_matmul.int8_bsr_mm``. CPU: the
strategy of ``accel.cpu.int8_bsr`` that ``accel.engines`` measured fastest for this shape, density,
bucket of tokens, dtype and activation range on this machine (only strategies exact for that range
here are candidates). The int8 weights are frozen buffers: gradients reach ``x`` straight through
the quantization, ``dx = dy @ dequant(W)`` through the block-sparse float kernels; a fused GELU has
no backward (it raises when a gradient is needed).

Everything is validated before a kernel runs (dtypes, devices, shapes, the block structure): a
ValueError / TypeError names the problem; nothing falls back silently.
"""

from __future__ import annotations

import math

import torch

from .. import engines
from ..cpu import int8_bsr as cpu_int8_bsr
from ..cpu.packcache import cached
from ..formats import BLOCK_SIZES, block_grid, bsr_row_indices, check_bsr_cached
from ..quant import ACTIVATIONS, INT32_MAX_K, QMAX, activate
from ._dispatch import check_tensors, needs_op, use_triton
from ._plans import _plan_key, _planned, _settled, call_linear
from .bsr_linear import check_shape
from .int8 import _check_w_scale, _checked_once

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = INT32_MAX_K
#: SQNR (dB) a CPU strategy must reach against the exact reference (rounded to the output dtype)
EXACT_SQNR = {torch.float32: 60.0, torch.bfloat16: 40.0, torch.float16: 50.0}


def _qmax(act_qmax: int, triton: bool) -> int:
    return act_qmax if act_qmax else (QMAX if triton else engines.native_act_qmax())


# ---------------------------------------------------------------------------------------------
# CPU strategy choice: one key per (shape, block, density, bucket of tokens, dtype, qmax)
# ---------------------------------------------------------------------------------------------
def _strategy(x, values_q, w_scale, crow, col, out_features, bias, activation, qmax) -> str:
    m, k = x.shape
    parts = (out_features, k, values_q.shape[1], values_q.shape[0], engines.m_bucket(m), x.dtype, qmax)
    return engines.memo("int8_bsr_linear", parts, lambda: _choose_strategy(x, values_q, w_scale, crow, col, out_features,
                                                                           bias, activation, qmax))


def _choose_strategy(x, values_q, w_scale, crow, col, out_features, bias, activation, qmax) -> str:
    m, k = x.shape
    bs, nnz = values_q.shape[1], values_q.shape[0]
    nbr, nbc = block_grid((out_features, k), bs)
    density = nnz / (nbr * nbc) if nbr * nbc else 1.0
    key = engines.make_key("int8_bsr_linear", n=out_features, k=k, b=bs, d=f"{round(density * 40) / 40:.3f}",
                           m=engines.m_bucket(m), dt=str(x.dtype)[6:], q=qmax)
    allowed = cpu_int8_bsr.strategies(qmax, m)

    def candidates():
        return {s: (lambda s=s: cpu_int8_bsr.int8_bsr_linear_cpu(x, values_q, w_scale, crow, col, out_features, bias,
                                                                 activation, qmax, s)) for s in allowed}

    def reference():
        return cpu_int8_bsr.int8_bsr_linear_reference(x, values_q, w_scale, crow, col, out_features, bias, activation,
                                                      qmax).to(x.dtype)

    return engines.choose("int8_bsr_linear", key, candidates, default=cpu_int8_bsr.default_strategy(qmax, m),
                          reference=reference, min_sqnr=EXACT_SQNR[x.dtype], allowed=allowed)


# ---------------------------------------------------------------------------------------------
# the op body
# ---------------------------------------------------------------------------------------------
def _impl(x, values_q, w_scale, crow, col, out_features, bias, activation, act_qmax):
    triton = use_triton(x, "int8_bsr_linear")
    qmax = _qmax(act_qmax, triton)
    m, k = x.shape
    if m == 0 or out_features == 0 or k == 0:  # no products: the bias (activated)
        y = x.new_zeros(m, out_features)
        if bias is not None:
            y += bias.to(y.dtype)
        return activate(y, activation)
    if triton:
        from ..kernels.int8_bsr_matmul import int8_bsr_mm
        from ..kernels.int8_matmul import quantize_rows

        q, s = quantize_rows(x, qmax)
        return int8_bsr_mm(q, s, values_q, w_scale, crow, col, out_features, bias, activation=activation,
                           out_dtype=x.dtype)
    strategy = _strategy(x, values_q, w_scale, crow, col, out_features, bias, activation, qmax)
    return cpu_int8_bsr.int8_bsr_linear_cpu(x, values_q, w_scale, crow, col, out_features, bias, activation, qmax,
                                            strategy)


@torch.library.custom_op("accel::int8_bsr_linear", mutates_args=())
def _int8_bsr_linear_op(x: torch.Tensor, values_q: torch.Tensor, w_scale: torch.Tensor, crow_indices: torch.Tensor,
                        col_indices: torch.Tensor, out_features: int, bias: torch.Tensor | None, activation: str,
                        act_qmax: int = 0) -> torch.Tensor:
    return _impl(x, values_q, w_scale, crow_indices, col_indices, out_features, bias, activation, act_qmax)


@_int8_bsr_linear_op.register_fake
def _(x, values_q, w_scale, crow_indices, col_indices, out_features, bias, activation, act_qmax=0):
    torch._check(x.dim() == 2, lambda: f"int8_bsr_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(values_q.dim() == 3, lambda: f"int8_bsr_linear: values_q must be [nnz, B, B], got {tuple(values_q.shape)}")
    torch._check(col_indices.shape[0] == values_q.shape[0],
                 lambda: "int8_bsr_linear: col_indices and values_q disagree on nnz")
    return x.new_empty(x.shape[0], out_features)


# ---------------------------------------------------------------------------------------------
# straight-through backward to x: dx = dy @ dequant(W), through the block-sparse float kernels
# ---------------------------------------------------------------------------------------------
def dequantized_values(values_q: torch.Tensor, w_scale: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """``[nnz, B, B]`` float blocks ``values_q * w_scale`` (each block's rows scaled by their output channel)."""
    def build():
        bs = values_q.shape[1]
        nbr = crow.numel() - 1
        ws = torch.zeros(nbr * bs, dtype=torch.float32, device=w_scale.device)
        ws[:w_scale.numel()] = w_scale
        rows = bsr_row_indices(crow, col)
        return (values_q.float() * ws.view(nbr, bs)[rows][:, :, None]).to(dtype)

    if torch.compiler.is_compiling() or isinstance(values_q, torch._subclasses.FakeTensor):
        return build()  # traced (torch.compile's backward): no data pointers to key a cache on
    return cached("int8_bsr_dequantized", (values_q, w_scale, crow, col), (dtype,), build)


def _setup(ctx, inputs, output):
    x, values_q, w_scale, crow, col, out_features, bias, activation = inputs[:8]
    ctx.activation, ctx.in_features, ctx.n_inputs = activation, x.shape[1], len(inputs)
    # a fused ReLU's mask, not the output: saved, the output would forbid in-place ops after the layer
    ctx.save_for_backward(values_q, w_scale, crow, col, output > 0 if activation == "relu" else None)


def _backward(ctx, dy):
    from .bsr_linear import _bsr_linear_dx_op

    values_q, w_scale, crow, col, positive = ctx.saved_tensors
    if ctx.activation == "relu":
        dy = dy * positive.to(dy.dtype)
    vals = dequantized_values(values_q, w_scale, crow, col, dy.dtype)
    dx = _bsr_linear_dx_op(dy.contiguous(), vals, crow, col, ctx.in_features,
                           bool(torch.backends.cuda.matmul.allow_tf32))
    return (dx,) + (None,) * (ctx.n_inputs - 1)


_int8_bsr_linear_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# public functions: validate, then call the op (compile / autograd) or its body (eager)
# ---------------------------------------------------------------------------------------------
def check_weight(what: str, values_q: torch.Tensor, w_scale: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                 shape: tuple[int, int], bias: torch.Tensor | None = None) -> int:
    """Validate an int8 block-sparse weight of ``shape = (N, K)``; returns the block size."""
    out_features, in_features = shape
    if values_q.dtype != torch.int8:
        raise TypeError(f"{what}: values_q must be int8, got {values_q.dtype}")
    if values_q.dim() != 3 or values_q.shape[1] != values_q.shape[2] or values_q.shape[1] not in BLOCK_SIZES:
        raise ValueError(f"{what}: values_q must be [nnz, B, B] with B in {BLOCK_SIZES}, got {tuple(values_q.shape)}")
    if in_features > MAX_K:
        raise ValueError(f"{what}: K={in_features} exceeds {MAX_K}, where int32 accumulation may overflow")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (out_features,):
        raise ValueError(f"{what}: w_scale must be float32 [{out_features}], got {w_scale.dtype} {tuple(w_scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (out_features,) or not bias.is_floating_point()):
        raise ValueError(f"{what}: bias must be a float [{out_features}], got {bias.dtype} {tuple(bias.shape)}")
    devices = {t.device for t in (values_q, w_scale, crow, col) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{what}: tensors on different devices {sorted(map(str, devices))}")
    bs = values_q.shape[1]
    if not torch.compiler.is_compiling():
        check_bsr_cached(crow, col, values_q.shape[0], shape, bs, what)
        _checked_once(w_scale, lambda: _check_w_scale(what, w_scale))  # (negative / NaN scales: wrong outputs)
    return bs


def int8_bsr_linear(
    x: torch.Tensor,
    values_q: torch.Tensor,
    w_scale: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    act_qmax: int = 0,
) -> torch.Tensor:
    """``act(x[..., K] @ dequant(W_q)^T + bias)`` with the int8 block-sparse ``W_q`` of ``shape = (N, K)``
    (see the module docstring). Raises ``TypeError`` / ``ValueError`` naming the offending dtype,
    device, shape, activation or broken index."""
    what = "int8_bsr_linear"
    check_tensors(what, (("x", x), ("values_q", values_q), ("w_scale", w_scale), ("crow_indices", crow_indices),
                         ("col_indices", col_indices)), (("bias", bias),))
    out_features, in_features = check_shape(shape, what)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: x dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{what}: x must have shape [..., {in_features}], got {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if act_qmax not in (0, 63, 127):
        raise ValueError(f"{what}: act_qmax must be 63, 127 or 0 (this machine's native range), got {act_qmax!r}")
    check_weight(what, values_q, w_scale, crow_indices, col_indices, (out_features, in_features), bias)
    if x.device != values_q.device:
        raise ValueError(f"{what}: x on {x.device} but the weight on {values_q.device}")
    if activation == "gelu" and x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{what}: no backward through a fused GELU (it needs the pre-activation); fuse 'none' or "
                           "'relu', or call under torch.no_grad()")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), in_features)
    args = (x2, values_q, w_scale, crow_indices, col_indices, out_features, bias, activation, act_qmax)
    y = _int8_bsr_linear_op(*args) if needs_op(x2) else _impl(*args)
    return y.view(*lead, out_features)


def module_int8_bsr_linear(x: torch.Tensor, values_q: torch.Tensor, w_scale: torch.Tensor, crow: torch.Tensor,
                           col: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None, activation: str,
                           act_qmax: int, owner: object | None = None) -> torch.Tensor:
    """:func:`int8_bsr_linear` for a module's own buffers (validated when set or loaded): ``x`` and the
    (cached) structure check only. ``owner`` (the module) keeps the resolved call per kind of input for CPU
    inference (``accel.ops._plans``): a settled call then costs a lookup and identity/version checks before its
    strategy."""
    out_features, in_features = shape
    tensors = (values_q, w_scale, crow, col, bias)
    settings = (shape, activation, act_qmax)
    if owner is not None:
        settled = _settled(owner, x, x.shape, tensors, settings)
        if settled is not None:
            return call_linear(settled, x, out_features)
    if needs_op(x) or x.dtype not in FLOAT_DTYPES or x.device != values_q.device or x.dim() == 0 or \
            x.shape[-1] != in_features or (activation == "gelu" and x.requires_grad and torch.is_grad_enabled()):
        return int8_bsr_linear(x, values_q, w_scale, crow, col, shape, bias, activation=activation, act_qmax=act_qmax)
    check_bsr_cached(crow, col, values_q.shape[0], shape, values_q.shape[1], "int8_bsr_linear")
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), in_features)
    if owner is not None and x.device.type == "cpu" and not use_triton(x2, "int8_bsr_linear") and x2.shape[0] and \
            in_features and out_features and values_q.shape[0]:
        return call_linear(_planned(owner, _plan_key(x, x.shape, False), tensors, settings, ("int8_bsr_linear",),
                                    lambda: _resolve_cpu(x2, values_q, w_scale, crow, col, out_features, bias,
                                                         activation, act_qmax)), x, out_features)
    y = _impl(x2, values_q, w_scale, crow, col, out_features, bias, activation, act_qmax)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


def _resolve_cpu(x, values_q, w_scale, crow, col, out_features, bias, activation, act_qmax):
    """``(fn, any_rank)``: the CPU call :func:`_impl` makes for ``x``'s kind of input (deciding the strategy now)."""
    qmax = _qmax(act_qmax, False)
    strategy = _strategy(x, values_q, w_scale, crow, col, out_features, bias, activation, qmax)
    if strategy in ("vnni", "vnni_amx"):
        return cpu_int8_bsr.native_runner(values_q, w_scale, crow, col, out_features, x.shape[1], bias, activation,
                                          qmax, x.dtype, strategy == "vnni_amx"), False
    return (lambda x2: cpu_int8_bsr.int8_bsr_linear_cpu(x2, values_q, w_scale, crow, col, out_features, bias,
                                                        activation, qmax, strategy)), False
