"""int8 GEMM with a fused dequantizing epilogue, and per-row (per-token) activation quantization.

* :func:`quantize_rows` turns ``x [M, K]`` (fp16/bf16/fp32) into ``q [M, K]`` int8 and a scale per
  row, symmetric, round half to even, saturating at ``+-qmax``. Dynamic: ``scale = absmax / qmax``;
  static: one calibrated scale for every row. The exact rule, shared with the PyTorch reference
  ``accel.quant.quantize_rows_ref``:

      inv = qmax / absmax   (dynamic; 1 / scale when static; 0 when absmax == 0)
      q   = round_half_even(clamp(x * inv, -qmax, qmax))

  NaN/inf policy: a row holding a NaN or an infinity gets scale NaN and q = 0, so every output of
  that token is NaN after the GEMM (as a float matmul would poison it), never a finite wrong value.
  Rows of at most :data:`ONE_PASS_MAX_K` elements are read once (held in registers between the
  absmax and the quantization); longer rows (a convolution's per-image rows) take two passes over
  chunks, each pass with one program per (row, chunk).
* :func:`int8_mm` computes ``out = act((a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias)``
  for an int8 weight ``b [N, K]`` and either int8 activations ``a`` (int8 x int8 -> int32
  accumulation, exact) or float activations (weight-only: ``b`` is converted to ``a``'s dtype in
  registers, fp32 accumulation). ``out_dtype=torch.int32`` returns the raw int32 accumulator.

Three kernels serve :func:`int8_mm`, chosen per call by :func:`plan_mm`:

* ``"small"`` (``M <= SMALL_M``): swap-AB (the weight is the MMA's M side, the few tokens its N
  side, so no MMA rows idle on padding) with split-K over ``program_id(1)``, so that enough
  programs stream the weight. Split-K partial sums go to a workspace ``[SPLIT_K, M, N]`` and
  :func:`_splitk_epilogue_kernel` adds them in a fixed order and applies the epilogue afterwards:
  bitwise deterministic, also for float partials.
* ``"tma"`` (sm_90, int8 ``a``, TMA-addressable operands): persistent grid, both operands through
  device-side tensor descriptors (``cp.async.bulk.tensor``).
* ``"ptr"`` otherwise: grouped tiles, pointer loads (``cp.async``). Weight-only calls use swap-AB
  here too, which keeps the converted weight in registers as the wgmma A operand (RS-wgmma), so
  the MMA stays in flight across iterations.

int32 accumulation is exact while ``K * 128 * 128 < 2**31`` (``K <= MAX_K = 131071``); the
launchers refuse larger K rather than wrap around. On NVIDIA the int8 ``tl.dot`` needs a K tile >= 32,
so every config has ``BLOCK_K >= 32`` (asserted by the tests). Triton never keeps an int32-accumulator
wgmma in flight (its WGMMA pipeliner only makes fp32-accumulator dots properly async), so the int8
sm_90 tiles use BLOCK_K = 128: four wgmma per wait instead of two.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._triton import (
    INTERPRET,
    capability,
    cdiv,
    check_launchable,
    ensure_allocator,
    launch,
    needs_upcast,
    num_sms,
    pick_configs,
    pow2_bucket,
)

#: largest K whose int32 accumulation cannot overflow for any int8 inputs (|-128 * -128| = 2**14)
MAX_K = (2**31 - 1) // (128 * 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}
#: calls with at most this many rows (tokens) take the swap-AB / split-K kernel configs
SMALL_M = 16
#: rows up to this length are quantized in one pass
ONE_PASS_MAX_K = 8192
IMPLS = ("auto", "ptr", "tma")

# ---------------------------------------------------------------------------------------------
# Autotune tables. A row: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SPLIT_K,
# SWAP_AB, min capability). With SWAP_AB the accumulator is [BLOCK_N, BLOCK_M]: BLOCK_N weight rows
# on the MMA's M side (wgmma needs 64), BLOCK_M tokens on its N side. The AOT check
# (``python -m accel.kernels.aot``) compiles every row for sm_80 and sm_90 and asserts no spills,
# shared memory within the limit, 16-byte cp.async or TMA operands and >= 2 pipeline buffers.
# ---------------------------------------------------------------------------------------------
#: int8 a, M > SMALL_M (Inductor / torchao int8 tiles, plus BLOCK_K 128). The sm_90-only rows spill
#: on sm_80, where mma.sync holds the whole accumulator in registers (128x128x64 with triton 3.6's ptxas).
MM_INT8_TABLE = [
    (32, 64, 128, 8, 4, 4, 1, 0, 80),
    (64, 64, 128, 8, 4, 4, 1, 0, 80),
    (64, 128, 128, 8, 4, 4, 1, 0, 80),
    (128, 64, 128, 8, 4, 4, 1, 0, 80),
    (128, 128, 64, 8, 8, 4, 1, 0, 90),
    (128, 128, 128, 8, 8, 3, 1, 0, 80),
    (128, 256, 128, 8, 8, 3, 1, 0, 90),
]
#: float a (weight-only), M > SMALL_M: swap-AB
MM_WEIGHT_ONLY_TABLE = [
    (32, 64, 64, 8, 4, 4, 1, 1, 80),
    (64, 64, 64, 8, 4, 4, 1, 1, 80),
    (64, 128, 64, 8, 4, 4, 1, 1, 80),
    (128, 128, 64, 8, 8, 3, 1, 1, 80),
    (128, 64, 64, 8, 4, 3, 1, 1, 80),
]
#: M <= SMALL_M, int8 or float a: swap-AB, narrow weight tiles or split-K
MM_SMALL_TABLE = [
    (16, 32, 256, 1, 4, 4, 1, 1, 80),
    (16, 64, 256, 1, 4, 4, 1, 1, 80),
    (16, 64, 256, 1, 4, 4, 2, 1, 80),
    (16, 64, 128, 1, 4, 5, 4, 1, 80),
    (16, 32, 128, 1, 4, 4, 4, 1, 80),
    (16, 128, 256, 1, 8, 3, 4, 1, 80),
    (16, 64, 128, 1, 4, 4, 8, 1, 80),
]
#: operands that are not 16-byte aligned (K or a row stride not a multiple of 16): every load is
#: scalar, so only tiles whose scalar loads fit the registers
MM_UNALIGNED_TABLE = [
    (32, 64, 64, 8, 4, 3, 1, 0, 80),
    (128, 128, 64, 8, 8, 3, 1, 0, 80),
    (32, 64, 64, 8, 4, 3, 1, 1, 80),
    (64, 64, 64, 8, 4, 3, 1, 1, 80),
    (16, 32, 64, 1, 4, 3, 1, 1, 80),
    (16, 64, 64, 1, 4, 3, 4, 1, 80),
]
#: persistent TMA kernel (sm_90): int8 a / weight-only / M <= SMALL_M
MM_TMA_INT8_TABLE = [
    (128, 128, 128, 8, 8, 3, 1, 0, 90),
    (128, 128, 128, 8, 8, 4, 1, 0, 90),
    (128, 256, 128, 8, 8, 3, 1, 0, 90),
    (64, 128, 128, 8, 4, 4, 1, 0, 90),
]
MM_TMA_WEIGHT_ONLY_TABLE = [
    (64, 128, 64, 8, 4, 4, 1, 1, 90),
    (128, 128, 64, 8, 8, 3, 1, 1, 90),
    (128, 128, 64, 8, 8, 4, 1, 1, 90),
    (128, 64, 64, 8, 4, 4, 1, 1, 90),
]
MM_TMA_SMALL_TABLE = [
    (16, 64, 256, 1, 4, 4, 1, 1, 90),
    (16, 64, 256, 1, 4, 4, 2, 1, 90),
    (16, 64, 128, 1, 4, 6, 4, 1, 90),
    (16, 128, 128, 1, 4, 4, 4, 1, 90),
    (16, 64, 128, 1, 4, 4, 8, 1, 90),
]
MM_INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1, 1, 0, 0)
#: (chunk BLOCK_K, num_warps) of the two-pass quantizer for long rows (the first is the default)
QUANT_CONFIG_TABLE = [(4096, 8), (1024, 4)]
QUANT_INTERPRET_CONFIG = (256, 4)

#: the tables of each (kernel, regime)
_TABLES = {
    ("ptr", "large", True): MM_INT8_TABLE,
    ("ptr", "large", False): MM_WEIGHT_ONLY_TABLE,
    ("ptr", "small", True): MM_SMALL_TABLE,
    ("ptr", "small", False): MM_SMALL_TABLE,
    ("tma", "large", True): MM_TMA_INT8_TABLE,
    ("tma", "large", False): MM_TMA_WEIGHT_ONLY_TABLE,
    ("tma", "small", True): MM_TMA_SMALL_TABLE,
    ("tma", "small", False): MM_TMA_SMALL_TABLE,
}


def tile_config(m, n, k, g, w, s, split=1, swap=0, cap=0) -> triton.Config:
    """A GEMM-tile config from a table row (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages[, SPLIT_K, SWAP_AB, min capability]); the capability is kept on the config object."""
    c = triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "SPLIT_K": split, "SWAP_AB": swap},
                      num_warps=w, num_stages=s)
    c.min_capability = cap
    return c


def gpu_mm_configs() -> list[triton.Config]:
    """Every config of the pointer kernel (all regimes, all capabilities)."""
    rows = MM_INT8_TABLE + MM_WEIGHT_ONLY_TABLE + MM_SMALL_TABLE + MM_UNALIGNED_TABLE
    return [tile_config(*row) for row in dict.fromkeys(map(tuple, rows))]


def gpu_mm_tma_configs() -> list[triton.Config]:
    """Every config of the TMA kernel."""
    rows = MM_TMA_INT8_TABLE + MM_TMA_WEIGHT_ONLY_TABLE + MM_TMA_SMALL_TABLE
    return [tile_config(*row) for row in dict.fromkeys(map(tuple, rows))]


def mm_configs() -> list[triton.Config]:
    return pick_configs(gpu_mm_configs(), tile_config(*MM_INTERPRET_CONFIG))


def mm_tma_configs() -> list[triton.Config]:
    return pick_configs(gpu_mm_tma_configs(), tile_config(*MM_INTERPRET_CONFIG))


def _row_of(c: triton.Config) -> tuple:
    k = c.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k["GROUP_M"], c.num_warps, c.num_stages, k["SPLIT_K"], k["SWAP_AB"])


def mm_configs_for(kernel: str, m_bucket: int, a_int8: bool, cap: int, aligned: bool = True,
                   configs: list[triton.Config] | None = None) -> list[triton.Config]:
    """The configs the autotuner may pick for a call to ``kernel`` ("ptr" or "tma") with
    ``M`` in bucket ``m_bucket``, int8 or float ``a``, on capability ``cap``, with 16-byte aligned
    operands or not (what the AOT check compiles)."""
    regime = "small" if m_bucket <= SMALL_M else "large"
    if kernel == "ptr" and not aligned:
        table = [r for r in MM_UNALIGNED_TABLE if (r[0] <= SMALL_M) == (regime == "small")
                 and (regime == "small" or r[7] == (0 if a_int8 else 1))]
    else:
        table = _TABLES[(kernel, regime, a_int8)]
    rows = {tuple(r[:8]) for r in table if r[8] <= cap}
    pool = configs if configs is not None else (gpu_mm_tma_configs() if kernel == "tma" else gpu_mm_configs())
    return [c for c in pool if _row_of(c) in rows]


@functools.lru_cache(maxsize=None)
def _max_split(kernel: str, m_bucket: int, a_int8: bool, cap: int, aligned: bool) -> int:
    """Largest SPLIT_K among the configs a call may autotune to (sizes the workspace; cached: the
    launchers run it every call)."""
    return max(c.kwargs["SPLIT_K"] for c in mm_configs_for(kernel, m_bucket, a_int8, cap, aligned))


def _prune_mm(configs, named_args, **kwargs):
    if len(configs) == 1:  # the interpreter's single config
        return configs
    args = {**named_args, **kwargs}
    return mm_configs_for("ptr", args["M_BUCKET"], bool(args["A_INT8"]), capability(args["a_ptr"].device),
                          bool(args["ALIGNED"]), configs)


def _prune_mm_tma(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    return mm_configs_for("tma", args["M_BUCKET"], bool(args["A_INT8"]), capability(args["a_ptr"].device), True,
                          configs)


def _quant_config(k, w) -> triton.Config:
    return triton.Config({"BLOCK_K": k}, num_warps=w, num_stages=1)


def gpu_quant_configs() -> list[triton.Config]:
    """Chunk sizes of the two-pass quantizer for long rows; the launcher uses the first."""
    return [_quant_config(*row) for row in QUANT_CONFIG_TABLE]


@functools.lru_cache(maxsize=None)
def quant_chunk_config() -> triton.Config:
    return _quant_config(*(QUANT_INTERPRET_CONFIG if INTERPRET else QUANT_CONFIG_TABLE[0]))


@functools.lru_cache(maxsize=None)
def one_pass_config(k: int) -> triton.Config:
    """The single-pass quantizer's launch for rows of ``k <= ONE_PASS_MAX_K`` elements: the whole row
    in one block, about 8-16 elements per thread."""
    block = max(16, pow2_bucket(k))
    return triton.Config({"BLOCK_K": block}, num_warps=max(1, min(8, block // 512)), num_stages=1)


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
def dequant_epilogue(acc, o_m, o_n, m_m, m_n, a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS,
                     HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     ACTIVATION: tl.constexpr):
    """``act(acc * a_scale[rows // A_SCALE_ROWS] * b_scale[cols] + bias[cols])`` in fp32.
    ``A_SCALE_ROWS`` rows share one activation scale (1 per token for a GEMM; OH*OW for a 1x1
    convolution run as a GEMM, whose scales are per image)."""
    out = acc.to(tl.float32)
    if HAS_A_SCALE:
        out = out * tl.load(a_scale_ptr + o_m // A_SCALE_ROWS, mask=m_m, other=0.0)[:, None]
    if HAS_B_SCALE:
        out = out * tl.load(b_scale_ptr + o_n, mask=m_n, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:  # relu that keeps NaN (tl.maximum would drop it)
        out = tl.where(out < 0.0, 0.0, out)
    elif ACTIVATION == 2:  # exact (erf) GELU, as F.gelu
        out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
    return out


@triton.jit
def _store_tile(acc, o_m, o_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS,
                HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACTIVATION: tl.constexpr, OUT_INT32: tl.constexpr):
    m_m = o_m < M
    m_n = o_n < N
    p_c = c_ptr + o_m.to(tl.int64)[:, None] * stride_cm + o_n[None, :] * stride_cn
    if OUT_INT32:
        tl.store(p_c, acc, mask=m_m[:, None] & m_n[None, :])
    else:
        out = dequant_epilogue(acc, o_m, o_n, m_m, m_n, a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS,
                               HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION)
        tl.store(p_c, out.to(c_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _mm_finish(acc, m0, n0, M, N, split, c_ptr, ws_ptr, stride_cm, stride_cn, a_scale_ptr, b_scale_ptr, bias_ptr,
               A_SCALE_ROWS, HAS_A_SCALE: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
               ACTIVATION: tl.constexpr, OUT_INT32: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Store the output tile at (m0, n0): the raw partial sum into the split-K workspace
    ``[SPLIT_K, M, N]`` (``_splitk_epilogue_kernel`` reduces it), or the dequantized result into
    ``c``. A 256-wide tile is finished as two 128-wide halves, so the fp32 epilogue never holds the
    whole tile twice (it spills otherwise)."""
    o_m = m0 + tl.arange(0, BLOCK_M)
    if SPLIT_K > 1:
        o_n = n0 + tl.arange(0, BLOCK_N)
        p_w = ws_ptr + split.to(tl.int64) * M * N + o_m.to(tl.int64)[:, None] * N + o_n[None, :]
        tl.store(p_w, acc, mask=(o_m < M)[:, None] & (o_n < N)[None, :])
    elif BLOCK_N >= 256 and not OUT_INT32:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        o_n = n0 + tl.arange(0, BLOCK_N // 2)
        _store_tile(acc0, o_m, o_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, b_scale_ptr, bias_ptr,
                    A_SCALE_ROWS, HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION, OUT_INT32)
        _store_tile(acc1, o_m, o_n + BLOCK_N // 2, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, b_scale_ptr,
                    bias_ptr, A_SCALE_ROWS, HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION, OUT_INT32)
    else:
        o_n = n0 + tl.arange(0, BLOCK_N)
        _store_tile(acc, o_m, o_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS,
                    HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION, OUT_INT32)


@triton.jit
def _k_range(K, split, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[kt0, kt1): the K tiles of split ``split`` (all of them when SPLIT_K == 1)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    if SPLIT_K == 1:
        kt0 = 0
        kt1 = k_tiles
    else:
        per_split = tl.cdiv(k_tiles, SPLIT_K)
        kt0 = split * per_split
        kt1 = min(kt0 + per_split, k_tiles)
    return kt0, kt1


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=mm_configs(),
                 key=["M_BUCKET", "N", "K", "A_INT8", "OUT_INT32", "ALIGNED", "stride_ak", "stride_bk"],
                 prune_configs_by={"early_config_prune": _prune_mm})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_mm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, ws_ptr,
    M, N, K,
    M_BUCKET, ALIGNED,  # autotune keys only: M rounded up to a power of two; 16-byte aligned operands
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_cm, stride_cn,
    A_SCALE_ROWS,
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
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    # rows/cols past the edge re-read valid ones (wrapped), so the loads need no row mask; their
    # results are masked at the store
    r_m = (o_m % M).to(tl.int64)
    r_n = (o_n % N).to(tl.int64)
    kt0, kt1 = _k_range(K, tl.program_id(1), BLOCK_K, SPLIT_K)
    if SWAP_AB:  # acc^T [BLOCK_N, BLOCK_M] = b [BLOCK_N, BLOCK_K] @ a^T [BLOCK_K, BLOCK_M]
        p_a = a_ptr + r_m[None, :] * stride_am + (kt0 * BLOCK_K + o_k)[:, None] * stride_ak
        p_b = b_ptr + r_n[:, None] * stride_bn + (kt0 * BLOCK_K + o_k)[None, :] * stride_bk
        if A_INT8:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # acc [BLOCK_M, BLOCK_N] = a [BLOCK_M, BLOCK_K] @ b^T [BLOCK_K, BLOCK_N]
        p_a = a_ptr + r_m[:, None] * stride_am + (kt0 * BLOCK_K + o_k)[None, :] * stride_ak
        p_b = b_ptr + r_n[None, :] * stride_bn + (kt0 * BLOCK_K + o_k)[:, None] * stride_bk
        if A_INT8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt0, kt1):
        if EVEN_K:
            b_a = tl.load(p_a)
            b_b = tl.load(p_b)
        else:
            m_k = o_k < K - kt * BLOCK_K
            if SWAP_AB:
                b_a = tl.load(p_a, mask=m_k[:, None], other=0)
                b_b = tl.load(p_b, mask=m_k[None, :], other=0)
            else:
                b_a = tl.load(p_a, mask=m_k[None, :], other=0)
                b_b = tl.load(p_b, mask=m_k[:, None], other=0)
        if A_INT8:  # int8 x int8 -> int32 (exact)
            if SWAP_AB:
                acc = tl.dot(b_b, b_a, acc, out_dtype=tl.int32)
            else:
                acc = tl.dot(b_a, b_b, acc, out_dtype=tl.int32)
        else:  # weight-only: the int8 weight converted to a's dtype in registers
            if UPCAST:
                b_a = b_a.to(tl.float32)
            if SWAP_AB:
                acc = tl.dot(b_b.to(b_a.dtype), b_a, acc, input_precision=PRECISION, out_dtype=tl.float32)
            else:
                acc = tl.dot(b_a, b_b.to(b_a.dtype), acc, input_precision=PRECISION, out_dtype=tl.float32)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk
    if SWAP_AB:
        acc = tl.trans(acc)
    _mm_finish(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, tl.program_id(1), c_ptr, ws_ptr, stride_cm, stride_cn,
               a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS, HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION,
               OUT_INT32, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N,
    stride_cm, stride_cn,
    A_SCALE_ROWS,
    SPLIT_K: tl.constexpr,
    HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partial results in order (int32 exact; fp32 in a fixed order, so bitwise
    deterministic), then the dequantizing epilogue."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_c = (o_m < M)[:, None] & (o_n < N)[None, :]
    p_w = ws_ptr + o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    acc = tl.load(p_w, mask=m_c, other=0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_w + s * M * N, mask=m_c, other=0)
    _store_tile(acc, o_m, o_n, M, N, c_ptr, stride_cm, stride_cn, a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS,
                HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION, OUT_INT32)


@triton.autotune(configs=mm_tma_configs(), key=["M_BUCKET", "N", "K", "A_INT8", "OUT_INT32"],
                 prune_configs_by={"early_config_prune": _prune_mm_tma})
@triton.jit
def _int8_mm_tma_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr, ws_ptr,
    M, N, K,
    M_BUCKET,
    stride_am, stride_bn,
    stride_cm, stride_cn,
    A_SCALE_ROWS,
    NUM_PROGRAMS,
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
    SPLIT_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """Persistent GEMM for sm_90: NUM_PROGRAMS programs walk the (output tile, K split) work items
    in grouped order; both operands arrive by TMA through device-side tensor descriptors
    (out-of-bounds rows and K columns read as zero, so ragged shapes need no masks in the loop).
    Same math, swap-AB and split-K as ``_int8_mm_kernel``."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for item in range(tl.program_id(0), num_tiles * SPLIT_K, NUM_PROGRAMS):
        tile = item // SPLIT_K
        split = item - tile * SPLIT_K
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        kt0, kt1 = _k_range(K, split, BLOCK_K, SPLIT_K)
        if SWAP_AB:
            if A_INT8:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
            else:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            if A_INT8:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(kt0, kt1):
            b_a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b_b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            if A_INT8:
                if SWAP_AB:
                    acc = tl.dot(b_b, tl.trans(b_a), acc, out_dtype=tl.int32)
                else:
                    acc = tl.dot(b_a, tl.trans(b_b), acc, out_dtype=tl.int32)
            else:
                if UPCAST:
                    b_a = b_a.to(tl.float32)
                if SWAP_AB:
                    acc = tl.dot(b_b.to(b_a.dtype), tl.trans(b_a), acc, input_precision=PRECISION, out_dtype=tl.float32)
                else:
                    acc = tl.dot(b_a, tl.trans(b_b.to(b_a.dtype)), acc, input_precision=PRECISION, out_dtype=tl.float32)
        if SWAP_AB:
            acc = tl.trans(acc)
        _mm_finish(acc, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, split, c_ptr, ws_ptr, stride_cm, stride_cn,
                   a_scale_ptr, b_scale_ptr, bias_ptr, A_SCALE_ROWS, HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION,
                   OUT_INT32, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit
def _quantize_row_block(b_x, inv, bad, QMAX: tl.constexpr):
    b_x = tl.where(bad, 0.0, b_x)  # a poisoned row quantizes to 0 (its scale is NaN)
    v = tl.minimum(tl.maximum(b_x * inv, -QMAX * 1.0), QMAX * 1.0)
    return round_half_even(v).to(tl.int8)


@triton.jit
def _row_scale(absmax, static_ptr, QMAX: tl.constexpr, STATIC: tl.constexpr):
    """(scale, 1/scale, bad) of a row from its absmax (NaN counted as inf); correctly rounded
    divisions (div_rn), as the reference's IEEE tensor divisions."""
    bad = absmax == float("inf")
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
        inv = tl.where(scale > 0.0, tl.math.div_rn(1.0, tl.where(scale > 0.0, scale, 1.0)), 0.0)
    else:
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        inv = tl.where(absmax > 0.0, tl.math.div_rn(QMAX * 1.0, tl.where(absmax > 0.0, absmax, 1.0)), 0.0)
    inv = tl.where(bad, 0.0, inv)
    return tl.where(bad, float("nan"), scale), inv, bad


@triton.jit
def _abs_nan_inf(b_x):
    """|x| with NaN counted as +inf (tl.max would silently drop a NaN)."""
    return tl.where(b_x == b_x, tl.abs(b_x), float("inf"))


@triton.jit
def _row_chunk_absmax_kernel(
    x_ptr, part_ptr,
    K,
    stride_xm, stride_xk,
    N_CHUNKS,
    BLOCK_K: tl.constexpr,
):
    """Pass 1 over rows longer than ONE_PASS_MAX_K: the absmax (NaN as inf) of each BLOCK_K chunk, one
    program per (row, chunk), so a long row (an image of a convolution) is read by many programs."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    o_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    b_x = tl.load(x_ptr + row * stride_xm + o_k * stride_xk, mask=o_k < K, other=0.0).to(tl.float32)
    tl.store(part_ptr + row * N_CHUNKS + chunk, tl.max(_abs_nan_inf(b_x), axis=0))


@triton.jit
def _quantize_row_chunks_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, part_ptr,
    K,
    stride_xm, stride_xk, stride_qm,
    N_CHUNKS,
    QMAX: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Pass 2: each (row, chunk) program reduces the row's chunk maxima, derives the scale (chunk 0
    stores it) and quantizes its chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    o_c = tl.arange(0, BLOCK_C)
    absmax = tl.max(tl.load(part_ptr + row * N_CHUNKS + o_c, mask=o_c < N_CHUNKS, other=0.0), axis=0)
    scale, inv, bad = _row_scale(absmax, static_ptr, QMAX, STATIC)
    tl.store(s_ptr + row, scale, mask=chunk == 0)
    o_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_x = tl.load(x_ptr + row * stride_xm + o_k * stride_xk, mask=m_k, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * stride_qm + o_k, _quantize_row_block(b_x, inv, bad, QMAX), mask=m_k)


@triton.jit
def _quantize_rows_1pass_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr,
    K,
    stride_xm, stride_xk, stride_qm,
    QMAX: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One pass over a row of K <= BLOCK_K elements: read once, kept in registers."""
    row = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_x = tl.load(x_ptr + row * stride_xm + o_k * stride_xk, mask=m_k, other=0.0).to(tl.float32)
    scale, inv, bad = _row_scale(tl.max(_abs_nan_inf(b_x), axis=0), static_ptr, QMAX, STATIC)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * stride_qm + o_k, _quantize_row_block(b_x, inv, bad, QMAX), mask=m_k)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def quantize_rows(
    x: torch.Tensor, qmax: int = 127, static_scale: torch.Tensor | None = None, *, config: triton.Config | None = None,
    one_pass: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 quantization of ``x [M, K]``; returns ``(q int8 [M, K], scale fp32 [M])``.

    ``static_scale``: a one-element fp32 tensor used for every row instead of ``absmax / qmax``
    (values beyond ``+-qmax * scale`` saturate). ``one_pass``: force (True) or forbid (False) the
    single-pass kernel; by default rows of at most ``ONE_PASS_MAX_K`` elements take it. ``config``:
    a ``triton.Config`` (``BLOCK_K``, warps) for whichever kernel runs: the whole row for the
    single-pass kernel (``BLOCK_K >= K``), the chunk length for the two-pass one.
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
    if one_pass is None:
        one_pass = k <= ONE_PASS_MAX_K
    static = static_scale if static_scale is not None else s
    if one_pass:
        cfg = config if config is not None else one_pass_config(k)
        if cfg.kwargs["BLOCK_K"] < k:
            raise ValueError(f"{what}: the one-pass kernel needs BLOCK_K >= K, got {cfg.kwargs['BLOCK_K']} < {k}")
        launch(_quantize_rows_1pass_kernel, (m,),
               dict(x_ptr=x, q_ptr=q, s_ptr=s, static_ptr=static, K=k, stride_xm=x.stride(0), stride_xk=x.stride(1),
                    stride_qm=q.stride(0), QMAX=qmax, STATIC=static_scale is not None), config=cfg)
        return q, s
    cfg = config if config is not None else quant_chunk_config()
    chunk = cfg.kwargs["BLOCK_K"]
    n_chunks = cdiv(k, chunk)
    part = torch.empty((m, n_chunks), dtype=torch.float32, device=x.device)
    launch(_row_chunk_absmax_kernel, (m, n_chunks),
           dict(x_ptr=x, part_ptr=part, K=k, stride_xm=x.stride(0), stride_xk=x.stride(1), N_CHUNKS=n_chunks,
                BLOCK_K=chunk), num_warps=cfg.num_warps)
    launch(_quantize_row_chunks_kernel, (m, n_chunks),
           dict(x_ptr=x, q_ptr=q, s_ptr=s, static_ptr=static, part_ptr=part, K=k, stride_xm=x.stride(0),
                stride_xk=x.stride(1), stride_qm=q.stride(0), N_CHUNKS=n_chunks, QMAX=qmax,
                STATIC=static_scale is not None, BLOCK_K=chunk, BLOCK_C=max(2, pow2_bucket(n_chunks))),
           num_warps=cfg.num_warps)
    return q, s


@dataclass
class MMPlan:
    """Which kernel a call runs ("ptr" or "tma"), the autotune bucket of its M, and whether its
    operands are 16-byte aligned (the pointer kernel picks from a narrower table when not)."""

    kernel: str
    m_bucket: int
    aligned: bool = True


def _aligned(t: torch.Tensor) -> bool:
    """Unit inner stride, 16-byte aligned base and row stride (what vectorised loads and TMA need)."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def plan_mm(M: int, K: int, a_int8: bool, cap: int, impl: str = "auto", aligned: bool = True) -> MMPlan:
    """The kernel for an ``M``-row call with reduction length ``K`` on a device of capability
    ``cap`` (0: the interpreter): TMA on sm_90+ when the operands allow it, else pointers."""
    bucket = pow2_bucket(M)
    aligned = aligned and K % 16 == 0
    tma_ok = aligned and (cap >= 90 or cap == 0)
    if impl == "tma":
        if not tma_ok:
            raise ValueError("int8_mm: impl='tma' needs sm_90+ and TMA-addressable operands (unit inner stride, "
                             "16-byte aligned base and rows, K a multiple of 16)")
        return MMPlan("tma", bucket)
    if impl == "auto" and tma_ok and cap >= 90:
        return MMPlan("tma", bucket)
    return MMPlan("ptr", bucket, aligned)


def _mm_args(a, b, a_scale, b_scale, bias, c, ws, *, m_bucket: int, activation: str, allow_tf32: bool,
             a_scale_rows: int = 1, aligned: bool = True, tma: bool = False, num_programs: int = 0) -> dict:
    """Keyword arguments of ``_int8_mm_kernel`` (or ``_int8_mm_tma_kernel`` with ``tma=True``) for one
    call, everything but the tile config and the heuristics: the launcher and the AOT check both
    build them here."""
    M, K = a.shape
    N = b.shape[0]
    scaled = c.dtype != torch.int32
    args = dict(
        a_ptr=a, b_ptr=b, a_scale_ptr=a_scale if a_scale is not None else c, b_scale_ptr=b_scale if b_scale is not None else c,
        bias_ptr=bias if bias is not None else c, c_ptr=c, ws_ptr=ws,
        M=M, N=N, K=K, M_BUCKET=m_bucket,
        stride_am=a.stride(0), stride_bn=b.stride(0), stride_cm=c.stride(0), stride_cn=c.stride(1),
        A_SCALE_ROWS=a_scale_rows,
        A_INT8=a.dtype == torch.int8,
        HAS_A_SCALE=a_scale is not None, HAS_B_SCALE=b_scale is not None, HAS_BIAS=bias is not None and scaled,
        ACTIVATION=ACTIVATIONS[activation], OUT_INT32=not scaled,
        UPCAST=needs_upcast(a.dtype),
        PRECISION="tf32" if (a.dtype == torch.float32 and allow_tf32) else "ieee",
    )
    if tma:
        args["NUM_PROGRAMS"] = num_programs
    else:
        args.update(ALIGNED=int(aligned), stride_ak=a.stride(1), stride_bk=b.stride(1))
    return args


def _splitk_epilogue_args(ws, c, mm_args: dict, split: int) -> dict:
    """Keyword arguments of ``_splitk_epilogue_kernel`` after a split-K launch with ``mm_args``."""
    return dict(
        ws_ptr=ws, a_scale_ptr=mm_args["a_scale_ptr"], b_scale_ptr=mm_args["b_scale_ptr"], bias_ptr=mm_args["bias_ptr"],
        c_ptr=c, M=c.shape[0], N=c.shape[1], stride_cm=c.stride(0), stride_cn=c.stride(1),
        A_SCALE_ROWS=mm_args["A_SCALE_ROWS"], SPLIT_K=split, HAS_A_SCALE=mm_args["HAS_A_SCALE"],
        HAS_B_SCALE=mm_args["HAS_B_SCALE"], HAS_BIAS=mm_args["HAS_BIAS"], ACTIVATION=mm_args["ACTIVATION"],
        OUT_INT32=mm_args["OUT_INT32"], BLOCK_M=16, BLOCK_N=128,
    )


def launch_mm(a, b, a_scale, b_scale, bias, c, *, activation="none", allow_tf32=False, a_scale_rows=1,
              config: triton.Config | None = None, impl: str = "auto") -> torch.Tensor:
    """Run the int8 GEMM into the preallocated ``c [M, N]`` (no validation: :func:`int8_mm` and the
    int8 conv launcher validate). ``a_scale`` has ``ceil(M / a_scale_rows)`` entries."""
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0:
        return c
    a_int8 = a.dtype == torch.int8
    cap = capability(a.device)
    plan = plan_mm(M, K, a_int8, cap, impl, _aligned(a) and _aligned(b))
    kernel = _int8_mm_tma_kernel if plan.kernel == "tma" else _int8_mm_kernel
    if config is not None:
        split_max = config.kwargs["SPLIT_K"]
    elif INTERPRET:
        split_max = 1
    else:
        split_max = _max_split(plan.kernel, plan.m_bucket, a_int8, cap, plan.aligned)
    ws = torch.empty((split_max, M, N), dtype=torch.int32 if a_int8 else torch.float32, device=a.device) \
        if split_max > 1 else c
    if plan.kernel == "tma":
        ensure_allocator()
        programs = num_sms(a.device)
        args = _mm_args(a, b, a_scale, b_scale, bias, c, ws, m_bucket=plan.m_bucket, activation=activation,
                        allow_tf32=allow_tf32, a_scale_rows=a_scale_rows, tma=True, num_programs=programs)
        grid = lambda meta: (min(programs, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])  # noqa: E731
                                 * meta["SPLIT_K"]),)
    else:
        args = _mm_args(a, b, a_scale, b_scale, bias, c, ws, m_bucket=plan.m_bucket, activation=activation,
                        allow_tf32=allow_tf32, a_scale_rows=a_scale_rows, aligned=plan.aligned)
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
    split = launch(kernel, grid, args, config).kwargs["SPLIT_K"]
    if split > 1:
        eargs = _splitk_epilogue_args(ws, c, args, split)
        launch(_splitk_epilogue_kernel, (cdiv(M, eargs["BLOCK_M"]), cdiv(N, eargs["BLOCK_N"])), eargs,
               num_warps=4)
    return c


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
    impl: str = "auto",
) -> torch.Tensor:
    """``act((a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias)``.

    Args:
        a: ``[M, K]`` int8 (quantized activations) or fp16/bf16/fp32 (weight-only), any strides.
        b: ``[N, K]`` int8 weight, any strides (K-contiguous is the fast layout).
        a_scale: ``[M]`` fp32 per-row scale (int8 ``a`` only; NaN rows give NaN outputs).
        b_scale: ``[N]`` fp32 per-output-channel scale.
        bias: ``[N]``, any float dtype.
        activation: "none", "relu" or "gelu" (erf).
        out_dtype: fp16/bf16/fp32; default ``a``'s dtype, or fp32 for int8 ``a``. ``torch.int32``
            returns the raw accumulator ``a @ b^T`` (int8 ``a`` only; scales, bias and activation
            must be absent).
        allow_tf32: tf32 tensor cores for weight-only fp32 activations.
        config: run this ``triton.Config`` (from :func:`gpu_mm_configs` or, with ``impl="tma"``,
            :func:`gpu_mm_tma_configs`) instead of autotuning.
        impl: "auto" (see :func:`plan_mm`), "ptr" (never TMA) or "tma" (the persistent TMA kernel;
            the interpreter runs it too).
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
    if impl not in IMPLS:
        raise ValueError(f"{what}: impl must be one of {IMPLS}, got {impl!r}")
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
    return launch_mm(a, b, a_scale, b_scale, bias, c, activation=activation, allow_tf32=allow_tf32, config=config,
                     impl=impl)
