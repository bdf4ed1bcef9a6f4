"""Block-sparse Conv2d on the CPU with PyTorch ops (the CPU side of ``accel.ops.bsr_conv``).

The weight ``[O, C, KH, KW]`` is the implicit-GEMM matrix ``W [O, KH*KW*C]`` in ``(kh, kw, c)``
order (``c`` fastest), stored block-sparse (``accel.formats``); activations are used as NHWC
(``channels_last``) whatever their layout. Two strategies:

* ``gather`` (``C % B == 0``): every K block is ``B`` consecutive channels at one tap, so in a
  zero-padded NHWC copy of ``x`` viewed as rows of ``B`` channels, the im2col block of output pixel
  ``m`` and K block ``kb`` is the single row ``base[m] + offset[kb]``. Block rows with the same
  number of stored blocks are grouped; for each group one ``index_select`` gathers exactly the
  rows its blocks read (``[n, M, P*B]``, no im2col buffer, nothing for pruned blocks) and one
  ``bmm`` with the group's blocks laid side by side (``[n, P*B, B]``, laid out once per weight)
  gives its output channels. Work and copies are proportional to the stored blocks.
* ``im2col`` (any ``C``): the ``[M, KH*KW*C]`` im2col matrix of the NHWC input is copied into a
  reused scratch buffer (one strided copy), then a block-sparse matmul strategy of
  ``accel.cpu.bsr`` runs on it (which one is chosen by the caller, ``accel.ops.bsr_conv``).

Both return ``[N, O, OH, OW]`` in ``channels_last`` memory format, in ``x``'s dtype (half-precision
products accumulate in fp32 inside ``bmm``). Which strategy (or the dense conv) serves a layer on
this machine is measured by ``accel.engines`` in ``accel.ops.bsr_conv``.
"""

from __future__ import annotations

import math

import torch

from . import bsr as cpu_bsr
from .packcache import cached
from .workspace import scratch

#: most bytes of gathered activations per ``bmm`` of the gather strategy (bounds its scratch)
GATHER_CHUNK_BYTES = 16 << 20


def output_size(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> tuple[int, int]:
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def padded_nhwc(x: torch.Tensor, padding, slot: str) -> torch.Tensor:
    """``x`` as a zero-padded NHWC tensor ``[N, H + 2ph, W + 2pw, C]``: a view of ``x`` when it is
    channels_last and unpadded, else a copy into the scratch ``slot`` (only the border is zeroed)."""
    n, c, h, w = x.shape
    ph, pw = padding
    xn = x.permute(0, 2, 3, 1)
    if ph == 0 and pw == 0 and xn.is_contiguous():
        return xn
    hp, wp = h + 2 * ph, w + 2 * pw
    buf = scratch(slot, n * hp * wp * c, x.dtype).view(n, hp, wp, c)
    if ph:
        buf[:, :ph].zero_()
        buf[:, hp - ph:].zero_()
    if pw:
        buf[:, ph:hp - ph, :pw].zero_()
        buf[:, ph:hp - ph, wp - pw:].zero_()
    buf[:, ph:ph + h, pw:pw + w].copy_(xn)
    return buf


def im2col_nhwc(x: torch.Tensor, kh: int, kw: int, stride, padding, dilation, block_size: int) -> torch.Tensor:
    """``[N*OH*OW, ceil(K/B)*B]`` im2col matrix in ``(kh, kw, c)`` order (zero columns past ``K``), in a
    scratch buffer the caller owns until it returns."""
    n, c, h, w = x.shape
    oh, ow = output_size(h, w, kh, kw, stride, padding, dilation)
    xp = padded_nhwc(x, padding, "conv.xpad")
    (sh, sw), (dh, dw) = stride, dilation
    s0, s1, s2, s3 = xp.stride()
    patches = xp.as_strided((n, oh, ow, kh, kw, c), (s0, sh * s1, sw * s2, dh * s1, dw * s2, s3))
    m, k = n * oh * ow, kh * kw * c
    kp = math.ceil(k / block_size) * block_size
    cols = scratch("conv.im2col", m * kp, x.dtype).view(m, kp)
    if kp == k:
        cols.view(n, oh, ow, kh, kw, c).copy_(patches)
    else:
        cols[:, :k].unflatten(1, (kh, kw, c)).view(n, oh, ow, kh, kw, c).copy_(patches)
        cols[:, k:].zero_()
    return cols


def _nchw_view(y: torch.Tensor, n: int, oh: int, ow: int, o: int) -> torch.Tensor:
    """``[M, O]`` (NHWC rows) as ``[N, O, OH, OW]`` channels_last."""
    return y.view(n, oh, ow, o).permute(0, 3, 1, 2)


def bsr_conv2d_im2col(x, values, crow, col, weight_shape, bias, stride, padding, dilation, strategy: str):
    """The ``im2col`` strategy with the block-sparse matmul ``strategy`` of ``accel.cpu.bsr``."""
    o, c, kh, kw = weight_shape
    n, _, h, w = x.shape
    oh, ow = output_size(h, w, kh, kw, stride, padding, dilation)
    bs = values.shape[1]
    cols = im2col_nhwc(x, kh, kw, stride, padding, dilation, bs)
    y = cpu_bsr.bsr_dense_mm_cpu(cols, values, crow, col, o, bias, strategy=strategy)
    return _nchw_view(y, n, oh, ow, o)


# ------------------------------------------------------------------------------------------------ gather
def _gather_plan(crow, col, ncb, kw, dh, dw, wp):
    """The gather strategy's work list for a block structure and input width (cached with the
    structure): block rows grouped by equal block count, ``(rows, positions, row offsets, p)`` per
    group, and the empty block rows. A K block ``kb`` is tap ``kb // ncb`` (``(kh, kw)``), channel
    block ``kb % ncb``; its offset in the padded NHWC input, in rows of ``B`` channels, is
    ``((kh*dh)*Wp + kw*dw)*ncb + kb % ncb``."""
    counts = (crow[1:] - crow[:-1]).tolist()
    groups: dict[int, list[int]] = {}
    for r, p in enumerate(counts):
        groups.setdefault(p, []).append(r)
    empty = groups.pop(0, [])
    kb = col.to(torch.int64)
    tap, cb = kb // ncb, kb % ncb
    offsets = ((tap // kw) * dh * wp + (tap % kw) * dw) * ncb + cb
    crow_l = crow.tolist()
    plan = []
    for p, rows in sorted(groups.items(), reverse=True):
        pos = torch.tensor([i for r in rows for i in range(crow_l[r], crow_l[r] + p)], dtype=torch.int64)
        plan.append((torch.tensor(rows, dtype=torch.int64), pos, offsets.index_select(0, pos), p))
    return plan, (torch.tensor(empty, dtype=torch.int64) if empty else None)


def _gather_panel(values, pos, n, p, bs):
    """``[n, P*in, out]``: a group's blocks transposed and laid side by side, one panel per block row."""
    return values.index_select(0, pos).view(n, p, bs, bs).permute(0, 1, 3, 2).reshape(n, p * bs, bs)


def _pixel_base(n, oh, ow, hp, wp, ncb, stride):
    """Row (of ``B`` channels) of the padded NHWC input where each output pixel's window starts."""
    sh, sw = stride
    i = torch.arange(n, dtype=torch.int64).view(n, 1, 1) * (hp * wp)
    i = i + torch.arange(oh, dtype=torch.int64).view(1, oh, 1) * (sh * wp)
    i = i + torch.arange(ow, dtype=torch.int64).view(1, 1, ow) * sw
    return (i * ncb).reshape(-1)


def bsr_conv2d_gather(x, values, crow, col, weight_shape, bias, stride, padding, dilation):
    """The ``gather`` strategy (``C % B == 0``); see the module docstring."""
    o, c, kh, kw = weight_shape
    bs = values.shape[1]
    if c % bs:
        raise ValueError(f"strategy 'gather' needs C % B == 0, got C={c}, B={bs}")
    n, _, h, w = x.shape
    oh, ow = output_size(h, w, kh, kw, stride, padding, dilation)
    m = n * oh * ow
    nbr = crow.numel() - 1
    ncb = c // bs
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    y = x.new_empty(m, nbr * bs)
    if m == 0:
        return _nchw_view(y[:, :o], n, oh, ow, o)
    if values.shape[0] == 0:
        y = x.new_zeros(m, o)
        if bias is not None:
            y += bias
        return _nchw_view(y, n, oh, ow, o)
    plan, empty = cached("bsr_conv_gather_plan", (crow, col), (ncb, kw, *dilation, wp),
                         lambda: _gather_plan(crow, col, ncb, kw, dilation[0], dilation[1], wp))
    # laid out once per weight (re-laid when the values change: every step in training)
    panels = cached("bsr_conv_gather_panels", (values, crow, col), (values.stride(),),
                    lambda: [_gather_panel(values, pos, rows.numel(), p, bs) for rows, pos, _, p in plan])
    xp = padded_nhwc(x, padding, "conv.xpad")
    rows_of_b = xp.reshape(-1, bs)  # a view: xp is contiguous NHWC
    geometry = (n, oh, ow, hp, wp, ncb, *stride, kh, kw, *dilation)  # the offsets depend on every part
    base = cached("bsr_conv_gather_base", (crow,), geometry, lambda: _pixel_base(n, oh, ow, hp, wp, ncb, stride))
    elt = x.element_size()
    # gather indices [n_rows, M, P] per group (cached per structure and input geometry: computing them is
    # a broadcast add with a short inner dimension, as slow as the gather itself)
    index = cached("bsr_conv_gather_index", (crow, col), geometry,
                   lambda: [(offsets.view(rows.numel(), 1, p) + base.view(1, m, 1)) for rows, _, offsets, p in plan])
    y3 = y.view(m, nbr, bs)
    if empty is not None:
        y3.index_fill_(1, empty, 0)
        if bias is not None:
            b3 = bias if o == nbr * bs else torch.nn.functional.pad(bias, (0, nbr * bs - o))
            y3.index_copy_(1, empty, b3.view(nbr, bs).index_select(0, empty).unsqueeze(0).expand(m, -1, -1))
    bias3 = None
    if bias is not None:  # added by the bmm (baddbmm): no pass over y
        bias3 = (bias if o == nbr * bs else torch.nn.functional.pad(bias, (0, nbr * bs - o))).view(nbr, 1, bs)
    for i, (rows, pos, offsets, p) in enumerate(plan):
        n_rows = rows.numel()
        w_all = panels[i]
        rows_l = rows.tolist()
        # chunks of block rows, and of pixels when one block row alone is too large
        per_row = max(1, m * p * bs * elt)
        step_r = max(1, GATHER_CHUNK_BYTES // per_row)
        step_m = m if per_row <= GATHER_CHUNK_BYTES else max(1, GATHER_CHUNK_BYTES // (p * bs * elt))
        for r0 in range(0, n_rows, step_r):
            r1 = min(n_rows, r0 + step_r)
            nr = r1 - r0
            b = bias3.index_select(0, rows[r0:r1]) if bias3 is not None else None
            for m0 in range(0, m, step_m):
                m1 = min(m, m0 + step_m)
                mm = m1 - m0
                a = scratch("conv.gather", nr * mm * p * bs, x.dtype).view(nr * mm * p, bs)
                torch.index_select(rows_of_b, 0, index[i][r0:r1, m0:m1].reshape(-1), out=a)
                res = scratch("conv.gather.out", nr * mm * bs, x.dtype).view(nr, mm, bs)
                if b is None:
                    torch.bmm(a.view(nr, mm, p * bs), w_all[r0:r1], out=res)
                else:
                    torch.baddbmm(b, a.view(nr, mm, p * bs), w_all[r0:r1], out=res)
                # strided copies into y's block columns (index_copy_ along a middle dimension is several
                # times slower): one for a run of consecutive block rows, else one per block row
                if rows_l[r1 - 1] - rows_l[r0] == nr - 1:
                    y3[m0:m1, rows_l[r0]:rows_l[r1 - 1] + 1].copy_(res.transpose(0, 1))
                else:
                    for j in range(nr):
                        y3[m0:m1, rows_l[r0 + j]].copy_(res[j])
    if o != nbr * bs:
        y = y[:, :o].contiguous()
    return _nchw_view(y, n, oh, ow, o)


# ------------------------------------------------------------------------------------------------ backward
def conv_weight_from_bsr(values, crow, col, weight_shape) -> torch.Tensor:
    """The dense ``[O, C, KH, KW]`` weight (in ``values``' dtype); differentiable in ``values``."""
    from ..formats import bsr_to_dense

    o, c, kh, kw = weight_shape
    return bsr_to_dense(values, crow, col, (o, kh * kw * c)).view(o, kh, kw, c).permute(0, 3, 1, 2)


def bsr_conv2d_dx_cpu(dy, values, crow, col, weight_shape, x_shape, stride, padding, dilation) -> torch.Tensor:
    """``dx = conv2d_input(dy, W)`` with the densified weight (oneDNN), channels_last."""
    w = conv_weight_from_bsr(values, crow, col, weight_shape).contiguous(memory_format=torch.channels_last)
    dx = torch.nn.grad.conv2d_input(tuple(x_shape), w, dy, stride, padding, dilation)
    return dx.contiguous(memory_format=torch.channels_last)


def bsr_conv2d_dw_cpu(dy, x, rows, col, block_size, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """``dvalues [nnz, B, B]``: the dense weight gradient (oneDNN) in ``(kh, kw, c)`` order, sampled at
    the stored blocks (entries past ``O`` / ``K`` are zero)."""
    o, c, kh, kw = weight_shape
    bs = block_size
    nnz = col.numel()
    if nnz == 0:
        return x.new_zeros(0, bs, bs)
    dw = torch.nn.grad.conv2d_weight(x, tuple(weight_shape), dy, stride, padding, dilation)
    k = kh * kw * c
    nbr, nbc = math.ceil(o / bs), math.ceil(k / bs)
    w2 = dw.permute(0, 2, 3, 1).reshape(o, k)
    if (o, k) != (nbr * bs, nbc * bs):
        w2 = torch.nn.functional.pad(w2, (0, nbc * bs - k, 0, nbr * bs - o))
    blocks = w2.view(nbr, bs, nbc, bs).transpose(1, 2)
    return blocks[rows, col.to(torch.int64)].contiguous()
