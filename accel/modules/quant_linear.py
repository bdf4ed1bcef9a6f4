"""``QuantLinear``, ``QuantConv2d`` and ``QuantEmbedding``: drop-in int8 inference modules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.int8 import check_conv_geometry, check_int32_k, forget_plans, module_conv2d, module_linear
from ..quant import ACTIVATIONS, dequantize_weight, quantize_weight
from ._common import explicit_padding, per_component, refuse_weight, same_padding_reason, weight_view

LINEAR_MODES = ("auto", "dynamic", "static", "weight_only")
CONV_MODES = ("auto", "dynamic", "static")
#: scales stay float32 whatever ``.half()`` / ``.to(dtype)`` does to the module
_FP32_BUFFERS = ("weight_scale", "act_scale")


def _check_size(what: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what}: {name} must be an int >= 0, got {v!r}")
    return v


def _check_qmax(what: str, act_qmax) -> int:
    if act_qmax is None:
        return 0
    if act_qmax not in (0, 63, 127):
        raise ValueError(f"{what}: act_qmax must be 63, 127 or None (this machine's native range), got {act_qmax!r}")
    return int(act_qmax)


class _QuantBase(nn.Module):
    """Buffers and state shared by the int8 modules: ``weight_q`` (int8), ``weight_scale`` (fp32, one
    per output channel), optional ``bias`` and ``act_scale`` (fp32 [1], used by mode "static").

    ``act_qmax`` is the activation range the layer computes with: 63 or 127, or 0 for the running
    machine's native range (``accel.engines.native_act_qmax``). QAT fixes it to what it simulated.
    """

    MODES: tuple[str, ...] = ()

    def _init_buffers(self, weight_shape, bias: bool, mode: str, activation: str, act_qmax, device, dtype) -> None:
        name = type(self).__name__
        if mode not in self.MODES:
            raise ValueError(f"{name}: mode must be one of {self.MODES}, got {mode!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"{name}: dtype must be a floating dtype, got {dtype}")
        if mode in ("dynamic", "static"):
            check_int32_k(f"{name} ({mode})", torch.empty(weight_shape, dtype=torch.int8, device="meta"))
        self.mode = mode
        self.activation = activation
        self.act_qmax = _check_qmax(name, act_qmax)
        self._has_act_scale = False
        self.float_dtype = dtype or torch.float32  # the float layer's dtype: what .weight shows (not saved)
        with torch.inference_mode(False):  # normal tensors, so in-place updates bump the version the packs see
            self.register_buffer("weight_q", torch.zeros(weight_shape, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.zeros(weight_shape[0], dtype=torch.float32, device=device))
            self.register_buffer("bias", torch.zeros(weight_shape[0], dtype=dtype or torch.float32, device=device)
                                 if bias else None)
            self.register_buffer("act_scale", torch.full((1,), float("nan"), dtype=torch.float32, device=device))
        self.register_load_state_dict_post_hook(_after_load)

    def _load_float(self, weight: torch.Tensor, bias: torch.Tensor | None, act_scale) -> None:
        if tuple(weight.shape) != tuple(self.weight_q.shape):
            raise ValueError(f"{type(self).__name__}: weight of shape {tuple(weight.shape)}, expected "
                             f"{tuple(self.weight_q.shape)}")
        q, s = quantize_weight(weight)
        with torch.no_grad(), torch.inference_mode(False):
            self.weight_q.copy_(q)
            self.weight_scale.copy_(s)
            if bias is not None:
                self.bias.copy_(bias.detach())
        if act_scale is not None:
            self.set_act_scale(act_scale)

    def set_act_scale(self, act_scale) -> None:
        """Set the static (calibrated) activation scale: ``absmax / qmax`` of the calibration data."""
        try:
            if isinstance(act_scale, (str, bytes, bool)) or act_scale is None:
                raise TypeError
            value = torch.as_tensor(act_scale, dtype=torch.float32).detach().reshape(-1).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"act_scale must be a number or a one-element float tensor, got {type(act_scale).__name__} "
                            f"{act_scale!r}") from None
        # (its inverse must be a finite fp32 number too: x / scale is what the engines compute)
        if value.numel() != 1 or not torch.isfinite(value).all() or value.item() <= 0 or \
                not math.isfinite(float(torch.div(1.0, value).item())):
            raise ValueError(f"act_scale must be one finite positive number whose inverse is finite in fp32, got "
                             f"{act_scale!r}")
        with torch.no_grad(), torch.inference_mode(False):
            self.act_scale.copy_(value)
        self._has_act_scale = True

    def _static_scale(self) -> torch.Tensor:
        if not self._has_act_scale:
            raise RuntimeError(f"{type(self).__name__} in mode 'static' has no activation scale: calibrate it "
                               "(accel.calibrate / set_act_scale) or use mode='dynamic'")
        return self.act_scale

    def get_extra_state(self):
        return {"mode": self.mode, "activation": self.activation, "act_qmax": self.act_qmax}

    def set_extra_state(self, state) -> None:
        self.mode, self.activation, self.act_qmax = self._saved_settings(state)

    def _saved_settings(self, state) -> tuple[str, str, int]:
        name = type(self).__name__
        if not isinstance(state, dict) or state.get("mode") not in self.MODES or \
                state.get("activation") not in ACTIVATIONS:
            raise ValueError(f"{name}: bad saved state {state!r}")
        return state["mode"], state["activation"], _check_qmax(name, state.get("act_qmax", 0))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _load_checked(self, super()._load_from_state_dict, self._saved_settings, state_dict, prefix, *args)

    def _apply(self, fn, recurse=True):
        forget_plans(self)  # the resolved calls hold the tensors (and weights derived from them) being replaced
        # weight_scale / act_scale follow the module's device but stay float32: fp16 turns small scales into 0
        keep = {n: self._buffers[n] for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        for n in keep:
            self._buffers[n] = None
        try:
            with torch.inference_mode(False):
                out = super()._apply(fn, recurse)
        finally:
            for n, t in keep.items():
                probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
                with torch.inference_mode(False):
                    self._buffers[n] = t.to(device=probe.device, dtype=torch.float32)
            probe = fn(torch.empty(0, dtype=self.float_dtype))
            if probe.is_floating_point():
                self.float_dtype = probe.dtype
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_q, self.weight_scale)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and "weight_q" in self.__dict__.get("_buffers", {}):
            refuse_weight(self)
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name == "weight":  # what model code reading layer.weight (dtype, device, shape) expects
            b = self.__dict__["_buffers"]
            return weight_view((b["weight_q"], b["weight_scale"]), self.float_dtype,
                               lambda: dequantize_weight(b["weight_q"], b["weight_scale"]))
        return super().__getattr__(name)


def _load_checked(module: nn.Module, base_load, check_extra, state_dict, prefix: str, local_metadata, strict,
                  missing_keys, unexpected_keys, error_msgs) -> None:
    """``nn.Module._load_from_state_dict`` (``base_load``) after checking everything it would copy (the saved
    settings with ``check_extra``, the buffers with :func:`_tables_error`): a failed load leaves the layer as it
    was."""
    extra = state_dict.get(prefix + "_extra_state")
    if extra is not None:
        try:
            check_extra(extra)
        except ValueError as e:
            error_msgs.append(f"{type(module).__name__} {prefix!r}: bad _extra_state: {e} (nothing of this layer "
                              "was loaded)")
            return
    if not _tables_error(module, state_dict, prefix, error_msgs):
        base_load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _tables_error(module: nn.Module, state_dict, prefix: str, error_msgs: list) -> bool:
    """Check every buffer of ``module`` that ``state_dict`` holds (shape, dtype, scale values) before a load
    copies any of them (``nn.Module`` copies one by one and only then reports a bad shape: a failed load
    would leave the layer half changed). Appends the errors; True if there were any."""
    name = type(module).__name__
    errors = []
    for key, cur in module._buffers.items():
        t = state_dict.get(prefix + key)
        if cur is None or t is None:
            continue
        if not isinstance(t, torch.Tensor):
            errors.append(f"{key} is a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != tuple(cur.shape):
            errors.append(f"{key} of shape {tuple(t.shape)}, expected {tuple(cur.shape)}")
        elif key == "weight_q" and t.dtype != torch.int8:
            errors.append(f"weight_q must be int8, got {t.dtype}")
        elif key != "weight_q" and not t.is_floating_point():
            errors.append(f"{key} must be floating point, got {t.dtype}")
        elif key == "weight_scale" and not t.is_meta and not (bool(torch.isfinite(t).all()) and bool((t >= 0).all())):
            errors.append("weight_scale must be finite and >= 0")
    for e in errors:
        error_msgs.append(f"{name} {prefix!r}: {e} (nothing of this layer was loaded)")
    return bool(errors)


def _after_load(module, incompatible_keys) -> None:
    # the static scale's presence is a Python flag, so forward has no data-dependent branch (compile, export)
    if isinstance(module, _QuantBase):
        with torch.inference_mode(False):
            for name in ("weight_q", "weight_scale", "bias", "act_scale"):
                t = module._buffers.get(name)
                if t is not None and t.is_inference():
                    module._buffers[name] = t.clone()
        a = module.act_scale
        module._has_act_scale = bool(torch.isfinite(a).all() and (a > 0).all())


class QuantLinear(_QuantBase):
    """``act(x @ W^T + b)`` with ``W`` stored as int8 with one scale per output channel.

    Modes: ``"dynamic"`` quantizes each token of ``x`` with its own scale at run time; ``"static"``
    uses one calibrated scale (``act_scale``); ``"weight_only"`` keeps ``x`` in floating point;
    ``"auto"`` runs, per bucket of tokens per call, whichever of dynamic int8, weight-only int8 and
    the dequantized float weight (in the input's dtype or bf16) is fastest for this layer's shape on the
    running machine (measured once and cached, ``accel.engines``); for one fp32 token also FBGEMM's fused
    dynamic linear ("dynamic_fused": the token quantized per tensor with a zero point). Inference only
    (gradients reach ``x`` straight through); outputs have the input's dtype.
    """

    MODES = LINEAR_MODES

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "auto",
                 activation: str = "none", act_qmax: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = _check_size("QuantLinear", "in_features", in_features)
        self.out_features = _check_size("QuantLinear", "out_features", out_features)
        self._init_buffers((out_features, in_features), bias, mode, activation, act_qmax, device, dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str = "auto", *, act_scale=None, activation: str = "none",
                   act_qmax: int | None = None) -> "QuantLinear":
        """Quantize ``linear`` (per-channel symmetric int8 weights). Passing ``act_scale`` with
        ``mode="auto"`` means ``"static"``. ``activation`` fuses a following ReLU/GELU."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float expects nn.Linear, got {type(linear).__name__}")
        if act_scale is not None and mode == "auto":
            mode = "static"
        if act_scale is not None and mode != "static":
            raise ValueError(f"QuantLinear.from_float: act_scale is used only by mode 'static', got mode {mode!r}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode,
                activation=activation, act_qmax=act_qmax, device=w.device, dtype=w.dtype)
        m._load_float(w, linear.bias, act_scale)
        return m

    def resolved_mode(self, x: torch.Tensor) -> str:
        """The form a call with input ``x`` runs in on this machine (resolves ``"auto"``, measuring if needed)."""
        if self.mode != "auto":
            return self.mode
        from .. import engines
        from ..ops import int8 as ops

        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return "dynamic"
        qmax = self.act_qmax or (127 if x2.is_cuda else engines.native_act_qmax())
        with torch.no_grad():
            return ops._auto_form(x2, self.weight_q, self.weight_scale, self.bias, self.activation, qmax,
                                  "cuda" if x2.is_cuda else "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:
            return per_component(self, x)
        b = self._buffers
        return module_linear(x, b["weight_q"], b["weight_scale"], b["bias"],
                             self._static_scale() if self.mode == "static" else None, self.activation, self.mode,
                             self.act_qmax, self)

    def extra_repr(self) -> str:
        q = f", act_qmax={self.act_qmax}" if self.act_qmax else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, activation={self.activation}{q}")


class QuantConv2d(_QuantBase):
    """``act(conv2d(x, W) + b)`` with int8 ``W`` (one scale per output channel) and ``x`` quantized per
    image (``"dynamic"``) or with one calibrated scale (``"static"``); ``"auto"`` runs dynamic int8
    or the dequantized float conv, whichever is faster for this layer and batch bucket here.
    Zero padding, groups = 1 (see :meth:`unsupported_reason`). Like ``nn.Conv2d``, takes ``[B, C, H, W]``
    or unbatched ``[C, H, W]`` inputs and returns the input's memory format (NCHW or channels_last;
    channels_last inputs are the fast path on CPU)."""

    MODES = CONV_MODES

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, mode: str = "dynamic", activation: str = "none", act_qmax: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels = _check_size("QuantConv2d", "in_channels", in_channels)
        self.out_channels = _check_size("QuantConv2d", "out_channels", out_channels)
        ks = pair(kernel_size)
        if len(ks) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
            raise ValueError(f"QuantConv2d: kernel_size must be ints >= 1, got {kernel_size!r}")
        self.kernel_size = tuple(ks)
        s, p, d = check_conv_geometry("QuantConv2d", pair(stride), pair(padding), pair(dilation))
        self.stride, self.padding, self.dilation = tuple(s), tuple(p), tuple(d)
        self._init_buffers((out_channels, in_channels, *self.kernel_size), bias, mode, activation, act_qmax, device,
                           dtype)

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
        return same_padding_reason(conv)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, mode: str = "dynamic", *, act_scale=None, activation: str = "none",
                   act_qmax: int | None = None) -> "QuantConv2d":
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"QuantConv2d.from_float: cannot convert {conv}: {reason}; keep this layer in floating point")
        if act_scale is not None and mode == "dynamic":
            mode = "static"
        if act_scale is not None and mode != "static":
            raise ValueError(f"QuantConv2d.from_float: act_scale is used only by mode 'static', got mode {mode!r}")
        w = conv.weight
        padding = explicit_padding(conv)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding, conv.dilation,
                bias=conv.bias is not None, mode=mode, activation=activation, act_qmax=act_qmax, device=w.device,
                dtype=w.dtype)
        m._load_float(w, conv.bias, act_scale)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d takes
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return module_conv2d(x, b["weight_q"], b["weight_scale"], b["bias"], self.stride, self.padding, self.dilation,
                             self._static_scale() if self.mode == "static" else None, self.activation,
                             "auto" if self.mode == "auto" else "int8", self.act_qmax, self)

    def extra_repr(self) -> str:
        q = f", act_qmax={self.act_qmax}" if self.act_qmax else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, mode={self.mode}, "
                f"activation={self.activation}{q}")


class QuantEmbedding(nn.Module):
    """Weight-only int8 ``nn.Embedding``: rows stored as int8 with one fp32 scale per row; a lookup
    gathers the int8 rows and scales them into ``dtype`` (the float embedding's dtype by default).
    A transformer's embedding tables are most of its file: this makes them 4x smaller."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.num_embeddings = _check_size("QuantEmbedding", "num_embeddings", num_embeddings)
        self.embedding_dim = _check_size("QuantEmbedding", "embedding_dim", embedding_dim)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"QuantEmbedding: padding_idx {padding_idx} out of range for {num_embeddings} rows")
        if padding_idx is not None and padding_idx < 0:  # as nn.Embedding stores it
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"QuantEmbedding: dtype must be a floating dtype, got {dtype}")
        self.out_dtype = dtype or torch.float32
        with torch.inference_mode(False):
            self.register_buffer("weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.zeros(num_embeddings, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "QuantEmbedding":
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"QuantEmbedding.from_float expects nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("QuantEmbedding.from_float: max_norm / sparse embeddings are not supported; keep it float")
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device=emb.weight.device, dtype=emb.weight.dtype)
        q, s = quantize_weight(emb.weight)
        with torch.no_grad(), torch.inference_mode(False):
            m.weight_q.copy_(q)
            m.weight_scale.copy_(s)
        return m

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"QuantEmbedding: indices must be int64/int32, got {indices.dtype}")
        flat = indices.reshape(-1)
        if not torch.compiler.is_compiling() and flat.numel() and \
                (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"QuantEmbedding: index out of range [0, {self.num_embeddings}) "
                             f"(got min {int(flat.min())}, max {int(flat.max())})")
        rows = F.embedding(flat, self.weight_q)  # int8 gather: a quarter of the float bytes
        scales = self.weight_scale.index_select(0, flat)
        # scaled in fp32, rounded once to the output dtype (an fp16 scale underflows for rows of tiny values)
        out = rows.float().mul_(scales[:, None])
        return out.to(self.out_dtype).view(*indices.shape, self.embedding_dim)

    def get_extra_state(self):
        return {"out_dtype": str(self.out_dtype).removeprefix("torch."), "padding_idx": self.padding_idx}

    def set_extra_state(self, state) -> None:
        # the saved dtype is checked, not applied: like nn.Embedding.load_state_dict, a load keeps this
        # module's dtype (a file saved from an fp32 model loads into a bf16 model as bf16)
        self.padding_idx = self._saved_padding_idx(state)

    def _saved_padding_idx(self, state):
        dt = getattr(torch, str(state.get("out_dtype", "float32")), None) if isinstance(state, dict) else None
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"QuantEmbedding: bad saved state {state!r}")
        pad = state.get("padding_idx")
        if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or
                                not -self.num_embeddings <= pad < self.num_embeddings):
            raise ValueError(f"QuantEmbedding: bad saved padding_idx {pad!r} for {self.num_embeddings} rows")
        return pad + self.num_embeddings if pad is not None and pad < 0 else pad

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _load_checked(self, super()._load_from_state_dict, self._saved_padding_idx, state_dict, prefix, *args)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and "weight_q" in self.__dict__.get("_buffers", {}):
            refuse_weight(self)
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name == "weight":  # what model code reading embedding.weight (dtype, device, shape) expects
            b = self.__dict__["_buffers"]
            return weight_view((b["weight_q"], b["weight_scale"]), self.out_dtype,
                               lambda: dequantize_weight(b["weight_q"], b["weight_scale"]))
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        keep = self._buffers.get("weight_scale")
        self._buffers["weight_scale"] = None
        try:
            with torch.inference_mode(False):
                out = super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=self.out_dtype, device=keep.device))
            self._buffers["weight_scale"] = keep.to(device=probe.device, dtype=torch.float32)
            self.out_dtype = probe.dtype if probe.is_floating_point() else self.out_dtype
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(self.weight_q, self.weight_scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.out_dtype}" + \
            (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")

