"""int8 Linear and Conv2d ops: dynamic or static activation quantization, or weight-only.

Three custom ops (``torch.library.custom_op`` + ``register_fake``), each with one dispatch point:

* ``accel::int8_linear``: quantize ``x`` per token (or with a static scale), int8 GEMM, fused
  dequant + bias + activation. CUDA: ``quantize_rows`` + ``int8_mm`` (qmax 127). CPU:
  ``accel.cpu.int8.linear_int8_cpu`` (FBGEMM; qmax from ``act_qmax()``).
* ``accel::int8_weight_only_linear``: float ``x`` times the int8 weight. CUDA: ``int8_mm`` with
  float ``a``. CPU: ``linear_weight_only_cpu``.
* ``accel::int8_conv2d``: quantize ``x`` per image (or static), implicit-GEMM int8 conv. CUDA:
  ``int8_conv2d``. CPU: ``conv2d_int8_cpu`` (oneDNN).

Outputs have ``x``'s dtype. The int8 weights are frozen buffers; gradients reach ``x`` straight
through the quantization (``dx = dy @ dequant(W)``, the transposed conv for Conv2d), so an int8
layer can sit inside a model that still trains elsewhere. A fused GELU has no backward here (it
would need the pre-activation): such a layer raises when a gradient is needed. To train the int8
layers themselves, use fake quantization (``accel.qat``) and convert.
"""

from __future__ import annotations

import torch

from ..cpu import int8 as cpu_int8
from ..quant import ACTIVATIONS, QMAX, dequantize_weight
from ._dispatch import needs_op, use_triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(i) for i in v]


# ---------------------------------------------------------------------------------------------
# implementations (the op bodies)
# ---------------------------------------------------------------------------------------------
def _int8_linear_impl(x, w_q, w_scale, bias, act_scale, activation):
    if use_triton(x, "int8_linear"):
        from ..kernels.int8_matmul import int8_mm, quantize_rows

        q, s = quantize_rows(x, QMAX, act_scale)
        return int8_mm(q, w_q, s, w_scale, bias, activation=activation, out_dtype=x.dtype)
    return cpu_int8.linear_int8_cpu(x, w_q, w_scale, bias, activation, act_scale).to(x.dtype)


def _weight_only_impl(x, w_q, w_scale, bias, activation):
    if use_triton(x, "int8_weight_only_linear"):
        from ..kernels.int8_matmul import int8_mm

        return int8_mm(x, w_q, None, w_scale, bias, activation=activation, out_dtype=x.dtype,
                       allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return cpu_int8.linear_weight_only_cpu(x, w_q, w_scale, bias, activation)


def _int8_conv2d_impl(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation):
    if use_triton(x, "int8_conv2d"):
        from ..kernels.int8_conv import int8_conv2d
        from ..kernels.int8_matmul import quantize_rows

        b = x.shape[0]
        nhwc = x.permute(0, 2, 3, 1)
        if nhwc.is_contiguous():  # channels_last: quantize each image as one contiguous row
            q, s = quantize_rows(nhwc.reshape(b, -1), QMAX, act_scale)
            xq = q.view(nhwc.shape).permute(0, 3, 1, 2)
        else:
            q, s = quantize_rows(x.contiguous().reshape(b, -1), QMAX, act_scale)
            xq = q.view(x.shape)
        return int8_conv2d(xq, w_q, s, w_scale, bias, stride, padding, dilation, activation=activation,
                           out_dtype=x.dtype)
    return cpu_int8.conv2d_int8_cpu(x, w_q, w_scale, bias, stride, padding, dilation, activation, act_scale).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# registered ops
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("accel::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor | None, activation: str) -> torch.Tensor:
    return _int8_linear_impl(x, w_q, w_scale, bias, act_scale, activation)


@_int8_linear_op.register_fake
def _(x, w_q, w_scale, bias, act_scale, activation):
    torch._check(x.shape[1] == w_q.shape[1], lambda: f"int8_linear: x {tuple(x.shape)} vs weight {tuple(w_q.shape)}")
    return x.new_empty(x.shape[0], w_q.shape[0])


@torch.library.custom_op("accel::int8_weight_only_linear", mutates_args=())
def _weight_only_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    return _weight_only_impl(x, w_q, w_scale, bias, activation)


@_weight_only_op.register_fake
def _(x, w_q, w_scale, bias, activation):
    torch._check(x.shape[1] == w_q.shape[1], lambda: f"int8_weight_only_linear: x {tuple(x.shape)} vs {tuple(w_q.shape)}")
    return x.new_empty(x.shape[0], w_q.shape[0])


@torch.library.custom_op("accel::int8_conv2d", mutates_args=())
def _int8_conv2d_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                    activation: str) -> torch.Tensor:
    return _int8_conv2d_impl(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation)


@_int8_conv2d_op.register_fake
def _(x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation):
    return torch.empty(conv2d_output_shape(x.shape, w_q.shape, stride, padding, dilation), dtype=x.dtype,
                       device=x.device, memory_format=torch.channels_last)


def conv2d_output_shape(x_shape, w_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    b, _, h, w = x_shape
    o, _, kh, kw = w_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return b, o, oh, ow


# ---------------------------------------------------------------------------------------------
# straight-through backward to x (weights are frozen int8 buffers)
# ---------------------------------------------------------------------------------------------
def _grad_through_activation(ctx, dy):
    if ctx.activation == "relu":
        (out,) = ctx.saved_tensors[-1:]
        return dy * (out > 0).to(dy.dtype)
    return dy


def _setup_linear(ctx, inputs, output):  # (x, w_q, w_scale, bias, [act_scale,] activation)
    ctx.activation, ctx.n_inputs = inputs[-1], len(inputs)
    ctx.save_for_backward(inputs[1], inputs[2], output)


def _backward_linear(ctx, dy):
    w_q, w_scale, _ = ctx.saved_tensors
    dy = _grad_through_activation(ctx, dy)
    dx = dy @ dequantize_weight(w_q, w_scale).to(dy.dtype)
    return (dx,) + (None,) * (ctx.n_inputs - 1)


def _setup_conv(ctx, inputs, output):
    x, w_q, w_scale, _bias, _act_scale, stride, padding, dilation, activation = inputs
    ctx.activation, ctx.geometry, ctx.x_shape = activation, (stride, padding, dilation), x.shape
    ctx.save_for_backward(w_q, w_scale, output)


def _backward_conv(ctx, dy):
    w_q, w_scale, _ = ctx.saved_tensors
    dy = _grad_through_activation(ctx, dy)
    stride, padding, dilation = ctx.geometry
    w = dequantize_weight(w_q, w_scale).to(dy.dtype)
    dx = torch.nn.grad.conv2d_input(ctx.x_shape, w, dy, stride, padding, dilation)
    return (dx,) + (None,) * 8


_int8_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)
_weight_only_op.register_autograd(_backward_linear, setup_context=_setup_linear)
_int8_conv2d_op.register_autograd(_backward_conv, setup_context=_setup_conv)


# ---------------------------------------------------------------------------------------------
# public functions: validate, then call the op (compile / autograd) or its body (eager)
# ---------------------------------------------------------------------------------------------
def _check_common(what, x, w_q, w_scale, bias, act_scale, activation, weight_dims):
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    tensors = [t for t in (x, w_q, w_scale, bias, act_scale) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what}: tensors on different devices {sorted(map(str, devices))}")
    if torch.is_grad_enabled() and x.requires_grad and activation == "gelu":
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
) -> torch.Tensor:
    """``act(x @ dequant(w_q)^T + bias)`` with int8 weights ``w_q [N, K]`` (per-channel ``w_scale``).

    ``x [..., K]`` is quantized per token (``act_scale=None``), or with the static per-tensor
    ``act_scale``, unless ``weight_only`` keeps it in floating point.
    """
    what = "int8_weight_only_linear" if weight_only else "int8_linear"
    _check_common(what, x, w_q, w_scale, bias, act_scale, activation, 2)
    if weight_only and act_scale is not None:
        raise ValueError(f"{what}: act_scale has no meaning with weight_only=True")
    if x.dim() == 0 or x.shape[-1] != w_q.shape[1]:
        raise ValueError(f"{what}: x must have shape [..., {w_q.shape[1]}], got {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if weight_only:
        args = (x2, w_q, w_scale, bias, activation)
        y = _weight_only_op(*args) if needs_op(x2) else _weight_only_impl(*args)
    else:
        args = (x2, w_q, w_scale, bias, act_scale, activation)
        y = _int8_linear_op(*args) if needs_op(x2) else _int8_linear_impl(*args)
    return y.view(*lead, w_q.shape[0])


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
) -> torch.Tensor:
    """``act(conv2d(x, dequant(w_q)) + bias)`` with ``x [B, C, H, W]`` quantized per image (or with the
    static ``act_scale``); zero padding, groups = 1. Returns channels_last memory format."""
    what = "int8_conv2d"
    _check_common(what, x, w_q, w_scale, bias, act_scale, activation, 4)
    if x.dim() != 4 or x.shape[1] != w_q.shape[1]:
        raise ValueError(f"{what}: x must be [B, {w_q.shape[1]}, H, W] for weight {tuple(w_q.shape)}, got {tuple(x.shape)}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = w_q.shape[2:]
    if x.shape[2] + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or x.shape[3] + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
        raise ValueError(f"{what}: input {tuple(x.shape[2:])} with padding {padding} is smaller than the "
                         f"dilated kernel {(kh, kw)} (dilation {dilation})")
    if x.shape[0] == 0:
        return torch.empty(conv2d_output_shape(x.shape, w_q.shape, stride, padding, dilation), dtype=x.dtype,
                           device=x.device, memory_format=torch.channels_last)
    args = (x, w_q, w_scale, bias, act_scale, stride, padding, dilation, activation)
    return _int8_conv2d_op(*args) if needs_op(x) else _int8_conv2d_impl(*args)
