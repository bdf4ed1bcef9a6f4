"""PyTorch references for the int8 block-sparse matmul and the block-sparse conv kernels.

They are written independently of the kernels' own layout helpers (plain loops over the stored
blocks), so a bug in ``conv_weight_to_bsr`` / ``bsr_to_conv_weight`` cannot hide in both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------- structures
def random_block_mask(n_rows: int, n_cols: int, density: float, empty_rows=(), seed: int = 0) -> torch.Tensor:
    """``[n_rows, n_cols]`` bool mask keeping about ``density`` of the blocks; rows in ``empty_rows`` keep none."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_rows, n_cols, generator=g) < density
    for r in empty_rows:
        mask[r] = False
    return mask


def bsr_from_mask(dense: torch.Tensor, block: int, mask: torch.Tensor):
    """``(values [nnz, B, B], crow int64, col int64)`` of the 2-D ``dense`` (zero-padded to whole
    blocks) keeping the blocks where ``mask`` is True, in row-major block order."""
    n, k = dense.shape
    nbr, nbc = mask.shape
    assert (nbr, nbc) == (math.ceil(n / block), math.ceil(k / block)), (mask.shape, dense.shape, block)
    padded = dense.new_zeros(nbr * block, nbc * block)
    padded[:n, :k] = dense
    values, cols, crow = [], [], [0]
    for r in range(nbr):
        for c in range(nbc):
            if mask[r, c]:
                values.append(padded[r * block:(r + 1) * block, c * block:(c + 1) * block])
                cols.append(c)
        crow.append(len(cols))
    vals = torch.stack(values) if values else dense.new_zeros(0, block, block)
    return vals.contiguous(), torch.tensor(crow, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)


def bsr_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense ``[N, K]`` matrix of BSR arrays (loop over the stored blocks, then crop the padding)."""
    bs = values.shape[-1]
    n, k = shape
    nbr, nbc = math.ceil(n / bs), math.ceil(k / bs)
    out = values.new_zeros(nbr * bs, nbc * bs)
    for r in range(nbr):
        for p in range(int(crow[r]), int(crow[r + 1])):
            c = int(col[p])
            out[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = values[p]
    return out[:n, :k]


def block_rows(crow: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(crow.numel() - 1), (crow[1:] - crow[:-1]).long())


# ----------------------------------------------------------------------------------- int8 matmul
def int8_bsr_mm_ref(x_q, x_scale, values_q, w_scale, crow, col, n, bias=None, activation="none", out_dtype=torch.float32):
    """Exact int64 accumulation, then the epilogue of ``accel.quant.apply_epilogue`` in fp32:
    ``act(((acc * x_scale) * w_scale) + bias)`` ("relu" keeps NaN, "gelu" erf); int32 is the raw accumulator."""
    w = bsr_dense(values_q.long(), crow, col, (n, x_q.shape[1]))
    acc = x_q.long() @ w.t()
    if out_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.float()
    if x_scale is not None:
        out = out * x_scale.float()[:, None]
    if w_scale is not None:
        out = out * w_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    if activation == "relu":
        out = torch.relu(out)
    elif activation == "gelu":
        out = F.gelu(out)
    return out.to(out_dtype)


# ------------------------------------------------------------------------------------------ conv
def conv_weight_from_bsr(values, crow, col, weight_shape) -> torch.Tensor:
    """Dense OIHW weight: the BSR matrix ``[O, KH*KW*C]`` in (kh, kw, c) order, reshaped to OHWI, permuted."""
    o, c, kh, kw = weight_shape
    w2 = bsr_dense(values, crow, col, (o, kh * kw * c))
    return w2.reshape(o, kh, kw, c).permute(0, 3, 1, 2)


def conv_block_mask(weight_shape, block: int, density: float, empty_rows=(), seed: int = 0) -> torch.Tensor:
    o, c, kh, kw = weight_shape
    return random_block_mask(math.ceil(o / block), math.ceil(kh * kw * c / block), density, empty_rows, seed)


def random_conv_bsr(weight_shape, block: int, density: float, empty_rows=(), seed: int = 0, dtype=torch.float32):
    """A Gaussian ``[O, KH*KW*C]`` weight in BSR with a random block mask: ``(values, crow, col)``."""
    o, c, kh, kw = weight_shape
    g = torch.Generator().manual_seed(seed + 1)
    dense = torch.randn(o, kh * kw * c, generator=g)
    mask = conv_block_mask(weight_shape, block, density, empty_rows, seed)
    values, crow, col = bsr_from_mask(dense, block, mask)
    return values.to(dtype), crow, col


def conv_ref(x, values, crow, col, weight_shape, bias=None, stride=1, padding=0, dilation=1):
    """``F.conv2d`` in float64 with the dense weight rebuilt from the BSR blocks."""
    w = conv_weight_from_bsr(values.double(), crow, col, weight_shape)
    return F.conv2d(x.double(), w, None if bias is None else bias.double(), stride, padding, dilation)


def conv_dx_ref(dy, values, crow, col, weight_shape, x_shape, stride=1, padding=0, dilation=1):
    w = conv_weight_from_bsr(values.double(), crow, col, weight_shape)
    return torch.nn.grad.conv2d_input(tuple(x_shape), w, dy.double(), stride, padding, dilation)


def conv_dw_ref(dy, x, crow, col, block, weight_shape, stride=1, padding=0, dilation=1):
    """``[nnz, B, B]``: the dense ``conv2d_weight`` gradient in (kh, kw, c) order, sampled at the stored
    blocks (padding rows/columns zero)."""
    o, c, kh, kw = weight_shape
    dw = torch.nn.grad.conv2d_weight(x.double(), tuple(weight_shape), dy.double(), stride, padding, dilation)
    w2 = dw.permute(0, 2, 3, 1).reshape(o, kh * kw * c)
    k = kh * kw * c
    padded = w2.new_zeros(math.ceil(o / block) * block, math.ceil(k / block) * block)
    padded[:o, :k] = w2
    rows = block_rows(crow)
    out = [padded[r * block:(r + 1) * block, cc * block:(cc + 1) * block] for r, cc in zip(rows.tolist(), col.tolist())]
    return torch.stack(out) if out else padded.new_zeros(0, block, block)
