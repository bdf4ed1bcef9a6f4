"""int8 Conv2d as an implicit GEMM, with the int8 GEMM's dequantizing epilogue.

The GEMM view: rows are output pixels ``(b, oh, ow)`` (``M = B*OH*OW``), columns are output
channels (``N = OC``), and the reduction runs over the filter taps ``(kh, kw)`` and, inside each
tap, over the input channels in tiles of ``BLOCK_K``. One flat loop walks
``t = (kh*KW + kw) * C_TILES + c_tile``: the tap and channel offset are scalars per iteration (no
per-element division), and a single loop is what Triton software-pipelines (nested loops would
leave an inner loop of ``C / BLOCK_K`` iterations, often one, to pipeline).

Per tap each row reads a contiguous run of channels: with ``x`` in channels_last (NHWC) memory and
the weight in channels_last (OHWI, channel fastest), both operands are 16-byte vectors streamed by
``cp.async``. The launcher takes the logical shapes ``x [B, C, H, W]`` and ``w [OC, C, KH, KW]``
and reads them through their strides; a tensor in another memory format is converted once (one
copy per call, so callers should keep a channels_last weight). Padding taps are masked per row.
Any channel count works, including ``C = 3``; groups must be 1.

1x1 convolutions with stride 1 and no padding are plain GEMMs over the NHWC matrix
``[B*H*W, C]``; they run through :func:`accel.kernels.int8_matmul.launch_mm` (TMA on sm_90).

Scales: one activation scale per *image* (``a_scale [B]``: per-token scales do not factor out of
a convolution, per-image ones do) and one per output channel. Output is ``[B, OH, OW, O]``
(returned as an NCHW-shaped channels_last tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import capability, cdiv, check_launchable, launch, pick_configs
from .int8_matmul import ACTIVATIONS, FLOAT_DTYPES, MAX_K, dequant_epilogue, grouped_tile, launch_mm

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, min capability); BLOCK_K >= 32 for
#: the int8 dot. 128x256 spills on sm_80 (mma.sync keeps the whole accumulator in registers).
CONV_CONFIG_TABLE = [
    (64, 64, 64, 8, 4, 4, 80),
    (128, 64, 64, 8, 4, 4, 80),
    (64, 128, 64, 8, 4, 4, 80),
    (128, 128, 64, 8, 8, 4, 80),
    (128, 128, 128, 8, 8, 3, 80),
    (128, 256, 64, 8, 8, 3, 90),
    (64, 64, 32, 8, 4, 4, 80),
]
CONV_INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1, 0)


def conv_tile_config(m, n, k, g, w, s, cap=0) -> triton.Config:
    c = triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_warps=w, num_stages=s)
    c.min_capability = cap
    return c


def gpu_conv_configs() -> list[triton.Config]:
    return [conv_tile_config(*row) for row in CONV_CONFIG_TABLE]


def conv_configs() -> list[triton.Config]:
    return pick_configs(gpu_conv_configs(), conv_tile_config(*CONV_INTERPRET_CONFIG))


def conv_configs_for(channels: int, cap: int, configs: list[triton.Config] | None = None) -> list[triton.Config]:
    """The configs the autotuner may pick for ``channels`` input channels on capability ``cap``: those
    the device runs, without K tiles wider than the channel count (C = 3 or 16 would load mostly
    padding; the narrowest K tile is kept when all are wider)."""
    pool = [c for c in (configs if configs is not None else gpu_conv_configs()) if getattr(c, "min_capability", 0) <= cap]
    narrowest = min(c.kwargs["BLOCK_K"] for c in pool)
    return [c for c in pool if c.kwargs["BLOCK_K"] <= max(channels, narrowest)]


def _prune_conv(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    args = {**named_args, **kwargs}
    return conv_configs_for(args["C"], capability(args["x_ptr"].device), configs)


@triton.autotune(configs=conv_configs(),
                 key=["B", "C", "H", "W", "OC", "OH", "OW", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OUT_INT32"],
                 prune_configs_by={"early_config_prune": _prune_conv})
@triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_conv2d_kernel(
    x_ptr, w_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, y_ptr,
    # sizes
    B, C, H, W, OC, OH, OW, KH, KW,
    # convolution geometry
    SH, SW, PH, PW, DH, DW,
    # strides
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wh, stride_ww,
    stride_ym, stride_yn,
    # meta
    HAS_A_SCALE: tl.constexpr,
    HAS_B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    OUT_INT32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_C: tl.constexpr,
):
    M = B * OH * OW
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, OC, BLOCK_M, BLOCK_N, GROUP_M)

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_n = o_n < OC
    # rows / output channels past the edge re-read valid ones (their results are masked at the store)
    r_m = o_m % M
    r_n = o_n % OC
    # output pixel of each row, once: the loop only adds the tap offset
    i_b = r_m // (OH * OW)
    rem = r_m % (OH * OW)
    ih0 = (rem // OW) * SH - PH
    iw0 = (rem % OW) * SW - PW
    p_x_rows = x_ptr + i_b.to(tl.int64) * stride_xb  # [BLOCK_M]
    p_w_cols = w_ptr + r_n.to(tl.int64) * stride_wo  # [BLOCK_N]

    c_tiles = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(0, KH * KW * c_tiles):
        tap = t // c_tiles  # scalars: filter tap (kh, kw) and channel offset of this K tile
        c0 = (t - tap * c_tiles) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        m_row = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # padding taps read zeros
        i_c = c0 + o_k
        p_a = (p_x_rows + ih * stride_xh + iw * stride_xw)[:, None] + i_c[None, :] * stride_xc
        p_b = (p_w_cols + kh * stride_wh + kw * stride_ww)[None, :] + i_c[:, None] * stride_wc  # [BLOCK_K, BLOCK_N]
        if EVEN_C:
            b_a = tl.load(p_a, mask=m_row[:, None], other=0)
            b_w = tl.load(p_b)
        else:
            m_c = i_c < C
            b_a = tl.load(p_a, mask=m_row[:, None] & m_c[None, :], other=0)
            b_w = tl.load(p_b, mask=m_c[:, None], other=0)
        acc = tl.dot(b_a, b_w, acc, out_dtype=tl.int32)

    p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + o_n[None, :] * stride_yn
    if OUT_INT32:
        tl.store(p_y, acc, mask=m_m[:, None] & m_n[None, :])
    else:
        out = dequant_epilogue(acc, i_b, o_n, m_m, m_n, a_scale_ptr, b_scale_ptr, bias_ptr, 1,
                               HAS_A_SCALE, HAS_B_SCALE, HAS_BIAS, ACTIVATION)
        tl.store(p_y, out.to(y_ptr.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != 2:
        raise ValueError(f"int8_conv2d: {name} must be an int or a pair, got {v!r}")
    return t


def conv_output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def is_gemm_1x1(w_shape, stride, padding) -> bool:
    """A 1x1 convolution with stride 1 and no padding is the GEMM ``x_nhwc [B*H*W, C] @ w[OC, C]^T``."""
    return tuple(w_shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when channels are its fastest dimension (NHWC / OHWI), else one channels_last copy."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous(memory_format=torch.channels_last)


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides with 0 for size-1 dimensions: their index is always 0, and a stride of 0 (a
    multiple of 16) keeps Triton's alignment analysis from losing the 16-byte vectors (torch gives
    such dimensions arbitrary strides, e.g. 1 for the taps of a channels_last 1x1 weight)."""
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _conv_args(x, w, a_scale, w_scale, bias, y, stride, padding, dilation, activation: str) -> dict:
    """Keyword arguments of ``_int8_conv2d_kernel`` (launcher and AOT check); ``y`` is ``[B, OH, OW, OC]``."""
    B, C, H, W = x.shape
    OC, _, KH, KW = w.shape
    out_int32 = y.dtype == torch.int32
    sx, sw = _strides(x), _strides(w)
    return dict(
        x_ptr=x, w_ptr=w, a_scale_ptr=a_scale if a_scale is not None else y, b_scale_ptr=w_scale if w_scale is not None else y,
        bias_ptr=bias if bias is not None else y, y_ptr=y,
        B=B, C=C, H=H, W=W, OC=OC, OH=y.shape[1], OW=y.shape[2], KH=KH, KW=KW,
        SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        stride_xb=sx[0], stride_xc=sx[1], stride_xh=sx[2], stride_xw=sx[3],
        stride_wo=sw[0], stride_wc=sw[1], stride_wh=sw[2], stride_ww=sw[3],
        stride_ym=OC, stride_yn=1,
        HAS_A_SCALE=a_scale is not None, HAS_B_SCALE=w_scale is not None, HAS_BIAS=bias is not None and not out_int32,
        ACTIVATION=ACTIVATIONS[activation], OUT_INT32=out_int32,
    )


def gemm_1x1_operands(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM operands of a 1x1 convolution: ``x`` (channels_last) as ``[B*H*W, C]`` and the
    weight as ``[OC, C]``, both views."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B * H * W, C), w[:, :, 0, 0]


def int8_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    *,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float32,
    config: triton.Config | None = None,
    gemm_1x1: bool = True,
) -> torch.Tensor:
    """``act(conv2d(x, w) * a_scale[b] * w_scale[o] + bias[o])`` for int8 ``x`` and ``w``.

    Args:
        x: ``[B, C, H, W]`` int8; channels_last memory is the fast layout (others are copied once).
        w: ``[OC, C, KH, KW]`` int8 (logical OIHW); channels_last memory (physically OHWI, channel
            fastest) is the fast layout: keep such a copy with the layer, others are copied per call.
        a_scale: ``[B]`` fp32, one scale per image.
        w_scale: ``[O]`` fp32, one scale per output channel.
        bias: ``[O]`` float.
        stride, padding, dilation: ints or pairs (zero padding; groups = 1).
        activation: "none", "relu" or "gelu".
        out_dtype: fp16/bf16/fp32, or ``torch.int32`` for the raw accumulator.
        config: force one config of the implicit-GEMM kernel (a 1x1 GEMM autotunes unless given an
            ``int8_mm`` config).
        gemm_1x1: run stride-1 unpadded 1x1 convolutions through the int8 GEMM.
    Returns:
        ``[B, OC, OH, OW]`` in channels_last memory format.
    """
    what = "int8_conv2d"
    if x.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"{what}: x and w must be int8, got {x.dtype} and {w.dtype}")
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"{what}: expected x [B, C, H, W] and w [OC, C, KH, KW], got {tuple(x.shape)} and {tuple(w.shape)}")
    B, C, H, W = x.shape
    OC, Cw, KH, KW = w.shape
    if Cw != C:
        raise ValueError(f"{what}: weight of shape {tuple(w.shape)} expects {Cw} input channels, x has {C} "
                         f"(shape {tuple(x.shape)}); groups other than 1 are not supported")
    if C * KH * KW > MAX_K:
        raise ValueError(f"{what}: C*KH*KW = {C * KH * KW} exceeds {MAX_K} (int32 accumulation could overflow)")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{what}: need stride >= 1, dilation >= 1, padding >= 0, got {stride}, {dilation}, {padding}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    out_int32 = out_dtype == torch.int32
    if out_int32 and (a_scale is not None or w_scale is not None or bias is not None or activation != "none"):
        raise ValueError(f"{what}: out_dtype=torch.int32 returns the raw accumulator; it takes no scales, bias or activation")
    if not out_int32 and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: out_dtype must be torch.int32 or one of {FLOAT_DTYPES}, got {out_dtype}")
    if a_scale is not None and (a_scale.shape != (B,) or a_scale.dtype != torch.float32):
        raise ValueError(f"{what}: a_scale must be [{B}] float32 (one per image), got {tuple(a_scale.shape)} {a_scale.dtype}")
    if w_scale is not None and (w_scale.shape != (OC,) or w_scale.dtype != torch.float32):
        raise ValueError(f"{what}: w_scale must be [{OC}] float32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    if bias is not None and (bias.shape != (OC,) or not bias.is_floating_point()):
        raise ValueError(f"{what}: bias must be a float [{OC}], got {tuple(bias.shape)} {bias.dtype}")
    check_launchable(x, w, *(t for t in (a_scale, w_scale, bias) if t is not None), what=what)
    OH, OW = conv_output_size(H, W, KH, KW, stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"{what}: input {H}x{W} is too small for kernel {KH}x{KW} with padding {padding}, "
                         f"dilation {dilation}")
    y = torch.empty((B, OH, OW, OC), dtype=out_dtype, device=x.device)
    M = B * OH * OW
    if M == 0 or OC == 0:
        return y.permute(0, 3, 1, 2)
    x, w = _channels_last(x), _channels_last(w)
    if gemm_1x1 and is_gemm_1x1(w.shape, stride, padding):
        a2, w2 = gemm_1x1_operands(x, w)
        mm_config = config if config is not None and "SPLIT_K" in config.kwargs else None
        launch_mm(a2, w2, a_scale, w_scale, bias, y.view(M, OC), activation=activation, a_scale_rows=H * W,
                  config=mm_config)
        return y.permute(0, 3, 1, 2)
    args = _conv_args(x, w, a_scale, w_scale, bias, y, stride, padding, dilation, activation)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(OC, meta["BLOCK_N"]),)  # noqa: E731
    launch(_int8_conv2d_kernel, grid, args, config)
    return y.permute(0, 3, 1, 2)
