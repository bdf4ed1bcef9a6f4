"""int8 Conv2d as an implicit GEMM, with the int8 GEMM's dequantizing epilogue.

The GEMM view: rows are output pixels ``(b, oh, ow)`` (``M = B*OH*OW``), columns are output
channels (``N = OC``), and the reduction runs over ``K = KH*KW*C`` in the order ``(kh, kw, c)`` with
``c`` fastest. Each K tile computes, per element, which input pixel and channel it reads
(``ih = oh*stride - pad + kh*dilation``), masks what falls in the padding, and gathers the int8
activations straight from ``x`` (no im2col buffer). Every stride is a kernel argument, so ``x`` may
be NHWC (channels_last, the fast case: channel runs are contiguous) or NCHW, and the weight may be
PyTorch's ``[OC, C, KH, KW]``. Any channel count works, including ``C = 3``; groups must be 1.

Scales: one activation scale per *image* (``a_scale [B]``: per-token scales do not factor out of
a convolution, per-image ones do) and one per output channel. Output is ``[B, OH, OW, O]``
(returned as an NCHW-shaped channels_last tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import check_launchable, config_kwargs, kernel_for, pick_configs
from .int8_matmul import ACTIVATIONS, FLOAT_DTYPES, MAX_K, dequant_epilogue, grouped_tile, tile_config

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); BLOCK_K >= 32 for the int8 dot
CONV_CONFIG_TABLE = [
    (64, 64, 32, 8, 4, 3),
    (64, 64, 64, 8, 4, 3),
    (128, 64, 32, 8, 4, 3),
    (128, 128, 64, 8, 8, 3),
    (64, 128, 64, 8, 4, 3),
]
CONV_INTERPRET_CONFIG = (32, 32, 32, 4, 4, 1)


def gpu_conv_configs() -> list[triton.Config]:
    return [tile_config(*row) for row in CONV_CONFIG_TABLE]


def conv_configs() -> list[triton.Config]:
    return pick_configs(gpu_conv_configs(), tile_config(*CONV_INTERPRET_CONFIG))


@triton.autotune(configs=conv_configs(), key=["C", "H", "W", "OC", "OH", "OW", "KH", "KW", "OUT_INT32"])
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
):
    M = B * OH * OW
    K = KH * KW * C
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, OC, BLOCK_M, BLOCK_N, GROUP_M)

    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_n = o_n < OC
    # output pixel of each row
    i_b = o_m // (OH * OW)
    rem = o_m % (OH * OW)
    ih0 = (rem // OW) * SH - PH
    iw0 = (rem % OW) * SW - PW
    p_x_rows = x_ptr + i_b.to(tl.int64)[:, None] * stride_xb
    p_w_cols = w_ptr + o_n.to(tl.int64)[None, :] * stride_wo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        i_k = k0 + o_k
        m_k = i_k < K
        i_c = i_k % C
        i_rs = i_k // C
        i_r = i_rs // KW
        i_s = i_rs % KW
        ih = ih0[:, None] + (i_r * DH)[None, :]
        iw = iw0[:, None] + (i_s * DW)[None, :]
        m_a = m_m[:, None] & m_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b_a = tl.load(p_x_rows + ih * stride_xh + iw * stride_xw + (i_c * stride_xc)[None, :], mask=m_a, other=0)
        w_off = i_c * stride_wc + i_r * stride_wh + i_s * stride_ww
        b_w = tl.load(p_w_cols + w_off[:, None], mask=m_k[:, None] & m_n[None, :], other=0)
        acc = tl.dot(b_a, b_w, acc)

    p_y = y_ptr + o_m.to(tl.int64)[:, None] * stride_ym + o_n[None, :] * stride_yn
    if OUT_INT32:
        tl.store(p_y, acc, mask=m_m[:, None] & m_n[None, :])
    else:
        out = dequant_epilogue(acc, i_b, o_n, m_m, m_n, a_scale_ptr, b_scale_ptr, bias_ptr,
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
) -> torch.Tensor:
    """``act(conv2d(x, w) * a_scale[b] * w_scale[o] + bias[o])`` for int8 ``x`` and ``w``.

    Args:
        x: ``[B, C, H, W]`` int8, any memory format (channels_last is the fast one).
        w: ``[OC, C, KH, KW]`` int8, any strides.
        a_scale: ``[B]`` fp32, one scale per image.
        w_scale: ``[O]`` fp32, one scale per output channel.
        bias: ``[O]`` float.
        stride, padding, dilation: ints or pairs (zero padding; groups = 1).
        activation: "none", "relu" or "gelu".
        out_dtype: fp16/bf16/fp32, or ``torch.int32`` for the raw accumulator.
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
    if M > 0 and OC > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(OC, meta["BLOCK_N"]),)  # noqa: E731
        kernel_for(_int8_conv2d_kernel, config)[grid](
            x, w, a_scale if a_scale is not None else y, w_scale if w_scale is not None else y,
            bias if bias is not None else y, y,
            B, C, H, W, OC, OH, OW, KH, KW,
            *stride, *padding, *dilation,
            *x.stride(),
            *w.stride(),
            OC, 1,
            HAS_A_SCALE=a_scale is not None,
            HAS_B_SCALE=w_scale is not None,
            HAS_BIAS=bias is not None,
            ACTIVATION=ACTIVATIONS[activation],
            OUT_INT32=out_int32,
            **config_kwargs(config),
        )
    return y.permute(0, 3, 1, 2)
