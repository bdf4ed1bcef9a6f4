"""int8 Linear and Conv2d ops: dynamic or static activation quantization, weight-only, or ``auto``.

Two custom ops (``torch.library.custom_op`` + ``register_fake``), each with one dispatch point:

* ``accel::int8_linear(x, w_q, w_scale, bias, act_scale, activation, mode, act_qmax)``, ``mode``:

  - ``"dynamic"`` / ``"static"``: quantize ``x`` per token (or with the static ``act_scale``), int8
    GEMM, fused dequant + bias + activation. CUDA: ``quantize_rows`` + ``int8_mm``. CPU: the engine
    ``accel.engines`` picks for this shape on this machine (``accel.cpu.int8``: FBGEMM, oneDNN,
    ``torch._int_mm``, ...);
  - ``"weight_only"``: float ``x`` times the int8 weight (CUDA ``int8_mm`` with float ``a``; CPU
    converted panels or ``_weight_int8pack_mm``);
  - ``"auto"``: the fastest of dynamic, weight-only and float (the dequantized weight) for this
    shape and number of tokens, measured on this machine (a layer of a model keeps one decision
    per batch-size bucket).

* ``accel::int8_conv2d(..., mode, act_qmax)``: quantize ``x`` per image (or static), int8 conv;
  ``mode="auto"`` may run the dequantized float conv where that is faster here.

``act_qmax`` is the activation range (127 or 63; 0: this machine's native range, see
``accel.engines.native_act_qmax``). Outputs have ``x``'s dtype. The int8 weights are frozen
buffers; gradients reach ``x`` straight through the quantization (``dx = dy @ dequant(W)``, the
transposed conv for Conv2d). A fused GELU has no backward here (it would need the pre-activation):
such a layer raises when a gradient is needed. To train int8 layers, use ``accel.qat``.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import torch.nn.functional as F

from .. import engines
from ..cpu import compiled
from ..cpu import int8 as cpu_int8
from ..cpu.packcache import cached
from ..quant import ACTIVATIONS, INT32_MAX_K, QMAX, activate, dequantize_weight
from ._dispatch import as_conv_output, check_tensors, conv_out_format, needs_op, not_a_view, use_triton
from ._plans import _PLANS, _Plan, _plan_key, _planned, _settled, call_linear, forget_plans  # noqa: F401  (layers, tests)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LINEAR_MODES = ("dynamic", "static", "weight_only", "auto")
CONV_MODES = ("int8", "auto")
#: CUDA ``auto`` without a measurement: weight-only int8 up to this many tokens, dynamic above
CUDA_WEIGHT_ONLY_MAX_M = 16
#: SQNR (dB) an engine's output must reach against the exact reference (rounded to the output dtype)
#: before it can be chosen: exact integer engines give > 100 dB in fp32 and differ from the rounded
#: reference by an ulp here and there in bf16/fp16; weight-only with bf16 activations gives ~50 dB
EXACT_SQNR = {torch.float32: 60.0, torch.bfloat16: 40.0, torch.float16: 50.0}
WEIGHT_ONLY_SQNR = 45.0
#: an ``auto`` form must agree this well with the float layer on the int8 weights (a sanity bound: the
#: int8 forms give ~40 dB on Gaussian data, bf16 ~50 dB; a broken engine gives < 10)
FORM_SQNR = 20.0


FLOAT_CONV_FORMS = ("float", "float_nchw", "float_bf16")


def _float_conv_form(form: str) -> tuple[torch.dtype | None, torch.memory_format]:
    """(compute dtype, None for the input's; layout) of a float conv form."""
    return (torch.bfloat16 if form == "float_bf16" else None,
            torch.contiguous_format if form == "float_nchw" else torch.channels_last)


def _float_conv(form, x, w_q, w_scale, bias, stride, padding, dilation, activation):
    return cpu_int8.conv2d_float_cpu(x, w_q, w_scale, bias, stride, padding, dilation, activation,
                                     *_float_conv_form(form))


def _auto_forms(x: torch.Tensor, k: int) -> tuple[str, ...]:
    """The forms an ``auto`` layer may run for ``x``: an fp32 input may also compute in bf16 ("float_bf16",
    AMX / AVX512-BF16 tensor cores; at least as accurate as the int8 forms); int8 activations only where
    ``K`` cannot overflow the int32 accumulator; one fp32 row on the CPU also "dynamic_fused" (FBGEMM's dynamic
    linear: one call, the row quantized per tensor with a zero point, as fine as per token for one row)."""
    base = ("dynamic", "weight_only", "float") if k <= INT32_MAX_K else ("weight_only", "float")
    if x.dtype != torch.float32 or x.is_cuda:
        return base
    fused = ("dynamic_fused",) if x.shape[0] == 1 and cpu_int8.fused_dynamic_ok(k) else ()
    return base + fused + ("float_bf16",)


def _pair(v) -> list[int]:
    """``v`` (an int or a sequence of ints) as a list; floats and bools raise TypeError (``int(1.5)`` would be 1)."""
    vals = [v, v] if isinstance(v, numbers.Integral) and not isinstance(v, bool) else list(v)
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in vals):
        raise TypeError(f"not ints: {v!r}")
    return [int(i) for i in vals]


def _qmax(act_qmax: int) -> int:
    return act_qmax if act_qmax else engines.native_act_qmax()


# ---------------------------------------------------------------------------------------------
# engine choice (CPU): one key per (op, shape, bucket of rows, dtype, qmax); see accel.engines
# ---------------------------------------------------------------------------------------------
def _linear_engine(x, w_q, w_scale, bias, act_scale, activation, qmax) -> str:
    n, k = w_q.shape
    m = x.shape[0]
    return engines.memo("int8_linear", (n, k, engines.m_bucket(m), x.dtype, qmax),
                 lambda: _choose_linear_engine(x, w_q, w_scale, bias, act_scale, activation, qmax))


def _choose_linear_engine(x, w_q, w_scale, bias, act_scale, activation, qmax) -> str:
    n, k = w_q.shape
    m = x.shape[0]
    key = f"int8_linear|n={n}|k={k}|m={engines.m_bucket(m)}|dt={str(x.dtype)[6:]}|q={qmax}"
    exact = cpu_int8.exact_engines(qmax, k)

    def candidates():  # (built only to measure: the compiled quantization is compiled before the timing starts)
        if "onednn_cq" in exact:
            compiled.warm(x)
        return {e: (lambda e=e: cpu_int8.linear_int8_cpu(x, w_q, w_scale, bias, activation, act_scale, qmax, e))
                for e in exact}

    def reference():  # rounded to the output dtype like the engines' outputs
        return cpu_int8.linear_int8_reference(x, w_q, w_scale, bias, activation, act_scale, qmax).to(x.dtype)

    return engines.choose("int8_linear", key, candidates, default=cpu_int8.default_linear_engine(qmax, m, k),
                          reference=reference, min_sqnr=EXACT_SQNR[x.dtype], allowed=exact)


def _weight_only_engine(x, w_q, w_scale, bias, activation) -> str:
    n, k = w_q.shape
    return engines.memo("int8_weight_only_linear", (n, k, engines.m_bucket(x.shape[0]), x.dtype),
                 lambda: _choose_weight_only_engine(x, w_q, w_scale, bias, activation))


def _choose_weight_only_engine(x, w_q, w_scale, bias, activation) -> str:
    n, k = w_q.shape
    key = f"int8_weight_only_linear|n={n}|k={k}|m={engines.m_bucket(x.shape[0])}|dt={str(x.dtype)[6:]}"
    allowed = cpu_int8.weight_only_engines(x.dtype, k)

    def candidates():
        return {e: (lambda e=e: cpu_int8.linear_weight_only_cpu(x, w_q, w_scale, bias, activation, e)) for e in allowed}

    def reference():
        return cpu_int8.linear_weight_only_cpu(x.float(), w_q, w_scale, bias, activation, "panels")

    return engines.choose("int8_weight_only_linear", key, candidates, default="panels", reference=reference,
                          min_sqnr=WEIGHT_ONLY_SQNR, allowed=allowed)


def _auto_form(x, w_q, w_scale, bias, activation, qmax, device: str) -> str:
    """"dynamic", "weight_only" or "float" for an ``auto`` layer at this shape and bucket of tokens."""
    n, k = w_q.shape
    return engines.memo("quant_linear_form", (n, k, engines.m_bucket(x.shape[0]), x.dtype, qmax, device),
                 lambda: _choose_auto_form(x, w_q, w_scale, bias, activation, qmax, device))


def _choose_auto_form(x, w_q, w_scale, bias, activation, qmax, device: str) -> str:
    n, k = w_q.shape
    m = x.shape[0]
    key = f"quant_linear_form|n={n}|k={k}|m={engines.m_bucket(m)}|dt={str(x.dtype)[6:]}|q={qmax}|{device}"
    if device == "cuda":
        default = "weight_only" if m <= CUDA_WEIGHT_ONLY_MAX_M else "dynamic"
    else:  # the incumbent a challenger must beat by the margin: a half-precision input's own dense GEMM
        default = "float" if x.dtype in (torch.bfloat16, torch.float16) else "dynamic"

    forms = _auto_forms(x, k)
    if default not in forms:
        default = "float"

    def candidates():
        return {f: (lambda f=f: _linear_body(x, w_q, w_scale, bias, None, activation, f, qmax)) for f in forms}

    def reference():  # the float layer with the int8 weights: every form must be at least int8-accurate
        return cpu_int8.linear_float_cpu(x.float(), w_q, w_scale, bias, activation)

    return engines.choose("quant_linear_form", key, candidates, default=default, device=device, allowed=forms,
                          reference=reference, min_sqnr=FORM_SQNR)


def _conv_engine(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, qmax, mode) -> str:
    b, c, h, w = x.shape
    o, _, kh, kw = w_q.shape
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    parts = (mode, o, c, kh, kw, h, w, tuple(stride), tuple(padding), tuple(dilation), engines.m_bucket(b), x.dtype, qmax,
             cl)
    return engines.memo("int8_conv2d", parts, lambda: _choose_conv_engine(x, w_q, w_scale, bias, act_scale, stride, padding,
                                                                  dilation, activation, qmax, mode))


def _choose_conv_engine(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, qmax, mode) -> str:
    b, c, h, w = x.shape
    o, _, kh, kw = w_q.shape
    allowed = list(cpu_int8.conv_engines(qmax))
    if not cpu_int8.onednn_conv_ok(c, h, w, kh, kw, tuple(stride), tuple(padding), tuple(dilation)):
        allowed = [e for e in allowed if not e.startswith("onednn")]  # wrong numbers there (accel.cpu.int8.onednn_conv_ok)
    if not cpu_int8.amx_conv_ok(c):
        allowed = [e for e in allowed if e != "amx_tiles"]
    if c * kh * kw > INT32_MAX_K:  # the int32 accumulator could overflow: float forms only (auto)
        allowed = []
    if mode == "auto":
        allowed += ["float", "float_nchw"]
        if x.dtype == torch.float32:
            allowed.append("float_bf16")
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    key = (f"int8_conv2d|{mode}|o={o}|c={c}|k={kh}x{kw}|hw={h}x{w}|s={stride[0]}x{stride[1]}|p={padding[0]}x{padding[1]}"
           f"|d={dilation[0]}x{dilation[1]}|b={engines.m_bucket(b)}|dt={str(x.dtype)[6:]}|q={qmax}|cl={int(cl)}")

    def run(e):  # timed with the conversion to the input's layout that the op does afterwards
        if e in FLOAT_CONV_FORMS:
            return as_conv_output(_float_conv(e, x, w_q, w_scale, bias, stride, padding, dilation, activation), x)
        return as_conv_output(cpu_int8.conv2d_int8_cpu(x, w_q, w_scale, bias, stride, padding, dilation, activation,
                                                       act_scale, qmax, e), x)

    def candidates():  # (built only to measure: the compiled quantization is compiled before the timing starts)
        if any(e.endswith("_cq") for e in allowed):
            compiled.warm(x)
        return {e: (lambda e=e: run(e)) for e in allowed}

    def float_reference():
        return cpu_int8.conv2d_float_cpu(x.float(), w_q, w_scale, bias, stride, padding, dilation, activation)

    reference = None
    if "float" not in allowed:
        def reference():  # the same integers through an fp32 conv: exact products
            xf = x.float()
            scale, inv = cpu_int8.act_scale_inv(xf, qmax, act_scale)
            v = torch.round((xf * inv[:, None, None, None]).clamp(-qmax, qmax))
            y = cpu_int8.float_conv2d_cpu(v, w_q.float(), None, stride, padding, dilation)
            y = y * w_scale[None, :, None, None] * scale[:, None, None, None]
            y = y if bias is None else y + bias.float()[None, :, None, None]
            return activate(y, activation).to(x.dtype)

    default = allowed[0]  # oneDNN's direct conv where it is correct, else im2col
    return engines.choose("int8_conv2d", key, candidates, default=default, reference=reference or float_reference,
                          min_sqnr=EXACT_SQNR[x.dtype] if reference is not None else FORM_SQNR, allowed=tuple(allowed))


# ---------------------------------------------------------------------------------------------
# implementations (the op bodies)
# ---------------------------------------------------------------------------------------------
def _linear_body(x, w_q, w_scale, bias, act_scale, activation, mode, qmax):
    """One resolved mode on the CPU."""
    if mode in ("float", "float_bf16"):
        return cpu_int8.linear_float_cpu(x, w_q, w_scale, bias, activation,
                                         torch.bfloat16 if mode == "float_bf16" else None)
    if mode == "weight_only":
        return cpu_int8.linear_weight_only_cpu(x, w_q, w_scale, bias, activation,
                                               _weight_only_engine(x, w_q, w_scale, bias, activation))
    if mode == "dynamic_fused":
        return cpu_int8.linear_dynamic_fused_cpu(x, w_q, w_scale, bias, activation)
    engine = _linear_engine(x, w_q, w_scale, bias, act_scale, activation, qmax)
    return cpu_int8.linear_int8_cpu(x, w_q, w_scale, bias, activation, act_scale, qmax, engine)


def _triton_linear(x, w_q, w_scale, bias, act_scale, activation, mode, qmax):
    from ..kernels.int8_matmul import int8_mm, quantize_rows

    if mode == "float":
        w = cpu_int8.dequantized(w_q, w_scale, x.dtype)
        out = torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
        return activate(out, activation)
    if mode == "weight_only":
        return int8_mm(x, w_q, None, w_scale, bias, activation=activation, out_dtype=x.dtype,
                       allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    q, s = quantize_rows(x, qmax, act_scale)
    return int8_mm(q, w_q, s, w_scale, bias, activation=activation, out_dtype=x.dtype)


def _int8_linear_impl(x, w_q, w_scale, bias, act_scale, activation, mode, act_qmax):
    triton = use_triton(x, "int8_linear")
    qmax = act_qmax if act_qmax else (QMAX if triton else engines.native_act_qmax())
    m, k, n = x.shape[0], x.shape[1], w_q.shape[0]
    if m == 0 or n == 0 or k == 0:  # nothing to multiply: the output is the bias (through the activation)
        y = x.new_zeros(m, n)
        if bias is not None:
            y += bias.to(y.dtype)
        return activate(y, activation)
    if mode == "auto":
        if triton and not x.is_cuda:  # the interpreter: no timing
            mode = "weight_only" if x.shape[0] <= CUDA_WEIGHT_ONLY_MAX_M else "dynamic"
        else:
            mode = _auto_form(x, w_q, w_scale, bias, activation, qmax, "cuda" if x.is_cuda else "cpu")
    if triton:
        return _triton_linear(x, w_q, w_scale, bias, act_scale, activation, mode, qmax)
    return _linear_body(x, w_q, w_scale, bias, act_scale, activation, mode, qmax)


def _int8_conv2d_impl(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, mode, act_qmax):
    if use_triton(x, "int8_conv2d"):
        from ..kernels.int8_conv import int8_conv2d
        from ..kernels.int8_matmul import quantize_rows

        qmax = act_qmax or QMAX
        b = x.shape[0]
        # NHWC is the kernel's layout: quantize each image as one contiguous row of the channels_last input
        nhwc = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        q, s = quantize_rows(nhwc.reshape(b, -1), qmax, act_scale)
        xq = q.view(nhwc.shape).permute(0, 3, 1, 2)
        # the kernel reads the weight through its strides; channels_last (OHWI) gives 16-byte loads
        w_cl = cpu_int8.cached_tensor("conv_w_ohwi", w_q, lambda: w_q.contiguous(memory_format=torch.channels_last))
        y = int8_conv2d(xq, w_cl, s, w_scale, bias, stride, padding, dilation, activation=activation,
                        out_dtype=x.dtype)
        return as_conv_output(y, x)
    qmax = _qmax(act_qmax)
    engine = _conv_engine(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, qmax, mode)
    if engine in FLOAT_CONV_FORMS:
        y = _float_conv(engine, x, w_q, w_scale, bias, stride, padding, dilation, activation)
    else:
        y = cpu_int8.conv2d_int8_cpu(x, w_q, w_scale, bias, stride, padding, dilation, activation, act_scale, qmax,
                                     engine)
    return as_conv_output(y, x)  # the input's layout, as nn.Conv2d (engines compute channels_last)


# ---------------------------------------------------------------------------------------------
# registered ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("accel::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor | None, activation: str, mode: str = "dynamic",
                    act_qmax: int = 0) -> torch.Tensor:
    return _int8_linear_impl(x, w_q, w_scale, bias, act_scale, activation, mode, act_qmax)


@_int8_linear_op.register_fake
def _(x, w_q, w_scale, bias, act_scale, activation, mode="dynamic", act_qmax=0):
    torch._check(x.shape[1] == w_q.shape[1], lambda: f"int8_linear: x {tuple(x.shape)} vs weight {tuple(w_q.shape)}")
    return x.new_empty(x.shape[0], w_q.shape[0])


@torch.library.custom_op("accel::int8_conv2d", mutates_args=())
def _int8_conv2d_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                    activation: str, mode: str = "int8", act_qmax: int = 0) -> torch.Tensor:
    return not_a_view(_int8_conv2d_impl(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, mode,
                                        act_qmax))


@_int8_conv2d_op.register_fake
def _(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, mode="int8", act_qmax=0):
    return torch.empty(conv2d_output_shape(x.shape, w_q.shape, stride, padding, dilation), dtype=x.dtype,
                       device=x.device, memory_format=conv_out_format(x))


def conv2d_output_shape(x_shape, w_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    b, _, h, w = x_shape
    o, _, kh, kw = w_shape
    oh, ow = cpu_int8.conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    return b, o, oh, ow


# ---------------------------------------------------------------------------------------------
# straight-through backward to x (weights are frozen int8 buffers)
# ---------------------------------------------------------------------------------------------
def _grad_through_activation(ctx, dy):
    if ctx.activation == "relu":
        (positive,) = ctx.saved_tensors[-1:]
        return dy * positive.to(dy.dtype)
    return dy


def _setup_linear(ctx, inputs, output):  # (x, w_q, w_scale, bias, act_scale, activation, mode, act_qmax)
    ctx.activation, ctx.n_inputs = inputs[5], len(inputs)
    # a fused ReLU's mask, not the output: saved, the output would forbid in-place ops after the layer
    ctx.save_for_backward(inputs[1], inputs[2], output > 0 if ctx.activation == "relu" else None)


def _backward_linear(ctx, dy):
    w_q, w_scale, _ = ctx.saved_tensors
    dy = _grad_through_activation(ctx, dy)
    dx = dy @ dequantize_weight(w_q, w_scale).to(dy.dtype)
    return (dx,) + (None,) * (ctx.n_inputs - 1)


def _setup_conv(ctx, inputs, output):
    x, w_q, w_scale, _bias, _act_scale, stride, padding, dilation, activation = inputs[:9]
    ctx.activation, ctx.geometry, ctx.x_shape, ctx.n_inputs = activation, (stride, padding, dilation), x.shape, len(inputs)
    ctx.save_for_backward(w_q, w_scale, output > 0 if activation == "relu" else None)  # (as for the linear)


def _backward_conv(ctx, dy):
    w_q, w_scale, _ = ctx.saved_tensors
    dy = _grad_through_activation(ctx, dy)
    stride, padding, dilation = ctx.geometry
    w = dequantize_weight(w_q, w_scale).to(dy.dtype)
    c, h, wd = ctx.x_shape[1:]
    if not dy.is_cuda and not cpu_int8.onednn_conv_ok(c, h, wd, w.shape[2], w.shape[3], tuple(stride), tuple(padding),
                                                     tuple(dilation)):
        # torch's CPU conv crashes or is wrong on these geometries (see cpu_int8.float_conv2d_cpu): fp32, NCHW
        dx = torch.nn.grad.conv2d_input(ctx.x_shape, cpu_int8.canonical(w, torch.float32),
                                        cpu_int8.canonical(dy, torch.float32), stride, padding, dilation).to(dy.dtype)
    else:
        dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, dy, stride, padding, dilation)
    return (dx,) + (None,) * (ctx.n_inputs - 1)


_int8_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)
_int8_conv2d_op.register_autograd(_backward_conv, setup_context=_setup_conv)


# ---------------------------------------------------------------------------------------------
# public functions: validate, then call the op (compile / autograd) or its body (eager)
# ---------------------------------------------------------------------------------------------
def _checked_once(t: torch.Tensor, check) -> None:
    """``check()`` (which raises on bad values) once per version of ``t``, remembered like a derived weight
    (``accel.cpu.packcache``: identity, storage and version, dropped with ``t``); an inference tensor, which has no
    version counter, every time."""
    if t.is_inference():
        check()
    else:
        cached("values_checked", (t,), (), lambda: check() or True)


def _check_act_scale(what: str, act_scale: torch.Tensor) -> None:
    if not (bool(torch.isfinite(act_scale).all()) and bool((act_scale > 0).all())):
        raise ValueError(f"{what}: act_scale must be finite and > 0, got {act_scale.flatten().tolist()}")


def _check_w_scale(what: str, w_scale: torch.Tensor) -> None:
    if not (bool(torch.isfinite(w_scale).all()) and bool((w_scale >= 0).all())):
        bad = w_scale[~(torch.isfinite(w_scale) & (w_scale >= 0))]
        raise ValueError(f"{what}: weight scales must be finite and >= 0, got {bad.numel()} bad values, e.g. "
                         f"{bad[:4].tolist()}")


def check_int32_k(what: str, w_q: torch.Tensor) -> None:
    """int8 activations need ``K`` (C*KH*KW for a conv) small enough that int32 sums cannot overflow."""
    k = math.prod(w_q.shape[1:])
    if k > INT32_MAX_K:
        raise ValueError(f"{what}: K={k} (weight {tuple(w_q.shape)}) exceeds {INT32_MAX_K}, where the int32 "
                         "accumulation of int8 activations may overflow; use mode 'auto' (float or weight-only "
                         "forms there)" + (" or 'weight_only'" if w_q.dim() == 2 else ""))


def _check_common(what, x, w_q, w_scale, bias, act_scale, activation, weight_dims, act_qmax):
    check_tensors(what, (("x", x), ("weight", w_q), ("weight scale", w_scale)), (("bias", bias), ("act_scale", act_scale)))
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: x dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if w_q.dtype != torch.int8 or w_q.dim() != weight_dims:
        raise TypeError(f"{what}: weight must be a {weight_dims}-D int8 tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if w_scale.shape != (w_q.shape[0],) or w_scale.dtype != torch.float32:
        raise ValueError(f"{what}: weight scale must be [{w_q.shape[0]}] float32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    if bias is not None and (bias.shape != (w_q.shape[0],) or not bias.is_floating_point()):
        raise ValueError(f"{what}: bias must be a float [{w_q.shape[0]}], got {tuple(bias.shape)} {bias.dtype}")
    if act_scale is not None and (act_scale.numel() != 1 or act_scale.dtype != torch.float32):
        raise ValueError(f"{what}: act_scale must be a one-element float32 tensor, got {tuple(act_scale.shape)} "
                         f"{act_scale.dtype}")
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not w_scale.is_meta:
        # (traced: no data-dependent checks) once per version of each scale tensor: a sync each, on CUDA
        if act_scale is not None:
            _checked_once(act_scale, lambda: _check_act_scale(what, act_scale))
        _checked_once(w_scale, lambda: _check_w_scale(what, w_scale))
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(act_qmax, numbers.Integral) or isinstance(act_qmax, bool) or act_qmax not in (0, 63, 127):
        raise ValueError(f"{what}: act_qmax must be 63, 127 or 0 (this machine's native range), got {act_qmax!r}")
    devices = {x.device, w_q.device, w_scale.device}
    devices |= {t.device for t in (bias, act_scale) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{what}: tensors on different devices {sorted(map(str, devices))}")
    if activation == "gelu" and x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{what}: no backward through a fused GELU (it needs the pre-activation); fuse "
                           "'none' or 'relu', call under torch.no_grad(), or train with accel.qat")


def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    act_scale: torch.Tensor | None = None,
    weight_only: bool = False,
    mode: str | None = None,
    act_qmax: int = 0,
) -> torch.Tensor:
    """``act(x @ dequant(w_q)^T + bias)`` with int8 weights ``w_q [N, K]`` (per-channel ``w_scale``).

    ``mode`` (see the module docstring) defaults to ``"weight_only"`` with ``weight_only=True``,
    ``"static"`` with an ``act_scale`` and ``"dynamic"`` otherwise. ``x [..., K]``.
    """
    if mode is None:
        mode = "weight_only" if weight_only else ("static" if act_scale is not None else "dynamic")
    if mode not in LINEAR_MODES:
        raise ValueError(f"int8_linear: mode must be one of {LINEAR_MODES}, got {mode!r}")
    what = f"int8_linear ({mode})"
    _check_common(what, x, w_q, w_scale, bias, act_scale, activation, 2, act_qmax)
    if mode in ("dynamic", "static"):
        check_int32_k(what, w_q)
    if (mode == "static") != (act_scale is not None):
        raise ValueError(f"{what}: act_scale is needed by mode 'static' and only by it, got "
                         f"{'none' if act_scale is None else 'one'}")
    if x.dim() == 0 or x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"{what}: x must have shape [..., {w_q.shape[1]}], got {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    args = (x2, w_q, w_scale, bias, act_scale, activation, mode, act_qmax)
    y = _int8_linear_op(*args) if needs_op(x2) else _int8_linear_impl(*args)
    return y.view(*lead, w_q.shape[0])


def module_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  act_scale: torch.Tensor | None, activation: str, mode: str, act_qmax: int,
                  owner: object | None = None) -> torch.Tensor:
    """:func:`int8_linear` for a ``QuantLinear``'s own buffers (validated when they were set or loaded):
    only ``x`` is checked, so a call costs a few microseconds more than its engine. ``owner`` (the
    module) keeps the resolved call per input dtype and bucket of rows (:func:`_planned`)."""
    shape = x.shape
    settled = _settled(owner, x, shape, (w_q, w_scale, bias, act_scale), (activation, mode, act_qmax))
    if settled is not None:  # a kind of input this layer has run (and checked) before: its plan, nothing else
        return call_linear(settled, x, w_q.shape[0])
    if needs_op(x) or x.dtype not in FLOAT_DTYPES or x.device != w_q.device or x.dim() == 0 or \
            x.shape[-1] != w_q.shape[1]:
        return int8_linear(x, w_q, w_scale, bias, activation=activation, act_scale=act_scale, mode=mode,
                           act_qmax=act_qmax)  # the full checks raise the clear error / record autograd
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if owner is not None and x2.device.type == "cpu" and x2.shape[0] and x2.shape[1] and w_q.shape[0] and \
            engines.env("ACCEL_FORCE_TRITON") != "1":
        return call_linear(_planned(owner, _plan_key(x, shape, False), (w_q, w_scale, bias, act_scale),
                                    (activation, mode, act_qmax), (),
                                    lambda: _resolve(x2, w_q, w_scale, bias, act_scale, activation, mode, act_qmax)),
                           x, w_q.shape[0])
    y = _int8_linear_impl(x2, w_q, w_scale, bias, act_scale, activation, mode, act_qmax)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w_q.shape[0])


def _resolve(x, w_q, w_scale, bias, act_scale, activation, mode, act_qmax):
    """``(fn, any_rank)``: the function running ``x``'s call as :func:`_linear_body` would (deciding form and
    engine now), and whether it takes any rank of input (else the 2-D view)."""
    qmax = _qmax(act_qmax)
    if mode == "auto":
        mode = _auto_form(x, w_q, w_scale, bias, activation, qmax, "cpu")
    elif mode in ("dynamic", "static"):
        check_int32_k(f"QuantLinear ({mode})", w_q)
    if mode in ("float", "float_bf16"):  # any rank: F.linear takes [..., K]
        w = cpu_int8.dequantized(w_q, w_scale, torch.bfloat16 if mode == "float_bf16" else x.dtype)
        b = _bias_in(bias, w.dtype)
        if w.dtype == x.dtype and activation == "none" and not torch.is_autocast_enabled("cpu"):  # nn.Linear's call
            return functools.partial(F.linear, weight=w, bias=b), True
        return (lambda x: cpu_int8.linear_float_with(x, w, b, activation)), True
    if mode == "weight_only":
        engine = _weight_only_engine(x, w_q, w_scale, bias, activation)
        return (lambda x: cpu_int8.linear_weight_only_cpu(x, w_q, w_scale, bias, activation, engine)), False
    if mode == "dynamic_fused":  # (a plan of the one-row bucket: every input of its kind is one fp32 row)
        return (lambda x: cpu_int8.linear_dynamic_fused_cpu(x, w_q, w_scale, bias, activation)), False
    engine = _linear_engine(x, w_q, w_scale, bias, act_scale, activation, qmax)
    if engine in cpu_int8.TILE_ENGINES and act_scale is None and x.dtype in FLOAT_DTYPES:  # (operands bound once)
        return cpu_int8.tiles_linear_runner(w_q, w_scale, bias, activation, qmax, x.dtype,
                                            cpu_int8.TILE_ENGINES[engine]), False
    return (lambda x: cpu_int8.linear_int8_cpu(x, w_q, w_scale, bias, activation, act_scale, qmax, engine)), False


def check_conv_geometry(what: str, stride, padding, dilation) -> tuple[list[int], list[int], list[int]]:
    """``(stride, padding, dilation)`` as pairs of ints, or a ValueError naming the bad values."""
    try:
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: stride, padding and dilation must be ints or pairs of ints, got "
                         f"{stride!r}, {padding!r}, {dilation!r}") from None
    if len(stride) != 2 or len(padding) != 2 or len(dilation) != 2:
        raise ValueError(f"{what}: stride, padding and dilation must be pairs, got {stride}, {padding}, {dilation}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{what}: need stride >= 1, dilation >= 1 and padding >= 0, got stride {stride}, "
                         f"padding {padding}, dilation {dilation}")
    return stride, padding, dilation


def int8_conv2d(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    activation: str = "none",
    act_scale: torch.Tensor | None = None,
    mode: str = "int8",
    act_qmax: int = 0,
) -> torch.Tensor:
    """``act(conv2d(x, dequant(w_q)) + bias)`` with ``x [B, C, H, W]`` quantized per image (or with the
    static ``act_scale``); zero padding, groups = 1. Returns the input's memory format (as ``nn.Conv2d``)."""
    what = "int8_conv2d"
    if mode not in CONV_MODES:
        raise ValueError(f"{what}: mode must be one of {CONV_MODES}, got {mode!r}")
    _check_common(what, x, w_q, w_scale, bias, act_scale, activation, 4, act_qmax)
    if mode == "int8":
        check_int32_k(what, w_q)
    if x.dim() != 4 or x.shape[1] != w_q.shape[1]:
        raise ValueError(f"{what}: x must be [B, {w_q.shape[1]}, H, W] for weight {tuple(w_q.shape)}, got {tuple(x.shape)}")
    stride, padding, dilation = check_conv_geometry(what, stride, padding, dilation)
    kh, kw = w_q.shape[2:]
    if x.shape[2] + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or x.shape[3] + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
        raise ValueError(f"{what}: input {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                         f"dilated kernel {(kh, kw)} (dilation {dilation})")
    if x.shape[0] == 0 or w_q.shape[0] == 0 or w_q.shape[1] == 0:  # nothing to multiply
        shape = conv2d_output_shape(x.shape, w_q.shape, stride, padding, dilation)
        if x.shape[0] == 0 or w_q.shape[0] == 0:  # an empty output
            y = torch.zeros(shape, dtype=x.dtype, device=x.device)
        else:  # no input channels: the bias at every pixel (through the activation)
            y = torch.zeros(shape, dtype=torch.float32, device=x.device)
            if bias is not None:
                y += bias.float()[None, :, None, None]
            y = activate(y, activation).to(x.dtype)
        y = y.contiguous(memory_format=conv_out_format(x))
        # for an x that requires grad (here it is empty, or the output is) the output stays in the graph: x.grad
        # zeros, as nn.Conv2d
        return y + x.sum() * 0 if needs_op(x) else y
    args = (x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, mode, act_qmax)
    return _int8_conv2d_op(*args) if needs_op(x) else _int8_conv2d_impl(*args)


def module_conv2d(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, stride,
                  padding, dilation, act_scale: torch.Tensor | None, activation: str, mode: str,
                  act_qmax: int, owner: object | None = None) -> torch.Tensor:
    """:func:`int8_conv2d` for a ``QuantConv2d``'s own buffers and geometry (validated at construction and
    load): only ``x`` is checked. ``owner`` (the module) keeps the resolved call per kind of input."""
    settings = (tuple(stride), tuple(padding), tuple(dilation), activation, mode, act_qmax)
    settled = _settled(owner, x, x.shape, (w_q, w_scale, bias, act_scale), settings, image=True)
    if settled is not None:  # a kind of input this layer has run (and checked) before: its plan, nothing else
        return settled.fn(x)
    if needs_op(x) or x.dtype not in FLOAT_DTYPES or x.device != w_q.device or x.dim() != 4 or \
            x.shape[1] != w_q.shape[1] or x.shape[0] == 0 or not x.shape[1] or not w_q.shape[0]:
        return int8_conv2d(x, w_q, w_scale, bias, stride, padding, dilation, activation=activation, act_scale=act_scale,
                           mode=mode, act_qmax=act_qmax)
    kh, kw = w_q.shape[2:]
    if x.shape[2] + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or x.shape[3] + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
        return int8_conv2d(x, w_q, w_scale, bias, stride, padding, dilation, activation=activation, act_scale=act_scale,
                           mode=mode, act_qmax=act_qmax)  # raises the clear error
    if owner is not None and x.device.type == "cpu" and engines.env("ACCEL_FORCE_TRITON") != "1":
        return _planned(owner, _plan_key(x, x.shape, True), (w_q, w_scale, bias, act_scale), settings, ("int8_conv2d",),
                        lambda: (_resolve_conv(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation,
                                               mode, act_qmax), True)).fn(x)
    return _int8_conv2d_impl(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, mode, act_qmax)


def _resolve_conv(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, mode, act_qmax):
    """The function running ``x``'s call as :func:`_int8_conv2d_impl` does on the CPU (deciding the engine now)."""
    qmax = _qmax(act_qmax)
    if mode == "int8":
        check_int32_k("QuantConv2d", w_q)
    engine = _conv_engine(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation, qmax, mode)
    if engine == "amx_tiles" and x.dtype in FLOAT_DTYPES and cpu_int8.amx_conv_ok(x.shape[1]):
        run = cpu_int8.tiles_conv_runner(x, w_q, w_scale, bias, stride, padding, dilation, activation, act_scale, qmax)
        return lambda x: as_conv_output(run(x), x)  # (operands bound once)
    if engine not in FLOAT_CONV_FORMS:
        return lambda x: as_conv_output(cpu_int8.conv2d_int8_cpu(x, w_q, w_scale, bias, stride, padding, dilation,
                                                                 activation, act_scale, qmax, engine), x)
    dt, layout = _float_conv_form(engine)
    w = cpu_int8.dequantized(w_q, w_scale, dt or x.dtype, layout)
    b = _bias_in(bias, w.dtype)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)

    def general(x):
        return as_conv_output(cpu_int8.conv2d_float_with(x, w, b, stride, padding, dilation, activation, layout), x)

    if w.dtype == x.dtype and activation == "none" and not torch.is_autocast_enabled("cpu") and \
            cpu_int8.onednn_conv_ok(x.shape[1], x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding,
                                    dilation):  # (the same for every input of the plan's kind: C, H, W are)
        conv = functools.partial(F.conv2d, weight=w, bias=b, stride=stride, padding=padding, dilation=dilation)
        # what conv2d_float_with does for an input already in the compute layout
        return lambda x: as_conv_output(conv(x), x) if x.is_contiguous(memory_format=layout) else general(x)
    return general


def _bias_in(bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A plan's bias converted once to its float form's compute dtype (a plan is dropped when ``bias``
    is replaced or changed in place), instead of on every call (~20 us)."""
    return bias if bias is None or bias.dtype == dtype else bias.detach().to(dtype)
