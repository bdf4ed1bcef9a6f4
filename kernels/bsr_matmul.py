"""Block-sparse (BSR) weight x dense activation matmul, forward and backward.

The weight ``W`` of shape ``[N, K]`` is stored as block-sparse rows with square blocks of size
``BS``: ``values [nnz, BS, BS]`` (each block oriented ``[out, in]``), ``col_indices [nnz]`` and
``crow_indices [N/BS + 1]``. Three launchers, all pure functions on tensors:

* :func:`bsr_dense_mm` computes ``y = x @ W^T (+ bias)``. One program owns a ``BLOCK_M x BS``
  output tile: it walks the nonzero blocks of its block row and feeds ``tl.dot`` with the matching
  ``BLOCK_M x BLOCK_K`` slice of ``x``. With ``blocks_transposed=True`` and a ``block_index`` that
  maps the transposed structure to the stored blocks, the same kernel computes ``dX = dY @ W``
  without materialising ``W^T``.
* :func:`bsr_sddmm` computes ``dW`` only at the stored blocks: block ``p`` at ``(r, c)`` gets
  ``dY[:, r-block]^T @ X[:, c-block]`` (a sampled dense-dense matmul), one program per block.

Accumulation is fp32 for fp16/bf16/fp32 inputs. fp32 inputs use IEEE fp32 FMA unless
``allow_tf32`` (then tf32 tensor cores, as ``torch.backends.cuda.matmul.allow_tf32``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_launchable, config_kwargs, kernel_for, needs_upcast, pick_configs

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------
# Autotune tables. BLOCK_N is the sparse block size itself; BLOCK_K is clamped to it when the
# table entry is larger (see _prune_fwd). Shapes follow the tile sizes of the Triton matmul
# tutorial, with small-M entries for decode-sized batches.
# ---------------------------------------------------------------------------------------------
#: (BLOCK_M, BLOCK_K, num_warps, num_stages)
FWD_CONFIG_TABLE = [
    (16, 32, 4, 3),
    (16, 64, 4, 4),
    (32, 32, 4, 4),
    (64, 32, 4, 4),
    (64, 64, 4, 3),
    (128, 32, 8, 3),
    (128, 64, 8, 3),
]
#: interpreter: one config, valid for every block size (BLOCK_K <= 16)
FWD_INTERPRET_CONFIG = (32, 16, 4, 1)

#: (BLOCK_M, num_warps, num_stages) for the SDDMM (dW) kernel
SDDMM_CONFIG_TABLE = [
    (32, 4, 3),
    (64, 4, 3),
    (64, 8, 3),
    (128, 8, 2),
]
SDDMM_INTERPRET_CONFIG = (32, 4, 1)


def _fwd_config(m: int, k: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _sddmm_config(m: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)


def gpu_fwd_configs() -> list[triton.Config]:
    """The whole forward table (what a GPU autotunes over, what the AOT check compiles)."""
    return [_fwd_config(*row) for row in FWD_CONFIG_TABLE]


def gpu_sddmm_configs() -> list[triton.Config]:
    return [_sddmm_config(*row) for row in SDDMM_CONFIG_TABLE]


def fwd_configs() -> list[triton.Config]:
    """What the autotuner holds: the whole table on a GPU, one config in the interpreter."""
    return pick_configs(gpu_fwd_configs(), _fwd_config(*FWD_INTERPRET_CONFIG))


def sddmm_configs() -> list[triton.Config]:
    return pick_configs(gpu_sddmm_configs(), _sddmm_config(*SDDMM_INTERPRET_CONFIG))


def fwd_configs_for_block(bs: int, configs: list[triton.Config] | None = None) -> list[triton.Config]:
    """The forward configs that apply to block size ``bs``, deduplicated: BLOCK_K is clamped to
    ``bs``, and for ``bs = 128`` to 32 with at least 8 warps and at most 3 stages (the AOT check
    measured register spills with BLOCK_K = 64, 4 warps or 4 stages at that block size)."""
    out, seen = [], set()
    for c in configs if configs is not None else fwd_configs():
        big = bs >= 128
        k = min(c.kwargs["BLOCK_K"], bs, 32 if big else bs)
        w = max(c.num_warps, 8) if big else c.num_warps
        key = (c.kwargs["BLOCK_M"], k, w, min(c.num_stages, 3) if big else c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(_fwd_config(*key))
    return out


def sddmm_configs_for_block(bs: int, configs: list[triton.Config] | None = None) -> list[triton.Config]:
    """SDDMM configs for block size ``bs``: the ``[bs, bs]`` fp32 accumulator of ``bs = 128`` needs 8 warps."""
    out, seen = [], set()
    for c in configs if configs is not None else sddmm_configs():
        w = max(c.num_warps, 8) if bs >= 128 else c.num_warps
        key = (c.kwargs["BLOCK_M"], w, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(_sddmm_config(*key))
    return out


def _prune_fwd(configs, named_args, **kwargs):
    return fwd_configs_for_block(named_args["BS"], configs)


def _prune_sddmm(configs, named_args, **kwargs):
    return sddmm_configs_for_block(named_args["BS"], configs)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.autotune(configs=fwd_configs(), key=["M", "N", "K", "BS"], prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _bsr_dense_mm_kernel(
    # pointers
    x_ptr, v_ptr, crow_ptr, col_ptr, bidx_ptr, bias_ptr, y_ptr,
    # sizes: x is [M, K], y is [M, N]
    M, N, K,
    # strides
    stride_xm, stride_xk,
    stride_vb, stride_vo, stride_vi,  # block, out-within-block, in-within-block
    stride_ym, stride_yn,
    # meta
    BS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIDX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    row = tl.program_id(1)  # block row of W: output features [row*BS, row*BS + BS)

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BS)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    p_x_rows = x_ptr + o_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    for p in range(start, end):
        c = tl.load(col_ptr + p)
        if HAS_BIDX:
            blk = tl.load(bidx_ptr + p)
        else:
            blk = p
        p_v = v_ptr + blk.to(tl.int64) * stride_vb + o_n[None, :] * stride_vo
        for kk in range(0, BS, BLOCK_K):
            i_k = c * BS + kk + o_k
            b_x = tl.load(p_x_rows + i_k[None, :] * stride_xk, mask=m_m[:, None] & (i_k[None, :] < K), other=0.0)
            # [BLOCK_K, BS] slice of the block, transposed by the strides
            b_v = tl.load(p_v + (kk + o_k)[:, None] * stride_vi)
            if UPCAST:
                b_x = b_x.to(tl.float32)
                b_v = b_v.to(tl.float32)
            acc = tl.dot(b_x, b_v, acc, input_precision=PRECISION)

    i_n = row * BS + o_n
    m_n = i_n < N
    if HAS_BIAS:
        b_b = tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)
        acc += b_b[None, :]
    p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + i_n[None, :] * stride_yn
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.autotune(configs=sddmm_configs(), key=["M", "BS"], prune_configs_by={"early_config_prune": _prune_sddmm})
@triton.jit
def _bsr_sddmm_kernel(
    dy_ptr, x_ptr, row_ptr, col_ptr, dv_ptr,
    M, N, K,
    stride_dym, stride_dyn,
    stride_xm, stride_xk,
    stride_db, stride_do, stride_di,
    BS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    p = tl.program_id(0)
    r = tl.load(row_ptr + p)
    c = tl.load(col_ptr + p)
    o_b = tl.arange(0, BS)
    i_n = r * BS + o_b  # output features of this block
    i_k = c * BS + o_b  # input features of this block
    m_n = i_n < N
    m_k = i_k < K
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < M
        rows64 = o_m.to(tl.int64)
        # dY^T tile [BS, BLOCK_M] and X tile [BLOCK_M, BS]
        b_dyt = tl.load(dy_ptr + rows64[None, :] * stride_dym + i_n[:, None] * stride_dyn,
                        mask=m_n[:, None] & m_m[None, :], other=0.0)
        b_x = tl.load(x_ptr + rows64[:, None] * stride_xm + i_k[None, :] * stride_xk,
                      mask=m_m[:, None] & m_k[None, :], other=0.0)
        if UPCAST:
            b_dyt = b_dyt.to(tl.float32)
            b_x = b_x.to(tl.float32)
        acc = tl.dot(b_dyt, b_x, acc, input_precision=PRECISION)
    p_dv = dv_ptr + p.to(tl.int64) * stride_db + o_b[:, None] * stride_do + o_b[None, :] * stride_di
    tl.store(p_dv, acc.to(dv_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _check_common(what: str, x: torch.Tensor, values: torch.Tensor) -> int:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"{what}: values dtype {values.dtype} must equal x dtype {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"{what}: values must be [nnz, BS, BS], got shape {tuple(values.shape)}")
    bs = values.shape[1]
    if bs not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {bs}")
    return bs


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
        values: ``[nnz_stored, BS, BS]`` blocks, same dtype as ``x``.
        crow_indices: ``[ceil(out_features/BS) + 1]`` int32/int64 row pointers.
        col_indices: ``[nnz]`` block-column of each position.
        out_features: ``N``; the last block row may be padded past it.
        bias: optional ``[N]``.
        blocks_transposed: use each stored block transposed (``[in, out]``), for ``dX = dY @ W``.
        block_index: optional ``[nnz]`` map from position to stored block (transposed structure).
        allow_tf32: tf32 tensor cores for fp32 inputs.
        config: run this config (``BLOCK_M``, ``BLOCK_K``) instead of autotuning; tests use it to
            exercise every entry of the table in the interpreter.
    """
    what = "bsr_dense_mm"
    bs = _check_common(what, x, values)
    tensors = [x, values, crow_indices, col_indices] + [t for t in (bias, block_index) if t is not None]
    check_launchable(*tensors, what=what)
    M, K = x.shape
    n_block_rows = crow_indices.numel() - 1
    if n_block_rows != triton.cdiv(out_features, bs):
        raise ValueError(
            f"{what}: crow_indices has {n_block_rows} block rows, expected ceil({out_features}/{bs})"
        )
    if col_indices.numel() != (block_index.numel() if block_index is not None else values.shape[0]):
        raise ValueError(
            f"{what}: col_indices has {col_indices.numel()} entries but there are "
            f"{values.shape[0] if block_index is None else block_index.numel()} blocks"
        )
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"{what}: bias must be [{out_features}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if config is not None and not (bs % config.kwargs["BLOCK_K"] == 0):
        raise ValueError(f"{what}: config BLOCK_K={config.kwargs['BLOCK_K']} must divide the block size {bs}")
    y = torch.empty((M, out_features), dtype=x.dtype, device=x.device)
    if M == 0 or out_features == 0:
        return y
    s_vb, s_vo, s_vi = values.stride()
    if blocks_transposed:
        s_vo, s_vi = s_vi, s_vo
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), n_block_rows)  # noqa: E731
    kernel_for(_bsr_dense_mm_kernel, config)[grid](
        x, values, crow_indices, col_indices,
        block_index if block_index is not None else col_indices,
        bias if bias is not None else y,
        y,
        M, out_features, K,
        x.stride(0), x.stride(1),
        s_vb, s_vo, s_vi,
        y.stride(0), y.stride(1),
        BS=bs,
        HAS_BIAS=bias is not None,
        HAS_BIDX=block_index is not None,
        UPCAST=needs_upcast(x.dtype),
        PRECISION=_precision(x.dtype, allow_tf32),
        **config_kwargs(config),
    )
    return y


def bsr_sddmm(
    dy: torch.Tensor,
    x: torch.Tensor,
    row_indices: torch.Tensor,
    col_indices: torch.Tensor,
    block_size: int,
    *,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``dvalues[p] = dy[:, r_p block]^T @ x[:, c_p block]`` for every stored block ``p``.

    Args:
        dy: ``[M, N]`` output gradient.
        x: ``[M, K]`` forward input.
        row_indices / col_indices: ``[nnz]`` block row / column of each stored block.
        block_size: ``BS``.
        config: run this config (``BLOCK_M``) instead of autotuning.
    Returns:
        ``[nnz, BS, BS]`` in ``x.dtype``; rows/cols past ``N``/``K`` (padding) are zero.
    """
    what = "bsr_sddmm"
    if dy.dtype not in SUPPORTED_DTYPES or x.dtype != dy.dtype:
        raise TypeError(f"{what}: dy and x must share one of {SUPPORTED_DTYPES}, got {dy.dtype} and {x.dtype}")
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(
            f"{what}: dy [M, N] and x [M, K] must be 2-D with equal M, got {tuple(dy.shape)} and {tuple(x.shape)}"
        )
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    if row_indices.numel() != col_indices.numel():
        raise ValueError(
            f"{what}: row_indices ({row_indices.numel()}) and col_indices ({col_indices.numel()}) differ in length"
        )
    check_launchable(dy, x, row_indices, col_indices, what=what)
    nnz = col_indices.numel()
    M, N = dy.shape
    K = x.shape[1]
    dv = torch.empty((nnz, block_size, block_size), dtype=x.dtype, device=x.device)
    if nnz == 0:
        return dv
    if M == 0:
        return dv.zero_()
    kernel_for(_bsr_sddmm_kernel, config)[(nnz,)](
        dy, x, row_indices, col_indices, dv,
        M, N, K,
        dy.stride(0), dy.stride(1),
        x.stride(0), x.stride(1),
        dv.stride(0), dv.stride(1), dv.stride(2),
        BS=block_size,
        UPCAST=needs_upcast(x.dtype),
        PRECISION=_precision(x.dtype, allow_tf32),
        **config_kwargs(config),
    )
    return dv
