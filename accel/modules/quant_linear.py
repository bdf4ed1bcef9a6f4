"""``QuantLinear`` and ``QuantConv2d``: drop-in int8 inference modules."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.int8 import int8_conv2d, int8_linear
from ..quant import ACTIVATIONS, dequantize_weight, quantize_weight

LINEAR_MODES = ("auto", "dynamic", "static", "weight_only")
CONV_MODES = ("dynamic", "static")

#: ``mode="auto"`` keeps activations in floating point (weight-only int8) up to this many tokens per
#: call. CPU: 0, measured with ``python -m bench.int8_microbench`` on the 2-core AVX2 dev machine:
#: dynamic int8 beat weight-only at every M in {1, 16, 256} (4096x4096), because int8 -> float
#: conversion on the CPU runs at about the speed of reading fp32. CUDA: 16, not measured yet (at small
#: M both read the same int8 weight; weight-only skips the activation-quantization kernel).
WEIGHT_ONLY_MAX_M = {"cpu": 0, "cuda": 16}


class _QuantBase(nn.Module):
    """Buffers and state shared by the int8 modules: ``weight_q`` (int8), ``weight_scale`` (fp32, one
    per output channel), optional ``bias`` and ``act_scale`` (fp32 [1], used by mode "static")."""

    MODES: tuple[str, ...] = ()

    def _init_buffers(self, weight_shape, bias: bool, mode: str, activation: str, device, dtype) -> None:
        if mode not in self.MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {self.MODES}, got {mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.mode = mode
        self.activation = activation
        self.register_buffer("weight_q", torch.zeros(weight_shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(weight_shape[0], dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(weight_shape[0], dtype=dtype or torch.float32, device=device)
                             if bias else None)
        self.register_buffer("act_scale", torch.full((1,), float("nan"), dtype=torch.float32, device=device))

    def _load_float(self, weight: torch.Tensor, bias: torch.Tensor | None, act_scale) -> None:
        q, s = quantize_weight(weight)
        self.weight_q.copy_(q)
        self.weight_scale.copy_(s)
        if bias is not None:
            self.bias.copy_(bias.detach())
        if act_scale is not None:
            self.set_act_scale(act_scale)

    def set_act_scale(self, act_scale) -> None:
        """Set the static (calibrated) activation scale: ``absmax / qmax`` of the calibration data."""
        value = torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1)
        if value.numel() != 1 or not torch.isfinite(value).all() or value.item() <= 0:
            raise ValueError(f"act_scale must be one finite positive number, got {act_scale!r}")
        self.act_scale.copy_(value)

    def _static_scale(self) -> torch.Tensor:
        if not torch.isfinite(self.act_scale).all():
            raise RuntimeError(f"{type(self).__name__} in mode 'static' has no activation scale: calibrate it "
                               "(accel.calibrate / set_act_scale) or use mode='dynamic'")
        return self.act_scale.float()

    def get_extra_state(self):
        return {"mode": self.mode, "activation": self.activation}

    def set_extra_state(self, state) -> None:
        if state["mode"] not in self.MODES or state["activation"] not in ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}: bad saved state {state}")
        self.mode, self.activation = state["mode"], state["activation"]

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_q, self.weight_scale)


class QuantLinear(_QuantBase):
    """``act(x @ W^T + b)`` with ``W`` stored as int8 with one scale per output channel.

    Modes: ``"dynamic"`` quantizes each token of ``x`` with its own scale at run time; ``"static"``
    uses one calibrated scale (``act_scale``); ``"weight_only"`` keeps ``x`` in floating point;
    ``"auto"`` picks weight-only for calls of at most :data:`WEIGHT_ONLY_MAX_M` tokens and dynamic
    above. Inference only; outputs have the input's dtype.
    """

    MODES = LINEAR_MODES

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "auto",
                 activation: str = "none", device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers((out_features, in_features), bias, mode, activation, device, dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "auto", *, act_scale=None, activation: str = "none"
                   ) -> "QuantLinear":
        """Quantize ``linear`` (per-channel symmetric int8 weights). Passing ``act_scale`` with
        ``mode="auto"`` means ``"static"``. ``activation`` fuses a following ReLU/GELU."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float expects nn.Linear, got {type(linear).__name__}")
        if act_scale is not None and mode == "auto":
            mode = "static"
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
                activation=activation, device=w.device, dtype=w.dtype)
        m._load_float(w, linear.bias, act_scale)
        return m

    def resolved_mode(self, x: torch.Tensor) -> str:
        """The mode a call with input ``x`` runs in (resolves ``"auto"``)."""
        if self.mode != "auto":
            return self.mode
        tokens = x.numel() // max(1, self.in_features)
        return "weight_only" if tokens <= WEIGHT_ONLY_MAX_M.get(x.device.type, 0) else "dynamic"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.resolved_mode(x)
        return int8_linear(x, self.weight_q, self.weight_scale.float(), self.bias, activation=self.activation,
                           act_scale=self._static_scale() if mode == "static" else None,
                           weight_only=mode == "weight_only")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, activation={self.activation}")


class QuantConv2d(_QuantBase):
    """``act(conv2d(x, W) + b)`` with int8 ``W`` (one scale per output channel) and ``x`` quantized per
    image (``"dynamic"``) or with one calibrated scale (``"static"``). Zero padding, groups = 1 (see
    :meth:`unsupported_reason` for what stays in floating point). Returns channels_last tensors."""

    MODES = CONV_MODES

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, mode: str = "dynamic", activation: str = "none", device=None, dtype=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self._init_buffers((out_channels, in_channels, *self.kernel_size), bias, mode, activation, device, dtype)

    @staticmethod
    def unsupported_reason(conv: nn.Conv2d) -> str | None:
        """Why ``conv`` cannot become a QuantConv2d (``None`` if it can). Such layers stay in floating
        point: ``accel.quantize_`` skips and reports them."""
        if not isinstance(conv, nn.Conv2d):
            return f"not an nn.Conv2d ({type(conv).__name__})"
        if conv.groups != 1:
            return f"groups={conv.groups} (the int8 conv serves groups=1 only)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} (only zero padding)"
        if isinstance(conv.padding, str) and conv.padding != "valid":
            return f"padding={conv.padding!r} (give explicit padding)"
        return None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, mode: str = "dynamic", *, act_scale=None, activation: str = "none"
                   ) -> "QuantConv2d":
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"QuantConv2d.from_float: cannot convert {conv}: {reason}; keep this layer in floating point")
        if act_scale is not None and mode == "dynamic":
            mode = "static"
        w = conv.weight
        padding = (0, 0) if conv.padding == "valid" else conv.padding
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                bias=conv.bias is not None, mode=mode, activation=activation, device=w.device, dtype=w.dtype)
        m._load_float(w, conv.bias, act_scale)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_conv2d(x, self.weight_q, self.weight_scale.float(), self.bias, self.stride, self.padding,
                           self.dilation, activation=self.activation,
                           act_scale=self._static_scale() if self.mode == "static" else None)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, mode={self.mode}, "
                f"activation={self.activation}")
