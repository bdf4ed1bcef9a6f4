"""``bsr_linear``: ``y = x @ W^T + bias`` for a block-sparse ``W``, with autograd and torch.compile support.

Three custom ops (``torch.library.custom_op`` + ``register_fake``) so ``torch.compile(fullgraph=True)``
sees opaque calls with correct shapes:

* ``accel::bsr_linear`` forward, with autograd registered below;
* ``accel::bsr_linear_dx`` ``dX = dY @ W`` through the transposed block structure;
* ``accel::bsr_sddmm`` ``dW`` at the stored blocks only.

Each op body calls :func:`_dispatch`, the one place that chooses the implementation: the Triton
kernel for CUDA tensors, the PyTorch path of ``accel.cpu.bsr`` for CPU tensors (see
``accel.ops._dispatch``). On the CPU the forward's strategy (gather / panels / rows, or with
``allow_dense`` the densified weight) is the one ``accel.engines`` measured fastest for this
shape, density, bucket of rows and dtype on the running machine.

The block structure is checked (``accel.formats.check_bsr``) before any kernel runs: a corrupt
``crow_indices`` / ``col_indices`` raises a ValueError instead of reading out of bounds. The check
is cached per index tensor (identity, version), so it costs microseconds after the first call.
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from .. import engines
from ..cpu import bsr as cpu_bsr
from ..cpu import native as cpu_native
from ..cpu.packcache import cached, drop
from ..formats import (
    block_grid,
    bsr_row_indices,
    bsr_to_dense,
    bsr_transpose_structure,
    check_block_size,
    check_bsr_cached,
)
from ._dispatch import backward_call, check_tensors, eager_function, graph_mode, needs_op, use_triton
from ._plans import _plan_key, _planned, _settled, call_linear

#: SQNR (dB) a CPU strategy must reach against the fp32 dense product before it can be chosen
#: (the strategies differ only in summation order: fp32 > 100 dB, bf16/fp16 ~45-50 dB)
MIN_SQNR = {torch.float32: 80.0, torch.float64: 150.0, torch.float16: 30.0, torch.bfloat16: 30.0}


def transposed_structure(crow: torch.Tensor, col: torch.Tensor, n_block_cols: int):
    """``bsr_transpose_structure`` cached with the block structure (an argsort, and a host sync on CUDA,
    that would otherwise run on every backward); re-built when the indices change."""
    return cached("bsr_transposed", (crow, col), (n_block_cols,),
                  lambda: bsr_transpose_structure(crow, col, n_block_cols))


def _dense_weight(values, crow, col, out_features, in_features, dtype):
    return cached("bsr_dense", (values, crow, col), (out_features, in_features, dtype),
                  lambda: bsr_to_dense(values.detach(), crow, col, (out_features, in_features)).to(dtype).contiguous())


def _cpu_strategy(x, values, crow, col, out_features, bias, allow_dense: bool) -> str:
    m, k = x.shape
    bs, nnz = values.shape[1], values.shape[0]
    parts = (out_features, k, bs, nnz, engines.m_bucket(m), x.dtype, allow_dense)
    return engines.memo("bsr_linear", parts, lambda: _choose_cpu_strategy(x, values, crow, col, out_features, bias,
                                                                  allow_dense))


def _choose_cpu_strategy(x, values, crow, col, out_features, bias, allow_dense: bool) -> str:
    m, k = x.shape
    bs, nnz = values.shape[1], values.shape[0]
    nbr, nbc = block_grid((out_features, k), bs)
    density = nnz / (nbr * nbc) if nbr * nbc else 1.0
    key = (f"bsr_linear|n={out_features}|k={k}|b={bs}|d={round(density * 40) / 40:.3f}|m={engines.m_bucket(m)}"
           f"|dt={str(x.dtype)[6:]}|dense={int(allow_dense)}")
    allowed = cpu_bsr.strategies_for(x.dtype) + native_strategies(x, bs) + (("dense",) if allow_dense else ())

    def candidates():
        return {e: (lambda e=e: run_cpu(e, x, values, crow, col, out_features, bias)) for e in allowed}

    def reference():  # fp32 (fp64 for fp64 inputs, whose bar is ~150 dB)
        rdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = bsr_to_dense(values.detach().to(rdt), crow, col, (out_features, k))
        return torch.nn.functional.linear(x.to(rdt), w, None if bias is None else bias.to(rdt))

    choice = engines.choose("bsr_linear", key, candidates, default=cpu_bsr.pick_strategy(m), reference=reference,
                            min_sqnr=MIN_SQNR.get(x.dtype), allowed=allowed)
    if allow_dense and choice != "dense":
        drop("bsr_dense", (values, crow, col), (out_features, k, x.dtype))  # measured, not kept: free it
    if choice != "panels":
        cpu_bsr.drop_panels(values, crow, col, nbr, nbc)
    return choice


#: the strategies of ``accel.cpu.native``'s kernels: AVX-512 (fp32/bf16) and AMX tiles (bf16)
NATIVE = ("native", "native_amx")


def native_strategies(x: torch.Tensor, bs: int) -> tuple[str, ...]:
    """The ``accel.cpu.native`` strategies that can run ``x`` here (K a multiple of the block; fp32/bf16, AMX for
    bf16)."""
    if x.shape[1] % bs:
        return ()
    return (("native",) if cpu_native.float_available(x.dtype) else ()) + \
        (("native_amx",) if x.dtype == torch.bfloat16 and cpu_native.amx_available() else ())


def _native_runner(x, values, crow, col, out_features, bias, strategy: str):
    """The native kernels' call for ``x``'s kind of input (``accel.cpu.native.linear_runner``: rows holding NaN/inf
    made like the dense layer's there)."""
    w = cpu_native.packed_float(values, crow, col, x.shape[1] // values.shape[1], x.dtype)
    b = None if bias is None else bias.detach().float().contiguous()
    return cpu_native.linear_runner(w, b, out_features, x, amx=strategy == "native_amx")


def _run_native(x, values, crow, col, out_features, bias, strategy: str) -> torch.Tensor:
    return _native_runner(x, values, crow, col, out_features, bias, strategy)(x)


def run_cpu(strategy: str, x, values, crow, col, out_features, bias) -> torch.Tensor:
    """One CPU strategy of the forward (:func:`accel.engines` candidates): ``dense`` (the densified weight), the
    native kernels, or a block-sparse matmul strategy of ``accel.cpu.bsr``."""
    if strategy == "dense":
        return torch.nn.functional.linear(x, _dense_weight(values, crow, col, out_features, x.shape[1], x.dtype), bias)
    if strategy in NATIVE:
        return _run_native(x, values, crow, col, out_features, bias, strategy)
    return cpu_bsr.bsr_dense_mm_cpu(x, values, crow, col, out_features, bias, strategy=strategy)


def _dispatch(name: str, *args, allow_dense: bool = False, **kwargs) -> torch.Tensor:
    """Run op ``name`` ("bsr_dense_mm" or "bsr_sddmm") on Triton or the CPU path."""
    if use_triton(args[0], "bsr_linear"):
        from ..kernels import bsr_matmul

        return getattr(bsr_matmul, name)(*args, **kwargs)
    kwargs.pop("allow_tf32", None)
    if name == "bsr_dense_mm" and "strategy" not in kwargs and "block_index" not in kwargs:
        x, values, crow, col, out_features, bias = args[:6]
        if x.shape[0] and x.shape[1]:
            if values.shape[0]:  # (every block pruned: no strategy, but zeros that still multiply NaN)
                strategy = _cpu_strategy(x, values, crow, col, out_features, bias, allow_dense)
                if strategy == "dense":
                    w = _dense_weight(values, crow, col, out_features, x.shape[1], x.dtype)
                    return torch.nn.functional.linear(x, w, bias)
                if strategy in NATIVE:  # (NaN rows made like the dense layer's by the native call)
                    return _run_native(x, values, crow, col, out_features, bias, strategy)
                kwargs["strategy"] = strategy
            return nonfinite_rows_like_dense(x, cpu_bsr.bsr_dense_mm_cpu(*args, **kwargs))
    return getattr(cpu_bsr, name + "_cpu")(*args, **kwargs)


def any_nonfinite(x: torch.Tensor) -> bool:
    """Whether ``x`` (non-empty, floating) may hold a NaN or inf: a native scan of fp32/bf16 rows where the native
    kernels run (``accel.cpu.native.any_nonfinite``: exact, a few microseconds per token), else one sum (the
    cheapest full reduction, about a read of ``x``) and one sync: NaN and inf propagate through it; a sum of finite
    values overflowing gives a false alarm, which the callers' exact per-row / per-pixel check then clears."""
    if x.dtype in _SCANNED and x.device.type == "cpu" and x.dim() >= 2 and cpu_native.scan_available():
        rows = _as_rows(x)
        if rows is not None:
            return cpu_native.any_nonfinite(rows)
    return not math.isfinite(x.sum().item())


def _as_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x``'s elements as a 2-D view with rows of unit stride (a 2-D matrix as it is, a contiguous tensor as rows of
    its last dim, a channels_last image batch as rows of channels), or None."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    if x.is_contiguous():
        return x.view(-1, x.shape[-1])
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # (a view: contiguous in this order)
    return None


_SCANNED = (torch.float32, torch.bfloat16)


def nonfinite_rows_like_dense(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` (a sparse strategy's ``[M, N]`` output for ``x [M, K]``) with the finite outputs of rows of ``x``
    holding NaN/inf made NaN, in place: a sparse strategy skips the pruned blocks, so a NaN/inf in ``x``
    reaches only the outputs of stored blocks, while the dense layer (and the "dense" strategy: ``0 * inf``
    is NaN) makes every output of that row NaN or inf. Every strategy then agrees on which outputs are finite."""
    if not any_nonfinite(x):
        return y
    bad = ~torch.isfinite(x).all(dim=1)
    rows = y[bad]
    y[bad] = torch.where(torch.isfinite(rows), torch.full_like(rows, float("nan")), rows)
    return y


def check_shape(shape, what: str) -> tuple[int, int]:
    """``(out_features, in_features)`` as ints >= 0 (anything with ``__index__``: a float is refused, not truncated)."""
    try:
        if isinstance(shape, (str, bytes)) or len(shape) != 2 or any(isinstance(v, bool) for v in shape):
            raise TypeError
        n, k = (operator.index(v) for v in shape)
    except TypeError:
        raise ValueError(f"{what}: shape must be (out_features, in_features), two ints >= 0, got {shape!r}") from None
    if n < 0 or k < 0:
        raise ValueError(f"{what}: shape must be (out_features, in_features), two ints >= 0, got {shape!r}")
    return n, k


def _check_fake(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, out_features: int):
    torch._check(x.dim() == 2, lambda: f"bsr_linear: x must be 2-D, got {x.dim()}-D")
    torch._check(values.dim() == 3, lambda: f"bsr_linear: values must be [nnz, B, B], got {tuple(values.shape)}")
    torch._check(x.dtype == values.dtype, lambda: f"bsr_linear: x dtype {x.dtype} != values dtype {values.dtype}")
    torch._check(col.shape[0] == values.shape[0], lambda: "bsr_linear: col_indices and values disagree on nnz")


def _bsr_linear_body(x, values, crow_indices, col_indices, out_features, bias, allow_tf32, allow_dense=False):
    return _dispatch("bsr_dense_mm", x, values, crow_indices, col_indices, out_features, bias, allow_tf32=allow_tf32,
                     allow_dense=allow_dense)


@torch.library.custom_op("accel::bsr_linear", mutates_args=())
def _bsr_linear_op(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    allow_tf32: bool,
    allow_dense: bool = False,
) -> torch.Tensor:
    return _bsr_linear_body(x, values, crow_indices, col_indices, out_features, bias, allow_tf32, allow_dense)


@_bsr_linear_op.register_fake
def _(x, values, crow_indices, col_indices, out_features, bias, allow_tf32, allow_dense=False):
    _check_fake(x, values, crow_indices, col_indices, out_features)
    return x.new_empty(x.shape[0], out_features)


def _bsr_linear_dx(dy, values, crow_indices, col_indices, in_features, allow_tf32):
    bs = values.shape[1]
    crow_t, col_t, block_index = transposed_structure(crow_indices, col_indices, math.ceil(in_features / bs))
    return _dispatch(
        "bsr_dense_mm", dy, values, crow_t, col_t, in_features, None,
        blocks_transposed=True, block_index=block_index, allow_tf32=allow_tf32,
    )


@torch.library.custom_op("accel::bsr_linear_dx", mutates_args=())
def _bsr_linear_dx_op(
    dy: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    allow_tf32: bool,
) -> torch.Tensor:
    return _bsr_linear_dx(dy, values, crow_indices, col_indices, in_features, allow_tf32)


@_bsr_linear_dx_op.register_fake
def _(dy, values, crow_indices, col_indices, in_features, allow_tf32):
    return dy.new_empty(dy.shape[0], in_features)


def _bsr_sddmm(dy, x, crow_indices, col_indices, block_size, allow_tf32):
    rows = cached("bsr_rows", (crow_indices, col_indices), (), lambda: bsr_row_indices(crow_indices, col_indices))
    if use_triton(dy, "bsr_linear"):
        from ..kernels import bsr_matmul

        nbr = crow_indices.numel() - 1
        group = bsr_matmul.sddmm_group(block_size, block_size)
        groups = cached("bsr_sddmm_groups", (crow_indices, col_indices), (group,),
                        lambda: bsr_matmul.sddmm_groups(rows, nbr, group, sorted_rows=True))
        return bsr_matmul.bsr_sddmm(dy, x, rows, col_indices, block_size, allow_tf32=allow_tf32, group=group,
                                    groups=groups)
    return _dispatch("bsr_sddmm", dy, x, rows, col_indices, block_size, allow_tf32=allow_tf32)


@torch.library.custom_op("accel::bsr_sddmm", mutates_args=())
def _bsr_sddmm_op(
    dy: torch.Tensor, x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, block_size: int,
    allow_tf32: bool,
) -> torch.Tensor:
    return _bsr_sddmm(dy, x, crow_indices, col_indices, block_size, allow_tf32)


@_bsr_sddmm_op.register_fake
def _(dy, x, crow_indices, col_indices, block_size, allow_tf32):
    return x.new_empty(col_indices.shape[0], block_size, block_size)


def _setup_context(ctx, inputs, output):
    x, values, crow, col, out_features, bias, allow_tf32 = inputs[:7]
    ctx.save_for_backward(x, values, crow, col)
    ctx.has_bias = bias is not None
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, dy):
    x, values, crow, col = ctx.saved_tensors
    dx = dvalues = dbias = None
    dy = dy.contiguous()
    if ctx.needs_input_grad[0]:
        dx = backward_call(ctx, dy, _bsr_linear_dx_op, _bsr_linear_dx)(dy, values, crow, col, x.shape[1], ctx.allow_tf32)
    if ctx.needs_input_grad[1]:
        dvalues = backward_call(ctx, dy, _bsr_sddmm_op, _bsr_sddmm)(dy, x, crow, col, values.shape[1], ctx.allow_tf32)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        dbias = dy.sum(0)
    return dx, dvalues, None, None, None, dbias, None, None


_bsr_linear_op.register_autograd(_backward, setup_context=_setup_context)
#: eager training of a SparseLinear: its module path (plans, engine decisions) run without autograd, and the op's
#: autograd formula
_ModuleBsrLinearFunction = eager_function(
    "_ModuleBsrLinearFunction",
    lambda x, values, crow, col, out_features, bias, allow_tf32, allow_dense, shape, owner: module_bsr_linear(
        x, values, crow, col, shape, bias, allow_dense, owner),
    _setup_context, lambda ctx, dy: (*_backward(ctx, dy), None, None))
#: eager training: the op's body and autograd formula without the custom-op dispatch
_BsrLinearFunction = eager_function("_BsrLinearFunction", _bsr_linear_body, _setup_context, _backward)


def refuse_double_backward(op, what: str) -> None:
    """Give a backward op (``dx``, ``dvalues``) an autograd formula that refuses, in one clear line, to be
    differentiated again (``create_graph=True``: gradient penalties, higher-order gradients)."""
    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{what}: no double backward through a block-sparse layer (create_graph=True); for "
                           "gradient penalties train it with mode='dense' (a masked dense weight)")

    op.register_autograd(backward, setup_context=setup)


refuse_double_backward(_bsr_linear_dx_op, "SparseLinear / SparseQuantLinear")
refuse_double_backward(_bsr_sddmm_op, "SparseLinear")


def bsr_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    *,
    allow_dense: bool = False,
) -> torch.Tensor:
    """``x[..., K] @ W^T + bias`` with ``W`` of ``shape = (N, K)`` in BSR form (see ``accel.formats``).

    ``allow_dense``: on the CPU, run the densified weight where that measures faster (``auto``).
    Raises ``TypeError``/``ValueError`` naming the offending dtype, device, shape or broken index.
    """
    check_tensors("bsr_linear", (("x", x), ("values", values), ("crow_indices", crow_indices),
                                 ("col_indices", col_indices)), (("bias", bias),))
    out_features, in_features = check_shape(shape, "bsr_linear")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"bsr_linear: values must be [nnz, B, B], got shape {tuple(values.shape)}")
    bs = check_block_size(int(values.shape[1]), "bsr_linear: block size (values.shape[1])")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"bsr_linear: x must have shape [..., {in_features}], got {tuple(x.shape)}")
    if x.dtype not in cpu_bsr.SUPPORTED_DTYPES:
        raise TypeError(f"bsr_linear: x dtype must be one of {cpu_bsr.SUPPORTED_DTYPES}, got {x.dtype}")
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
    if not torch.compiler.is_compiling():
        check_bsr_cached(crow_indices, col_indices, values.shape[0], (out_features, in_features), bs, "bsr_linear")
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), in_features)
    if needs_op(x2, values, bias):
        fn = _bsr_linear_op if graph_mode() else _BsrLinearFunction.apply
        y = fn(x2, values, crow_indices, col_indices, out_features, bias, allow_tf32, allow_dense)
    else:
        y = _dispatch("bsr_dense_mm", x2, values, crow_indices, col_indices, out_features, bias, allow_tf32=allow_tf32,
                      allow_dense=allow_dense)
    return y.view(*lead, out_features)


def module_bsr_linear(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      shape: tuple[int, int], bias: torch.Tensor | None, allow_dense: bool,
                      owner: object | None = None) -> torch.Tensor:
    """:func:`bsr_linear` for a ``SparseLinear``'s own parameters: ``x`` and the (cached) structure check
    only, so a call costs a few microseconds more than its strategy. ``owner`` (the module) keeps the
    resolved call per kind of input for CPU inference (``accel.ops._plans``): a settled call then costs a
    lookup and identity/version checks before its strategy (or the dense ``F.linear``) runs."""
    out_features, in_features = shape
    tensors = (values, crow_indices, col_indices, bias)
    if owner is not None and not needs_op(values, bias):  # (autograd records calls that train the layer)
        settled = _settled(owner, x, x.shape, tensors, (shape, allow_dense))
        if settled is not None:
            return call_linear(settled, x, out_features)
    elif owner is not None and not graph_mode() and x.dtype == values.dtype and x.device == values.device and \
            x.dim() and x.shape[-1] == in_features:  # trainable: autograd records the layer's own path
        x2 = x.reshape(math.prod(x.shape[:-1]), in_features)
        allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if x.is_cuda else False
        y = _ModuleBsrLinearFunction.apply(x2, values, crow_indices, col_indices, out_features, bias, allow_tf32,
                                           allow_dense, shape, owner)
        return y.view(*x.shape[:-1], out_features)
    if needs_op(x, values, bias) or x.dtype != values.dtype or x.device != values.device or x.dim() == 0 or \
            x.shape[-1] != in_features:
        return bsr_linear(x, values, crow_indices, col_indices, shape, bias, allow_dense=allow_dense)
    check_bsr_cached(crow_indices, col_indices, values.shape[0], shape, values.shape[1], "bsr_linear")
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if x.is_cuda else False
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), in_features)
    if owner is not None and not use_triton(x2, "bsr_linear") and x2.shape[0] and x2.shape[1] and values.shape[0]:
        return call_linear(_planned(owner, _plan_key(x, x.shape, False), tensors, (shape, allow_dense), ("bsr_linear",),
                                    lambda: _resolve_cpu(x2, values, crow_indices, col_indices, out_features, bias,
                                                         allow_dense)), x, out_features)
    y = _dispatch("bsr_dense_mm", x2, values, crow_indices, col_indices, out_features, bias, allow_tf32=allow_tf32,
                  allow_dense=allow_dense)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], out_features)


def _resolve_cpu(x, values, crow, col, out_features, bias, allow_dense):
    """``(fn, any_rank)``: the CPU call :func:`_dispatch` makes for ``x``'s kind of input (deciding the strategy
    now), and whether it takes any rank of input (else the 2-D view)."""
    strategy = _cpu_strategy(x, values, crow, col, out_features, bias, allow_dense)
    if strategy == "dense":
        w = _dense_weight(values, crow, col, out_features, x.shape[1], x.dtype)
        return functools.partial(torch.nn.functional.linear, weight=w, bias=bias), True

    if strategy in NATIVE:  # the packed weight and fp32 bias fetched once (the plan is dropped when they change)
        return _native_runner(x, values, crow, col, out_features, bias, strategy), False

    def run(x2):
        return nonfinite_rows_like_dense(x2, cpu_bsr.bsr_dense_mm_cpu(x2, values, crow, col, out_features, bias,
                                                                      strategy=strategy))
    return run, False
