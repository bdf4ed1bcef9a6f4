"""Block-sparse (BSR) weight x dense activation matmul, forward and backward.

The weight ``W`` of shape ``[N, K]`` is stored as block-sparse rows with blocks of ``BS_N x BS_K``
(square ``BS x BS`` blocks from ``accel.formats``, or the taller ``P x BS`` panels of
:func:`bsr_to_panels`): ``values [nnz, BS_N, BS_K]`` (each block oriented ``[out, in]``),
``col_indices [nnz]`` and ``crow_indices [ceil(N/BS_N) + 1]``. Three launchers, all pure functions
on tensors:

* :func:`bsr_dense_mm` computes ``y = x @ W^T (+ bias)``. A program owns a ``BLOCK_M x BS_N``
  output tile and walks its block row in one flat loop over (block, K step), so Triton pipelines
  the loads of consecutive blocks (several shared-memory stages; a nested per-block loop would
  only pipeline the one or two K steps inside a block). For few rows (``M <= SMALL_M``) the
  configs swap operands (the weight block is the MMA's M side, the tokens its N side) and split
  each block row over ``SPLIT`` programs, whose fp32 partial sums a second kernel adds in a fixed
  order (bitwise deterministic); without the split, N/BS programs (128 at 4096/32) would walk whole
  rows serially on 132 SMs. With ``blocks_transposed=True`` and a ``block_index`` that maps the
  transposed structure to the stored blocks, the same kernel computes ``dX = dY @ W`` without
  materialising ``W^T``.
* :func:`bsr_sddmm` computes ``dW`` only at the stored blocks: block ``p`` at ``(r, c)`` gets
  ``dY[:, r-block]^T @ X[:, c-block]`` (a sampled dense-dense matmul). A program takes up to four
  consecutive blocks of one block row and reads the row's dY tile once for all of them (the kernel
  is bound by its L2 reads).

Autotuning is keyed on the token count's power-of-two bucket, the block shape and a block-density
bucket. Accumulation is fp32 for fp16/bf16/fp32 inputs. fp32 inputs use IEEE fp32 FMA unless
``allow_tf32`` (then tf32 tensor cores, as ``torch.backends.cuda.matmul.allow_tf32``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._triton import (
    INTERPRET,
    cdiv,
    check_launchable,
    density_bucket,
    launch,
    needs_upcast,
    pick_configs,
    pow2_bucket,
)

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: calls with at most this many rows take the swap-operand / split-row configs
SMALL_M = 16
#: block-column indices loaded per vector load in the forward kernel
COL_CHUNK = 32

# ---------------------------------------------------------------------------------------------
# Autotune tables. A forward row: (BLOCK_M, BLOCK_K, num_warps, num_stages, SPLIT, SWAP). BLOCK_K
# is clamped to the block's K side (see fwd_configs_for_block). Small-M rows are the SWAP ones.
# The AOT check compiles each for sm_80/sm_90 at every block size and asserts no spills, 16-byte
# cp.async for both operands and >= 2 shared-memory stages.
# ---------------------------------------------------------------------------------------------
FWD_LARGE_TABLE = [
    (32, 64, 4, 4, 1, 0),
    (64, 64, 4, 4, 1, 0),
    (64, 32, 4, 5, 1, 0),
    (128, 64, 8, 3, 1, 0),
    (128, 32, 4, 4, 1, 0),
    (256, 64, 8, 3, 1, 0),
    (256, 32, 8, 4, 1, 0),
]
FWD_SMALL_TABLE = [
    (16, 64, 4, 4, 1, 1),
    (16, 64, 4, 4, 2, 1),
    (16, 64, 4, 4, 4, 1),
    (16, 32, 4, 5, 4, 1),
    (16, 64, 4, 3, 8, 1),
]
#: interpreter: one config, valid for every block size (BLOCK_K <= 16)
FWD_INTERPRET_CONFIG = (32, 16, 4, 1, 1, 0)

#: (BLOCK_M, num_warps, num_stages) for the SDDMM (dW) kernel
SDDMM_CONFIG_TABLE = [
    (32, 4, 3),
    (64, 4, 3),
    (64, 8, 4),
    (128, 8, 3),
]
SDDMM_INTERPRET_CONFIG = (32, 4, 1)


def _fwd_config(m: int, k: int, w: int, s: int, split: int = 1, swap: int = 0) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_K": k, "SPLIT": split, "SWAP": swap}, num_warps=w, num_stages=s)


def _sddmm_config(m: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)


def gpu_fwd_configs() -> list[triton.Config]:
    """The whole forward table (what a GPU autotunes over, what the AOT check compiles)."""
    return [_fwd_config(*row) for row in FWD_LARGE_TABLE + FWD_SMALL_TABLE]


def gpu_sddmm_configs() -> list[triton.Config]:
    return [_sddmm_config(*row) for row in SDDMM_CONFIG_TABLE]


def fwd_configs() -> list[triton.Config]:
    """What the autotuner holds: the whole table on a GPU, one config in the interpreter."""
    return pick_configs(gpu_fwd_configs(), _fwd_config(*FWD_INTERPRET_CONFIG))


def sddmm_configs() -> list[triton.Config]:
    return pick_configs(gpu_sddmm_configs(), _sddmm_config(*SDDMM_INTERPRET_CONFIG))


#: shared memory the forward configs may plan for (stages x operand tiles): fits sm_80 and sm_90
SMEM_BUDGET = 160 * 1024


def _warps_for(acc_elems: int, tile_bytes: int, warps: int) -> int | None:
    """Warps for a program: the accumulator needs <= 64 fp32 values per thread (more spills), and as
    many warps as keep >= 16 bytes per thread on the smaller operand tile (16-byte cp.async), but at
    least 4 (a Hopper warpgroup for wgmma). None when no count up to 8 holds the accumulator."""
    w = warps
    while w > 4 and tile_bytes // (32 * w) < 16:
        w //= 2
    while acc_elems > 64 * 32 * w and w < 8:
        w *= 2
    return w if acc_elems <= 64 * 32 * w else None


def fwd_configs_for_block(bs, configs: list[triton.Config] | None = None, m_bucket: int | None = None,
                          elem_bytes: int = 2) -> list[triton.Config]:
    """The forward configs that apply to blocks of ``bs`` (an int for square blocks, or
    ``(BS_N, BS_K)``) with ``elem_bytes``-byte operands, deduplicated. BLOCK_K is clamped to BS_K (and
    to 64, 32 for fp32); warps follow :func:`_warps_for`; stages drop (to 3 at least) until the operand ring fits
    :data:`SMEM_BUDGET`, else the config is dropped; ``m_bucket`` (a power of two) keeps the small-M
    (SWAP) or the large-M rows.
    ``configs=None``: the whole GPU table."""
    bs_n, bs_k = (bs, bs) if isinstance(bs, int) else bs
    out, seen = [], set()
    for c in configs if configs is not None else gpu_fwd_configs():
        kw = c.kwargs
        if m_bucket is not None and bool(kw["SWAP"]) != (m_bucket <= SMALL_M):
            continue
        bm = kw["BLOCK_M"]
        k = min(kw["BLOCK_K"], bs_k, 64 if elem_bytes <= 2 else 32)  # fp32 64-wide K tiles spill on sm_80
        w = _warps_for(bm * bs_n, min(bm, bs_n) * k * elem_bytes, c.num_warps)
        if w is None:
            continue
        stages = c.num_stages  # at least 3: sm_80 keeps num_stages - 1 buffers, and 2 is the least that overlaps
        while stages > 3 and stages * (bm + bs_n) * k * elem_bytes > SMEM_BUDGET:
            stages -= 1
        if stages * (bm + bs_n) * k * elem_bytes > SMEM_BUDGET:
            continue
        key = (bm, k, w, stages, kw["SPLIT"], kw["SWAP"])
        if key not in seen:
            seen.add(key)
            out.append(_fwd_config(*key))
    return out


def sddmm_configs_for_block(bs, configs: list[triton.Config] | None = None, elem_bytes: int = 2,
                            group: int | None = None) -> list[triton.Config]:
    """SDDMM configs for blocks of ``bs`` (int or ``(BS_N, BS_K)``) and ``group`` blocks per program
    (default :func:`sddmm_group`), warps by :func:`_warps_for` for the group's accumulators."""
    bs_n, bs_k = (bs, bs) if isinstance(bs, int) else bs
    group = group or sddmm_group(bs_n, bs_k)
    out, seen = [], set()
    for c in configs if configs is not None else gpu_sddmm_configs():
        bm = c.kwargs["BLOCK_M"]
        w = _warps_for(group * bs_n * bs_k, bm * min(bs_n, bs_k) * elem_bytes, c.num_warps)
        if w is None:
            continue
        key = (bm, w, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(_sddmm_config(*key))
    return out


@functools.lru_cache(maxsize=None)
def _max_split(bs_n: int, bs_k: int, m_bucket: int, elem_bytes: int) -> int:
    """Largest SPLIT among the configs a call may autotune to (sizes the workspace; cached)."""
    return max(c.kwargs["SPLIT"] for c in fwd_configs_for_block((bs_n, bs_k), m_bucket=m_bucket, elem_bytes=elem_bytes))


def _prune_fwd(configs, named_args, **kwargs):
    if len(configs) == 1:  # the interpreter's single config
        return configs
    args = {**named_args, **kwargs}
    return fwd_configs_for_block((args["BS_N"], args["BS_K"]), configs, args["M_BUCKET"],
                                 args["x_ptr"].element_size()) or configs[:1]


def _prune_sddmm(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    return sddmm_configs_for_block((args["BS_N"], args["BS_K"]), configs, args["x_ptr"].element_size(),
                                   args["GROUP"]) or configs[:1]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=fwd_configs(), key=["M_BUCKET", "N", "K", "BS_N", "BS_K", "DENSITY_BUCKET", "HAS_BIDX"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _bsr_dense_mm_kernel(
    # pointers
    x_ptr, v_ptr, crow_ptr, col_ptr, bidx_ptr, bias_ptr, y_ptr, ws_ptr,
    # sizes: x is [M, K], y is [M, N]
    M, N, K,
    # autotune keys only
    M_BUCKET, DENSITY_BUCKET,
    # strides
    stride_xm, stride_xk,
    stride_vb, stride_vo, stride_vi,  # block, out-within-block, in-within-block
    stride_ym, stride_yn,
    # meta
    BS_N: tl.constexpr,
    BS_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIDX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    SWAP: tl.constexpr,
    COL_CHUNK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row = tl.program_id(1)  # block row of W: output features [row*BS_N, row*BS_N + BS_N)

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BS_N)
    o_k = tl.arange(0, BLOCK_K)
    # rows past M re-read valid ones (no row mask on the loads); masked at the store
    r_m = (o_m % M).to(tl.int64)

    start = tl.load(crow_ptr + row).to(tl.int32)
    end = tl.load(crow_ptr + row + 1).to(tl.int32)
    if SPLIT > 1:  # this program's contiguous share of the row's blocks
        chunk = tl.cdiv(end - start, SPLIT)
        lo = min(start + tl.program_id(2) * chunk, end)
        hi = min(lo + chunk, end)
    else:
        lo = start
        hi = end
    KSTEPS: tl.constexpr = BS_K // BLOCK_K

    if SWAP:
        acc = tl.zeros((BS_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BS_N), dtype=tl.float32)
    # The block columns come in chunks of COL_CHUNK as one vector load; inside a chunk a flat loop
    # over (block, K step) takes each column index from that register vector, so no load in the
    # pipelined loop waits on another load (a per-block index load would be an async copy that the
    # next tile's address needs: cp.async groups retire in order, so every iteration would wait for
    # all copies in flight).
    o_c = tl.arange(0, COL_CHUNK)
    for p0 in range(lo, hi, COL_CHUNK):
        n_chunk = min(COL_CHUNK, hi - p0)
        cols = tl.load(col_ptr + p0 + o_c, mask=o_c < n_chunk, other=0).to(tl.int32)
        if HAS_BIDX:
            blks = tl.load(bidx_ptr + p0 + o_c, mask=o_c < n_chunk, other=0).to(tl.int32)
        for t in range(0, n_chunk * KSTEPS):
            j = t // KSTEPS
            kk = (t % KSTEPS) * BLOCK_K
            c = tl.sum(tl.where(o_c == j, cols, 0), axis=0)
            if HAS_BIDX:
                blk = tl.sum(tl.where(o_c == j, blks, 0), axis=0)
            else:
                blk = p0 + j
            i_k = c * BS_K + kk + o_k
            m_k = i_k < K
            p_v = v_ptr + blk.to(tl.int64) * stride_vb
            if SWAP:  # acc^T [BS_N, BLOCK_M] += block [BS_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M]
                b_x = tl.load(x_ptr + r_m[None, :] * stride_xm + i_k[:, None] * stride_xk, mask=m_k[:, None], other=0.0)
                b_v = tl.load(p_v + o_n[:, None] * stride_vo + (kk + o_k)[None, :] * stride_vi)
                if UPCAST:
                    b_x = b_x.to(tl.float32)
                    b_v = b_v.to(tl.float32)
                acc = tl.dot(b_v, b_x, acc, input_precision=PRECISION, out_dtype=tl.float32)
            else:  # acc [BLOCK_M, BS_N] += x [BLOCK_M, BLOCK_K] @ block^T [BLOCK_K, BS_N]
                b_x = tl.load(x_ptr + r_m[:, None] * stride_xm + i_k[None, :] * stride_xk, mask=m_k[None, :], other=0.0)
                b_v = tl.load(p_v + o_n[None, :] * stride_vo + (kk + o_k)[:, None] * stride_vi)
                if UPCAST:
                    b_x = b_x.to(tl.float32)
                    b_v = b_v.to(tl.float32)
                acc = tl.dot(b_x, b_v, acc, input_precision=PRECISION, out_dtype=tl.float32)
    if SWAP:
        acc = tl.trans(acc)

    i_n = row * BS_N + o_n
    m_n = i_n < N
    m_y = (o_m < M)[:, None] & m_n[None, :]
    if SPLIT > 1:  # fp32 partial sums [SPLIT, M, N]; _bsr_split_reduce_kernel adds them in order
        p_w = ws_ptr + tl.program_id(2).to(tl.int64) * M * N + o_m.to(tl.int64)[:, None] * N + i_n[None, :]
        tl.store(p_w, acc, mask=m_y)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
        p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + i_n[None, :] * stride_yn
        tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _bsr_split_reduce_kernel(
    ws_ptr, bias_ptr, y_ptr,
    M, N,
    stride_ym, stride_yn,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y = sum_s ws[s] + bias`` over the SPLIT partial sums, in order (deterministic)."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    m_y = (o_m < M)[:, None] & m_n[None, :]
    p_w = ws_ptr + o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    acc = tl.load(p_w, mask=m_y, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(p_w + s * M * N, mask=m_y, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + o_n[None, :] * stride_yn
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _sddmm_x_tile(x_ptr, rows64, m_m, col_ptr, p0, cnt, stride_xm, stride_xk, K, G: tl.constexpr, BS_K: tl.constexpr):
    """X tile [BLOCK_M, BS_K] of stored block ``p0 + G`` (zeros, and no traffic, when ``G >= cnt``)."""
    o_k = tl.arange(0, BS_K)
    c = tl.load(col_ptr + tl.where(G < cnt, p0 + G, p0))
    i_k = c * BS_K + o_k
    m_k = (i_k < K) & ((o_k * 0 + G) < cnt)
    return tl.load(x_ptr + rows64[:, None] * stride_xm + i_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :],
                   other=0.0)


@triton.jit
def _sddmm_store(dv_ptr, acc, p0, cnt, stride_db, stride_do, stride_di, G: tl.constexpr, BS_N: tl.constexpr,
                 BS_K: tl.constexpr):
    o_n = tl.arange(0, BS_N)
    o_k = tl.arange(0, BS_K)
    p_dv = dv_ptr + (p0 + G).to(tl.int64) * stride_db + o_n[:, None] * stride_do + o_k[None, :] * stride_di
    tl.store(p_dv, acc.to(dv_ptr.dtype.element_ty), mask=((o_n * 0 + G) < cnt)[:, None])


@triton.autotune(configs=sddmm_configs(), key=["M_BUCKET", "BS_N", "BS_K", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune_sddmm})
@triton.jit
def _bsr_sddmm_kernel(
    dy_ptr, x_ptr, gstart_ptr, grow_ptr, gcount_ptr, col_ptr, dv_ptr,
    M, N, K,
    M_BUCKET,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_db, stride_do, stride_di,
    BS_N: tl.constexpr,
    BS_K: tl.constexpr,
    GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One program per group of up to GROUP (1, 2 or 4) consecutive stored blocks of one block row:
    the dY^T tile of the row is read once per M step for all of them (the kernel is bound by these
    tile reads from L2: GROUP = 4 reads 5 tiles per 4 blocks instead of 8)."""
    q = tl.program_id(0)
    cnt = tl.load(gcount_ptr + q)
    if cnt > 0:
        p0 = tl.load(gstart_ptr + q)
        r = tl.load(grow_ptr + q)
        i_n = r * BS_N + tl.arange(0, BS_N)  # output features of this block row
        m_n = i_n < N
        acc0 = tl.zeros((BS_N, BS_K), dtype=tl.float32)
        if GROUP >= 2:
            acc1 = tl.zeros((BS_N, BS_K), dtype=tl.float32)
        if GROUP >= 4:
            acc2 = tl.zeros((BS_N, BS_K), dtype=tl.float32)
            acc3 = tl.zeros((BS_N, BS_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            o_m = m0 + tl.arange(0, BLOCK_M)
            m_m = o_m < M
            rows64 = o_m.to(tl.int64)
            b_dyt = tl.load(dy_ptr + rows64[None, :] * stride_dym + i_n[:, None] * stride_dyn,
                            mask=m_n[:, None] & m_m[None, :], other=0.0)  # dY^T tile [BS_N, BLOCK_M]
            if UPCAST:
                b_dyt = b_dyt.to(tl.float32)
            b_x = _sddmm_x_tile(x_ptr, rows64, m_m, col_ptr, p0, cnt, stride_xm, stride_xk, K, 0, BS_K)
            if UPCAST:
                b_x = b_x.to(tl.float32)
            acc0 = tl.dot(b_dyt, b_x, acc0, input_precision=PRECISION, out_dtype=tl.float32)
            if GROUP >= 2:
                b_x = _sddmm_x_tile(x_ptr, rows64, m_m, col_ptr, p0, cnt, stride_xm, stride_xk, K, 1, BS_K)
                if UPCAST:
                    b_x = b_x.to(tl.float32)
                acc1 = tl.dot(b_dyt, b_x, acc1, input_precision=PRECISION, out_dtype=tl.float32)
            if GROUP >= 4:
                b_x = _sddmm_x_tile(x_ptr, rows64, m_m, col_ptr, p0, cnt, stride_xm, stride_xk, K, 2, BS_K)
                if UPCAST:
                    b_x = b_x.to(tl.float32)
                acc2 = tl.dot(b_dyt, b_x, acc2, input_precision=PRECISION, out_dtype=tl.float32)
                b_x = _sddmm_x_tile(x_ptr, rows64, m_m, col_ptr, p0, cnt, stride_xm, stride_xk, K, 3, BS_K)
                if UPCAST:
                    b_x = b_x.to(tl.float32)
                acc3 = tl.dot(b_dyt, b_x, acc3, input_precision=PRECISION, out_dtype=tl.float32)
        _sddmm_store(dv_ptr, acc0, p0, cnt, stride_db, stride_do, stride_di, 0, BS_N, BS_K)
        if GROUP >= 2:
            _sddmm_store(dv_ptr, acc1, p0, cnt, stride_db, stride_do, stride_di, 1, BS_N, BS_K)
        if GROUP >= 4:
            _sddmm_store(dv_ptr, acc2, p0, cnt, stride_db, stride_do, stride_di, 2, BS_N, BS_K)
            _sddmm_store(dv_ptr, acc3, p0, cnt, stride_db, stride_do, stride_di, 3, BS_N, BS_K)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _check_common(what: str, x: torch.Tensor, values: torch.Tensor) -> tuple[int, int]:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"{what}: values dtype {values.dtype} must equal x dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if values.dim() != 3:
        raise ValueError(f"{what}: values must be [nnz, BS_N, BS_K], got shape {tuple(values.shape)}")
    bs_n, bs_k = values.shape[1], values.shape[2]
    for side in (bs_n, bs_k):
        if side not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {side}")
    return bs_n, bs_k


def _fwd_args(x, values, crow, col, block_index, bias, y, ws, *, blocks_transposed: bool, allow_tf32: bool,
              n_block_cols: int) -> dict:
    """Keyword arguments of ``_bsr_dense_mm_kernel`` for one call (launcher and AOT check)."""
    M, K = x.shape
    s_vb, s_vo, s_vi = values.stride()
    bs_n, bs_k = values.shape[1], values.shape[2]
    if blocks_transposed:
        s_vo, s_vi = s_vi, s_vo
        bs_n, bs_k = bs_k, bs_n
    n_block_rows = crow.shape[0] - 1
    nnz = col.shape[0]
    return dict(
        x_ptr=x, v_ptr=values, crow_ptr=crow, col_ptr=col, bidx_ptr=block_index if block_index is not None else col,
        bias_ptr=bias if bias is not None else y, y_ptr=y, ws_ptr=ws,
        M=M, N=y.shape[1], K=K,
        M_BUCKET=pow2_bucket(M), DENSITY_BUCKET=density_bucket(nnz / max(1, n_block_rows * n_block_cols)),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_vb=s_vb, stride_vo=s_vo, stride_vi=s_vi,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        BS_N=bs_n, BS_K=bs_k, HAS_BIAS=bias is not None, HAS_BIDX=block_index is not None, COL_CHUNK=COL_CHUNK,
        UPCAST=needs_upcast(x.dtype), PRECISION=_precision(x.dtype, allow_tf32),
    )


def _reduce_args(ws, bias, y, split: int) -> dict:
    """Keyword arguments of ``_bsr_split_reduce_kernel``."""
    return dict(ws_ptr=ws, bias_ptr=bias if bias is not None else y, y_ptr=y, M=y.shape[0], N=y.shape[1],
                stride_ym=y.stride(0), stride_yn=y.stride(1), SPLIT=split, HAS_BIAS=bias is not None,
                BLOCK_M=16, BLOCK_N=128)


def bsr_dense_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    blocks_transposed: bool = False,
    block_index: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``y[M, out_features] = x[M, K] @ W^T + bias`` for block-sparse ``W``.

    Args:
        x: ``[M, K]`` activations (any strides), fp16/bf16/fp32.
        values: ``[nnz_stored, BS_N, BS_K]`` blocks (square, or panels from :func:`bsr_to_panels`),
            same dtype as ``x``.
        crow_indices: ``[ceil(out_features/BS_N) + 1]`` int32/int64 row pointers.
        col_indices: ``[nnz]`` block-column of each position.
        out_features: ``N``; the last block row may be padded past it.
        bias: optional ``[N]``.
        blocks_transposed: use each stored block transposed (``[in, out]``), for ``dX = dY @ W``.
        block_index: optional ``[nnz]`` map from position to stored block (transposed structure).
        allow_tf32: tf32 tensor cores for fp32 inputs.
        config: run this config (``BLOCK_M``, ``BLOCK_K``, ``SPLIT``, ``SWAP``) instead of
            autotuning; tests use it to exercise every entry of the table in the interpreter.
    """
    what = "bsr_dense_mm"
    bs_n, bs_k = _check_common(what, x, values)
    if blocks_transposed:
        bs_n, bs_k = bs_k, bs_n
    tensors = [x, values, crow_indices, col_indices] + [t for t in (bias, block_index) if t is not None]
    check_launchable(*tensors, what=what)
    M, K = x.shape
    n_block_rows = crow_indices.numel() - 1
    if n_block_rows != cdiv(out_features, bs_n):
        raise ValueError(
            f"{what}: crow_indices has {n_block_rows} block rows, expected ceil({out_features}/{bs_n})"
        )
    if col_indices.numel() != (block_index.numel() if block_index is not None else values.shape[0]):
        raise ValueError(
            f"{what}: col_indices has {col_indices.numel()} entries but there are "
            f"{values.shape[0] if block_index is None else block_index.numel()} blocks"
        )
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"{what}: bias must be [{out_features}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if config is not None and not (bs_k % config.kwargs["BLOCK_K"] == 0):
        raise ValueError(f"{what}: config BLOCK_K={config.kwargs['BLOCK_K']} must divide the block size {bs_k}")
    y = torch.empty((M, out_features), dtype=x.dtype, device=x.device)
    if M == 0 or out_features == 0:
        return y
    if config is not None:
        split_max = config.kwargs.get("SPLIT", 1)
    elif INTERPRET:
        split_max = 1
    else:
        split_max = _max_split(bs_n, bs_k, pow2_bucket(M), x.element_size())
    ws = torch.empty((split_max, M, out_features), dtype=torch.float32, device=x.device) if split_max > 1 else y
    args = _fwd_args(x, values, crow_indices, col_indices, block_index, bias, y, ws, blocks_transposed=blocks_transposed,
                     allow_tf32=allow_tf32, n_block_cols=cdiv(K, bs_k))
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]), n_block_rows, meta["SPLIT"])  # noqa: E731
    cfg = None if config is None else _fwd_config(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"], config.num_warps,
                                                  config.num_stages, config.kwargs.get("SPLIT", 1),
                                                  config.kwargs.get("SWAP", 0))
    split = launch(_bsr_dense_mm_kernel, grid, args, cfg).kwargs["SPLIT"]
    if split > 1:
        rargs = _reduce_args(ws, bias, y, split)
        launch(_bsr_split_reduce_kernel, (cdiv(M, rargs["BLOCK_M"]), cdiv(out_features, rargs["BLOCK_N"])),
               rargs, num_warps=4)
    return y


def sddmm_group(bs_n: int, bs_k: int) -> int:
    """Blocks per SDDMM program: 4 for blocks of <= 32x32, 2 up to 64x64 (the fp32 accumulators of the
    group stay within 64 registers a thread), else 1."""
    return 4 if bs_n * bs_k <= 32 * 32 else (2 if bs_n * bs_k <= 64 * 64 else 1)


def sddmm_groups(rows: torch.Tensor, n_block_rows: int, group: int, sorted_rows: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SDDMM work list: ``(start, row, count)`` per program, each a run of up to ``group``
    consecutive stored blocks of one block row (consecutive in BSR order; any order works). Built with
    tensor ops only, no host synchronisation: the list has a fixed upper-bound length, ``nnz // group
    + n_block_rows`` when the caller vouches that ``rows`` is sorted (``sorted_rows``: at most one
    partial group per row), else ``nnz``; its unused tail has count 0. The op layer may cache it with
    the weight structure."""
    nnz = rows.numel()
    device = rows.device
    rows = rows.to(torch.int64)
    p = torch.arange(nnz, device=device)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]  # a run of equal rows starts here
    local = p - torch.cummax(torch.where(first, p, 0), 0).values  # index of each block within its run
    heads = (local % group == 0).to(torch.int64)
    n_runs = n_block_rows if sorted_rows else nnz
    gid = torch.cumsum(heads, 0) - 1
    size = nnz if group == 1 else min(nnz, nnz // group + n_runs)
    start = torch.full((size,), nnz, dtype=torch.int64, device=device).scatter_reduce_(0, gid, p, reduce="amin")
    grow = torch.zeros(size, dtype=torch.int64, device=device).scatter_reduce_(0, gid, rows, reduce="amax")
    count = torch.zeros(size, dtype=torch.int32, device=device).scatter_add_(0, gid, torch.ones_like(gid, dtype=torch.int32))
    return start, grow, count


def _sddmm_args(dy, x, groups, cols, dv, *, allow_tf32: bool, group: int) -> dict:
    """Keyword arguments of ``_bsr_sddmm_kernel`` (launcher and AOT check); ``groups`` from :func:`sddmm_groups`."""
    start, grow, count = groups
    return dict(
        dy_ptr=dy, x_ptr=x, gstart_ptr=start, grow_ptr=grow, gcount_ptr=count, col_ptr=cols, dv_ptr=dv,
        M=dy.shape[0], N=dy.shape[1], K=x.shape[1], M_BUCKET=pow2_bucket(dy.shape[0]),
        stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_db=dv.stride(0), stride_do=dv.stride(1), stride_di=dv.stride(2),
        BS_N=dv.shape[1], BS_K=dv.shape[2], GROUP=group, UPCAST=needs_upcast(x.dtype),
        PRECISION=_precision(x.dtype, allow_tf32),
    )


def bsr_sddmm(
    dy: torch.Tensor,
    x: torch.Tensor,
    row_indices: torch.Tensor,
    col_indices: torch.Tensor,
    block_size,
    *,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
    group: int | None = None,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``dvalues[p] = dy[:, r_p block]^T @ x[:, c_p block]`` for every stored block ``p``.

    Args:
        dy: ``[M, N]`` output gradient.
        x: ``[M, K]`` forward input.
        row_indices / col_indices: ``[nnz]`` block row / column of each stored block.
        block_size: ``BS``, or ``(BS_N, BS_K)`` for rectangular blocks (panels).
        config: run this config (``BLOCK_M``) instead of autotuning.
        group: blocks of one row per program (1, 2 or 4); default :func:`sddmm_group`.
        groups: the work list ``sddmm_groups(row_indices, ..., group)`` if the caller caches it.
    Returns:
        ``[nnz, BS_N, BS_K]`` in ``x.dtype``; rows/cols past ``N``/``K`` (padding) are zero.
    """
    what = "bsr_sddmm"
    bs_n, bs_k = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if dy.dtype not in SUPPORTED_DTYPES or x.dtype != dy.dtype:
        raise TypeError(f"{what}: dy and x must share one of {SUPPORTED_DTYPES}, got {dy.dtype} and {x.dtype}")
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"{what}: dy [M, N] and x [M, K] must be 2-D with equal M, got {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    if bs_n not in SUPPORTED_BLOCK_SIZES or bs_k not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if row_indices.numel() != col_indices.numel():
        raise ValueError(
            f"{what}: row_indices ({row_indices.numel()}) and col_indices ({col_indices.numel()}) differ in length"
        )
    if group not in (None, 1, 2, 4):
        raise ValueError(f"{what}: group must be 1, 2 or 4, got {group}")
    check_launchable(dy, x, row_indices, col_indices, what=what)
    nnz = col_indices.numel()
    M = dy.shape[0]
    dv = torch.empty((nnz, bs_n, bs_k), dtype=x.dtype, device=x.device)
    if nnz == 0:
        return dv
    if M == 0:
        return dv.zero_()
    if group is None:
        group = sddmm_group(bs_n, bs_k)
    if groups is None:
        groups = sddmm_groups(row_indices, cdiv(dy.shape[1], bs_n), group)
    args = _sddmm_args(dy, x, groups, col_indices, dv, allow_tf32=allow_tf32, group=group)
    launch(_bsr_sddmm_kernel, (groups[0].numel(),), args, config)
    return dv


def bsr_to_panels(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, panel_rows: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Re-block a square-block BSR weight into panels of ``panel_rows`` output rows.

    Each panel is the ``panel_rows / BS`` consecutive block rows of one panel row, kept at every
    block column where any of them holds a block (missing blocks are zero-filled). The forward
    kernel then computes a ``BLOCK_M x panel_rows`` output tile per program (wgmma m64n128 instead
    of m64n32 for BS = 32), reading each x tile once per panel instead of once per block row.

    Returns ``(values [nnz_p, panel_rows, BS], crow [ceil(nbr*BS/panel_rows) + 1], col [nnz_p],
    fill)``, where ``fill = nnz_p * panel_rows / (nnz * BS)`` is the factor by which the stored
    (and multiplied) elements grow: worth it for structured masks (fill near 1), not for random ones.
    The zero-filled blocks are not a sparsity mask: this is an inference format (training through
    it would let the filled blocks grow).
    """
    bs = values.shape[1]
    if values.dim() != 3 or values.shape[2] != bs:
        raise ValueError(f"bsr_to_panels: values must be square blocks [nnz, BS, BS], got {tuple(values.shape)}")
    if panel_rows % bs or panel_rows not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"bsr_to_panels: panel_rows must be one of {SUPPORTED_BLOCK_SIZES} and a multiple of {bs}, "
                         f"got {panel_rows}")
    r = panel_rows // bs
    nbr = crow_indices.numel() - 1
    n_panels = -(-nbr // r)
    device = values.device
    crow = crow_indices.to(torch.int64)
    col = col_indices.to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(nbr, device=device), crow[1:] - crow[:-1])
    n_cols = int(col.max().item()) + 1 if col.numel() else 1
    key = (rows // r) * n_cols + col
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    out = values.new_zeros(uniq.numel(), r, bs, bs)
    out[inverse, rows % r] = values
    counts = torch.bincount(uniq // n_cols, minlength=n_panels)
    crow_p = torch.zeros(n_panels + 1, dtype=torch.int64, device=device)
    crow_p[1:] = torch.cumsum(counts, 0)
    fill = uniq.numel() * r / max(1, values.shape[0])
    return out.reshape(uniq.numel(), r * bs, bs), crow_p.to(crow_indices.dtype), (uniq % n_cols).to(col_indices.dtype), fill
