"""int8 Linear and Conv2d on the CPU: the engines (the CPU side of ``accel.ops.int8``).

Integer engines shipped inside PyTorch do the multiply-accumulate; this module quantizes the
activations with accel's rule (``accel.quant``) and applies the per-token / per-image scale,
bias and activation around them. Which engine runs a call is decided in ``accel.ops.int8``
through ``accel.engines`` (measured on the running machine); every engine here computes the same
integers, so they differ only in speed.

**Activation engines** (x quantized per token, or with a static scale):

* ``fbgemm``: ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` on rows already
  multiplied by their inverse scale and rounded, so FBGEMM's per-tensor quantization with scale 1
  reproduces accel's integers exactly. Needs a ``torch.qint8`` weight (deprecated dtypes in torch
  2.13; the other engines use plain int8 tensors).
* ``onednn``: ``onednn::qlinear_pointwise`` (the op Inductor's x86 int8 lowering uses; AMX where
  present) on uint8 activations, fp32 or bf16 output.
* ``int_mm``: ``torch._int_mm`` (int8 x int8 -> int32; oneDNN/AMX on VNNI CPUs, a slow reference
  loop on older ones, which measuring drops) and the dequantizing epilogue in PyTorch ops.
* ``*_split`` (``fbgemm_split``, ``onednn_split``): 8-bit activations on CPUs without VNNI, as two
  exact 7-bit passes (see *Activation bits*).
* ``amx_tiles``, ``vnni_tiles``: accel's native int8 block kernel (``accel.cpu.native``) with the weight as dense
  64 x 64 blocks (packed once, shared by both), on AMX tiles or with AVX-512 VNNI dot products (``vnni_tiles`` wins
  for one or a few tokens, where the product is one pass over the weight at memory speed); dynamic scales quantized
  natively (on AMX in the product's own call), a static scale of one fp32 value too (others through the eager
  steps); the other engines' epilogue order, so the same bits as ``int_mm``.
* ``onednn_cq`` (and the conv engines ``onednn_cq``, ``im2col_cq``): the same oneDNN GEMM, with the activation
  quantization (and a bf16 output's scale and bias) as loops compiled by ``torch.compile`` (``accel.cpu.compiled``):
  two passes over the input instead of five or six. The integers are the same; offered where a C++ compiler is
  found and ``ACCEL_COMPILE`` is not 0, and only ever chosen by measuring.

Conv2d: ``onednn`` (``onednn::qconv2d_pointwise``) on uint8 activations, and ``im2col``: the
patches of the uint8 activation gathered into a ``[B*OH*OW, KH*KW*C]`` matrix (1x1 convs are a
strided view, no copy) and multiplied by ``onednn::qlinear_pointwise``: exact for every geometry.
oneDNN's direct int8 conv returns wrong numbers for some geometries (:func:`onednn_conv_ok`);
those never reach it.

**Weight-only** (``x`` stays float): ``panels`` converts the int8 weight panel by panel into a
reused buffer of ``x``'s dtype and calls ``torch.mm`` (bf16: AMX); ``int8pack`` is
``aten._weight_int8pack_mm`` with bf16 activations (fp32 inputs are rounded to bf16 there, so the
engine layer checks its accuracy before choosing it).

**float** (the floor): the dequantized weight, cached in ``x``'s dtype, through ``F.linear`` /
``F.conv2d``. Only the ``auto`` modes may run it.

**Activation bits.** Without VNNI (AVX2 only) x86 int8 instructions (``vpmaddubsw``) add two
u8 x s8 products into a saturating int16, so full 8-bit activations give wrong sums (measured:
oneDNN's int8 linear off by 37001 on random +-127 data, exact once activations fit in 7 bits).
:func:`accel.engines.native_act_qmax` is therefore 63 there and 127 with VNNI/AMX. A layer can
fix its qmax (QAT records the one it simulated): an engine that cannot compute a qmax exactly on
this machine is not a candidate for it (:func:`exact_engines`), and ``*_split`` engines compute
8-bit activations on such CPUs as ``q = q_hi + q_lo`` with both halves in [-64, 64].

Packed weights are cached per weight tensor (identity, version counter and data pointer): in-place
updates and loads re-pack on the next call, in every grad mode. Tensors created under
``torch.inference_mode`` carry no version counter; the modules keep their buffers as normal
tensors, and :func:`clear_cache` is there for weights edited through ``.data``.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .. import engines
from ..quant import activate, dequantize_weight
from . import compiled, native
from .packcache import cached as _cached
from .packcache import clear_cache  # noqa: F401  (re-exported)
from .workspace import scratch

#: bytes of converted weight per panel of the weight-only path (measured best of 16..1024 rows at K=4096)
WEIGHT_ONLY_PANEL_BYTES = 4 << 20

LINEAR_ENGINES = ("fbgemm", "onednn", "int_mm", "fbgemm_split", "onednn_split", "onednn_cq", "amx_tiles", "vnni_tiles")
#: ``amx_tiles`` / ``vnni_tiles``: the weight as dense blocks of this size for accel's native int8 kernel
#: (``accel.cpu.native``), one packing for both: 64 int8 inputs fill a tile row, so every ``tdpbusd`` does its full
#: 16 x 16 x 64 (the VNNI product measured no slower at 64 than at 32 or 128: 4096x4096, M = 1)
TILES_BLOCK = 64
#: the native engines of :data:`LINEAR_ENGINES`: on AMX tiles or not
TILE_ENGINES = {"amx_tiles": True, "vnni_tiles": False}
WEIGHT_ONLY_ENGINES = ("panels", "int8pack")
CONV_ENGINES = ("onednn", "im2col", "onednn_split", "im2col_split", "onednn_cq", "im2col_cq", "amx_tiles")


def cached_tensor(kind: str, t: torch.Tensor, build):
    """``build()`` cached against ``t`` (re-built when ``t`` is replaced or changed in place)."""
    return _cached(kind, (t,), (), build)


def act_qmax() -> int:
    """Activation qmax of the CPU int8 paths on this machine (see the module docstring)."""
    return engines.native_act_qmax()


# ---------------------------------------------------------------------------------------------
# which engines are available and exact here
# ---------------------------------------------------------------------------------------------
@functools.cache
def fbgemm_available() -> bool:
    try:
        _fbgemm_pack(torch.zeros(1, 1, dtype=torch.int8), torch.ones(1))
        return True
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def _int8pack_available() -> bool:
    try:
        torch.ops.aten._weight_int8pack_mm(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.int8),
                                           torch.ones(8, dtype=torch.bfloat16))
        return True
    except (RuntimeError, AttributeError):
        return False


#: ``torch._int_mm`` on the CPU returns wrong sums when K == 1 (torch 2.13, probed by tests/test_fuzz.py)
INT_MM_MIN_K = 2


def exact_engines(qmax: int, k: int | None = None) -> tuple[str, ...]:
    """The activation engines that compute ``qmax``-bit activations exactly on this machine (for
    ``K = k`` input features, when given)."""
    return _exact_engines(qmax, k is None or k >= INT_MM_MIN_K, engines.generation())


@functools.lru_cache(maxsize=64)
def _exact_engines(qmax: int, int_mm_ok: bool, _gen: int) -> tuple[str, ...]:
    out = []
    fb = fbgemm_available()
    if qmax <= 63 or engines.has_vnni():
        out += ["fbgemm"] if fb else []
    if qmax <= 63 or engines.has_vnni(engines.onednn_isa()):
        out += ["onednn"] + (["onednn_cq"] if compiled.available() else [])
    if engines.has_vnni(engines.onednn_isa()) and int_mm_ok:
        out.append("int_mm")  # a slow reference loop without VNNI
    if qmax > 63:
        out += (["fbgemm_split"] if fb and not engines.has_vnni() else [])
        out += (["onednn_split"] if not engines.has_vnni(engines.onednn_isa()) else [])
    if native.int8_amx_available():  # (int32 sums of uint8 x int8 products: exact for every qmax)
        out.append("amx_tiles")
    if native.int8_available():  # (the same sums with VNNI's vpdpbusd)
        out.append("vnni_tiles")
    return tuple(out)


def default_linear_engine(qmax: int, m: int, k: int | None = None) -> str:
    """The engine used when nothing is measured (``ACCEL_ENGINE_MEASURE=0``, or while tracing)."""
    exact = exact_engines(qmax, k)
    if engines.onednn_isa() == "amx" and "onednn" in exact and m > 16:
        return "onednn"
    for name in ("fbgemm", "onednn", "fbgemm_split", "onednn_split", "int_mm"):
        if name in exact:
            return name
    raise AssertionError(f"no exact CPU int8 engine for qmax {qmax}: {exact}")


#: ``aten._weight_int8pack_mm`` on the CPU crashes the process (SIGSEGV, torch 2.13) unless K is a
#: multiple of this; such layers never reach it
INT8PACK_K_MULTIPLE = 16


def weight_only_engines(dtype: torch.dtype, k: int) -> tuple[str, ...]:
    if _int8pack_available() and dtype in (torch.float32, torch.bfloat16) and k % INT8PACK_K_MULTIPLE == 0:
        return WEIGHT_ONLY_ENGINES
    return ("panels",)


def conv_engines(qmax: int) -> tuple[str, ...]:
    """Conv engines exact for ``qmax`` here (all use oneDNN's int8 dot products; ``*_split`` run 8-bit
    activations as two 7-bit passes where oneDNN has no VNNI)."""
    return _conv_engines(qmax, engines.generation())


@functools.lru_cache(maxsize=16)
def _conv_engines(qmax: int, _gen: int) -> tuple[str, ...]:
    amx = ("amx_tiles",) if native.amx_available() else ()  # (int32 sums of uint8 x int8: exact for every qmax)
    if qmax <= 63 or engines.has_vnni(engines.onednn_isa()):
        return ("onednn", "im2col") + (("onednn_cq", "im2col_cq") if compiled.available() else ()) + amx
    return ("onednn_split", "im2col_split") + amx


def amx_conv_ok(c: int) -> bool:
    """Whether the ``amx_tiles`` conv engine takes ``c`` input channels (whole blocks of 16 channels per tap)."""
    return c % 16 == 0


# ---------------------------------------------------------------------------------------------
# activation quantization: accel's rule in few whole-tensor PyTorch ops
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _scalar(v: float) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(v, dtype=torch.float32)


def act_scale_inv(x: torch.Tensor, qmax: int, static_scale: torch.Tensor | None):
    """Per-group ``(scale, inv)`` of ``x``, one group per index of dim 0 (a token of a Linear input,
    an image of a Conv2d input); NaN/inf groups -> (NaN, 0); all-zero groups -> (0, 0).

    Few whole-tensor ops (each costs microseconds at M=1): ``qmax / absmax`` divides by a 0-d tensor,
    which is a correctly rounded division (``qmax / tensor`` would multiply by a reciprocal).
    """
    b = x.shape[0]
    if x.numel() == 0:  # no rows, or empty rows (amax of nothing raises)
        absmax = torch.zeros(b, dtype=torch.float32)
    else:
        flat = x.reshape(b, -1) if x.is_contiguous() else x
        dims = 1 if flat.dim() == 2 else tuple(range(1, x.dim()))
        if flat.numel() <= 1 << 16:  # abs + amax: NaN propagates, inf stays inf
            absmax = flat.abs().amax(dim=dims)
        else:  # two reductions without the |x| copy: 5x faster on a 25 MB conv input
            absmax = torch.maximum(flat.amax(dim=dims), flat.amin(dim=dims).neg_())
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
    return scale_inv(absmax, qmax, static_scale)


def scale_inv(absmax: torch.Tensor, qmax: int, static_scale: torch.Tensor | None = None):
    """``(scale, inv)`` from the fp32 per-group ``absmax`` (see :func:`act_scale_inv`)."""
    poison = absmax - absmax  # 0 for finite groups, NaN for groups holding NaN/inf
    if static_scale is None:
        inv = torch.div(_scalar(float(qmax)), absmax).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # zero: inf -> 0
        scale = torch.div(absmax, _scalar(float(qmax))).add_(poison)
    else:
        s = static_scale.reshape(())
        scale = poison + s
        inv = (poison + torch.div(_scalar(1.0), s)).nan_to_num_(nan=0.0, posinf=0.0)
    return scale, inv


def _scaled_rounded(x: torch.Tensor, inv: torch.Tensor, qmax: int, saturate: bool, slot: str,
                    rounded: bool = True) -> torch.Tensor:
    """``round_half_even(clamp(x * inv))`` as float32 integers in a reused buffer (``inv`` broadcasts);
    ``rounded=False`` leaves out the rounding, for a caller that only passes the values to :func:`_to_uint8`
    (which rounds them as it converts)."""
    out = scratch(slot, x.numel(), torch.float32).view(x.shape)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
    torch.mul(x, inv, out=out)
    if saturate:
        out.clamp_(-qmax, qmax)
    return out.round_() if rounded else out


#: adding 1.5 * 2**23 to an fp32 value of magnitude below 2**22 rounds it to an integer (half to even, the
#: IEEE default) held in the low mantissa bits: ``bits(v + MAGIC) = bits(MAGIC) + round(v)``
_ROUND_MAGIC = 12582912.0


def _scratch_like(t: torch.Tensor, slot: str, dtype: torch.dtype) -> torch.Tensor:
    """A scratch tensor of ``t``'s shape in ``dtype``: channels_last where ``t`` is (and not plainly contiguous),
    contiguous otherwise. Large fresh tensors cost page faults on every call (see ``workspace``): a 50 MB fp32
    tensor took 20 ms fresh and 4.5 ms reused on the dev machine."""
    buf = scratch(slot, t.numel(), dtype)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        b, c, h, w = t.shape
        return buf.view(b, h, w, c).permute(0, 3, 1, 2)
    return buf.view(t.shape)


def as_fp32(x: torch.Tensor, slot: str) -> torch.Tensor:
    """``x`` itself when fp32, else its fp32 copy in scratch ``slot`` (the caller owns the slot until it returns)."""
    if x.dtype == torch.float32:
        return x
    return _scratch_like(x, slot, torch.float32).copy_(x)


def _to_uint8(v: torch.Tensor, zp: int) -> torch.Tensor:
    """fp32 ``v`` in [-zp, 255 - zp] (integers or not) -> uint8 ``round_half_even(v) + zp``, exact, in ``v``'s
    memory format, in a scratch buffer (consumed by the GEMM of the same call); ``v`` is overwritten.

    Two passes instead of three (round, add, float -> uint8 convert): one add puts ``round(v) + zp`` into
    the low byte of the fp32 bits, and an int32 -> uint8 copy (which keeps the low byte) takes it out.
    """
    out = _scratch_like(v, "int8.u8", torch.uint8)
    v.add_(_ROUND_MAGIC + zp)
    return out.copy_(v.view(torch.int32))


def _split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v = hi + lo`` with both halves in [-64, 64] for integer ``v`` in [-127, 127] (hi = trunc(v / 2))."""
    hi = torch.div(v, 2, rounding_mode="trunc")
    return hi, v - hi


# ---------------------------------------------------------------------------------------------
# Linear: the GEMM engines. Each returns fp32 ``(q @ w_q^T) * w_scale`` for ``q = round(v)`` (``v`` already
# rounded, except where only oneDNN takes it: :func:`_to_uint8` rounds).
# ---------------------------------------------------------------------------------------------
def _per_channel_qweight(w_q, w_scale):
    zero = torch.zeros(w_q.shape[0], dtype=torch.int64)
    with warnings.catch_warnings():  # quantized dtypes are deprecated in torch 2.13; the other engines use int8
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch._make_per_channel_quantized_tensor(w_q.contiguous(), w_scale.double(), zero, 0)


def _fbgemm_pack(w_q, w_scale):
    return torch.ops.quantized.linear_prepack(_per_channel_qweight(w_q, w_scale), None)


def _onednn_pack(w_q):
    return torch.ops.onednn.qlinear_prepack(w_q.contiguous(), None)


@functools.lru_cache(maxsize=64)
def _zeros_n(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


def _gemm_fbgemm(v, w_q, w_scale, zp: int):
    packed = _cached("fbgemm_linear", (w_q, w_scale), (), lambda: _fbgemm_pack(w_q, w_scale))
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(v, 1.0, zp, packed)


def _gemm_onednn(u8, w_q, w_scale, zp: int, out_dtype=torch.float32):
    packed = _cached("onednn_linear", (w_q,), (), lambda: _onednn_pack(w_q))
    return torch.ops.onednn.qlinear_pointwise(u8, 1.0, zp, packed, w_scale, _zeros_n(w_q.shape[0]), None, 1.0, 0,
                                              out_dtype, "none", [], "")


def _gemm_int_mm(v, w_q, w_scale):
    q = torch.empty(v.shape, dtype=torch.int8)
    q.copy_(v)
    wt = _cached("int_mm_wt", (w_q,), (), lambda: w_q.contiguous().t())  # [K, N] column-major view
    acc = torch._int_mm(q, wt)
    y = torch.empty(acc.shape, dtype=torch.float32)
    return y.copy_(acc).mul_(w_scale)  # (a mixed int32 x fp32 mul takes a slow casting loop: ~1.3x these two)


def _linear_gemm(engine: str, v: torch.Tensor, w_q, w_scale, qmax: int) -> torch.Tensor:
    if engine == "fbgemm":
        return _gemm_fbgemm(v, w_q, w_scale, qmax + 1)
    if engine == "onednn":
        return _gemm_onednn(_to_uint8(v, qmax + 1), w_q, w_scale, qmax + 1)
    if engine == "int_mm":
        return _gemm_int_mm(v, w_q, w_scale)
    if engine in ("fbgemm_split", "onednn_split"):
        hi, lo = _split(v)
        if engine == "fbgemm_split":
            y = _gemm_fbgemm(hi, w_q, w_scale, 64)
            return y.add_(_gemm_fbgemm(lo, w_q, w_scale, 64))
        y = _gemm_onednn(_to_uint8(hi, 64), w_q, w_scale, 64)
        return y.add_(_gemm_onednn(_to_uint8(lo, 64), w_q, w_scale, 64))
    raise ValueError(f"unknown CPU int8 linear engine {engine!r}, expected one of {LINEAR_ENGINES}")


def _epilogue(y: torch.Tensor, scale: torch.Tensor, bias, activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``act(y * scale[:, None] + bias)`` in fp32, in place, then ``out_dtype``."""
    if bias is not None:
        torch.addcmul(bias.float(), y, scale, out=y)
    else:
        y.mul_(scale)
    y = activate(y, activation, inplace=True)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def linear_int8_reference(x, w_q, w_scale, bias=None, activation="none", static_scale=None, qmax: int = 127):
    """The same integers through an fp32 GEMM (exact products, ~1e-7 relative sums): the yardstick an
    engine must match before ``accel.engines`` may choose it."""
    xf = x.float()
    scale, inv = act_scale_inv(xf, qmax, static_scale)
    v = torch.round((xf * inv[:, None]).clamp(-qmax, qmax))
    y = (v @ w_q.float().t()) * w_scale
    return _epilogue(y, scale[:, None], bias, activation, torch.float32)


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
    """``act(quant(x) @ w_q^T * x_scale * w_scale + bias)`` for float ``x [M, K]``, in ``x``'s dtype.

    ``x`` is quantized per row (or with ``static_scale``) to ``qmax`` (default :func:`act_qmax`);
    ``engine`` defaults to :func:`default_linear_engine`. An engine that is not exact for ``qmax``
    on this machine raises.
    """
    qmax = act_qmax() if qmax is None else qmax
    m, k = x.shape
    n = w_q.shape[0]
    engine = default_linear_engine(qmax, m, k) if engine is None else engine
    if engine not in exact_engines(qmax, k):
        raise ValueError(f"CPU int8 linear engine {engine!r} is not exact for activation qmax {qmax}, K={k} on this CPU "
                         f"(isa {engines.cpu_isa()}, oneDNN {engines.onednn_isa()}); exact here: "
                         f"{exact_engines(qmax, k)}")
    if m == 0:
        return x.new_zeros(0, n)
    if engine in TILE_ENGINES:
        return _linear_tiles(x, w_q, w_scale, bias, activation, static_scale, qmax, TILE_ENGINES[engine])
    if m == 1 or static_scale is not None:  # one scale for the whole call: fewer, fused ops
        xf = as_fp32(x, "int8.x32")
        uniform = _uniform_scale(xf, qmax, static_scale)
        if uniform is not None:
            return _linear_uniform(xf, uniform, w_q, w_scale, bias, activation, qmax,
                                   "onednn" if engine == "onednn_cq" else engine, static_scale is not None, x.dtype)
    if engine == "onednn_cq" and static_scale is None:  # the quantization as two compiled loops
        xc = x.contiguous()
        scale, inv = scale_inv(compiled.row_absmax(xc), qmax)
        u8 = compiled.quantize(xc, inv, qmax + 1)
    else:
        xf = as_fp32(x, "int8.x32")
        scale, inv = act_scale_inv(xf, qmax, static_scale)
        onednn = engine in ("onednn", "onednn_cq")
        v = _scaled_rounded(xf, inv[:, None], qmax, static_scale is not None, "int8.v", rounded=not onednn)
        if not onednn:
            y = _linear_gemm(engine, v, w_q, w_scale, qmax)
            return _epilogue(y, scale[:, None], bias, activation, x.dtype)
        u8 = _to_uint8(v, qmax + 1)
    if x.dtype == torch.bfloat16 and bool(torch.isfinite(scale).all()):
        # bf16 out of oneDNN and a bf16 epilogue: a third of the output traffic of the fp32 epilogue
        # (one more bf16 rounding, for the layer that returns bf16 anyway); NaN rows take the fp32 path
        y = _gemm_onednn(u8, w_q, w_scale, qmax + 1, torch.bfloat16)
        sb = scale.to(torch.bfloat16)
        b16 = None if bias is None else bias.to(torch.bfloat16)
        if engine == "onednn_cq":
            y = compiled.scale_bias(y, sb, b16)
        elif bias is not None:
            torch.addcmul(b16, y, sb[:, None], out=y)
        else:
            y.mul_(sb[:, None])
        return activate(y, activation, inplace=True)
    y = _gemm_onednn(u8, w_q, w_scale, qmax + 1)
    return _epilogue(y, scale[:, None], bias, activation, x.dtype)


def _dense_blocks(w_q: torch.Tensor, bs: int):
    """``(values [nbr*nbc, bs, bs], crow, col)``: every block of ``w_q [N, K]`` (zero-padded to whole blocks) in BSR
    order."""
    n, k = w_q.shape
    nbr, nbc = -(-n // bs), -(-k // bs)
    w = F.pad(w_q, (0, nbc * bs - k, 0, nbr * bs - n)) if (n, k) != (nbr * bs, nbc * bs) else w_q
    values = w.reshape(nbr, bs, nbc, bs).permute(0, 2, 1, 3).reshape(nbr * nbc, bs, bs)
    crow = torch.arange(nbr + 1, dtype=torch.int64) * nbc
    return values, crow, torch.arange(nbc, dtype=torch.int64).repeat(nbr)


def _native_scale(static_scale: torch.Tensor | None) -> bool:
    """Whether the native quantization takes this activation scale: none (dynamic), or one fp32 value on the CPU."""
    return static_scale is None or (static_scale.dtype == torch.float32 and static_scale.numel() == 1 and
                                    static_scale.device.type == "cpu")


def _rows_uint8(rows: torch.Tensor, qmax: int, static_scale: torch.Tensor | None, width: int, spread: bool = False):
    """``(u [M, width] uint8, scale [M])``: accel's quantization of each row of ``rows [M, K]`` (rows of unit stride)
    as the integers + 128, the zero point past K; per row in one native pass (dynamic, or one fp32 static scale,
    saturating), or with another static scale through the eager steps. The tile engines' input (``amx_tiles``,
    ``vnni_tiles``); ``spread``: rows apart by :func:`accel.cpu.native.spread_stride`."""
    if _native_scale(static_scale):
        return native.quantize_rows(rows, qmax, width, spread, static_scale)
    m, k = rows.shape
    xf = as_fp32(rows, "int8.x32")
    scale, inv = act_scale_inv(xf, qmax, static_scale)
    v = _scaled_rounded(xf, inv[:, None], qmax, True, "int8.v", rounded=False)
    ld = native.spread_stride(width) if spread else width
    u = scratch("int8.amx_u8", m * ld, torch.uint8).view(m, ld)[:, :width]
    u[:, :k].copy_(v.add_(_ROUND_MAGIC + 128).view(torch.int32))  # (round(v) + 128 in the low byte: _to_uint8)
    u[:, k:].fill_(128)
    return u, scale


def _tile_blocks(w_q: torch.Tensor) -> native.Packed:
    return cached_tensor("int8.tile_blocks", w_q, lambda: native.pack(*_dense_blocks(w_q, TILES_BLOCK)))


def _linear_tiles(x, w_q, w_scale, bias, activation, static_scale, qmax, amx: bool) -> torch.Tensor:
    """The ``amx_tiles`` / ``vnni_tiles`` engines: accel's native int8 block kernel (on AMX tiles, or VNNI) with the
    weight as dense 64 x 64 blocks (the same integers and the other engines' epilogue, ``fma(acc * w_scale, x_scale,
    bias)`` in fp32, then ``x``'s dtype)."""
    if static_scale is None:  # (the runner, its operands checked and converted, once per weight state)
        run = _cached("int8.tiles_runner", (w_q, w_scale) + (() if bias is None else (bias,)),
                      (activation, qmax, x.dtype, amx), lambda: tiles_linear_runner(w_q, w_scale, bias, activation,
                                                                                    qmax, x.dtype, amx))
        return run(x)
    n, k = w_q.shape
    width = -(-k // TILES_BLOCK) * TILES_BLOCK
    u, scale = _rows_uint8(x if x.stride(-1) == 1 else x.contiguous(), qmax, static_scale, width, spread=True)
    b = None if bias is None else bias.float().contiguous()
    y = native.int8_bsr_linear(u, _tile_blocks(w_q), scale.float().contiguous(), w_scale.float().contiguous(), b, n,
                               amx=amx, dense_order=True, out_dtype=native.out_dtype(x.dtype, activation))
    y = activate(y, activation, inplace=True)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def tiles_linear_runner(w_q, w_scale, bias, activation: str, qmax: int, dtype: torch.dtype, amx: bool):
    """The dynamic ``amx_tiles`` (``amx``) or ``vnni_tiles`` Linear for one layer's operands, fetched once (the dense
    blocks, fp32 scales and bias): a function of ``x [M, K]`` in ``dtype`` (``accel.cpu.native.int8_runner`` in the
    dense engines' epilogue order, then the activation and ``dtype``), for a settled layer's plan."""
    n, k = w_q.shape
    return native.int8_runner(_tile_blocks(w_q), w_scale.detach().float().contiguous(),
                              None if bias is None else bias.detach().float().contiguous(), n, qmax, k, amx, dtype,
                              activation, dense_order=True)


_FP32_MAX = float(np.finfo(np.float32).max)


def _uniform_scale(xf: torch.Tensor, qmax: int, static_scale: torch.Tensor | None) -> tuple[float, float] | None:
    """``(scale, inv)`` as Python floats (exact fp32 values, fp32 IEEE division) when every row of the call
    shares them (one row, or a static scale) and every value is finite; None otherwise (the per-row
    path then gives NaN rows their NaN outputs)."""
    if static_scale is None:
        a = np.float32(xf.abs().max().item())
        if not np.isfinite(a):
            return None
        if a == 0:
            return 0.0, 0.0
        if qmax / float(a) >= _FP32_MAX:  # the inverse overflows fp32: the per-row path's rule (inv 0)
            return None
        return float(a / np.float32(qmax)), float(np.float32(qmax) / a)
    if not math.isfinite(xf.sum().item()):  # NaN or inf somewhere (or an overflowing sum): per-row path
        return None
    sc = np.float32(static_scale.item())
    if not (sc != 0 and abs(1.0 / float(sc)) < _FP32_MAX):  # 0, NaN, or an inverse past fp32: the per-row rule
        return None
    return float(sc), float(np.float32(1.0) / sc)


def _linear_uniform(xf, uniform, w_q, w_scale, bias, activation, qmax, engine, saturate, out_dtype):
    scale, inv = uniform
    m, k = xf.shape
    v = scratch("int8.v", m * k, torch.float32).view(m, k)
    torch.mul(xf, inv, out=v)
    if saturate:
        v.clamp_(-qmax, qmax)
    if engine != "onednn":  # oneDNN takes uint8, which _to_uint8 rounds as it converts
        v.round_()
    if engine == "onednn":  # x scale, bias and the activation fused into oneDNN's epilogue
        packed = _cached("onednn_linear", (w_q,), (), lambda: _onednn_pack(w_q))
        post = activation if activation in ("relu", "gelu") else "none"
        y = torch.ops.onednn.qlinear_pointwise(_to_uint8(v, qmax + 1), scale, qmax + 1, packed, w_scale,
                                               _zeros_n(w_q.shape[0]), None if bias is None else _f32(bias), 1.0, 0,
                                               out_dtype if out_dtype in (torch.float32, torch.bfloat16) else
                                               torch.float32, post, [], "none" if post == "gelu" else "")
        return y if y.dtype == out_dtype else y.to(out_dtype)
    y = _linear_gemm(engine, v, w_q, w_scale, qmax)
    if bias is not None:
        y = torch.add(_f32(bias), y, alpha=scale)
    else:
        y.mul_(scale)
    y = activate(y, activation, inplace=True)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


#: FBGEMM's dynamic linear sums uint8 (0..255) x int8 products in int32: K past this may overflow
FUSED_MAX_K = (2**31 - 1) // (255 * 128)
#: FBGEMM's dynamic quantization clamps its scale from below (torch's SMALL_SCALE_THRESHOLD, 6.1e-5): a row whose
#: range (with 0) is under this many of those steps takes the dynamic path, where its own scale keeps 8 bits
FUSED_MIN_RANGE = 2 * 255 * 6.1e-5


def fused_dynamic_ok(k: int) -> bool:
    """Whether :func:`linear_dynamic_fused_cpu` can run here: FBGEMM's dynamic linear takes full-range uint8
    activations (``reduce_range=False``), which it multiplies exactly where FBGEMM is an exact engine for
    activation range 127 (VNNI: no int16 saturation), and sums in int32 (``K <= FUSED_MAX_K``)."""
    return k <= FUSED_MAX_K and "fbgemm" in exact_engines(127, k)


def linear_dynamic_fused_cpu(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias=None,
                             activation: str = "none", engine: str = "fbgemm") -> torch.Tensor:
    """The ``dynamic_fused`` form of an ``auto`` layer for one fp32 row ``x [1, K]``: FBGEMM's dynamic linear
    in one call (the row quantized per tensor, asymmetric uint8 with a zero point: for one row at least as
    fine as accel's symmetric per-token rule; the int8 weights per channel; dequantization and bias fused).
    Rows FBGEMM would quantize worse take accel's dynamic path: one holding NaN/inf (FBGEMM makes it finite
    garbage; the dynamic path gives NaN outputs as the float layer does) and one of tiny range
    (:data:`FUSED_MIN_RANGE`: FBGEMM's smallest scale would leave it a few levels)."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"dynamic_fused: takes one fp32 row [1, K], got {x.dtype} {tuple(x.shape)}")
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)) or max(hi, 0.0) - min(lo, 0.0) < FUSED_MIN_RANGE:
        return linear_int8_cpu(x, w_q, w_scale, bias, activation, None, 127, engine)
    packed = _cached("fbgemm_dynamic", (w_q, w_scale) + (() if bias is None else (bias,)), (),
                     lambda: torch.ops.quantized.linear_prepack(_per_channel_qweight(w_q, w_scale),
                                                                None if bias is None else _f32(bias).contiguous()))
    return activate(torch.ops.quantized.linear_dynamic(x, packed, False), activation, inplace=True)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


# ---------------------------------------------------------------------------------------------
# weight-only and float
# ---------------------------------------------------------------------------------------------
def linear_weight_only_cpu(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    engine: str = "panels",
) -> torch.Tensor:
    """``act((x @ w_q^T) * w_scale + bias)`` in ``x``'s dtype (see the module docstring)."""
    m, k = x.shape
    n = w_q.shape[0]
    if engine == "int8pack":
        if "int8pack" not in weight_only_engines(x.dtype, k):
            raise ValueError(f"weight-only engine 'int8pack' needs fp32/bf16 x and K a multiple of {INT8PACK_K_MULTIPLE} "
                             f"(aten._weight_int8pack_mm crashes otherwise), got {x.dtype}, K={k}")
        xb = x if x.dtype == torch.bfloat16 else x.bfloat16()
        sb = _cached("int8pack_scale", (w_scale,), (), lambda: w_scale.bfloat16())
        wc = _cached("int8pack_w", (w_q,), (), lambda: w_q.contiguous())
        out = torch.ops.aten._weight_int8pack_mm(xb.contiguous(), wc, sb)
        if bias is not None:
            out = out.float().add_(bias.float()) if x.dtype == torch.float32 else out.add_(bias.to(out.dtype))
        out = activate(out, activation, inplace=True)
        return out.to(x.dtype)
    if engine != "panels":
        raise ValueError(f"unknown CPU weight-only engine {engine!r}, expected one of {WEIGHT_ONLY_ENGINES}")
    out = x.new_empty(m, n)
    rows = max(1, WEIGHT_ONLY_PANEL_BYTES // max(1, k * x.element_size()))
    exact = x.dtype in (torch.float32, torch.float64)  # integer panels: sums of int x float stay in range
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        panel = scratch("int8.w_panel", (n1 - n0) * k, x.dtype).view(n1 - n0, k)
        if exact:
            panel.copy_(w_q[n0:n1])
        else:  # fp16/bf16: dequantize the panel in fp32 (int sums would overflow fp16, fp16 scales underflow)
            panel.copy_(w_q[n0:n1].float().mul_(w_scale[n0:n1, None]))
        torch.mm(x, panel.t(), out=out[:, n0:n1])
    if exact:
        ws = w_scale.to(out.dtype)
        if bias is not None:
            torch.addcmul(bias.to(out.dtype), out, ws, out=out)
        else:
            out.mul_(ws)
    elif bias is not None:
        out.add_(bias.to(out.dtype))
    return activate(out, activation, inplace=True)


def dequantized(w_q: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype, memory_format=None) -> torch.Tensor:
    """The dequantized weight in ``dtype`` (cached with the packed weights): the ``float`` form's weight."""
    def build():
        w = dequantize_weight(w_q, w_scale).to(dtype)
        return w if memory_format is None else w.contiguous(memory_format=memory_format)

    return _cached("dequantized", (w_q, w_scale), (dtype, memory_format), build)


def linear_float_cpu(x, w_q, w_scale, bias=None, activation: str = "none", compute_dtype=None) -> torch.Tensor:
    """The float form: ``act(F.linear(x, dequant(W), bias))`` in ``compute_dtype`` (default ``x``'s
    dtype; ``torch.bfloat16`` for an fp32 ``x`` is the "float_bf16" form), returned in ``x``'s dtype."""
    return linear_float_with(x, dequantized(w_q, w_scale, compute_dtype or x.dtype), bias, activation)


def linear_float_with(x, w, bias=None, activation: str = "none") -> torch.Tensor:
    """:func:`linear_float_cpu` with the weight already dequantized, in the compute dtype (``w.dtype``)."""
    dt = w.dtype
    y = F.linear(x.to(dt), w, None if bias is None else bias.to(dt))
    return activate(y, activation, inplace=True).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------
def conv_output_hw(h, w, kh, kw, stride, padding, dilation) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def _pad_only(n: int, k: int, s: int, p: int, d: int) -> bool:
    """Some output index along a dim reads only zero padding (its taps all fall outside the input)."""
    o = (n + 2 * p - d * (k - 1) - 1) // s + 1
    return any(not any(0 <= i * s - p + j * d < n for j in range(k)) for i in range(o))


@functools.lru_cache(maxsize=4096)
def onednn_conv_ok(c: int, h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> bool:
    """Whether ``onednn::qconv2d_pointwise`` (torch 2.13, oneDNN 3.12) computes this geometry correctly.

    Probed over ~210,000 geometries (no failure outside these rules, all ISAs; several crash the
    process, so they must be routed before the call), it is wrong or crashes when:

    * S: the output is one column wide with stride_w > 1 (and, conservatively here, any 1-wide or
      1-high output);
    * P: some output row or column reads only zero padding (uninitialised accumulators, SIGSEGV);
    * K: a 1-wide kernel without W padding, with H padding, and an output width divisible by 16 (AMX);
      routed in both orientations;
    * X: dilation > 1 and padding > 0 in the same dim (AMX: wrong values, heap corruption);
    * also (conservatively) a single input channel and inputs at most 2 pixels high or wide.

    Such calls go to the ``im2col`` engine, which is exact for every geometry. Common layers (3x3
    padding 1, 1x1, 7x7 stride 2) match none of the rules.
    """
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    oh, ow = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    if c <= 1 or oh <= 1 or ow <= 1 or min(h, w) <= 2:
        return False
    if _pad_only(h, kh, stride[0], padding[0], dilation[0]) or _pad_only(w, kw, stride[1], padding[1], dilation[1]):
        return False  # P
    if (kw == 1 and padding[1] == 0 and padding[0] > 0 and ow % 16 == 0) or \
            (kh == 1 and padding[0] == 0 and padding[1] > 0 and oh % 16 == 0):
        return False  # K
    if (dilation[0] > 1 and padding[0] > 0) or (dilation[1] > 1 and padding[1] > 0):
        return False  # X
    return True


def _onednn_conv_weight(w_q, w_scale, zero_point, stride, padding, dilation):
    def build():
        return torch.ops.onednn.qconv_prepack(w_q.contiguous(), w_scale, 1.0, zero_point, list(stride),
                                              list(padding), list(dilation), 1, None)

    return _cached("onednn_conv", (w_q, w_scale), (zero_point, tuple(stride), tuple(padding), tuple(dilation)), build)


def _im2col_u8(u8: torch.Tensor, kh, kw, stride, padding, dilation, zp: int) -> torch.Tensor:
    """``[B*OH*OW, KH*KW*C]`` uint8 patches of the NHWC uint8 ``u8 [B, H, W, C]`` (padding holds ``zp``,
    the quantized zero). A 1x1 conv without padding is a strided view (copied only if strided)."""
    b, h, w, c = u8.shape
    oh, ow = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    if padding[0] or padding[1]:
        p = torch.full((b, h + 2 * padding[0], w + 2 * padding[1], c), zp, dtype=torch.uint8)
        p[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = u8
        u8 = p
    sb, sh, sw, sc = u8.stride()
    patches = u8.as_strided((b, oh, ow, kh, kw, c),
                            (sb, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc))
    return patches.reshape(b * oh * ow, kh * kw * c)


def _conv_gemm(engine: str, v, w_q, w_scale, zp: int, stride, padding, dilation) -> torch.Tensor:
    """fp32 ``conv(q, w_q) * w_scale`` for ``q = round(v)``, ``v [B, C, H, W]`` fp32 (zero point ``zp``)."""
    if engine == "onednn":
        # the uint8 input stays in x's memory format: oneDNN reorders uint8 faster than we convert fp32 layouts
        return _conv_gemm_u8(engine, _to_uint8(v, zp), w_q, w_scale, zp, stride, padding, dilation)
    if engine == "im2col":
        u8 = _to_uint8(v.permute(0, 2, 3, 1), zp)  # NHWC
        return _conv_gemm_u8(engine, u8.permute(0, 3, 1, 2), w_q, w_scale, zp, stride, padding, dilation)
    raise ValueError(f"unknown CPU int8 conv engine {engine!r}, expected one of {CONV_ENGINES}")


def _conv_gemm_u8(engine: str, u8, w_q, w_scale, zp: int, stride, padding, dilation) -> torch.Tensor:
    """fp32 ``conv(u8 - zp, w_q) * w_scale`` for uint8 ``u8 [B, C, H, W]`` (any layout; im2col copies a layout
    other than channels_last to it)."""
    b, c, h, w = u8.shape
    o, _, kh, kw = w_q.shape
    if engine == "onednn":
        return torch.ops.onednn.qconv2d_pointwise(
            u8, 1.0, zp, _onednn_conv_weight(w_q, w_scale, zp, stride, padding, dilation), w_scale,
            _zeros_n(o), None, list(stride), list(padding), list(dilation), 1, 1.0, 0, torch.float32, "none", [], "")
    nhwc = u8.permute(0, 2, 3, 1)
    if not nhwc.is_contiguous():
        nhwc = _scratch_like(nhwc, "int8.u8_nhwc", torch.uint8).copy_(nhwc)
    oh, ow = conv_output_hw(h, w, kh, kw, stride, padding, dilation)
    cols = _im2col_u8(nhwc, kh, kw, stride, padding, dilation, zp)
    w2 = _cached("im2col_w", (w_q,), (), lambda: w_q.permute(0, 2, 3, 1).reshape(o, kh * kw * c).contiguous())
    y2 = _gemm_onednn(cols, w2, w_scale, zp)  # [B*OH*OW, O]
    return y2.view(b, oh, ow, o).permute(0, 3, 1, 2)


def _image_rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x [B, C, H, W]`` as ``[B, C*H*W]`` rows in memory order (a view: each image is one contiguous run in
    NCHW and in channels_last), or None for other layouts."""
    if x.is_contiguous():
        return x.view(x.shape[0], -1)
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
    return None


def _rows_as_image(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`_image_rows` for ``rows`` computed from ``like`` (its shape and layout)."""
    b, c, h, w = like.shape
    if like.is_contiguous():
        return rows.view(b, c, h, w)
    return rows.view(b, h, w, c).permute(0, 3, 1, 2)


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
    engine: str = "im2col",
) -> torch.Tensor:
    """Int8 conv of float ``x [B, C, H, W]`` (any memory format) quantized per image (or with
    ``static_scale``); returns ``x``'s dtype, ``[B, O, OH, OW]`` in channels_last memory format."""
    qmax = act_qmax() if qmax is None else qmax
    if engine not in conv_engines(qmax):
        raise ValueError(f"CPU int8 conv engine {engine!r} is not available/exact for activation qmax {qmax} on this "
                         f"CPU (oneDNN {engines.onednn_isa()}); exact here: {conv_engines(qmax)}")
    b, c, h, w = x.shape
    o, _, kh, kw = w_q.shape
    if engine == "amx_tiles":
        if not amx_conv_ok(c):
            raise ValueError(f"the 'amx_tiles' int8 conv engine needs input channels in whole blocks of 16, got C={c}")
        return _conv_amx(x, w_q, w_scale, bias, stride, padding, dilation, activation, static_scale, qmax)
    base, split = engine.removesuffix("_split").removesuffix("_cq"), engine.endswith("_split")
    if base == "onednn" and not onednn_conv_ok(c, h, w, kh, kw, tuple(stride), tuple(padding), tuple(dilation)):
        raise ValueError(f"oneDNN's int8 conv is wrong for C={c}, input {h}x{w}, kernel {kh}x{kw}, stride {list(stride)}, "
                         f"padding {list(padding)}, dilation {list(dilation)}; use the 'im2col' engine")
    rows = _image_rows(x) if engine.endswith("_cq") and static_scale is None else None
    if rows is not None:  # per-image quantization as two compiled loops over the images' memory
        scale, inv = scale_inv(compiled.row_absmax(rows), qmax)
        u8 = _rows_as_image(compiled.quantize(rows, inv, qmax + 1), x)
        y = _conv_gemm_u8(base, u8, w_q, w_scale, qmax + 1, stride, padding, dilation)
    else:
        xf = as_fp32(x, "int8.x32")
        scale, inv = act_scale_inv(xf, qmax, static_scale)
        v = _scaled_rounded(xf, inv[:, None, None, None], qmax, static_scale is not None, "int8.conv_v",
                            rounded=split)
        if split:
            hi, lo = _split(v)
            y = _conv_gemm(base, hi, w_q, w_scale, 64, stride, padding, dilation)
            y = y.add_(_conv_gemm(base, lo, w_q, w_scale, 64, stride, padding, dilation))
        else:
            y = _conv_gemm(base, v, w_q, w_scale, qmax + 1, stride, padding, dilation)
    y = _epilogue(y, scale[:, None, None, None], None if bias is None else bias.float()[None, :, None, None],
                  activation, torch.float32)
    return y.to(x.dtype, memory_format=torch.channels_last)


def _conv_amx(x, w_q, w_scale, bias, stride, padding, dilation, activation, static_scale, qmax) -> torch.Tensor:
    """The ``amx_tiles`` conv engine: accel's native AMX int8 implicit GEMM (``accel.cpu.native``) over the input
    quantized per image (or with one fp32 static scale) straight into a buffer padded with the zero point (one native
    pass reading a channels_last or an NCHW input in place; other layouts, and a static scale that is not one fp32
    value on the CPU, through the eager steps, an NHWC copy and a padded copy)."""
    b, c, h, w = x.shape
    o, _, kh, kw = w_q.shape
    (sh, sw), (ph, pw), (dh, dw) = tuple(stride), tuple(padding), tuple(dilation)
    oh, ow = conv_output_hw(h, w, kh, kw, (sh, sw), (ph, pw), (dh, dw))
    packed = _amx_conv_blocks(w_q)
    if _native_scale(static_scale) and (x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous()):
        u, scale = native.quantize_images_padded(x, qmax, (ph, pw), static_scale)  # (into the padded NHWC buffer)
    else:
        xn = x.permute(0, 2, 3, 1)
        if not xn.is_contiguous():
            xn = xn.contiguous()
        u, scale = _rows_uint8(xn.reshape(b, h * w * c), qmax, static_scale, h * w * c)
        u = u.view(b, h, w, c)
        if ph or pw:  # the zero point around the image: the padding's zeros
            up = scratch("int8.amx_pad", b * (h + 2 * ph) * (w + 2 * pw) * c, torch.uint8).view(b, h + 2 * ph,
                                                                                               w + 2 * pw, c)
            up.fill_(128)
            up[:, ph:ph + h, pw:pw + w].copy_(u)
            u = up
    y = native.int8_conv2d_amx(u, packed, (o, c, kh, kw), scale.float().contiguous(), w_scale.float().contiguous(),
                               None if bias is None else bias.float().contiguous(), (sh, sw), (dh, dw), (oh, ow),
                               native.out_dtype(x.dtype, activation))
    y = activate(y, activation, inplace=True).permute(0, 3, 1, 2)  # [B, O, OH, OW] channels_last
    return y if y.dtype == x.dtype else y.to(x.dtype, memory_format=torch.channels_last)


def _amx_conv_blocks(w_q: torch.Tensor) -> native.Packed:
    """The ``amx_tiles`` conv's weight, ``[O, KH*KW*C]`` in ``(kh, kw, c)`` order as dense blocks of the widest size
    dividing C (64, 32 or 16), packed for the kernel once per weight."""
    o, c, kh, kw = w_q.shape
    bs = 64 if c % 64 == 0 else 32 if c % 32 == 0 else 16
    return cached_tensor(f"int8.amx_conv_blocks{bs}", w_q,
                         lambda: native.pack(*_dense_blocks(w_q.permute(0, 2, 3, 1).reshape(o, kh * kw * c), bs)))


def tiles_conv_runner(x, w_q, w_scale, bias, stride, padding, dilation, activation: str,
                      static_scale: torch.Tensor | None, qmax: int):
    """The ``amx_tiles`` conv engine for one layer's operands, bound once (the packed blocks, the fp32 scales and
    bias, the kernels: ``accel.cpu.native.int8_conv_runner``): a function of inputs of ``x``'s dtype and channels,
    for a settled layer's plan. Inputs the native quantization cannot read in place (neither channels_last nor
    contiguous), and activation scales it does not take, go through :func:`conv2d_int8_cpu`'s steps."""
    def general(x):
        return _conv_amx(x, w_q, w_scale, bias, stride, padding, dilation, activation, static_scale, qmax)

    if not (_native_scale(static_scale) and amx_conv_ok(w_q.shape[1])):
        return general
    run = native.int8_conv_runner(_amx_conv_blocks(w_q), tuple(w_q.shape), w_scale.detach().float().contiguous(),
                                  None if bias is None else bias.detach().float().contiguous(), stride, padding,
                                  dilation, qmax, x.dtype, activation,
                                  None if static_scale is None else float(static_scale.reshape(())))

    def fn(x):
        if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            return run(x)
        return general(x)

    return fn


def canonical(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with the plain NCHW strides (a tensor with a size-1 dim may carry
    channels_last strides and still be "contiguous"; oneDNN then takes the channels_last path)."""
    t = t.to(dtype)
    strides, acc = [], 1
    for n in reversed(t.shape):
        strides.append(acc)
        acc *= max(n, 1)
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


def float_conv2d_cpu(x: torch.Tensor, w: torch.Tensor, bias, stride, padding, dilation) -> torch.Tensor:
    """``F.conv2d`` routed around torch's CPU convolution defects (torch 2.13, oneDNN 3.12): on the
    geometries :func:`onednn_conv_ok` rejects (1-wide/high outputs, outputs reading only padding,
    dilation with padding, 1 input channel, 1-2 pixel inputs), channels_last fp32 and any bf16/fp16
    convolution crash the process (SIGSEGV) or return garbage (C=1 with channels_last strides:
    ~1e32). Those run in fp32 (fp64 for fp64 inputs) with plain NCHW strides, which is exact for every geometry probed (~7,500
    random ones against fp64); the result has ``x``'s dtype."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if onednn_conv_ok(x.shape[1], x.shape[2], x.shape[3], w.shape[2], w.shape[3], stride, padding, dilation):
        return F.conv2d(x, w, bias, stride, padding, dilation)
    dt = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64
    y = F.conv2d(canonical(x, dt), canonical(w, dt), None if bias is None else bias.to(dt), stride, padding, dilation)
    return y.to(x.dtype)


def conv2d_float_cpu(x, w_q, w_scale, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                     activation: str = "none", compute_dtype=None, layout=torch.channels_last) -> torch.Tensor:
    """The float form: the dequantized conv in ``compute_dtype`` (default ``x``'s dtype; bf16 for an fp32
    ``x`` is the "float_bf16" form), computed in ``layout`` (channels_last, oneDNN's fast layout, or
    contiguous NCHW: the "float_nchw" form, what ``nn.Conv2d`` runs on an NCHW input), returned in
    ``x``'s dtype and the layout it was computed in (the op returns the input's layout). Geometries
    torch's own conv gets wrong run through :func:`float_conv2d_cpu`'s safe path."""
    w = dequantized(w_q, w_scale, compute_dtype or x.dtype, layout)
    return conv2d_float_with(x, w, bias, stride, padding, dilation, activation, layout)


def conv2d_float_with(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), activation: str = "none",
                      layout=torch.channels_last) -> torch.Tensor:
    """:func:`conv2d_float_cpu` with the weight already dequantized, in the compute dtype (``w.dtype``) and
    ``layout``."""
    dt = w.dtype
    xc = x if x.dtype == dt and x.is_contiguous(memory_format=layout) else x.to(dtype=dt, memory_format=layout)
    y = float_conv2d_cpu(xc, w, bias if bias is None or bias.dtype == dt else bias.to(dt), stride, padding, dilation)
    if activation != "none":
        y = activate(y, activation, inplace=True)
    return y if y.dtype == x.dtype else y.to(x.dtype)
