"""int8 GEMM with a fused dequantizing epilogue, and per-row (per-token) activation quantization.

* :func:`quantize_rows` turns ``x [M, K]`` (fp16/bf16/fp32) into ``q [M, K]`` int8 and a scale per
  row, symmetric, round half to even, saturating at ``+-qmax``. Dynamic: ``scale = absmax / qmax``;
  static: one calibrated scale for every row. The exact rule, shared with the PyTorch reference
  ``accel.quant.quantize_rows_ref``:

      inv = qmax / absmax   (dynamic; 1 / scale when static; 0 when absmax == 0)
      q   = round_half_even(clamp(x * inv, -qmax, qmax))

  NaN/inf policy: a row holding a NaN or an infinity gets scale NaN and q = 0, so every output of
  that token is NaN after the GEMM (as a float matmul would poison it), never a finite wrong value.
* :func:`int8_mm` computes ``out = act((a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias)``
  for an int8 weight ``b [N, K]`` and either int8 activations ``a`` (int8 x int8 -> int32
  accumulation, exact) or float activations (weight-only: ``b`` is converted to ``a``'s dtype in
  registers, fp32 accumulation). ``out_dtype=torch.int32`` returns the raw int32 accumulator.

int32 accumulation is exact while ``K * 128 * 128 < 2**31`` (``K <= MAX_K = 131071``); the
launchers refuse larger K rather than wrap around. On NVIDIA the int8 ``tl.dot`` needs a K tile >= 32, so every
config has ``BLOCK_K >= 32`` (asserted by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_launchable, config_kwargs, kernel_for, needs_upcast, pick_configs

#: largest K whose int32 accumulation cannot overflow for any int8 inputs (|-128 * -128| = 2**14)
MAX_K = (2**31 - 1) // (128 * 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}

# ---------------------------------------------------------------------------------------------
# Autotune table, (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): the int8 entries of
# Inductor's mm_common / torchao int8_mm tables, plus small-M tiles for decode-sized batches.
# 128x256x64 was dropped and 32x64 uses BLOCK_K 64: the AOT check measured register spills there.
# ---------------------------------------------------------------------------------------------
MM_CONFIG_TABLE = [
    (16, 64, 128, 8, 4, 4),
    (32, 64, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (128, 128, 64, 8, 8, 3),
]
MM_INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1)
#: (BLOCK_K, num_warps) for the row quantizer
QUANT_CONFIG_TABLE = [(1024, 4), (4096, 8)]
QUANT_INTERPRET_CONFIG = (256, 4)


def tile_config(m, n, k, g, w, s) -> triton.Config:
    """A GEMM-tile config from a table row (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)."""
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_warps=w, num_stages=s)


def gpu_mm_configs() -> list[triton.Config]:
    return [tile_config(*row) for row in MM_CONFIG_TABLE]


def mm_configs() -> list[triton.Config]:
    return pick_configs(gpu_mm_configs(), tile_config(*MM_INTERPRET_CONFIG))


def _quant_config(k, w) -> triton.Config:
    return triton.Config({"BLOCK_K": k}, num_warps=w)


def gpu_quant_configs() -> list[triton.Config]:
    return [_quant_config(*row) for row in QUANT_CONFIG_TABLE]


def quant_configs() -> list[triton.Config]:
    return pick_configs(gpu_quant_configs(), _quant_config(*QUANT_INTERPRET_CONFIG))


# ---------------------------------------------------------------------------------------------
# Shared device helpers (also used by the int8 conv kernel)
# ---------------------------------------------------------------------------------------------
@triton.jit
def round_half_even(v):
    """Round to nearest, ties to even, like torch.round (exact for |v| < 2**23; no libdevice,
    so it runs in the interpreter too)."""
    fl = tl.floor(v)
    frac = v - fl
    odd = (fl - 2.0 * tl.floor(fl * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, fl + 1.0, fl)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid`` in grouped order: GROUP_M tile rows sweep the
    columns together, so their operand tiles are reused from L2 (Triton matmul tutorial)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def dequant_epilogue(acc, o_m, o_n, m_m, m_n, a_scale_ptr, b_scale_ptr, bias_ptr,
                     HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr):
    """``act(acc * a_scale[rows] * b_scale[cols] + bias[cols])`` in fp32. ``o_m`` indexes
    ``a_scale`` (a token, or an image for the conv kernel)."""
    out = acc.to(tl.float32)
    if HAS_A_SCALE:
        out = out * tl.load(a_scale_ptr + o_m, mask=m_m, other=0.0)[:, None]
    if HAS_B_SCALE:
        out = out * tl.load(b_scale_ptr + o_n, mask=m_n, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:  # relu that keeps NaN (tl.maximum would drop it)
        out = tl.where(out < 0.0, 0.0, out)
    elif ACTIVATION == 2:  # exact (erf) GELU, as F.gelu
        out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
    return out


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=mm_configs(), key=["M", "N", "K", "A_INT8", "OUT_INT32"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_mm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    A_INT8: tl.constexpr,
    HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OUT_INT32: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    # rows/cols past the edge re-read valid ones (wrapped); their results are masked at the store
    r_m = (o_m % M).to(tl.int64)
    r_n = (o_n % N).to(tl.int64)
    p_a = a_ptr + r_m[:, None] * stride_am + o_k[None, :] * stride_ak
    p_b = b_ptr + r_n[None, :] * stride_bn + o_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N] view of b^T

    if A_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            b_a = tl.load(p_a)
            b_b = tl.load(p_b)
        else:
            m_k = o_k < K - kt * BLOCK_K
            b_a = tl.load(p_a, mask=m_k[None, :], other=0)
            b_b = tl.load(p_b, mask=m_k[:, None], other=0)
        if A_INT8:
            acc = tl.dot(b_a, b_b, acc)  # int8 x int8 -> int32
        else:
            if UPCAST:
                b_a = b_a.to(tl.float32)
            acc = tl.dot(b_a, b_b.to(b_a.dtype), acc, input_precision=PRECISION)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk

    m_m = o_m < M
    m_n = o_n < N
    p_c = c_ptr + o_m.to(tl.int64)[:, None] * stride_cm + o_n[None, :] * stride_cn
    if OUT_INT32:
        tl.store(p_c, acc, mask=m_m[:, None] & m_n[None, :])
    else:
        out = dequant_epilogue(acc, o_m, o_n, m_m, m_n, a_scale_ptr, b_scale_ptr, bias_ptr,
                               HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION)
        tl.store(p_c, out.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.autotune(configs=quant_configs(), key=["K", "STATIC"])
@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr,
    K,
    stride_xm, stride_xk, stride_qm,
    QMAX: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_x = x_ptr + row * stride_xm
    o_k = tl.arange(0, BLOCK_K)
    # pass 1: absmax of the row; NaN counts as +inf (tl.max would silently drop it)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m_k = k0 + o_k < K
        b_x = tl.load(p_x + (k0 + o_k) * stride_xk, mask=m_k, other=0.0).to(tl.float32)
        b_abs = tl.where(b_x == b_x, tl.abs(b_x), float("inf"))
        amax = tl.maximum(amax, b_abs)
    absmax = tl.max(amax, axis=0)
    bad = absmax == float("inf")
    # correctly rounded divisions (div_rn), as the reference's IEEE tensor divisions
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
        inv = tl.where(scale > 0.0, tl.math.div_rn(1.0, tl.where(scale > 0.0, scale, 1.0)), 0.0)
    else:
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        inv = tl.where(absmax > 0.0, tl.math.div_rn(QMAX * 1.0, tl.where(absmax > 0.0, absmax, 1.0)), 0.0)
    inv = tl.where(bad, 0.0, inv)
    tl.store(s_ptr + row, tl.where(bad, float("nan"), scale))
    # pass 2: quantize
    for k0 in range(0, K, BLOCK_K):
        m_k = k0 + o_k < K
        b_x = tl.load(p_x + (k0 + o_k) * stride_xk, mask=m_k, other=0.0).to(tl.float32)
        b_x = tl.where(bad, 0.0, b_x)  # a poisoned row quantizes to 0 (its scale is NaN)
        v = tl.minimum(tl.maximum(b_x * inv, -QMAX * 1.0), QMAX * 1.0)
        q = round_half_even(v)
        tl.store(q_ptr + row * stride_qm + k0 + o_k, q.to(tl.int8), mask=m_k)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def quantize_rows(
    x: torch.Tensor, qmax: int = 127, static_scale: torch.Tensor | None = None, *, config: triton.Config | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of ``x [M, K]``; returns ``(q int8 [M, K], scale fp32 [M])``.

    ``static_scale``: a one-element fp32 tensor used for every row instead of ``absmax / qmax``
    (values beyond ``+-qmax * scale`` saturate).
    """
    what = "quantize_rows"
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: x dtype must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if not 1 <= qmax <= 127:
        raise ValueError(f"{what}: qmax must be in [1, 127], got {qmax}")
    if static_scale is not None and (static_scale.numel() != 1 or static_scale.dtype != torch.float32):
        raise ValueError(
            f"{what}: static_scale must be a one-element float32 tensor, got shape {tuple(static_scale.shape)} "
            f"{static_scale.dtype}"
        )
    check_launchable(x, *(t for t in (static_scale,) if t is not None), what=what)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    if needs_upcast(x.dtype):  # the interpreter reads bf16 bit patterns wrongly; its loads are fine in fp32
        x = x.float()
    kernel_for(_quantize_rows_kernel, config)[(m,)](
        x, q, s, static_scale if static_scale is not None else s,
        k, x.stride(0), x.stride(1), q.stride(0),
        QMAX=qmax, STATIC=static_scale is not None,
        **config_kwargs(config),
    )
    return q, s


def int8_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    out_dtype: torch.dtype | None = None,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``act((a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias)``.

    Args:
        a: ``[M, K]`` int8 (quantized activations) or fp16/bf16/fp32 (weight-only), any strides.
        b: ``[N, K]`` int8 weight, any strides.
        a_scale: ``[M]`` fp32 per-row scale (int8 ``a`` only; NaN rows give NaN outputs).
        b_scale: ``[N]`` fp32 per-output-channel scale.
        bias: ``[N]``, any float dtype.
        activation: "none", "relu" or "gelu" (erf).
        out_dtype: fp16/bf16/fp32; default ``a``'s dtype, or fp32 for int8 ``a``. ``torch.int32``
            returns the raw accumulator ``a @ b^T`` (int8 ``a`` only; scales, bias and activation
            must be absent).
        allow_tf32: tf32 tensor cores for weight-only fp32 activations.
        config: run this ``triton.Config`` instead of autotuning.
    """
    what = "int8_mm"
    if b.dtype != torch.int8:
        raise TypeError(f"{what}: weight b must be int8, got {b.dtype}")
    a_int8 = a.dtype == torch.int8
    if not a_int8 and a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: a must be int8 or one of {FLOAT_DTYPES}, got {a.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{what}: expected a [M, K] and b [N, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[0]
    if K > MAX_K:
        raise ValueError(f"{what}: K={K} exceeds {MAX_K}, where int32 accumulation of int8 products may overflow")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if out_dtype is None:
        out_dtype = torch.float32 if a_int8 else a.dtype
    if out_dtype == torch.int32:
        if not a_int8 or a_scale is not None or b_scale is not None or bias is not None or activation != "none":
            raise ValueError(f"{what}: out_dtype=torch.int32 returns the raw int8 x int8 accumulator; "
                             "it takes int8 a and no scales, bias or activation")
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: out_dtype must be torch.int32 or one of {FLOAT_DTYPES}, got {out_dtype}")
    if a_scale is not None:
        if not a_int8:
            raise ValueError(f"{what}: a_scale applies to int8 a; weight-only a ({a.dtype}) is not scaled")
        if a_scale.shape != (M,) or a_scale.dtype != torch.float32:
            raise ValueError(f"{what}: a_scale must be [{M}] float32, got {tuple(a_scale.shape)} {a_scale.dtype}")
    if b_scale is not None and (b_scale.shape != (N,) or b_scale.dtype != torch.float32):
        raise ValueError(f"{what}: b_scale must be [{N}] float32, got {tuple(b_scale.shape)} {b_scale.dtype}")
    if bias is not None and (bias.shape != (N,) or not bias.is_floating_point()):
        raise ValueError(f"{what}: bias must be a float [{N}], got {tuple(bias.shape)} {bias.dtype}")
    check_launchable(a, b, *(t for t in (a_scale, b_scale, bias) if t is not None), what=what)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel_for(_int8_mm_kernel, config)[grid](
        a, b, a_scale if a_scale is not None else c, b_scale if b_scale is not None else c,
        bias if bias is not None else c, c,
        M, N, K,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        c.stride(0), c.stride(1),
        A_INT8=a_int8,
        HAS_A_SCALE=a_scale is not None,
        HAS_B_SCALE=b_scale is not None,
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS[activation],
        OUT_INT32=out_dtype == torch.int32,
        UPCAST=needs_upcast(a.dtype),
        PRECISION="tf32" if (a.dtype == torch.float32 and allow_tf32) else "ieee",
        **config_kwargs(config),
    )
    return c
