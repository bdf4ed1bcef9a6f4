"""int8 quantization rules and the PyTorch reference for the int8 ops.

One rule everywhere (Triton kernels, CPU paths, references): symmetric, round half to even,
saturating at ``+-qmax``::

    inv = qmax / absmax         (dynamic; 1 / scale when static; 0 when absmax == 0)
    q   = round_half_even(clamp(x * inv, -qmax, qmax)),   scale = absmax / qmax

* weights: per output channel, ``qmax = 127``; a zero channel gets scale 0 (its outputs are the bias);
  a weight holding NaN or inf is refused.
* activations: per row (token) of a Linear input, per image of a Conv2d input, or one static
  (calibrated) scale. A row or image holding NaN or inf gets scale NaN, so its outputs are NaN.
  ``qmax`` is 127 on CUDA; on CPUs without VNNI it is 63 (see ``accel.cpu.int8``).

Divisions are IEEE fp32 divisions (``ieee_div``): ``qmax / tensor`` in PyTorch is computed as
``reciprocal(tensor) * qmax`` (two roundings), which moves ties such as 63.5 vs 63.499996.

The references compute in float64 from the integers (exact for ``K <= 2**53 / 127**2``) and apply
scales, bias and activation in float32 in the kernels' order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

QMAX = 127
#: largest K (input features, or C*KH*KW of a conv) whose int32 accumulation of int8 x int8 products cannot
#: overflow for any inputs
INT32_MAX_K = (2**31 - 1) // (128 * 128)
ACTIVATIONS = ("none", "relu", "gelu")


def ieee_div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """``numerator / t`` correctly rounded (tensor / tensor), unlike ``numerator / t``, see above."""
    return torch.full_like(t, numerator) / t


def _quantize(x: torch.Tensor, inv: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round((x.float() * inv).clamp_(-qmax, qmax)).to(torch.int8)


def quantize_weight(w: torch.Tensor, qmax: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) symmetric quantization: ``(q int8 like w, scale fp32 [w.shape[0]])``."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_weight: expected a float weight, got {w.dtype}")
    if w.dim() < 1:
        raise ValueError(f"quantize_weight: expected a weight with an output-channel dim, got shape {tuple(w.shape)}")
    w = w.detach()
    flat = w.reshape(w.shape[0], math.prod(w.shape[1:])).float()
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).any(1).nonzero().flatten().tolist()
        raise ValueError(f"quantize_weight: weight of shape {tuple(w.shape)} holds NaN/inf in output channels {bad[:8]}")
    absmax = flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    inv = torch.where(absmax > 0, ieee_div(qmax, absmax), torch.zeros_like(absmax))
    q = _quantize(flat, inv[:, None], qmax).view(w.shape)
    return q, absmax / qmax


def dequantize_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """``w_q * scale`` per output channel, float32."""
    return w_q.float() * w_scale.float().view(-1, *([1] * (w_q.dim() - 1)))


def quantize_rows_ref(
    x: torch.Tensor, qmax: int = QMAX, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``accel.kernels.int8_matmul.quantize_rows``: ``(q int8 [M, K], scale fp32 [M])``."""
    if x.dim() < 1:
        raise ValueError("quantize_rows_ref: expected x [M, ...], got a 0-d tensor")
    return _quantize_groups(x.reshape(x.shape[0], math.prod(x.shape[1:])), qmax, static_scale)


def quantize_per_image_ref(
    x: torch.Tensor, qmax: int = QMAX, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (dim 0) quantization of an ``[B, ...]`` activation: ``(q int8 like x, scale fp32 [B])``."""
    if x.dim() < 1:
        raise ValueError("quantize_per_image_ref: expected x [B, ...], got a 0-d tensor")
    q, s = _quantize_groups(x.reshape(x.shape[0], math.prod(x.shape[1:])), qmax, static_scale)
    return q.view(x.shape), s


def _quantize_groups(x2: torch.Tensor, qmax: int, static_scale: torch.Tensor | None):
    if not x2.is_floating_point():
        raise TypeError(f"quantize: expected a float tensor, got {x2.dtype}")
    xf = x2.float()
    absmax = torch.where(torch.isnan(xf), torch.inf, xf.abs()).amax(1) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    bad = absmax == torch.inf
    if static_scale is None:
        scale = absmax / qmax
        inv = torch.where(absmax > 0, ieee_div(qmax, absmax), torch.zeros_like(absmax))
    else:
        s = static_scale.float().reshape(())
        scale = s.expand(xf.shape[0])
        inv = torch.where(s > 0, ieee_div(1.0, s), torch.zeros_like(s)).expand(xf.shape[0])
    inv = torch.where(bad, torch.zeros_like(inv), inv)
    q = _quantize(xf, inv[:, None], qmax)
    q[bad] = 0
    return q, torch.where(bad, torch.full_like(scale, float("nan")), scale).float()


def apply_epilogue(acc: torch.Tensor, row_scale, col_scale, bias, activation: str) -> torch.Tensor:
    """``act(acc * row_scale[:, None] * col_scale[None, :] + bias)`` in float32, the kernels' order."""
    out = acc.float()
    if row_scale is not None:
        out = out * row_scale.float()[:, None]
    if col_scale is not None:
        out = out * col_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return activate(out, activation)


def activate(out: torch.Tensor, activation: str, inplace: bool = False) -> torch.Tensor:
    if activation == "relu":
        return torch.relu_(out) if inplace else torch.relu(out)  # keeps NaN
    if activation == "gelu":
        return F.gelu(out)
    if activation != "none":
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return out


def int8_linear_ref(x_q, x_scale, w_q, w_scale, bias=None, activation="none") -> torch.Tensor:
    """``act((x_q @ w_q^T) * x_scale[:, None] * w_scale + bias)`` in float32 from exact integer products."""
    acc = x_q.double() @ w_q.double().t()
    return apply_epilogue(acc, x_scale, w_scale, bias, activation)


def weight_only_linear_ref(x, w_q, w_scale, bias=None, activation="none") -> torch.Tensor:
    """``act((x @ w_q^T) * w_scale + bias)`` with float ``x`` (weight-only int8), in float64 then float32."""
    acc = x.double() @ w_q.double().t()
    return apply_epilogue(acc, None, w_scale, bias, activation)


def int8_conv2d_ref(x_q, x_scale, w_q, w_scale, bias=None, stride=1, padding=0, dilation=1,
                    activation="none") -> torch.Tensor:
    """Int8 conv (NCHW in and out) with a scale per image: exact integer conv, then the epilogue."""
    acc = F.conv2d(x_q.double(), w_q.double(), None, stride, padding, dilation)  # [B, O, OH, OW]
    out = acc.float()
    out = out * x_scale.float()[:, None, None, None] * w_scale.float()[None, :, None, None]
    if bias is not None:
        out = out + bias.float()[None, :, None, None]
    return activate(out, activation)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(||ref|| / ||ref - out||)``."""
    ref, out = ref.double(), out.double()
    noise = (ref - out).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))
