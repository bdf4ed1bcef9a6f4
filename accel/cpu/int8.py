"""int8 Linear and Conv2d on the CPU (the CPU side of ``accel.ops.int8``).

Integer engines shipped inside PyTorch do the multiply-accumulate; this module quantizes the
activations with accel's rule (``accel.quant``) and applies the per-token / per-image scale,
bias and activation around them:

* Linear: FBGEMM (``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``) on rows that were
  already divided by their per-token scale, so FBGEMM's per-tensor quantization with scale 1
  reproduces accel's integers exactly. FBGEMM needs a ``torch.qint8`` weight, and PyTorch 2.13
  deprecates quantized dtypes, so oneDNN (``onednn::qlinear_pointwise``, plain int8 tensors, the
  op Inductor's x86 int8 lowering uses) is the second engine: chosen when FBGEMM is missing, or
  with ``ACCEL_CPU_LINEAR_ENGINE=onednn``. Measured here (4096x4096), FBGEMM is 2.5-3x faster
  than oneDNN at M <= 16 and equal at M = 256.
* Conv2d: oneDNN (``onednn::qconv2d_pointwise``) on uint8 NHWC activations quantized per image.

**Activation bits.** Without VNNI (AVX2 only) x86 int8 instructions (``vpmaddubsw``) add two
u8 x s8 products into a saturating int16, so full 8-bit activations give wrong sums: measured
here, oneDNN's int8 linear was off by 37001 on random +-127 data and exact once activations fit
in 7 bits. On such CPUs activations are therefore quantized to ``qmax = 63`` (what torch's own
dynamic quantization does with ``reduce_range``); with VNNI or AMX they use the full ``qmax = 127``.
Weights are always 8-bit. :func:`act_qmax` tells which; ``ACCEL_CPU_ACT_QMAX`` overrides it.

**Weight-only int8** (``x`` stays float): the int8 weight is converted panel by panel into a
reused cache-sized buffer and multiplied with ``torch.mm``, so the full float weight never exists.

Packed weights are cached per weight tensor (identity and version counter): in-place updates of
the int8 weight or its scale re-pack on the next call. Writing through ``.data`` bypasses the
version counter; call :func:`clear_cache` after doing so.
"""

from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch

from ..quant import activate, ieee_div
from .workspace import scratch

#: bytes of converted weight per panel of the weight-only path (measured best of 16..1024 rows at K=4096)
WEIGHT_ONLY_PANEL_BYTES = 4 << 20


def act_qmax() -> int:
    """Activation qmax of the CPU int8 paths: 127 with VNNI/AMX, 63 otherwise (see the module docstring)."""
    env = os.environ.get("ACCEL_CPU_ACT_QMAX")
    if env is not None:
        q = int(env)
        if q not in (63, 127):
            raise ValueError(f"ACCEL_CPU_ACT_QMAX must be 63 or 127, got {env}")
        return q
    return 127 if (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()) else 63


# ---------------------------------------------------------------------------------------------
# packed-weight cache
# ---------------------------------------------------------------------------------------------
_CACHE: dict = {}


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _cached(kind: str, tensors: tuple[torch.Tensor, ...], extra: tuple, build):
    key = (kind, tuple(id(t) for t in tensors), extra)
    versions = tuple(_version(t) for t in tensors)
    hit = _CACHE.get(key)
    if hit is not None:
        refs, vers, packed = hit
        if vers == versions and all(r() is t for r, t in zip(refs, tensors)):
            return packed
    packed = build()
    refs = tuple(weakref.ref(t, lambda _, key=key: _CACHE.pop(key, None)) for t in tensors)
    _CACHE[key] = (refs, versions, packed)
    return packed


def clear_cache() -> None:
    """Forget every packed weight (needed only after writing a weight through ``.data``)."""
    _CACHE.clear()


# ---------------------------------------------------------------------------------------------
# activation quantization: accel's rule, fused as far as PyTorch allows
# ---------------------------------------------------------------------------------------------
def _inv_scale(x: torch.Tensor, qmax: int, static_scale: torch.Tensor | None):
    """Per-group ``(scale, inv)`` of ``x``, one group per index of dim 0 (a token of a Linear input,
    an image of a Conv2d input); NaN/inf groups -> (NaN, 0).

    Few, whole-tensor ops: at M=1 each PyTorch op costs ~5-10 us next to a ~0.5 ms GEMM.
    """
    dims = tuple(range(1, x.dim()))
    if x.numel() == 0:  # no rows, or empty rows (amax of nothing raises)
        absmax = x.new_zeros(x.shape[0], dtype=torch.float32)
    elif x.numel() <= 1 << 16:  # NaN propagates through amax, inf stays inf
        absmax = x.abs().amax(dim=dims).float()
    else:  # two reductions without the |x| copy: 5x faster on a 25 MB conv input
        absmax = torch.maximum(x.amax(dim=dims), x.amin(dim=dims).neg()).float()
    poison = absmax * 0.0  # 0 for finite rows, NaN for rows holding NaN/inf
    if static_scale is None:
        scale = (absmax / qmax).add_(poison)
        inv = torch.nan_to_num_(ieee_div(qmax, absmax).add_(poison), nan=0.0, posinf=0.0)  # zero rows: inf -> 0
    else:
        s = static_scale.float().reshape(())
        scale = poison + s
        inv = torch.nan_to_num_(poison + ieee_div(1.0, s), nan=0.0, posinf=0.0)
    return scale, inv


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------
@functools.cache
def _fbgemm_available() -> bool:
    try:
        _fbgemm_pack(torch.zeros(1, 1, dtype=torch.int8), torch.ones(1))
        return True
    except (RuntimeError, AttributeError):
        return False


def linear_engine() -> str:
    """"fbgemm" or "onednn" (see the module docstring); ``ACCEL_CPU_LINEAR_ENGINE`` overrides."""
    env = os.environ.get("ACCEL_CPU_LINEAR_ENGINE")
    if env is not None:
        if env not in ("fbgemm", "onednn"):
            raise ValueError(f"ACCEL_CPU_LINEAR_ENGINE must be fbgemm or onednn, got {env}")
        return env
    return "fbgemm" if _fbgemm_available() else "onednn"


def _fbgemm_pack(w_q, w_scale):
    zero = torch.zeros(w_q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # quantized dtypes are deprecated in torch 2.13; oneDNN is the fallback
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qw = torch._make_per_channel_quantized_tensor(w_q.contiguous(), w_scale.double(), zero, 0)
    return torch.ops.quantized.linear_prepack(qw, None)


def _quantize_u8(x: torch.Tensor, inv: torch.Tensor, qmax: int, saturate: bool) -> torch.Tensor:
    """accel's integers ``round_half_even(x * inv)`` plus the zero point ``qmax + 1``, as uint8 in
    ``x``'s memory format (``inv`` broadcasts over ``x``).

    The zero point is added after rounding, in uint8 on the int8 bits (wrapping mod 256 gives
    exactly ``q + zp``): adding it to the float first would round away low bits and move near-ties
    (67.4999999 -> 67.5 -> 68). Groups with inv = 0 and NaN/inf give NaN, whose integer is
    arbitrary; their scale is NaN, so their outputs are NaN whatever the integers.
    """
    v = torch.mul(x, inv)
    if saturate:
        v.clamp_(-qmax, qmax)
    q = torch.empty_like(v, dtype=torch.int8)
    q.copy_(v.round_())
    return q.view(torch.uint8).add_(qmax + 1)


def linear_int8_cpu(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    static_scale: torch.Tensor | None = None,
    qmax: int | None = None,
    engine: str | None = None,
) -> torch.Tensor:
    """``act(quant(x) @ w_q^T * x_scale * w_scale + bias)`` for float ``x [M, K]``; float32 out.

    ``x`` is quantized per row (or with ``static_scale``) to ``qmax`` (default :func:`act_qmax`);
    ``engine`` defaults to :func:`linear_engine`.
    """
    qmax = act_qmax() if qmax is None else qmax
    engine = linear_engine() if engine is None else engine
    m, k = x.shape
    n = w_q.shape[0]
    if m == 0:
        return x.new_zeros(0, n, dtype=torch.float32)
    scale, inv = _inv_scale(x, qmax, static_scale)
    if engine == "fbgemm":
        # round(x / scale): FBGEMM's per-tensor quantization with scale 1 and zero point qmax+1 keeps
        # accel's integers. A dynamic scale keeps |x / scale| <= qmax by construction; a static one
        # saturates, so clamp.
        xn = torch.mul(x.float(), inv[:, None], out=scratch("int8.xn", m * k, torch.float32).view(m, k))
        if static_scale is not None:
            xn.clamp_(-qmax, qmax)
        xn.round_()  # integers already, so FBGEMM's float "+ zero point" before its rounding is exact
        packed = _cached("fbgemm_linear", (w_q, w_scale), (), lambda: _fbgemm_pack(w_q, w_scale))
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(xn, 1.0, qmax + 1, packed)
    elif engine == "onednn":
        xq = _quantize_u8(x.float(), inv[:, None], qmax, static_scale is not None)
        packed = _cached("onednn_linear", (w_q,), (), lambda: torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None))
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, qmax + 1, packed, w_scale.float(), torch.zeros(n, dtype=torch.int64),
                                               None, 1.0, 0, torch.float32, "none", [], "")
    else:
        raise ValueError(f"unknown CPU int8 linear engine {engine!r}, expected fbgemm or onednn")
    if bias is not None:
        torch.addcmul(bias.float(), y, scale[:, None], out=y)
    else:
        y.mul_(scale[:, None])
    return activate(y, activation, inplace=True)


def linear_weight_only_cpu(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """``act((x @ w_q^T) * w_scale + bias)`` in ``x``'s dtype.

    The int8 weight is converted panel by panel into a reused cache-sized buffer (the per-channel
    scale factors out of the K sum, so it is applied once to the output). Measured on the 2-core
    AVX2 dev machine, int8 -> fp32 conversion runs at about the speed of reading fp32, so this path
    is about 1.3x fp32 at M=1 and buys accuracy, not speed, there.
    """
    m, k = x.shape
    n = w_q.shape[0]
    out = x.new_empty(m, n)
    rows = max(1, WEIGHT_ONLY_PANEL_BYTES // max(1, k * x.element_size()))
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        panel = scratch("int8.w_panel", (n1 - n0) * k, x.dtype).view(n1 - n0, k)
        panel.copy_(w_q[n0:n1])
        torch.mm(x, panel.t(), out=out[:, n0:n1])
    if bias is not None:
        torch.addcmul(bias.to(out.dtype), out, w_scale.to(out.dtype), out=out)
    else:
        out.mul_(w_scale.to(out.dtype))
    return activate(out, activation, inplace=True)


# ---------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------
def _onednn_conv_weight(w_q, w_scale, zero_point, stride, padding, dilation):
    def build():
        return torch.ops.onednn.qconv_prepack(w_q.contiguous(), w_scale.float(), 1.0, zero_point, list(stride),
                                              list(padding), list(dilation), 1, None)

    return _cached("onednn_conv", (w_q, w_scale), (zero_point, tuple(stride), tuple(padding), tuple(dilation)), build)


def conv2d_int8_cpu(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    activation: str = "none",
    static_scale: torch.Tensor | None = None,
    qmax: int | None = None,
) -> torch.Tensor:
    """Int8 conv of float ``x [B, C, H, W]`` (any memory format) quantized per image (or with
    ``static_scale``); returns float32 ``[B, O, OH, OW]`` in channels_last memory format."""
    qmax = act_qmax() if qmax is None else qmax
    scale, inv = _inv_scale(x, qmax, static_scale)
    # the uint8 input stays in x's memory format: oneDNN reorders uint8 faster than we convert fp32 layouts
    xq = _quantize_u8(x.float(), inv[:, None, None, None], qmax, static_scale is not None)
    zero = torch.zeros(w_q.shape[0], dtype=torch.int64)
    y = torch.ops.onednn.qconv2d_pointwise(
        xq, 1.0, qmax + 1, _onednn_conv_weight(w_q, w_scale, qmax + 1, stride, padding, dilation), w_scale.float(),
        zero, None, list(stride), list(padding), list(dilation), 1, 1.0, 0, torch.float32, "none", [], "",
    )
    if bias is not None:
        torch.addcmul(bias.float()[None, :, None, None], y, scale[:, None, None, None], out=y)
    else:
        y.mul_(scale[:, None, None, None])
    return activate(y, activation, inplace=True)
