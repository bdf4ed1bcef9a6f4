"""Block-sparse matmul on the CPU with PyTorch ops (the CPU side of ``accel.ops.bsr_linear``).

Same contract as ``accel.kernels.bsr_matmul`` so the dispatcher can pick either. Three
strategies, chosen by the number of rows ``M`` of ``x`` (crossovers measured with
``python -m bench.bsr_microbench --strategies`` on 4096x4096, block 32, 2 cores; see bench/results):

* ``gather_bmm`` (small M): gather the ``x`` block column of every stored block, one batched
  ``[M, B] @ [B, B]`` per block, then ``index_add_`` into its block row. Reads each stored block once.
* ``gather_bmm_t`` (medium M): the same with ``x^T`` so each gathered slice is a contiguous
  ``[B, M]`` panel and the products are ``[B, B] @ [B, M]``.
* ``panels`` (large M): block rows sorted by block count and grouped into cache-sized chunks of
  similar count; each row's blocks are laid side by side into a ``[B, P*B]`` panel (short rows
  padded with zero blocks against a zero ``x`` block) so one ``bmm`` per chunk does the work with
  long inner products. No scatter of partial products, but ``x`` and ``y`` are transposed whole.
* ``rows`` (large M, density-proportional): block rows grouped by equal block count; for each
  group the ``x`` block columns its blocks need are gathered in place order (``[M, n*P*B]``, no
  transpose of ``x``), one ``bmm`` of the ``[n, M, P*B]`` view with the ``[n, P*B, B]`` panels,
  and the results copied into their ``y`` columns. Every copy is proportional to the stored
  blocks (plus the output), so a layer keeping 1 block of 576 costs about 1/576 of the work.

Which strategy (or the dense weight) serves a shape on this machine is measured by
``accel.engines`` (see ``accel.ops.bsr_linear``); :func:`pick_strategy` is the unmeasured default.

Half-precision partial sums are accumulated in fp32.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..formats import bsr_row_indices
from .packcache import cached, drop
from .workspace import scratch

# (largest M, strategy): see the module docstring
STRATEGY_BY_M = ((8, "gather_bmm"), (48, "gather_bmm_t"), (math.inf, "panels"))
STRATEGIES = ("gather_bmm", "gather_bmm_t", "panels", "rows", "mkl")
#: dtypes torch's CPU BSR matmul (MKL sparse BLAS, strategy "mkl") supports
MKL_DTYPES = (torch.float32, torch.float64)


def strategies_for(dtype: torch.dtype) -> tuple[str, ...]:
    return STRATEGIES if dtype in MKL_DTYPES else tuple(s for s in STRATEGIES if s != "mkl")
#: bytes of gathered x per panel chunk (about an L2/L3 slice)
PANEL_CHUNK_BYTES = 8 << 20
#: rows whose block count is at least this fraction of the chunk's longest row share its chunk
PANEL_FILL = 0.875
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pick_strategy(m: int) -> str:
    for limit, name in STRATEGY_BY_M:
        if m <= limit:
            return name
    raise AssertionError("unreachable")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]))


def _check(x, values, crow, col, out_features, block_index):
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bsr_dense_mm_cpu: x dtype must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"bsr_dense_mm_cpu: values dtype {values.dtype} must equal x dtype {x.dtype}")
    if x.dim() != 2 or values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(
            f"bsr_dense_mm_cpu: expected x [M, K] and values [nnz, B, B], got {tuple(x.shape)} and {tuple(values.shape)}"
        )
    bs = values.shape[1]
    if crow.numel() - 1 != math.ceil(out_features / bs):
        raise ValueError(
            f"bsr_dense_mm_cpu: crow_indices has {crow.numel() - 1} block rows, expected ceil({out_features}/{bs})"
        )
    n_pos = block_index.numel() if block_index is not None else values.shape[0]
    if col.numel() != n_pos:
        raise ValueError(f"bsr_dense_mm_cpu: col_indices has {col.numel()} entries but there are {n_pos} blocks")
    return bs


def bsr_dense_mm_cpu(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    *,
    blocks_transposed: bool = False,
    block_index: torch.Tensor | None = None,
    strategy: str | None = None,
) -> torch.Tensor:
    """``x[M, K] @ W^T (+ bias)`` for BSR ``W``; see ``accel.kernels.bsr_matmul.bsr_dense_mm``."""
    bs = _check(x, values, crow_indices, col_indices, out_features, block_index)
    m, k = x.shape
    nbr = crow_indices.numel() - 1
    nbc = math.ceil(k / bs)
    strategy = strategy or pick_strategy(m)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown CPU BSR strategy {strategy!r}, expected one of {STRATEGIES}")
    blocks = values.transpose(1, 2) if blocks_transposed else values  # [*, out, in]
    nnz = col_indices.numel()
    if m == 0 or nnz == 0 or k == 0:
        y = x.new_zeros(m, out_features)
    elif strategy == "panels":
        y = _panels(x, values, blocks_transposed, crow_indices, col_indices, block_index, nbr, nbc, bs, out_features)
    elif strategy == "rows":
        y = _rows(x, blocks, crow_indices, col_indices, block_index, nbr, nbc, bs, out_features)
    elif strategy == "mkl":
        y = _mkl(x, values, crow_indices, col_indices, block_index, blocks_transposed, nbr, nbc, bs, out_features)
    else:
        if block_index is not None:
            blocks = blocks.index_select(0, block_index)
        rows = bsr_row_indices(crow_indices, col_indices)
        acc_dtype = _acc_dtype(x.dtype)
        xp = _pad_cols(x, nbc * bs)
        if strategy == "gather_bmm":
            xg = scratch("gather.x", nnz * m * bs, x.dtype).view(nnz, m, bs)
            torch.index_select(xp.reshape(m, nbc, bs).transpose(0, 1), 0, col_indices, out=xg)  # [nnz, M, in]
            part = scratch("gather.part", nnz * m * bs, x.dtype).view(nnz, m, bs)
            torch.bmm(xg, blocks.transpose(1, 2), out=part)  # [nnz, M, out]
            acc = torch.zeros(nbr, m, bs, dtype=acc_dtype).index_add_(0, rows, part.to(acc_dtype))
            y = acc.transpose(0, 1).reshape(m, nbr * bs)[:, :out_features].to(x.dtype)
        else:
            xt = scratch("gather.xt", nbc * bs * m, x.dtype).view(nbc * bs, m)
            xt.copy_(xp.t())
            xg = scratch("gather.x", nnz * bs * m, x.dtype).view(nnz, bs, m)
            torch.index_select(xt.view(nbc, bs, m), 0, col_indices, out=xg)  # [nnz, in, M]
            part = scratch("gather.part", nnz * bs * m, x.dtype).view(nnz, bs, m)
            torch.bmm(blocks, xg, out=part)  # [nnz, out, M]
            acc = torch.zeros(nbr, bs, m, dtype=acc_dtype).index_add_(0, rows, part.to(acc_dtype))
            y = acc.view(nbr * bs, m)[:out_features].t().to(x.dtype)
    y = y.contiguous()
    if bias is not None:
        y += bias
    return y


def _panels_plan(crow, col, block_index, nbr, nbc):
    """Block rows by descending block count, in groups of similar count (each at least :data:`PANEL_FILL` of
    the group's first): ``(order, counts, [(first, end, p)], [nbr, p_max] block and column tables, empty rows)``.
    A padding slot takes block 0 (zeroed in the panel) and the zero block of x at column ``nbc``."""
    counts = crow[1:] - crow[:-1]
    order = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[order].tolist()
    p_max = sorted_counts[0]
    rows = bsr_row_indices(crow, col)
    nnz = col.numel()
    pos = torch.arange(nnz) - crow[rows]
    blk_of = torch.zeros(nbr, p_max, dtype=torch.int64)
    col_of = torch.full((nbr, p_max), nbc, dtype=torch.int64)
    blk_of[rows, pos] = block_index if block_index is not None else torch.arange(nnz)
    col_of[rows, pos] = col.to(torch.int64)  # int32 structures are valid too
    groups, s = [], 0
    while s < nbr and sorted_counts[s] > 0:
        p = sorted_counts[s]
        floor = math.ceil(PANEL_FILL * p)
        e = s + 1
        while e < nbr and sorted_counts[e] >= floor:
            e += 1
        groups.append((s, e, p))
        s = e
    return order, counts, groups, blk_of, col_of, (order[s:] if s < nbr else None)


def _panel_weights(blocks, plan, bs):
    """Per group: its block rows, the panel ``[n, out, p*in]`` of their blocks side by side (padding slots
    zero), and the flat x-block column of every slot ``[n * p]`` (laid out once per weight)."""
    order, counts, groups, blk_of, col_of, _ = plan
    out = []
    for s, e, p in groups:
        r = order[s:e]
        n = e - s
        slots = blocks.index_select(0, blk_of[r, :p].reshape(-1))
        pad = (torch.arange(p)[None, :] >= counts[r][:, None]).reshape(-1).nonzero().squeeze(1)
        if pad.numel():
            slots.index_fill_(0, pad, 0)
        panel = slots.view(n, p, bs, bs).permute(0, 2, 1, 3).reshape(n, bs, p * bs).contiguous()
        out.append((r, panel, col_of[r, :p].contiguous()))
    return out


def drop_panels(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, nbr: int, nbc: int) -> None:
    """Free the panel layout of a forward weight (measured with "panels", which was not chosen)."""
    drop("bsr_panels", (values, crow, col), (False, nbr, nbc))


def _panels(x, values, blocks_transposed, crow, col, block_index, nbr, nbc, bs, out_features):
    m, k = x.shape
    keys = (crow, col) if block_index is None else (crow, col, block_index)
    plan = cached("bsr_panels_plan", keys, (nbr, nbc), lambda: _panels_plan(crow, col, block_index, nbr, nbc))
    blocks = values.transpose(1, 2) if blocks_transposed else values  # [*, out, in]
    panels = cached("bsr_panels", (values,) + keys, (blocks_transposed, nbr, nbc),
                    lambda: _panel_weights(blocks.detach(), plan, bs))
    # x^T with one extra zero block: [nbc + 1, bs, M]; gathering whole [bs, M] slabs of it is the
    # cheapest gather (contiguous rows of M elements)
    xt = scratch("panels.xt", (nbc + 1) * bs * m, x.dtype).view((nbc + 1) * bs, m)
    xt[:k].copy_(x.t())
    xt[k:].zero_()
    xt = xt.view(nbc + 1, bs, m)
    yt = x.new_empty(nbr, bs, m)
    row_bytes = bs * m * x.element_size()
    for r, panel, cols in panels:  # in chunks of block rows whose gathered x fits PANEL_CHUNK_BYTES
        n, p = cols.shape
        cap = max(1, PANEL_CHUNK_BYTES // (p * row_bytes))
        for c0 in range(0, n, cap):
            c1 = min(n, c0 + cap)
            xg = scratch("panels.xg", (c1 - c0) * p * bs * m, x.dtype).view((c1 - c0) * p, bs, m)
            torch.index_select(xt, 0, cols[c0:c1].reshape(-1), out=xg)
            res = scratch("panels.out", (c1 - c0) * bs * m, x.dtype).view(c1 - c0, bs, m)
            torch.bmm(panel[c0:c1], xg.view(c1 - c0, p * bs, m), out=res)
            yt.index_copy_(0, r[c0:c1], res)
    if plan[5] is not None:  # block rows without stored blocks
        yt.index_fill_(0, plan[5], 0)
    return yt.view(nbr * bs, m)[:out_features].t()


def _mkl(x, values, crow, col, block_index, blocks_transposed, nbr, nbc, bs, out_features):
    """torch's own CPU BSR matmul (MKL sparse BLAS): ``W @ x^T``, transposed back; fp32/fp64 only."""
    if x.dtype not in MKL_DTYPES:
        raise ValueError(f"strategy 'mkl' (torch's CPU BSR matmul) supports {MKL_DTYPES}, got {x.dtype}")
    if block_index is not None or blocks_transposed:
        raise ValueError("strategy 'mkl' serves the forward structure only")
    m, k = x.shape
    def build():
        with warnings.catch_warnings():  # "beta state"; the structure was checked by accel.formats.check_bsr
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_bsr_tensor(crow, col, values.detach(), size=(nbr * bs, nbc * bs), check_invariants=False)

    w = cached("bsr_mkl", (values, crow, col), (nbr, nbc), build)
    xt = _pad_cols(x, nbc * bs).t().contiguous()
    return (w @ xt)[:out_features].t()


#: most bytes of gathered x per bmm of the rows strategy (bounds the scratch; ~an L2/L3 slice)
ROWS_CHUNK_BYTES = 16 << 20


def _rows_plan(crow, col, block_index, nbr, cap_blocks):
    """The rows strategy's work list for a block structure (cached with it): block rows grouped by equal
    block count, in chunks of at most ``cap_blocks`` blocks: ``(rows, cols, blocks, p)`` per chunk, plus
    the empty rows."""
    counts = (crow[1:] - crow[:-1]).tolist()
    groups: dict[int, list[int]] = {}
    for r, c in enumerate(counts):
        groups.setdefault(c, []).append(r)
    empty = groups.pop(0, [])
    crow_l = crow.tolist()
    chunks = []
    for p, rows in groups.items():
        cap = max(1, cap_blocks // p)
        for s0 in range(0, len(rows), cap):
            rs = rows[s0:s0 + cap]
            pos = torch.tensor([i for r in rs for i in range(crow_l[r], crow_l[r] + p)], dtype=torch.int64)
            idx = block_index.index_select(0, pos) if block_index is not None else pos
            chunks.append((torch.tensor(rs), col.index_select(0, pos), idx, p))
    return chunks, (torch.tensor(empty) if empty else None)


def _rows_panel(blocks, idx, n, p, bs):
    """``[n, P*in, out]``: the chunk's blocks transposed and laid side by side, one panel per block row."""
    return blocks.index_select(0, idx).view(n, p, bs, bs).permute(0, 1, 3, 2).reshape(n, p * bs, bs)


def _rows(x, blocks, crow, col, block_index, nbr, nbc, bs, out_features):
    m, k = x.shape
    row_bytes = max(1, m) * bs * x.element_size()
    cap_blocks = max(1, ROWS_CHUNK_BYTES // row_bytes)
    cap_blocks = 1 << (cap_blocks.bit_length() - 1)  # a power of two: few distinct plans per structure
    keys = (crow, col) if block_index is None else (crow, col, block_index)
    chunks, empty = cached("bsr_rows_plan", keys, (nbr, cap_blocks), lambda: _rows_plan(crow, col, block_index, nbr,
                                                                                        cap_blocks))
    # inference: the panels are laid out once per weight (a second copy of the blocks); training re-lays them
    reuse = not (torch.is_grad_enabled() and blocks.requires_grad)
    panels = cached("bsr_rows_panels", (blocks,) + keys, (nbr, cap_blocks, blocks.stride()),
                    lambda: [_rows_panel(blocks, idx, rs.numel(), p, bs) for rs, _, idx, p in chunks]) if reuse else None
    xp = _pad_cols(x, nbc * bs)
    x3 = xp.as_strided((m, nbc, bs), (xp.stride(0), bs, 1)) if xp.stride(1) == 1 else xp.reshape(m, nbc, bs)
    exact = out_features == nbr * bs
    y = x.new_empty(m, nbr * bs) if not exact else x.new_empty(m, out_features)
    y3 = y.view(m, nbr, bs)
    if empty is not None:
        if empty.numel() == nbr:
            y.zero_()
        else:
            y3.index_fill_(1, empty, 0)
    for i, (rs, cols, idx, p) in enumerate(chunks):
        n = rs.numel()
        xg = scratch("rows.xg", m * n * p * bs, x.dtype).view(m, n * p, bs)
        torch.index_select(x3, 1, cols, out=xg)  # [M, n*P, in]: the needed x blocks, in place order
        a = xg.view(m, n, p * bs).transpose(0, 1)  # [n, M, P*in], rows strided by n*P*in
        w = panels[i] if panels is not None else _rows_panel(blocks, idx, n, p, bs)
        res = scratch("rows.out", n * m * bs, x.dtype).view(n, m, bs)
        torch.bmm(a, w, out=res)  # [n, M, out]
        if n == 1:
            y3[:, int(rs[0])].copy_(res[0])
        else:
            y3.index_copy_(1, rs, res.transpose(0, 1))
    return y if exact else y[:, :out_features]


def bsr_sddmm_cpu(
    dy: torch.Tensor,
    x: torch.Tensor,
    row_indices: torch.Tensor,
    col_indices: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """``dvalues[p] = dy[:, r_p block]^T @ x[:, c_p block]``; see ``accel.kernels.bsr_matmul.bsr_sddmm``."""
    if dy.dtype != x.dtype or dy.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bsr_sddmm_cpu: dy and x must share one of {SUPPORTED_DTYPES}, got {dy.dtype} and {x.dtype}")
    if dy.dim() != 2 or x.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"bsr_sddmm_cpu: dy [M, N] and x [M, K] must share M, got {tuple(dy.shape)} and {tuple(x.shape)}")
    m = x.shape[0]
    bs = block_size
    nbr = math.ceil(dy.shape[1] / bs)
    nbc = math.ceil(x.shape[1] / bs)
    nnz = col_indices.numel()
    out = x.new_empty(nnz, bs, bs)
    if nnz == 0:
        return out
    dyb = _pad_cols(dy, nbr * bs).reshape(m, nbr, bs)
    xb = _pad_cols(x, nbc * bs).reshape(m, nbc, bs)
    # bound the gathered copies to ~64 MB per chunk
    step = max(1, (64 << 20) // max(1, 2 * m * bs * x.element_size()))
    for s in range(0, nnz, step):
        e = min(nnz, s + step)
        a = dyb.index_select(1, row_indices[s:e]).permute(1, 2, 0)  # [n, out, M]
        b = xb.index_select(1, col_indices[s:e]).transpose(0, 1)  # [n, M, in]
        torch.bmm(a, b, out=out[s:e])
    return out
