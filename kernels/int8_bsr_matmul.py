"""int8 block-sparse (BSR) weight x int8 activation matmul with a fused dequantizing epilogue.

``y[M, N] = act((x_q @ W_q^T) * x_scale[:, None] * w_scale[None, :] + bias)`` where ``x_q [M, K]`` is
int8 quantized per token (``x_scale [M]``) and ``W_q [N, K]`` is an int8 weight stored as block-sparse
rows: ``values_q [nnz, B, B]`` (each block oriented ``[out, in]``), ``crow_indices [ceil(N/B) + 1]``
and ``col_indices [nnz]`` (the layout of ``accel.formats``), with a scale per output channel
(``w_scale [N]``). The products accumulate in int32 (exact while ``K <= MAX_K``); the epilogue runs in
fp32 in the order of ``accel.quant.apply_epilogue``: ``((acc * x_scale) * w_scale) + bias``, then the
activation ("relu" keeps NaN, "gelu" is the erf GELU). ``out_dtype=torch.int32`` stores the raw
accumulator.

One program owns an output tile of ``BLOCK_M`` tokens x ``BLOCK_N`` output channels of one block row
(``BLOCK_N`` divides ``B``: a large block row may be split over several programs) and walks the
nonzero blocks of that block row in one flat loop of ``BLOCK_K``-wide K steps, so Triton software
pipelines the gathers (16-byte ``cp.async`` on sm_80/sm_90) across block boundaries. Two
orientations of the same tile, chosen by the ``SWAP`` constexpr of the config:

* ``SWAP=0`` (large M): ``acc[BLOCK_M, BLOCK_N] += x[BLOCK_M, BLOCK_K] @ Wblk^T[BLOCK_K, BLOCK_N]``.
  ``ROWS > 1`` makes a program own several consecutive block-row tiles, one after the other.
* ``SWAP=1`` (decode-sized M <= 32): ``acc[BLOCK_N, BLOCK_M] += Wblk[BLOCK_N, BLOCK_K] @ x^T``, so the
  weight block is the MMA's M side (sm_90 ``wgmma`` needs 64 rows there) and a 16-token batch is
  its N side; the accumulator is transposed before the epilogue.

Block sizes 16, 32, 64 and 128. A K step is a ``BLOCK_K`` slice of one stored block when
``BLOCK_K <= B``, else it gathers ``BLOCK_K / B`` consecutive stored blocks of the block row (their
columns may be anywhere). That is how ``B = 16`` meets NVIDIA's int8 MMA minimum K tile of 32, and
how small blocks still fill tiles big enough for 16-byte copies.

The autotuner is keyed on ``M_BUCKET`` (next power of two of M, at least 16), not on M itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import bind, cdiv, check_launchable, launch, pick_configs, pow2_bucket

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}
#: largest K whose int32 accumulation cannot overflow for any int8 inputs (|-128 * -128| = 2**14)
MAX_K = (2**31 - 1) // (128 * 128)
#: the int8 tl.dot needs a K tile >= 32 on NVIDIA (triton's nvidia backend, min_dot_size)
MIN_BLOCK_K = 32
#: largest M for which the swapped (weight-as-MMA-M) configs are considered
SWAP_MAX_M = 32

# ---------------------------------------------------------------------------------------------
# Autotune tables, one per block size B: (BLOCK_M, BLOCK_N, BLOCK_K, SWAP, ROWS, num_warps, num_stages).
# BLOCK_N <= B (BLOCK_N < B splits a block row over B / BLOCK_N programs). BLOCK_K > B gathers
# BLOCK_K / B blocks per K step. Every operand tile holds >= 16 bytes per thread
# (rows * BLOCK_K >= 512 * num_warps), otherwise Triton cannot issue 16-byte cp.async copies.
# 256 x 128 tiles at B = 128 were dropped: the AOT check measured register spills.
# ---------------------------------------------------------------------------------------------
CONFIG_TABLES = {
    16: [
        (16, 16, 128, 1, 1, 4, 4),
        (32, 16, 128, 1, 1, 4, 3),
        (64, 16, 128, 0, 1, 4, 4),
        (128, 16, 128, 0, 1, 4, 3),
        (128, 16, 256, 0, 2, 8, 3),
    ],
    32: [
        (16, 32, 128, 1, 1, 4, 4),
        (32, 32, 128, 1, 1, 4, 3),
        (64, 32, 64, 0, 1, 4, 4),
        (128, 32, 128, 0, 1, 4, 3),
        (128, 32, 128, 0, 2, 8, 3),
    ],
    64: [
        (16, 32, 128, 1, 1, 4, 4),
        (16, 64, 128, 1, 1, 4, 4),
        (32, 64, 128, 1, 1, 4, 3),
        (64, 64, 64, 0, 1, 4, 4),
        (128, 64, 64, 0, 1, 4, 3),
        (128, 64, 128, 0, 1, 8, 3),
        (256, 64, 64, 0, 1, 8, 3),
    ],
    128: [
        (16, 32, 128, 1, 1, 4, 4),
        (16, 64, 128, 1, 1, 4, 4),
        (16, 128, 128, 1, 1, 4, 3),
        (32, 64, 128, 1, 1, 4, 3),
        (64, 128, 64, 0, 1, 4, 4),
        (128, 128, 64, 0, 1, 8, 3),
        (128, 64, 128, 0, 2, 8, 3),
    ],
}
#: interpreter: one config, legal for every block size as it is (the autotuner does not prune a
#: single config)
INTERPRET_CONFIG = (16, 16, 32, 0, 1, 4, 1)


def _config(m, n, k, swap, rows, w, s) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP": swap, "ROWS": rows}, num_warps=w, num_stages=s)


def _key(c: triton.Config) -> tuple:
    kw = c.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["SWAP"], kw["ROWS"], c.num_warps, c.num_stages)


def configs_for_block(bs: int) -> list[triton.Config]:
    """The runtime configs of block size ``bs`` (what a GPU autotunes over; tests and AOT use them)."""
    return [_config(*row) for row in CONFIG_TABLES[bs]]


def gpu_configs() -> list[triton.Config]:
    """Every config of every block size, deduplicated."""
    rows = dict.fromkeys(row for bs in SUPPORTED_BLOCK_SIZES for row in CONFIG_TABLES[bs])
    return [_config(*row) for row in rows]


def configs() -> list[triton.Config]:
    """What the autotuner holds: all tables on a GPU, one config in the interpreter."""
    return pick_configs(gpu_configs(), _config(*INTERPRET_CONFIG))


def m_bucket(m: int) -> int:
    """The autotuning key of M: the next power of two, at least 16."""
    return max(16, pow2_bucket(max(m, 1)))


def prune_for(bs: int, bucket: int, configs: list[triton.Config] | None = None) -> list[triton.Config]:
    """Configs worth timing for block size ``bs`` and ``M_BUCKET = bucket``: those of ``bs``'s table
    (among ``configs``) with no M tile larger than the bucket, swapped ones only for
    ``bucket <= SWAP_MAX_M``; never empty (the smallest M tiles stay)."""
    table = {tuple(row) for row in CONFIG_TABLES[bs]}
    cands = [c for c in (configs if configs is not None else gpu_configs()) if _key(c) in table]
    keep = [c for c in cands if c.kwargs["BLOCK_M"] <= bucket and (not c.kwargs["SWAP"] or bucket <= SWAP_MAX_M)]
    if not keep:
        smallest = min(c.kwargs["BLOCK_M"] for c in cands)
        keep = [c for c in cands if c.kwargs["BLOCK_M"] == smallest]
    return keep


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # constexprs arrive as keyword arguments, sizes positionally
    return prune_for(args["BS"], args["M_BUCKET"], configs)


def check_config(config: triton.Config, bs: int, what: str = "int8_bsr_mm") -> None:
    """A forced config must be legal for block size ``bs`` as given."""
    kw = config.kwargs
    missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "SWAP", "ROWS"} - set(kw)
    if missing:
        raise ValueError(f"{what}: config lacks {sorted(missing)}")
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = kw[name]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{what}: config {name}={v} must be a power of two >= 16")
    if kw["BLOCK_N"] > bs:
        raise ValueError(f"{what}: config BLOCK_N={kw['BLOCK_N']} must not exceed the block size {bs}")
    if kw["BLOCK_K"] < MIN_BLOCK_K:
        raise ValueError(f"{what}: config BLOCK_K={kw['BLOCK_K']} is below 32, the smallest int8 tensor-core K tile on NVIDIA")
    if kw["SWAP"] not in (0, 1) or kw["ROWS"] < 1:
        raise ValueError(f"{what}: config SWAP must be 0 or 1 and ROWS >= 1, got {kw['SWAP']} and {kw['ROWS']}")


# ---------------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _activate(out, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # relu that keeps NaN (tl.maximum would drop it)
        out = tl.where(out < 0.0, 0.0, out)
    elif ACTIVATION == 2:  # exact (erf) GELU, as F.gelu
        out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
    return out


@triton.autotune(configs=configs(), key=["M_BUCKET", "N", "K", "BS", "OUT_INT32"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _int8_bsr_mm_kernel(
    x_ptr, xs_ptr, v_ptr, ws_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET only keys the autotuner
    stride_xm, stride_xk,
    stride_vb, stride_vo, stride_vi,  # block, out-within-block, in-within-block
    stride_ym, stride_yn,
    BS: tl.constexpr,
    HAS_X_SCALE: tl.constexpr,
    HAS_W_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWAP: tl.constexpr,
    ROWS: tl.constexpr,
):
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    p_x_rows = x_ptr + o_m.to(tl.int64) * stride_xm  # [BLOCK_M]
    n_tiles = tl.cdiv(N, BS) * (BS // BLOCK_N)

    for r in tl.static_range(ROWS):
        t = tl.program_id(1) * ROWS + r
        if t < n_tiles:
            row = t // (BS // BLOCK_N)  # block row of W
            n0 = (t % (BS // BLOCK_N)) * BLOCK_N  # first output channel of the tile inside the block
            start = tl.load(crow_ptr + row)
            end = tl.load(crow_ptr + row + 1)
            if SWAP:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            if BLOCK_K <= BS:
                # a K step is a BLOCK_K slice of one stored block; (block, slice) pairs in one flat loop
                for it in range(start * (BS // BLOCK_K), end * (BS // BLOCK_K)):
                    p = it // (BS // BLOCK_K)
                    kk = (it % (BS // BLOCK_K)) * BLOCK_K
                    c = tl.load(col_ptr + p)
                    i_k = c * BS + kk + o_k
                    m_k = i_k < K
                    p_v = v_ptr + p.to(tl.int64) * stride_vb + (n0 + o_n) * stride_vo  # [BLOCK_N]
                    if SWAP:
                        b_w = tl.load(p_v[:, None] + (kk + o_k)[None, :] * stride_vi)  # [BLOCK_N, BLOCK_K]
                        b_x = tl.load(p_x_rows[None, :] + i_k[:, None] * stride_xk,
                                      mask=m_k[:, None] & m_m[None, :], other=0)  # [BLOCK_K, BLOCK_M]
                        acc = tl.dot(b_w, b_x, acc, out_dtype=tl.int32)
                    else:
                        b_x = tl.load(p_x_rows[:, None] + i_k[None, :] * stride_xk,
                                      mask=m_m[:, None] & m_k[None, :], other=0)  # [BLOCK_M, BLOCK_K]
                        b_w = tl.load(p_v[None, :] + (kk + o_k)[:, None] * stride_vi)  # [BLOCK_K, BLOCK_N]
                        acc = tl.dot(b_x, b_w, acc, out_dtype=tl.int32)
            else:
                # a K step gathers BLOCK_K // BS consecutive stored blocks of the block row
                o_kb = o_k % BS
                for q in range(start, end, BLOCK_K // BS):
                    p_k = q + o_k // BS  # stored block of each K lane
                    v_k = p_k < end
                    c_k = tl.load(col_ptr + p_k, mask=v_k, other=0)
                    i_k = tl.max_contiguous(tl.multiple_of(c_k * BS + o_kb, BS), BS)
                    m_k = v_k & (i_k < K)
                    off_v = p_k.to(tl.int64) * stride_vb + o_kb * stride_vi  # [BLOCK_K]
                    if SWAP:
                        b_w = tl.load(v_ptr + (n0 + o_n)[:, None] * stride_vo + off_v[None, :], mask=v_k[None, :], other=0)
                        b_x = tl.load(p_x_rows[None, :] + i_k[:, None] * stride_xk,
                                      mask=m_k[:, None] & m_m[None, :], other=0)
                        acc = tl.dot(b_w, b_x, acc, out_dtype=tl.int32)
                    else:
                        b_x = tl.load(p_x_rows[:, None] + i_k[None, :] * stride_xk,
                                      mask=m_m[:, None] & m_k[None, :], other=0)
                        b_w = tl.load(v_ptr + (n0 + o_n)[None, :] * stride_vo + off_v[:, None], mask=v_k[:, None], other=0)
                        acc = tl.dot(b_x, b_w, acc, out_dtype=tl.int32)
            if SWAP:
                acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]

            i_n = row * BS + n0 + o_n
            m_n = i_n < N
            p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + i_n[None, :] * stride_yn
            if OUT_INT32:
                tl.store(p_y, acc, mask=m_m[:, None] & m_n[None, :])
            else:
                out = acc.to(tl.float32)
                if HAS_X_SCALE:
                    out = out * tl.load(xs_ptr + o_m, mask=m_m, other=0.0)[:, None]
                if HAS_W_SCALE:
                    out = out * tl.load(ws_ptr + i_n, mask=m_n, other=0.0)[None, :]
                if HAS_BIAS:
                    out = out + tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
                out = _activate(out, ACTIVATION)
                tl.store(p_y, out.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------
_MAX_GRID_1 = 65535


def int8_bsr_mm(
    x_q: torch.Tensor,
    x_scale: torch.Tensor | None,
    values_q: torch.Tensor,
    w_scale: torch.Tensor | None,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``act((x_q @ W_q^T) * x_scale[:, None] * w_scale[None, :] + bias)`` for a block-sparse int8 ``W_q``.

    Args:
        x_q: ``[M, K]`` int8 activations quantized per row, any strides (unit K stride is the fast case).
        x_scale: ``[M]`` float32 per-row scale (a NaN scale makes that row's outputs NaN), or None.
        values_q: ``[nnz, B, B]`` int8 stored blocks, each ``[out, in]``; B in 16, 32, 64, 128.
        w_scale: ``[out_features]`` float32 per-output-channel scale, or None.
        crow_indices: ``[ceil(out_features / B) + 1]`` int32/int64 block-row pointers.
        col_indices: ``[nnz]`` int32/int64 block column of each stored block (``< ceil(K / B)``, not
            checked: that would synchronise with the device).
        out_features: ``N``; the last block row may be padded past it (padding rows are never stored to).
        bias: optional float ``[N]`` (any float dtype, added in fp32).
        activation: "none", "relu" (keeps NaN) or "gelu" (erf).
        out_dtype: fp16, bf16 or fp32 output, or ``torch.int32`` for the raw exact accumulator
            ``x_q @ W_q^T`` (then scales and bias must be None and activation "none").
        config: run this ``triton.Config`` (keys BLOCK_M, BLOCK_N, BLOCK_K, SWAP, ROWS) instead of
            autotuning; it must be legal for B as given (see :func:`configs_for_block`).
    Returns:
        ``[M, out_features]`` of ``out_dtype``.
    Raises:
        TypeError: wrong dtypes. ValueError: wrong shapes, block size, device, K > MAX_K, activation.
    """
    what = "int8_bsr_mm"
    if x_q.dtype != torch.int8:
        raise TypeError(f"{what}: x_q must be int8, got {x_q.dtype}")
    if values_q.dtype != torch.int8:
        raise TypeError(f"{what}: values_q must be int8, got {values_q.dtype}")
    for name, idx in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{what}: {name} must be int32 or int64, got {idx.dtype}")
        if idx.dim() != 1:
            raise ValueError(f"{what}: {name} must be 1-D, got shape {tuple(idx.shape)}")
    if x_q.dim() != 2:
        raise ValueError(f"{what}: x_q must be 2-D [M, K], got shape {tuple(x_q.shape)}")
    if values_q.dim() != 3 or values_q.shape[1] != values_q.shape[2]:
        raise ValueError(f"{what}: values_q must be [nnz, B, B], got shape {tuple(values_q.shape)}")
    bs = values_q.shape[1]
    if bs not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {bs}")
    M, K = x_q.shape
    N = int(out_features)
    if N < 0:
        raise ValueError(f"{what}: out_features must be >= 0, got {N}")
    if K > MAX_K:
        raise ValueError(f"{what}: K={K} exceeds {MAX_K}, where int32 accumulation of int8 products may overflow")
    n_block_rows = crow_indices.numel() - 1
    if n_block_rows != cdiv(N, bs):
        raise ValueError(f"{what}: crow_indices has {n_block_rows} block rows, expected ceil({N}/{bs})")
    if col_indices.numel() != values_q.shape[0]:
        raise ValueError(f"{what}: col_indices has {col_indices.numel()} entries "
                         f"but values_q holds {values_q.shape[0]} blocks")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    out_int32 = out_dtype == torch.int32
    if out_int32:
        if x_scale is not None or w_scale is not None or bias is not None or activation != "none":
            raise ValueError(f"{what}: out_dtype=torch.int32 returns the raw int32 accumulator; "
                             "it takes no x_scale, w_scale, bias or activation (pass None / 'none')")
    elif out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: out_dtype must be torch.int32 or one of {FLOAT_DTYPES}, got {out_dtype}")
    if x_scale is not None and (x_scale.shape != (M,) or x_scale.dtype != torch.float32):
        raise ValueError(f"{what}: x_scale must be [{M}] float32, got {tuple(x_scale.shape)} {x_scale.dtype}")
    if w_scale is not None and (w_scale.shape != (N,) or w_scale.dtype != torch.float32):
        raise ValueError(f"{what}: w_scale must be [{N}] float32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in FLOAT_DTYPES):
        raise ValueError(f"{what}: bias must be a float [{N}], got {tuple(bias.shape)} {bias.dtype}")
    if config is not None:
        check_config(config, bs, what)
    check_launchable(x_q, values_q, crow_indices, col_indices,
                     *(t for t in (x_scale, w_scale, bias) if t is not None), what=what)

    y = torch.empty((M, N), dtype=out_dtype, device=x_q.device)
    if M == 0 or N == 0:
        return y

    def grid(meta):
        groups = cdiv(n_block_rows * (bs // meta["BLOCK_N"]), meta["ROWS"])
        if groups > _MAX_GRID_1:
            raise ValueError(f"{what}: {groups} output tiles exceed the grid limit {_MAX_GRID_1}; "
                             "use a larger block size or fewer output features")
        return (cdiv(M, meta["BLOCK_M"]), groups)

    launch(_int8_bsr_mm_kernel, grid, bind(
        _int8_bsr_mm_kernel,
        x_q, x_scale if x_scale is not None else y, values_q, w_scale if w_scale is not None else y,
        crow_indices, col_indices, bias if bias is not None else y, y,
        M, N, K, m_bucket(M),
        x_q.stride(0), x_q.stride(1),
        *values_q.stride(),
        y.stride(0), y.stride(1),
        BS=bs,
        HAS_X_SCALE=x_scale is not None,
        HAS_W_SCALE=w_scale is not None,
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATIONS[activation],
        OUT_INT32=out_int32,
    ), config)
    return y
