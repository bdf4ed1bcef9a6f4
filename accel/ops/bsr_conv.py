"""``bsr_conv2d``: ``conv2d(x, W) + bias`` for a block-sparse conv weight, with autograd and torch.compile support.

The weight ``[O, C, KH, KW]`` is the implicit-GEMM matrix ``W [O, KH*KW*C]`` in ``(kh, kw, c)`` order
(OHWI flattening), stored as block-sparse rows (``accel.formats``; block sizes :data:`BLOCK_SIZES`).
Zero padding, stride, dilation, groups = 1. Outputs have the input's memory format, as ``nn.Conv2d``.

Three custom ops (``torch.library.custom_op`` + ``register_fake``):

* ``accel::bsr_conv2d`` the forward, with autograd registered below;
* ``accel::bsr_conv2d_dx`` the input gradient ``conv2d_input(dy, W)``;
* ``accel::bsr_conv2d_dw`` the weight gradient at the stored blocks only.

:func:`_dispatch` is the one place that picks the implementation: the Triton kernels of
``accel.kernels.bsr_conv`` for CUDA tensors, ``accel.cpu.bsr_conv`` for CPU tensors. On the CPU the
forward's strategy (``gather``; ``im2col`` followed by one of the block-sparse matmul strategies;
with ``allow_dense`` the dense conv of the densified weight) is the one ``accel.engines`` measured
fastest for this layer, input size, batch bucket and dtype on the running machine.

Every input is checked before anything runs (dtype, device, shapes, geometry and the block
structure, with ``accel.formats.check_bsr``, cached per index tensor): a bad call raises a
``TypeError`` (dtypes) or ``ValueError`` naming what is wrong, never a silent fallback.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .. import engines
from ..cpu import bsr as cpu_bsr
from ..cpu import bsr_conv as cpu_conv
from ..cpu import native as cpu_native
from ..cpu.int8 import float_conv2d_cpu, onednn_conv_ok
from ..cpu.packcache import cached, drop
from ..formats import bsr_row_indices, check_bsr_cached
from ._dispatch import (
    as_conv_output,
    backward_call,
    check_tensors,
    conv_out_format,
    eager_function,
    graph_mode,
    needs_op,
    not_a_view,
    use_triton,
)
from ._plans import _plan_key, _planned, _settled
from .bsr_linear import MIN_SQNR, any_nonfinite, refuse_double_backward, transposed_structure

#: block sizes of the conv kernels (``accel.kernels.bsr_conv.SUPPORTED_BLOCK_SIZES``)
BLOCK_SIZES = (16, 32, 64)
#: dtypes of the CPU path; the Triton kernels take fp16/bf16/fp32
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------ checks
def conv_pair(v, name: str, what: str = "bsr_conv2d") -> tuple[int, int]:
    """``v`` (an int or a pair of ints) as a pair; a ValueError naming ``name`` otherwise."""
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(t, (tuple, list)) or len(t) != 2 or \
            any(isinstance(i, bool) or not isinstance(i, int) for i in t):
        raise ValueError(f"{what}: {name} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def check_geometry(stride, padding, dilation, what: str = "bsr_conv2d"):
    """(stride, padding, dilation) as pairs, or a ValueError: stride >= 1, padding >= 0, dilation >= 1."""
    stride, padding, dilation = (conv_pair(stride, "stride", what), conv_pair(padding, "padding", what),
                                 conv_pair(dilation, "dilation", what))
    if min(stride) < 1:
        raise ValueError(f"{what}: stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"{what}: padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"{what}: dilation must be >= 1, got {dilation}")
    return stride, padding, dilation


def check_weight_shape(weight_shape, what: str = "bsr_conv2d") -> tuple[int, int, int, int]:
    ws = tuple(weight_shape) if isinstance(weight_shape, (tuple, list, torch.Size)) else None
    if ws is None or len(ws) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ws):
        raise ValueError(f"{what}: weight_shape must be (O, C, KH, KW) of ints >= 1, got {weight_shape!r}")
    return tuple(int(v) for v in ws)


def _validate(x, values, crow, col, weight_shape, bias, stride, padding, dilation):
    what = "bsr_conv2d"
    check_tensors(what, (("x", x), ("values", values), ("crow_indices", crow), ("col_indices", col)),
                  (("bias", bias),))
    o, c, kh, kw = check_weight_shape(weight_shape, what)
    stride, padding, dilation = check_geometry(stride, padding, dilation, what)
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"{what}: values must be [nnz, B, B], got shape {tuple(values.shape)}")
    bs = int(values.shape[1])
    if bs not in BLOCK_SIZES:
        raise ValueError(f"{what}: block size (values.shape[1]) must be one of {BLOCK_SIZES}, got {bs}")
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    allowed = CUDA_DTYPES if x.is_cuda else CPU_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"{what}: x dtype must be one of {allowed} on {x.device.type}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"{what}: x dtype {x.dtype} must equal weight dtype {values.dtype}")
    if bias is not None:
        if bias.dtype != x.dtype:
            raise TypeError(f"{what}: bias dtype {bias.dtype} must equal x dtype {x.dtype}")
        if tuple(bias.shape) != (o,):
            raise ValueError(f"{what}: bias must have shape ({o},), got {tuple(bias.shape)}")
    devices = {t.device for t in (x, values, crow, col) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"{what}: tensors on different devices {sorted(map(str, devices))}")
    if x.shape[1] != c:
        raise ValueError(f"{what}: weight_shape {(o, c, kh, kw)} expects {c} input channels, x of shape "
                         f"{tuple(x.shape)} has {x.shape[1]} (groups other than 1 are not supported)")
    oh, ow = cpu_conv.output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"{what}: input {x.shape[2]}x{x.shape[3]} is too small for kernel {kh}x{kw} with padding "
                         f"{padding}, dilation {dilation} (output {oh}x{ow})")
    if crow.numel() - 1 != math.ceil(o / bs):
        raise ValueError(f"{what}: crow_indices has {crow.numel() - 1} block rows, expected ceil({o}/{bs})")
    if not torch.compiler.is_compiling():
        check_bsr_cached(crow, col, values.shape[0], (o, kh * kw * c), bs, what)
    return (o, c, kh, kw), stride, padding, dilation


# ------------------------------------------------------------------------------------------------ CPU strategy
def _dense_weight(values, crow, col, weight_shape, dtype):
    return cached("bsr_conv_dense", (values, crow, col), (tuple(weight_shape), dtype),
                  lambda: cpu_conv.conv_weight_from_bsr(values.detach(), crow, col, weight_shape).to(dtype)
                  .contiguous(memory_format=torch.channels_last))


def _run_dense(x, values, crow, col, weight_shape, bias, stride, padding, dilation):
    w = _dense_weight(values, crow, col, weight_shape, x.dtype)
    y = float_conv2d_cpu(x, w, bias, stride, padding, dilation)  # torch's conv, routed around its bad geometries
    return y.contiguous(memory_format=torch.channels_last)


def cpu_engines(c: int, bs: int, dtype: torch.dtype, allow_dense: bool, nchw: bool = False) -> tuple[str, ...]:
    """The CPU engines that can run a layer: ``gather`` (``C % B == 0``), ``im2col_<strategy>`` for the
    block-sparse matmul strategies of ``accel.cpu.bsr``, ``native`` (``accel.cpu.native``'s implicit GEMM: ``C % B
    == 0``, fp32/bf16, where the kernel builds; ``native_nchw`` the same reading an fp32 NCHW input in place, with
    ``nchw``: measured for NCHW inputs, and forcible for any; ``native_amx`` its AMX tile version for bf16) and
    ``dense`` where allowed."""
    names = (("gather",) if c % bs == 0 else ()) + tuple(f"im2col_{s}" for s in cpu_bsr.strategies_for(dtype))
    if c % bs == 0 and cpu_native.float_available(dtype):
        names += ("native",) + (("native_nchw",) if nchw and dtype == torch.float32 else ())
    if c % bs == 0 and dtype == torch.bfloat16 and cpu_native.amx_available():
        names += ("native_amx", "native_amx_padded")
    return names + (("dense",) if allow_dense else ())


def default_engine(c: int, bs: int, m: int) -> str:
    """The unmeasured default: ``gather`` when the K blocks align with the taps, else im2col with the
    matmul strategy ``accel.cpu.bsr`` uses by default for ``m`` rows."""
    return "gather" if c % bs == 0 else f"im2col_{cpu_bsr.pick_strategy(m)}"


@torch.no_grad()  # the engines are not differentiable: autograd comes from the op's registered backward
def run_cpu(engine: str, x, values, crow, col, weight_shape, bias, stride, padding, dilation) -> torch.Tensor:
    """Run one CPU engine (see :func:`cpu_engines`): its output channels_last, or (``native``) in the layout the op
    returns (:func:`_dispatch` makes either that layout)."""
    if engine == "dense":
        return _run_dense(x, values, crow, col, weight_shape, bias, stride, padding, dilation)
    if engine in cpu_native.CONV_ENGINES:
        return _native_runner(engine, x, values, crow, col, weight_shape, bias, stride, padding, dilation)(x)
    if engine == "gather":
        y = cpu_conv.bsr_conv2d_gather(x, values, crow, col, weight_shape, bias, stride, padding, dilation)
    elif engine.startswith("im2col_"):
        y = cpu_conv.bsr_conv2d_im2col(x, values, crow, col, weight_shape, bias, stride, padding, dilation,
                                       engine[len("im2col_"):])
    else:
        raise ValueError(f"bsr_conv2d: unknown CPU engine {engine!r}")
    return _nonfinite_like_dense(x, y, weight_shape, stride, padding, dilation)


def _native_runner(engine: str, x, values, crow, col, weight_shape, bias, stride, padding, dilation):
    """The native engine's call for ``x``'s kind of input, the layer's packed blocks and fp32 bias fetched once
    (``accel.cpu.native.conv_runner``), the outputs whose windows read NaN/inf made as the dense conv's."""
    o, c, kh, kw = weight_shape
    w = cpu_native.packed_float(values, crow, col, kh * kw * c // values.shape[1], x.dtype)
    b = None if bias is None else bias.detach().float().contiguous()
    run = cpu_native.conv_runner(w, weight_shape, b, stride, padding, dilation, x, engine)

    def fn(x: torch.Tensor) -> torch.Tensor:
        y, bad = run(x)
        return _nonfinite_like_dense(x, y, weight_shape, stride, padding, dilation, bad)

    return fn


def _nonfinite_like_dense(x, y, weight_shape, stride, padding, dilation, bad: bool | None = None) -> torch.Tensor:
    """``y`` with the finite outputs whose window reads a NaN/inf input pixel made NaN (the conv analogue of
    ``accel.ops.bsr_linear.nonfinite_rows_like_dense``): the dense conv multiplies that pixel by the pruned
    zeros too, so every output channel there is NaN or inf; a sparse engine reaches only stored blocks. ``bad``:
    whether ``x`` holds NaN/inf, when the engine already knows (else ``x`` is scanned)."""
    if not x.numel() or not y.numel() or not (any_nonfinite(x) if bad is None else bad):
        return y
    kh, kw = weight_shape[2:]
    bad = (~torch.isfinite(x)).any(dim=1, keepdim=True).float()  # [N, 1, H, W]
    windows = float_conv2d_cpu(bad, torch.ones(1, 1, kh, kw), None, stride, padding, dilation)  # [N, 1, OH, OW]
    return y.masked_fill_((windows > 0) & torch.isfinite(y), float("nan"))


def _cpu_engine(x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_dense) -> str:
    parts = (tuple(weight_shape), tuple(x.shape[1:]), stride, padding, dilation, values.shape[0],
             engines.m_bucket(x.shape[0]), x.dtype, allow_dense, bias is not None, _layout(x))
    return engines.memo("bsr_conv2d", parts, lambda: _choose_cpu_engine(x, values, crow, col, weight_shape, bias,
                                                                          stride, padding, dilation, allow_dense))


def _layout(x: torch.Tensor) -> int:
    """The input layout an engine decision is for: 1 channels_last, 0 contiguous NCHW, 2 another (strided) NCHW-format
    input. They run at other speeds: an NCHW input is copied to channels_last for most native engines (or read in
    place by ``native_nchw``, a contiguous one only) and its output stored NCHW."""
    if conv_out_format(x) == torch.channels_last:
        return 1
    return 0 if x.is_contiguous() else 2


def _choose_cpu_engine(x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_dense) -> str:
    o, c, kh, kw = weight_shape
    bs, nnz = values.shape[1], values.shape[0]
    nbr, nbc = math.ceil(o / bs), math.ceil(kh * kw * c / bs)
    density = nnz / (nbr * nbc)
    key = engines.make_key("bsr_conv2d", w=(o, c, kh, kw), hw=tuple(x.shape[2:]), s=stride, p=padding, d=dilation,
                           b=bs, dens=f"{round(density * 40) / 40:.3f}", m=engines.m_bucket(x.shape[0]),
                           dt=str(x.dtype)[6:], dense=int(allow_dense),
                           cl=_layout(x))
    allowed = cpu_engines(c, bs, x.dtype, allow_dense, nchw=True)  # (forced: native_nchw runs any fp32 input)
    args = (x, values, crow, col, weight_shape, bias, stride, padding, dilation)

    def candidates():  # (measured: native_nchw for an NCHW input only; on another it is native)
        return {e: (lambda e=e: run_cpu(e, *args)) for e in cpu_engines(c, bs, x.dtype, allow_dense,
                                                                         nchw=x.is_contiguous())}

    def reference():  # the dense conv in fp32 (fp64 for fp64 inputs)
        dt = torch.promote_types(x.dtype, torch.float32)
        w = cpu_conv.conv_weight_from_bsr(values.detach().to(dt), crow, col, weight_shape)
        return torch.nn.functional.conv2d(x.to(dt), w, None if bias is None else bias.to(dt), stride, padding,
                                          dilation)

    m = x.shape[0] * math.prod(cpu_conv.output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation))
    choice = engines.choose("bsr_conv2d", key, candidates, default=default_engine(c, bs, m), reference=reference,
                            min_sqnr=MIN_SQNR.get(x.dtype), allowed=allowed)
    if allow_dense and choice != "dense":
        drop("bsr_conv_dense", (values, crow, col), (tuple(weight_shape), x.dtype))  # measured, not kept
    if choice != "im2col_panels":
        cpu_bsr.drop_panels(values, crow, col, nbr, nbc)
    return choice


def _dispatch(x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_tf32, allow_dense):
    if use_triton(x, "bsr_conv2d"):
        from ..kernels import bsr_conv

        return as_conv_output(bsr_conv.bsr_conv2d(x, values, crow, col, weight_shape, bias, stride, padding, dilation,
                                                  allow_tf32=allow_tf32), x)
    if x.shape[0] == 0 or values.shape[0] == 0:
        engine = default_engine(weight_shape[1], values.shape[1], 1)  # nothing to measure
    else:
        engine = _cpu_engine(x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_dense)
    # the input's layout, as nn.Conv2d (the engines compute channels_last)
    return as_conv_output(run_cpu(engine, x, values, crow, col, weight_shape, bias, stride, padding, dilation), x)


# ------------------------------------------------------------------------------------------------ custom ops
def _out_shape(x_shape, weight_shape, stride, padding, dilation):
    o, _, kh, kw = weight_shape
    oh, ow = cpu_conv.output_size(x_shape[2], x_shape[3], kh, kw, stride, padding, dilation)
    return x_shape[0], o, oh, ow


def _empty_channels_last(like: torch.Tensor, shape) -> torch.Tensor:
    n, c, h, w = shape
    return like.new_empty((n, h, w, c)).permute(0, 3, 1, 2)


def _bsr_conv2d_body(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation, allow_tf32,
                     allow_dense=False):
    return not_a_view(_dispatch(x, values, crow_indices, col_indices, tuple(weight_shape), bias, tuple(stride),
                                tuple(padding), tuple(dilation), allow_tf32, allow_dense))


@torch.library.custom_op("accel::bsr_conv2d", mutates_args=())
def _bsr_conv2d_op(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                   weight_shape: list[int], bias: torch.Tensor | None, stride: list[int], padding: list[int],
                   dilation: list[int], allow_tf32: bool, allow_dense: bool = False) -> torch.Tensor:
    return _bsr_conv2d_body(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation,
                            allow_tf32, allow_dense)


@_bsr_conv2d_op.register_fake
def _(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation, allow_tf32,
      allow_dense=False):
    torch._check(x.dim() == 4, lambda: f"bsr_conv2d: x must be 4-D, got {x.dim()}-D")
    torch._check(x.dtype == values.dtype, lambda: f"bsr_conv2d: x dtype {x.dtype} != values dtype {values.dtype}")
    torch._check(col_indices.shape[0] == values.shape[0], lambda: "bsr_conv2d: col_indices and values disagree on nnz")
    return x.new_empty(_out_shape(x.shape, weight_shape, stride, padding, dilation)).contiguous(
        memory_format=conv_out_format(x))


def _bsr_conv2d_dx(dy, values, crow_indices, col_indices, weight_shape, x_shape, stride, padding, dilation, allow_tf32):
    if use_triton(dy, "bsr_conv2d"):
        from ..kernels import bsr_conv

        o, c, kh, kw = weight_shape
        bs = values.shape[1]
        crow_t, col_t, block_index = transposed_structure(crow_indices, col_indices, math.ceil(kh * kw * c / bs))
        return bsr_conv.bsr_conv2d_dx(dy, values, crow_indices, col_indices, weight_shape, x_shape, stride, padding,
                                      dilation, crow_t=crow_t, col_t=col_t, block_index=block_index,
                                      allow_tf32=allow_tf32)
    return cpu_conv.bsr_conv2d_dx_cpu(dy, values, crow_indices, col_indices, tuple(weight_shape), x_shape,
                                      tuple(stride), tuple(padding), tuple(dilation))


@torch.library.custom_op("accel::bsr_conv2d_dx", mutates_args=())
def _bsr_conv2d_dx_op(dy: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      weight_shape: list[int], x_shape: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], allow_tf32: bool) -> torch.Tensor:
    return _bsr_conv2d_dx(dy, values, crow_indices, col_indices, weight_shape, x_shape, stride, padding, dilation,
                          allow_tf32)


@_bsr_conv2d_dx_op.register_fake
def _(dy, values, crow_indices, col_indices, weight_shape, x_shape, stride, padding, dilation, allow_tf32):
    return _empty_channels_last(dy, x_shape)


def _bsr_conv2d_dw(dy, x, crow_indices, col_indices, block_size, weight_shape, stride, padding, dilation, allow_tf32):
    rows = cached("bsr_rows", (crow_indices, col_indices), (), lambda: bsr_row_indices(crow_indices, col_indices))
    if use_triton(dy, "bsr_conv2d"):
        from ..kernels import bsr_conv

        return bsr_conv.bsr_conv2d_dw(dy, x, rows, col_indices, block_size, weight_shape, stride, padding, dilation,
                                      allow_tf32=allow_tf32)
    return cpu_conv.bsr_conv2d_dw_cpu(dy, x, rows, col_indices, block_size, tuple(weight_shape), tuple(stride),
                                      tuple(padding), tuple(dilation))


@torch.library.custom_op("accel::bsr_conv2d_dw", mutates_args=())
def _bsr_conv2d_dw_op(dy: torch.Tensor, x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      block_size: int, weight_shape: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], allow_tf32: bool) -> torch.Tensor:
    return _bsr_conv2d_dw(dy, x, crow_indices, col_indices, block_size, weight_shape, stride, padding, dilation,
                          allow_tf32)


@_bsr_conv2d_dw_op.register_fake
def _(dy, x, crow_indices, col_indices, block_size, weight_shape, stride, padding, dilation, allow_tf32):
    return x.new_empty(col_indices.shape[0], block_size, block_size)


def _setup_context(ctx, inputs, output):
    x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_tf32 = inputs[:10]
    ctx.save_for_backward(x, values, crow, col)
    ctx.geometry = (list(weight_shape), list(stride), list(padding), list(dilation))
    ctx.has_bias = bias is not None
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, dy):
    x, values, crow, col = ctx.saved_tensors
    weight_shape, stride, padding, dilation = ctx.geometry
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = backward_call(ctx, dy, _bsr_conv2d_dx_op, _bsr_conv2d_dx)(dy, values, crow, col, weight_shape,
                                                                      list(x.shape), stride, padding, dilation,
                                                                      ctx.allow_tf32)
    if ctx.needs_input_grad[1]:
        dvalues = backward_call(ctx, dy, _bsr_conv2d_dw_op, _bsr_conv2d_dw)(dy, x, crow, col, values.shape[1],
                                                                           weight_shape, stride, padding, dilation,
                                                                           ctx.allow_tf32)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        dbias = dy.sum((0, 2, 3))
    return dx, dvalues, None, None, None, dbias, None, None, None, None, None


_bsr_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
#: eager training of a SparseConv2d: its module path (plans, engine decisions) run without autograd, and the op's
#: autograd formula
_ModuleBsrConv2dFunction = eager_function(
    "_ModuleBsrConv2dFunction",
    lambda x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_tf32, allow_dense, owner:
    module_bsr_conv2d(x, values, crow, col, tuple(weight_shape), bias, tuple(stride), tuple(padding), tuple(dilation),
                      allow_dense, owner),
    _setup_context, lambda ctx, dy: (*_backward(ctx, dy), None))
#: eager training: the op's body and autograd formula without the custom-op dispatch
_BsrConv2dFunction = eager_function("_BsrConv2dFunction", _bsr_conv2d_body, _setup_context, _backward)
refuse_double_backward(_bsr_conv2d_dx_op, "SparseConv2d")
refuse_double_backward(_bsr_conv2d_dw_op, "SparseConv2d")


# ------------------------------------------------------------------------------------------------ public
def bsr_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    weight_shape,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    allow_dense: bool = False,
) -> torch.Tensor:
    """``conv2d(x, W, bias, stride, padding, dilation)`` for ``W`` of ``weight_shape = (O, C, KH, KW)``
    stored as BSR blocks of its ``[O, KH*KW*C]`` matrix in ``(kh, kw, c)`` order (see the module docstring).

    ``x``: ``[N, C, H, W]`` or unbatched ``[C, H, W]``, any memory format (``channels_last`` is the fast
    one); the result has the input's memory format. ``allow_dense``: on the CPU, run the densified weight where
    that measures faster (``auto``). Raises ``TypeError`` (dtypes) / ``ValueError`` naming the offending
    device, shape, geometry or broken index.
    """
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return bsr_conv2d(x.unsqueeze(0), values, crow_indices, col_indices, weight_shape, bias, stride, padding,
                          dilation, allow_dense=allow_dense).squeeze(0)
    weight_shape, stride, padding, dilation = _validate(x, values, crow_indices, col_indices, weight_shape, bias,
                                                        stride, padding, dilation)
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if x.is_cuda else False
    if needs_op(x, values, bias):
        fn = _bsr_conv2d_op if graph_mode() else _BsrConv2dFunction.apply
        return fn(x, values, crow_indices, col_indices, list(weight_shape), bias, list(stride), list(padding),
                  list(dilation), allow_tf32, allow_dense)
    return _dispatch(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation, allow_tf32,
                     allow_dense)


def module_bsr_conv2d(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation,
                      allow_dense: bool, owner: object | None = None) -> torch.Tensor:
    """:func:`bsr_conv2d` for a ``SparseConv2d``'s own (already validated) parameters and geometry: only
    ``x`` and the (cached) structure check are validated, so a call costs a few microseconds more
    than its engine. ``owner`` (the module) keeps the resolved call per kind of input for CPU inference
    (``accel.ops._plans``)."""
    tensors = (values, crow_indices, col_indices, bias)
    settings = (tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), allow_dense)
    o, c, kh, kw = weight_shape
    if owner is not None and not needs_op(values, bias):  # (autograd records calls that train the layer)
        settled = _settled(owner, x, x.shape, tensors, settings, image=True)
        if settled is not None:
            return settled.fn(x)
    elif owner is not None and not graph_mode() and x.dim() == 4 and x.dtype == values.dtype and \
            x.device == values.device and x.shape[1] == c:  # trainable: autograd records the layer's own path
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if x.is_cuda else False
        return _ModuleBsrConv2dFunction.apply(x, values, crow_indices, col_indices, list(weight_shape), bias,
                                              list(stride), list(padding), list(dilation), allow_tf32, allow_dense,
                                              owner)
    if needs_op(x, values, bias) or x.dim() != 4 or x.dtype != values.dtype or x.device != values.device or \
            x.shape[1] != c or x.is_cuda:
        return bsr_conv2d(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation,
                          allow_dense=allow_dense)
    oh, ow = cpu_conv.output_size(x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
    if oh < 1 or ow < 1 or x.dtype not in CPU_DTYPES:
        return bsr_conv2d(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation,
                          allow_dense=allow_dense)
    check_bsr_cached(crow_indices, col_indices, values.shape[0], (o, kh * kw * c), values.shape[1], "bsr_conv2d")
    if owner is not None and x.shape[0] and values.shape[0] and not use_triton(x, "bsr_conv2d"):
        return _planned(owner, _plan_key(x, x.shape, True), tensors, settings, ("bsr_conv2d",),
                        lambda: _resolve_cpu(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding,
                                             dilation, allow_dense)).fn(x)
    return _dispatch(x, values, crow_indices, col_indices, weight_shape, bias, stride, padding, dilation, False,
                     allow_dense)


def _resolve_cpu(x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_dense):
    """``(fn, True)``: the CPU call :func:`_dispatch` makes for ``x``'s kind of input (deciding the engine now)."""
    engine = _cpu_engine(x, values, crow, col, weight_shape, bias, stride, padding, dilation, allow_dense)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if engine == "dense" and conv_out_format(x) == torch.channels_last and not torch.is_autocast_enabled("cpu") and \
            onednn_conv_ok(x.shape[1], x.shape[2], x.shape[3], weight_shape[2], weight_shape[3], stride, padding,
                           dilation):  # (the same for every input of the plan's kind)
        # what _run_dense does for a channels_last input: torch's conv of the densified (channels_last) weight
        w = _dense_weight(values, crow, col, weight_shape, x.dtype)
        return functools.partial(F.conv2d, weight=w, bias=bias, stride=stride, padding=padding, dilation=dilation), True
    if engine in cpu_native.CONV_ENGINES:  # (operands fetched and checked once, for every input of the plan's kind)
        run = _native_runner(engine, x, values, crow, col, weight_shape, bias, stride, padding, dilation)
        return (lambda x: as_conv_output(run(x), x)), True
    return (lambda x: as_conv_output(run_cpu(engine, x, values, crow, col, weight_shape, bias, stride, padding,
                                             dilation), x)), True
