"""Block-sparse Conv2d as an implicit GEMM: forward, input gradient and weight gradient.

The weight ``[O, C, KH, KW]`` is viewed as the implicit-GEMM matrix ``W [O, K]`` with
``K = KH*KW*C`` ordered ``(kh, kw, c)``, ``c`` fastest (OHWI flattening), and stored as block-sparse
rows with square blocks ``B`` in 16, 32, 64: ``values [nnz, B, B]`` (each block ``[out, in]``),
``crow_indices [ceil(O/B) + 1]``, ``col_indices [nnz]`` (``accel.formats``' layout). With
``C % B == 0`` a K block is B consecutive input channels at one tap; any other ``C`` works too
(a block then straddles taps; the kernels compute the tap of every K lane). Padding blocks (rows
past ``O``, columns past ``K``) must hold zeros, as :func:`conv_weight_to_bsr` makes them.

Activations are NHWC in memory (``channels_last``) for speed, but every stride is an argument, so
any layout is correct. Zero padding, stride, dilation; groups = 1. fp16/bf16/fp32 with fp32
accumulation (fp32 inputs use IEEE FMA unless ``allow_tf32``).

* :func:`bsr_conv2d`: ``y = conv2d(x, W) + bias``. A program owns ``BLOCK_M`` output pixels x one
  block row (``B`` output channels), walks the row's nonzero blocks and gathers the matching
  im2col slice of ``x`` straight from memory (no im2col buffer).
* :func:`bsr_conv2d_dx`: ``dx = conv2d_input(dy, W)`` through the transposed block structure. A
  program owns ``BLOCK_M`` input pixels x ``B`` input channels and, for every tap, gathers the
  output pixels that read them and the blocks of ``W^T``'s K-block row(s) of that (tap, channels)
  range. Every dX element is written once by one program: no atomics, deterministic.
* :func:`bsr_conv2d_dw`: ``dvalues[p] = dy[:, r_p block]^T @ im2col(x)[:, c_p block]`` at the stored
  blocks only (SDDMM over the implicit im2col), one program per (block, slice of the pixels).
  With several slices, fp32 partials are summed by ``torch.sum`` afterwards (deterministic, no atomics).

In the forward and dX kernels a K step is ``BLOCK_K`` lanes of one block when ``BLOCK_K <= B``, or
``BLOCK_K / B`` consecutive stored blocks of the row when ``BLOCK_K > B`` (so 16-blocks still fill
operand tiles large enough for 16-byte ``cp.async`` copies).

:func:`conv_weight_to_bsr` / :func:`bsr_to_conv_weight` convert a dense OIHW weight to this layout
and back; :func:`transpose_structure` builds the ``W^T`` structure the dX kernel walks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._triton import bind, cdiv, check_launchable, launch, needs_upcast, pick_configs

SUPPORTED_BLOCK_SIZES = (16, 32, 64)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# ---------------------------------------------------------------------------------------------
# Autotune tables, by alignment and block size. "Aligned" launches (C % 16 == 0 and O % 16 == 0,
# the common NHWC case) get tiles whose operand copies are 16-byte cp.async: every operand tile
# holds >= 16 bytes per thread in fp16 (tile elements >= 256 * num_warps). Other channel counts
# gather element by element (Triton only knows 16-divisibility), which costs registers: their
# tables hold smaller tiles (the AOT check measured spills with the aligned ones).
# ---------------------------------------------------------------------------------------------
#: forward and dX: (BLOCK_M, BLOCK_K, num_warps, num_stages)
FWD_TABLES = {
    True: {
        16: [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3)],
        32: [(64, 32, 4, 3), (64, 64, 4, 4), (128, 32, 4, 3), (128, 64, 8, 3)],
        64: [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
    },
    False: {bs: [(32, 16, 4, 2), (64, 16, 4, 2), (128, 16, 8, 3)] for bs in (16, 32, 64)},
}
DX_TABLES = {
    True: FWD_TABLES[True],
    # B = 16: ptxas spilled 16-24 bytes at 80-128 registers with 4-warp K16 tiles (sm_80)
    False: {**FWD_TABLES[False], 16: [(32, 32, 4, 2), (64, 16, 8, 2), (128, 32, 8, 2)]},
}
#: dW: (BLOCK_M, num_warps, num_stages)
DW_TABLES = {
    True: {
        16: [(64, 4, 3), (128, 4, 3)],
        32: [(64, 4, 3), (128, 4, 3), (128, 8, 3)],
        64: [(32, 4, 3), (64, 4, 3), (128, 8, 3)],
    },
    False: {
        16: [(32, 4, 3), (64, 4, 3)],
        32: [(32, 4, 3), (64, 4, 2)],
        64: [(32, 4, 2), (32, 4, 3)],
    },
}
#: interpreter: one config, legal for every block size as it is
FWD_INTERPRET_CONFIG = (32, 16, 4, 1)
DW_INTERPRET_CONFIG = (32, 4, 1)
#: dW pixel slices are multiples of this (>= every BLOCK_M)
DW_CHUNK_ALIGN = 256


def _mk_config(m: int, k: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _dw_config(m: int, w: int, s: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)


def is_aligned(in_channels: int, out_channels: int) -> bool:
    """Which table a launch autotunes over: both channel counts multiples of 16."""
    return in_channels % 16 == 0 and out_channels % 16 == 0


def fwd_configs_for_block(bs: int, aligned: bool = True) -> list[triton.Config]:
    """Runtime configs of the forward kernel for block size ``bs`` (GPU autotuning, tests, AOT)."""
    return [_mk_config(*row) for row in FWD_TABLES[aligned][bs]]


def dx_configs_for_block(bs: int, aligned: bool = True) -> list[triton.Config]:
    return [_mk_config(*row) for row in DX_TABLES[aligned][bs]]


def dw_configs_for_block(bs: int, aligned: bool = True) -> list[triton.Config]:
    return [_dw_config(*row) for row in DW_TABLES[aligned][bs]]


def _union(tables: dict, make) -> list[triton.Config]:
    rows = (row for al in (True, False) for bs in SUPPORTED_BLOCK_SIZES for row in tables[al][bs])
    return [make(*row) for row in dict.fromkeys(rows)]


def _key(c: triton.Config) -> tuple:
    return (*c.kwargs.values(), c.num_warps, c.num_stages)


def _pruner(tables: dict):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}  # constexprs arrive as keyword arguments, sizes positionally
        table = {tuple(row) for row in tables[is_aligned(args["C"], args["OC"])][args["BS"]]}
        keep = [c for c in configs if _key(c) in table]
        return keep or list(configs)[:1]

    return prune


def _check_config(config: triton.Config, bs: int, what: str, keys: tuple) -> None:
    missing = set(keys) - set(config.kwargs)
    if missing:
        raise ValueError(f"{what}: config lacks {sorted(missing)}")
    for name in keys:
        v = config.kwargs[name]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{what}: config {name}={v} must be a power of two >= 16")


# ---------------------------------------------------------------------------------------------
# Pure tensor helpers: the layout
# ---------------------------------------------------------------------------------------------
def conv_weight_to_bsr(
    weight_oihw: torch.Tensor, block: int, block_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``[O, C, KH, KW]`` weight -> ``(values [nnz, B, B], crow_indices int64, col_indices int64)``
    of ``W [O, KH*KW*C]`` ((kh, kw, c) order), padded with zeros to whole blocks.

    ``block_mask``: ``[ceil(O/B), ceil(KH*KW*C/B)]`` bool, the blocks to store (default: blocks with
    any nonzero). Unstored blocks are dropped even if nonzero. Blocks are ordered by row, then column.
    """
    if weight_oihw.dim() != 4:
        raise ValueError(f"conv_weight_to_bsr: weight must be [O, C, KH, KW], got shape {tuple(weight_oihw.shape)}")
    if block not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"conv_weight_to_bsr: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {block}")
    o, c, kh, kw = weight_oihw.shape
    k = kh * kw * c
    nbr, nbc = math.ceil(o / block), math.ceil(k / block)
    dense = weight_oihw.permute(0, 2, 3, 1).reshape(o, k)
    padded = dense.new_zeros(nbr * block, nbc * block)
    padded[:o, :k] = dense
    blocks = padded.view(nbr, block, nbc, block).transpose(1, 2)  # [nbr, nbc, B, B]
    if block_mask is None:
        block_mask = blocks.ne(0).any(dim=3).any(dim=2)
    else:
        if tuple(block_mask.shape) != (nbr, nbc):
            raise ValueError(f"conv_weight_to_bsr: block_mask must be [{nbr}, {nbc}] "
                             f"(ceil(O/B), ceil(KH*KW*C/B)), got {tuple(block_mask.shape)}")
        block_mask = block_mask.to(device=weight_oihw.device, dtype=torch.bool)
    rows, cols = block_mask.nonzero(as_tuple=True)
    values = blocks[rows, cols].contiguous()
    crow = torch.zeros(nbr + 1, dtype=torch.int64, device=weight_oihw.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=nbr), 0)
    return values, crow, cols.to(torch.int64)


def bsr_to_conv_weight(
    values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, weight_shape
) -> torch.Tensor:
    """The dense ``[O, C, KH, KW]`` weight (contiguous) of a BSR conv weight; differentiable in ``values``."""
    o, c, kh, kw = (int(v) for v in weight_shape)
    bs = values.shape[-1]
    k = kh * kw * c
    nbr, nbc = math.ceil(o / bs), math.ceil(k / bs)
    rows = block_row_indices(crow_indices, col_indices.numel())
    flat = values.new_zeros(nbr * nbc, bs, bs).index_put((rows * nbc + col_indices.to(torch.int64),), values)
    dense = flat.view(nbr, nbc, bs, bs).transpose(1, 2).reshape(nbr * bs, nbc * bs)[:o, :k]
    return dense.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()


def block_row_indices(crow_indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """Block row (int64) of each of the ``nnz`` stored blocks (the ``row_indices`` of :func:`bsr_conv2d_dw`)."""
    counts = crow_indices[1:].to(torch.int64) - crow_indices[:-1].to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=crow_indices.device), counts)
    if rows.numel() != nnz:
        raise ValueError(f"crow_indices describes {rows.numel()} blocks, expected {nnz}")
    return rows


def transpose_structure(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, n_block_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structure of ``W^T``: ``(crow_t [n_block_cols + 1], col_t [nnz], block_index [nnz])``, int64.
    Position ``q`` of ``W^T`` row ``kb`` is the stored block ``block_index[q]`` of ``W``, at block
    row ``col_t[q]`` of ``W`` (rows in increasing order)."""
    col = col_indices.to(torch.int64)
    rows = block_row_indices(crow_indices, col.numel())
    nbr = crow_indices.numel() - 1
    order = torch.argsort(col * max(nbr, 1) + rows, stable=True)
    crow_t = torch.zeros(n_block_cols + 1, dtype=torch.int64, device=col.device)
    crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=n_block_cols), 0)
    return crow_t, rows[order], order


def _pair(v, name: str, what: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"{what}: {name} must be an int or a pair, got {v!r}")
    return t


def conv_output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _im2col_tile(p_x_img, ih0, iw0, m_m, i_k, lane, m_lane, H, W, C, KW, K, DH, DW,
                 stride_xc, stride_xh, stride_xw, VEC: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_K]`` im2col slice of ``x`` (zero padding) for output pixels (``p_x_img``
    image base, ``ih0``/``iw0`` top-left input position) and K lanes ``i_k`` ((kh, kw, c) order;
    ``lane`` is ``tl.arange`` over them, ``m_lane`` masks them).

    The K lanes come in runs of ``VEC`` (a power of two dividing C and B) that start at multiples of
    VEC, so a run never crosses a tap: it is VEC consecutive channels of one input pixel. The hints
    tell Triton so (it cannot see it through gathered block columns), which turns the gather into
    16-byte vector copies when ``C % 8 == 0`` (fp16) or ``C % 4 == 0`` (fp32)."""
    run = (i_k // VEC) * VEC
    run = tl.max_constancy(tl.multiple_of(run, VEC), VEC)
    i_c = run % C + lane % VEC
    i_rs = run // C
    ih = ih0[:, None] + ((i_rs // KW) * DH)[None, :]
    iw = iw0[:, None] + ((i_rs % KW) * DW)[None, :]
    mask = m_m[:, None] & (m_lane & (run < K))[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(p_x_img[:, None] + ih * stride_xh + iw * stride_xw + (i_c * stride_xc)[None, :], mask=mask, other=0.0)


@triton.autotune(configs=pick_configs(_union(FWD_TABLES, _mk_config), _mk_config(*FWD_INTERPRET_CONFIG)),
                 key=["C", "H", "W", "OC", "OH", "OW", "KH", "KW", "BS", "VEC"],
                 prune_configs_by={"early_config_prune": _pruner(FWD_TABLES)})
@triton.jit
def _bsr_conv2d_fwd_kernel(
    x_ptr, v_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    NB, C, H, W, OC, OH, OW, KH, KW, K,
    SH, SW, PH, PW, DH, DW,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_vb, stride_vo, stride_vi,
    stride_ym, stride_yn,
    BS: tl.constexpr,
    VEC: tl.constexpr,  # largest power of two <= 16 dividing C: im2col lanes come in runs of VEC channels
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    M = NB * OH * OW
    row = tl.program_id(1)  # block row: output channels [row*BS, row*BS + BS)
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BS)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    i_b = o_m // (OH * OW)
    rem = o_m % (OH * OW)
    ih0 = (rem // OW) * SH - PH
    iw0 = (rem % OW) * SW - PW
    p_x_img = x_ptr + i_b.to(tl.int64) * stride_xb

    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    if BLOCK_K <= BS:
        for it in range(start * (BS // BLOCK_K), end * (BS // BLOCK_K)):
            p = it // (BS // BLOCK_K)
            kk = (it % (BS // BLOCK_K)) * BLOCK_K
            c = tl.load(col_ptr + p)
            i_k = c * BS + kk + o_k
            b_x = _im2col_tile(p_x_img, ih0, iw0, m_m, i_k, o_k, o_k < BLOCK_K, H, W, C, KW, K, DH, DW,
                               stride_xc, stride_xh, stride_xw, VEC)
            b_w = tl.load(v_ptr + p.to(tl.int64) * stride_vb + o_n[None, :] * stride_vo + (kk + o_k)[:, None] * stride_vi)
            if UPCAST:
                b_x = b_x.to(tl.float32)
                b_w = b_w.to(tl.float32)
            acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        o_kb = o_k % BS
        for q in range(start, end, BLOCK_K // BS):
            p_k = q + o_k // BS  # stored block of each K lane
            v_k = p_k < end
            c_k = tl.load(col_ptr + p_k, mask=v_k, other=0)
            i_k = c_k * BS + o_kb
            b_x = _im2col_tile(p_x_img, ih0, iw0, m_m, i_k, o_k, v_k, H, W, C, KW, K, DH, DW,
                               stride_xc, stride_xh, stride_xw, VEC)
            b_w = tl.load(v_ptr + (p_k.to(tl.int64) * stride_vb + o_kb * stride_vi)[:, None] + o_n[None, :] * stride_vo,
                          mask=v_k[:, None], other=0.0)
            if UPCAST:
                b_x = b_x.to(tl.float32)
                b_w = b_w.to(tl.float32)
            acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION, out_dtype=tl.float32)

    i_n = row * BS + o_n
    m_n = i_n < OC
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + i_n[None, :] * stride_yn
    tl.store(p_y, acc.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _dx_row(acc, p_dy_pix, m_pix, v_ptr, crowt_ptr, colt_ptr, bidx_ptr, kb, valid, cols, m_cols, OC,
            stride_dyc, stride_vb, stride_vo, stride_vi,
            BS: tl.constexpr, SHIFTED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """``acc += dY[pixels, o] @ W[o, cols]`` over the blocks of ``W^T`` K-block row ``kb`` (skipped
    unless ``valid``); ``cols`` are the columns inside a block (``m_cols`` masks them when SHIFTED)."""
    o_k = tl.arange(0, BLOCK_K)
    start = tl.load(crowt_ptr + kb)
    end = tl.load(crowt_ptr + kb + 1)
    end = tl.where(valid, end, start)
    if BLOCK_K <= BS:
        for it in range(start * (BS // BLOCK_K), end * (BS // BLOCK_K)):
            q = it // (BS // BLOCK_K)
            kk = (it % (BS // BLOCK_K)) * BLOCK_K
            ob = tl.load(colt_ptr + q)
            blk = tl.load(bidx_ptr + q)
            i_o = ob * BS + kk + o_k
            b_dy = tl.load(p_dy_pix[:, None] + i_o[None, :] * stride_dyc, mask=m_pix[:, None] & (i_o < OC)[None, :],
                           other=0.0)
            p_w = v_ptr + blk.to(tl.int64) * stride_vb + (kk + o_k)[:, None] * stride_vo + cols[None, :] * stride_vi
            if SHIFTED:
                b_w = tl.load(p_w, mask=m_cols[None, :], other=0.0)
            else:
                b_w = tl.load(p_w)
            if UPCAST:
                b_dy = b_dy.to(tl.float32)
                b_w = b_w.to(tl.float32)
            acc = tl.dot(b_dy, b_w, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        o_kb = o_k % BS
        for q0 in range(start, end, BLOCK_K // BS):
            q_k = q0 + o_k // BS
            v_k = q_k < end
            ob_k = tl.load(colt_ptr + q_k, mask=v_k, other=0)
            blk_k = tl.load(bidx_ptr + q_k, mask=v_k, other=0)
            i_o = ob_k * BS + o_kb
            b_dy = tl.load(p_dy_pix[:, None] + i_o[None, :] * stride_dyc,
                           mask=m_pix[:, None] & (v_k & (i_o < OC))[None, :], other=0.0)
            p_w = v_ptr + (blk_k.to(tl.int64) * stride_vb + o_kb * stride_vo)[:, None] + cols[None, :] * stride_vi
            if SHIFTED:
                b_w = tl.load(p_w, mask=v_k[:, None] & m_cols[None, :], other=0.0)
            else:
                b_w = tl.load(p_w, mask=v_k[:, None], other=0.0)
            if UPCAST:
                b_dy = b_dy.to(tl.float32)
                b_w = b_w.to(tl.float32)
            acc = tl.dot(b_dy, b_w, acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.autotune(configs=pick_configs(_union(DX_TABLES, _mk_config), _mk_config(*FWD_INTERPRET_CONFIG)),
                 key=["C", "H", "W", "OC", "OH", "OW", "KH", "KW", "BS", "C_ALIGNED"],
                 prune_configs_by={"early_config_prune": _pruner(DX_TABLES)})
@triton.jit
def _bsr_conv2d_dx_kernel(
    dy_ptr, v_ptr, crowt_ptr, colt_ptr, bidx_ptr, dx_ptr,
    NB, C, H, W, OC, OH, OW, KH, KW, NKB,
    SH, SW, PH, PW, DH, DW,
    stride_dyb, stride_dyc, stride_dyh, stride_dyw,
    stride_vb, stride_vo, stride_vi,
    stride_xm, stride_xn,
    BS: tl.constexpr,
    C_ALIGNED: tl.constexpr,  # C % BS == 0: (tap, channel block) is exactly one K block
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    M = NB * H * W
    c0 = tl.program_id(1) * BS  # input channels [c0, c0 + BS)
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = tl.arange(0, BS)
    m_m = o_m < M
    i_b = o_m // (H * W)
    rem = o_m % (H * W)
    ih = rem // W
    iw = rem % W
    p_dy_img = dy_ptr + i_b.to(tl.int64) * stride_dyb
    m_c = c0 + o_c < C

    acc = tl.zeros((BLOCK_M, BS), dtype=tl.float32)
    for t in range(0, KH * KW):
        # output pixel (oh, ow) whose tap t reads input pixel (ih, iw)
        nh = ih + PH - (t // KW) * DH
        nw = iw + PW - (t % KW) * DW
        oh = nh // SH
        ow = nw // SW
        m_pix = m_m & (nh >= 0) & (nw >= 0) & (nh % SH == 0) & (nw % SW == 0) & (oh < OH) & (ow < OW)
        p_dy_pix = p_dy_img + oh * stride_dyh + ow * stride_dyw
        k_lo = t * C + c0  # K index of channel c0 at tap t
        if C_ALIGNED:
            acc = _dx_row(acc, p_dy_pix, m_pix, v_ptr, crowt_ptr, colt_ptr, bidx_ptr, k_lo // BS, True, o_c, m_c, OC,
                          stride_dyc, stride_vb, stride_vo, stride_vi, BS, False, UPCAST, PRECISION, BLOCK_K)
        else:
            # the channels [c0, c0 + BS) of tap t straddle K blocks k_lo // BS and the next one
            kb = k_lo // BS
            shift = k_lo - kb * BS
            n_c = tl.minimum(C - c0, BS)
            acc = _dx_row(acc, p_dy_pix, m_pix, v_ptr, crowt_ptr, colt_ptr, bidx_ptr, kb, True, o_c + shift,
                          m_c & (o_c + shift < BS), OC, stride_dyc, stride_vb, stride_vo, stride_vi,
                          BS, True, UPCAST, PRECISION, BLOCK_K)
            nxt = (shift + n_c > BS) & (kb + 1 < NKB)
            acc = _dx_row(acc, p_dy_pix, m_pix, v_ptr, crowt_ptr, colt_ptr, bidx_ptr, tl.minimum(kb + 1, NKB - 1), nxt,
                          o_c + shift - BS, m_c & (o_c + shift >= BS), OC, stride_dyc, stride_vb, stride_vo, stride_vi,
                          BS, True, UPCAST, PRECISION, BLOCK_K)

    p_dx = dx_ptr + o_m.to(tl.int64)[:, None] * stride_xm + (c0 + o_c)[None, :] * stride_xn
    tl.store(p_dx, acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])


@triton.autotune(configs=pick_configs(_union(DW_TABLES, _dw_config), _dw_config(*DW_INTERPRET_CONFIG)),
                 key=["C", "H", "W", "OC", "OH", "OW", "KH", "KW", "BS", "VEC", "CHUNK"],
                 prune_configs_by={"early_config_prune": _pruner(DW_TABLES)})
@triton.jit
def _bsr_conv2d_dw_kernel(
    dy_ptr, x_ptr, row_ptr, col_ptr, dv_ptr,
    NB, C, H, W, OC, OH, OW, KH, KW, K, CHUNK,
    SH, SW, PH, PW, DH, DW,
    stride_dyb, stride_dyc, stride_dyh, stride_dyw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_ds, stride_db, stride_do, stride_di,
    BS: tl.constexpr,
    VEC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    M = NB * OH * OW
    p = tl.program_id(0)
    s = tl.program_id(1)  # slice of the output pixels [s*CHUNK, s*CHUNK + CHUNK)
    r = tl.load(row_ptr + p)
    c = tl.load(col_ptr + p)
    o_b = tl.arange(0, BS)
    i_o = r * BS + o_b
    m_o = i_o < OC
    i_k = c * BS + o_b
    m_lo = s * CHUNK
    m_hi = tl.minimum(m_lo + CHUNK, M)
    acc = tl.zeros((BS, BS), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < m_hi
        i_b = (o_m // (OH * OW)).to(tl.int64)
        rem = o_m % (OH * OW)
        oh = rem // OW
        ow = rem % OW
        # dY^T tile [BS, BLOCK_M]
        p_dy = dy_ptr + (i_b * stride_dyb + oh * stride_dyh + ow * stride_dyw)[None, :] + (i_o * stride_dyc)[:, None]
        b_dyt = tl.load(p_dy, mask=m_o[:, None] & m_m[None, :], other=0.0)
        # im2col tile [BLOCK_M, BS]
        b_x = _im2col_tile(x_ptr + i_b * stride_xb, oh * SH - PH, ow * SW - PW, m_m, i_k, o_b, o_b < BS, H, W, C, KW, K,
                           DH, DW, stride_xc, stride_xh, stride_xw, VEC)
        if UPCAST:
            b_dyt = b_dyt.to(tl.float32)
            b_x = b_x.to(tl.float32)
        acc = tl.dot(b_dyt, b_x, acc, input_precision=PRECISION, out_dtype=tl.float32)
    p_dv = dv_ptr + s.to(tl.int64) * stride_ds + p.to(tl.int64) * stride_db
    p_dv += o_b[:, None] * stride_do + o_b[None, :] * stride_di
    tl.store(p_dv, acc.to(dv_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------
def _vec(c: int) -> int:
    """Run length of the im2col gather: the largest power of two <= 16 dividing C (<= every block size)."""
    return math.gcd(c, 16)


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def _geometry(what, stride, padding, dilation):
    stride, padding, dilation = (_pair(stride, "stride", what), _pair(padding, "padding", what),
                                 _pair(dilation, "dilation", what))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{what}: need stride >= 1, dilation >= 1, padding >= 0, got {stride}, {dilation}, {padding}")
    return stride, padding, dilation


def _weight_shape(what, weight_shape) -> tuple[int, int, int, int]:
    ws = tuple(int(v) for v in weight_shape)
    if len(ws) != 4 or min(ws) < 1:
        raise ValueError(f"{what}: weight_shape must be (O, C, KH, KW) of positive ints, got {tuple(weight_shape)}")
    return ws


def _check_structure(what, values, crow, col, weight_shape, dtype=None) -> int:
    if dtype is not None and values.dtype != dtype:
        raise TypeError(f"{what}: values dtype {values.dtype} must equal the activation dtype {dtype}")
    if values.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: values dtype must be one of {SUPPORTED_DTYPES}, got {values.dtype}")
    if values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"{what}: values must be [nnz, B, B], got shape {tuple(values.shape)}")
    bs = values.shape[1]
    if bs not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {bs}")
    _check_index(what, "crow_indices", crow)
    _check_index(what, "col_indices", col)
    o = weight_shape[0]
    if crow.numel() - 1 != math.ceil(o / bs):
        raise ValueError(f"{what}: crow_indices has {crow.numel() - 1} block rows, expected ceil({o}/{bs})")
    if col.numel() != values.shape[0]:
        raise ValueError(f"{what}: col_indices has {col.numel()} entries but values holds {values.shape[0]} blocks")
    return bs


def _check_index(what, name, t):
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what}: {name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what}: {name} must be 1-D, got shape {tuple(t.shape)}")


def _check_act(what, name, t, dtype=None):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: {name} dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what}: {name} dtype {t.dtype} must equal {dtype}")
    if t.dim() != 4:
        raise ValueError(f"{what}: {name} must be 4-D [N, C, H, W], got shape {tuple(t.shape)}")


def bsr_conv2d(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    weight_shape,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``conv2d(x, W, bias, stride, padding, dilation)`` for a block-sparse conv weight ``W``.

    Args:
        x: ``[N, C, H, W]`` fp16/bf16/fp32, any strides (channels_last is the fast layout).
        values, crow_indices, col_indices: the BSR weight (see :func:`conv_weight_to_bsr`), values
            in ``x``'s dtype, block size 16, 32 or 64; indices int32/int64.
        weight_shape: ``(O, C, KH, KW)``.
        bias: optional float ``[O]`` (added in fp32).
        stride, padding, dilation: ints or pairs (zero padding, groups = 1).
        allow_tf32: tf32 tensor cores for fp32 inputs.
        config: run this config (``BLOCK_M``, ``BLOCK_K``) instead of autotuning.
    Returns:
        ``[N, O, OH, OW]`` in ``x``'s dtype, channels_last memory format.
    """
    what = "bsr_conv2d"
    _check_act(what, "x", x)
    o, c, kh, kw = _weight_shape(what, weight_shape)
    bs = _check_structure(what, values, crow_indices, col_indices, (o, c, kh, kw), x.dtype)
    nb, cx, h, w = x.shape
    if cx != c:
        raise ValueError(f"{what}: weight_shape {(o, c, kh, kw)} expects {c} input channels, x of shape "
                         f"{tuple(x.shape)} has {cx}; groups other than 1 are not supported")
    stride, padding, dilation = _geometry(what, stride, padding, dilation)
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"{what}: input {h}x{w} is too small for kernel {kh}x{kw} with padding {padding}, "
                         f"dilation {dilation}")
    if bias is not None and (bias.shape != (o,) or bias.dtype not in SUPPORTED_DTYPES):
        raise ValueError(f"{what}: bias must be a float [{o}], got {tuple(bias.shape)} {bias.dtype}")
    if config is not None:
        _check_config(config, bs, what, ("BLOCK_M", "BLOCK_K"))
    check_launchable(x, values, crow_indices, col_indices, *(t for t in (bias,) if t is not None), what=what)
    y = torch.empty((nb, oh, ow, o), dtype=x.dtype, device=x.device)
    m = nb * oh * ow
    if m > 0:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), crow_indices.numel() - 1)  # noqa: E731
        launch(_bsr_conv2d_fwd_kernel, grid, bind(
            _bsr_conv2d_fwd_kernel,
            x, values, crow_indices, col_indices, bias if bias is not None else y, y,
            nb, c, h, w, o, oh, ow, kh, kw, kh * kw * c,
            *stride, *padding, *dilation,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            *values.stride(),
            o, 1,
            BS=bs,
            VEC=_vec(c),
            HAS_BIAS=bias is not None,
            UPCAST=needs_upcast(x.dtype),
            PRECISION=_precision(x.dtype, allow_tf32),
        ), config)
    return y.permute(0, 3, 1, 2)


def bsr_conv2d_dx(
    dy: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    weight_shape,
    x_shape,
    stride=1,
    padding=0,
    dilation=1,
    *,
    crow_t: torch.Tensor | None = None,
    col_t: torch.Tensor | None = None,
    block_index: torch.Tensor | None = None,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """``conv2d_input(x_shape, W, dy, stride, padding, dilation)``: the input gradient.

    Args:
        dy: ``[N, O, OH, OW]`` output gradient, any strides, in ``values``' dtype.
        values, crow_indices, col_indices, weight_shape: the BSR weight, as for :func:`bsr_conv2d`.
        x_shape: ``(N, C, H, W)`` of the forward input.
        crow_t, col_t, block_index: the structure of ``W^T`` from :func:`transpose_structure`
            (all three or none; computed here when absent, which costs a few small tensor ops).
        config: run this config (``BLOCK_M``, ``BLOCK_K``) instead of autotuning.
    Returns:
        ``[N, C, H, W]`` in ``dy``'s dtype, channels_last memory format. Deterministic (no atomics).
    """
    what = "bsr_conv2d_dx"
    _check_act(what, "dy", dy)
    o, c, kh, kw = _weight_shape(what, weight_shape)
    bs = _check_structure(what, values, crow_indices, col_indices, (o, c, kh, kw), dy.dtype)
    xs = tuple(int(v) for v in x_shape)
    if len(xs) != 4:
        raise ValueError(f"{what}: x_shape must be (N, C, H, W), got {tuple(x_shape)}")
    nb, cx, h, w = xs
    if cx != c:
        raise ValueError(f"{what}: x_shape {xs} has {cx} channels but weight_shape {(o, c, kh, kw)} expects {c}")
    stride, padding, dilation = _geometry(what, stride, padding, dilation)
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding, dilation)
    if tuple(dy.shape) != (nb, o, oh, ow):
        raise ValueError(f"{what}: dy must be {(nb, o, oh, ow)} for x_shape {xs} and this geometry, got {tuple(dy.shape)}")
    nkb = math.ceil(kh * kw * c / bs)
    given = [t is not None for t in (crow_t, col_t, block_index)]
    if any(given) and not all(given):
        raise ValueError(f"{what}: pass all of crow_t, col_t, block_index or none of them")
    if crow_t is None:
        crow_t, col_t, block_index = transpose_structure(crow_indices, col_indices, nkb)
    for name, t in (("crow_t", crow_t), ("col_t", col_t), ("block_index", block_index)):
        _check_index(what, name, t)
    if crow_t.numel() != nkb + 1 or col_t.numel() != values.shape[0] or block_index.numel() != values.shape[0]:
        raise ValueError(f"{what}: transposed structure must be crow_t [{nkb + 1}], col_t and block_index "
                         f"[{values.shape[0]}], got {crow_t.numel()}, {col_t.numel()}, {block_index.numel()}")
    if config is not None:
        _check_config(config, bs, what, ("BLOCK_M", "BLOCK_K"))
    check_launchable(dy, values, crow_indices, col_indices, crow_t, col_t, block_index, what=what)
    dx = torch.empty((nb, h, w, c), dtype=dy.dtype, device=dy.device)
    m = nb * h * w
    if m > 0:
        grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), cdiv(c, bs))  # noqa: E731
        launch(_bsr_conv2d_dx_kernel, grid, bind(
            _bsr_conv2d_dx_kernel,
            dy, values, crow_t, col_t, block_index, dx,
            nb, c, h, w, o, oh, ow, kh, kw, nkb,
            *stride, *padding, *dilation,
            dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
            *values.stride(),
            c, 1,
            BS=bs,
            C_ALIGNED=c % bs == 0,
            UPCAST=needs_upcast(dy.dtype),
            PRECISION=_precision(dy.dtype, allow_tf32),
        ), config)
    return dx.permute(0, 3, 1, 2)


def _default_split(device: torch.device, m: int, nnz: int) -> int:
    """Pixel slices for dW: enough programs to fill the GPU twice, slices of >= 1024 pixels."""
    if device.type != "cuda" or nnz == 0:
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(m, 1024), cdiv(2 * n_sm, nnz)))


def bsr_conv2d_dw(
    dy: torch.Tensor,
    x: torch.Tensor,
    row_indices: torch.Tensor,
    col_indices: torch.Tensor,
    block_size: int,
    weight_shape,
    stride=1,
    padding=0,
    dilation=1,
    *,
    split_m: int | None = None,
    allow_tf32: bool = False,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Weight gradient at the stored blocks: ``dvalues[p] = (dy^T @ im2col(x))[r_p block, c_p block]``.

    Args:
        dy: ``[N, O, OH, OW]`` output gradient; x: ``[N, C, H, W]`` forward input; same dtype, any strides.
        row_indices, col_indices: ``[nnz]`` block row / column of each stored block
            (:func:`block_row_indices` gives the rows from ``crow_indices``).
        block_size: ``B`` (16, 32, 64).
        weight_shape: ``(O, C, KH, KW)``.
        split_m: slices of the output pixels reduced separately (fp32 partials summed afterwards,
            deterministically); default: 1 on CPU, enough to fill the GPU otherwise.
        config: run this config (``BLOCK_M``) instead of autotuning.
    Returns:
        ``[nnz, B, B]`` in ``x``'s dtype; entries of padding rows/columns (past ``O`` or ``K``) are zero.
    """
    what = "bsr_conv2d_dw"
    _check_act(what, "dy", dy)
    _check_act(what, "x", x, dy.dtype)
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{what}: block size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    _check_index(what, "row_indices", row_indices)
    _check_index(what, "col_indices", col_indices)
    if row_indices.numel() != col_indices.numel():
        raise ValueError(f"{what}: row_indices ({row_indices.numel()}) and col_indices ({col_indices.numel()}) "
                         "differ in length")
    o, c, kh, kw = _weight_shape(what, weight_shape)
    nb, cx, h, w = x.shape
    if cx != c:
        raise ValueError(f"{what}: weight_shape {(o, c, kh, kw)} expects {c} input channels, x has {cx}")
    stride, padding, dilation = _geometry(what, stride, padding, dilation)
    oh, ow = conv_output_size(h, w, kh, kw, stride, padding, dilation)
    if tuple(dy.shape) != (nb, o, oh, ow):
        raise ValueError(f"{what}: dy must be {(nb, o, oh, ow)} for x of shape {tuple(x.shape)} and this geometry, "
                         f"got {tuple(dy.shape)}")
    if split_m is not None and split_m < 1:
        raise ValueError(f"{what}: split_m must be >= 1, got {split_m}")
    if config is not None:
        _check_config(config, block_size, what, ("BLOCK_M",))
    check_launchable(dy, x, row_indices, col_indices, what=what)
    nnz = col_indices.numel()
    bs = block_size
    m = nb * oh * ow
    dv = torch.empty((nnz, bs, bs), dtype=x.dtype, device=x.device)
    if nnz == 0:
        return dv
    if m == 0:
        return dv.zero_()
    split = split_m if split_m is not None else _default_split(x.device, m, nnz)
    chunk = cdiv(cdiv(m, split), DW_CHUNK_ALIGN) * DW_CHUNK_ALIGN
    split = cdiv(m, chunk)
    out = dv if split == 1 else torch.empty((split, nnz, bs, bs), dtype=torch.float32, device=x.device)
    s_split = 0 if split == 1 else out.stride(0)
    s_blk = out.stride(-3)
    launch(_bsr_conv2d_dw_kernel, (nnz, split), bind(
        _bsr_conv2d_dw_kernel,
        dy, x, row_indices, col_indices, out,
        nb, c, h, w, o, oh, ow, kh, kw, kh * kw * c, chunk,
        *stride, *padding, *dilation,
        dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        s_split, s_blk, out.stride(-2), out.stride(-1),
        BS=bs,
        VEC=_vec(c),
        UPCAST=needs_upcast(x.dtype),
        PRECISION=_precision(x.dtype, allow_tf32),
    ), config)
    if split > 1:
        dv.copy_(out.sum(0))
    return dv
