"""int8 block-sparse Linear on the CPU (the CPU side of ``accel.ops.int8_bsr_linear``).

``y = act((q(x) @ W_q^T) * x_scale[:, None] * w_scale[None, :] + bias)`` with ``x`` quantized per
token by accel's rule (``accel.quant``, the same integers as the dense int8 engines) and ``W_q`` an
int8 block-sparse weight (``values_q [nnz, B, B]`` blocks ``[out, in]``, ``crow`` / ``col`` as in
``accel.formats``) with one scale per output channel. The epilogue runs in fp32 in the Triton
kernel's order, ``((acc * x_scale) * w_scale) + bias``, then the activation; NaN/inf tokens get a
NaN scale and so NaN rows.

Strategies (which one serves a call is measured by ``accel.engines`` in ``accel.ops.int8_bsr_linear``):

* ``rows``: the quantized activation is padded to whole blocks once per call; consecutive block rows
  are taken in chunks whose gathered activation blocks fit in :data:`ROWS_CHUNK_BYTES` (one
  ``index_select`` per chunk into a reused buffer), and each block row is one
  ``torch._int_mm(x_gathered [M, P*B], W_row^T [P*B, B])`` (int8 x int8 -> int32, oneDNN/AMX on
  VNNI CPUs) writing its own ``[M, B]`` slab of the int32 accumulator. The row panels
  ``W_row [B, P*B]`` are laid out once per weight (cached). One GEMM call per non-empty block row.
* ``stacked`` (few tokens): a GEMM call costs ~8 us on the CPU whatever its size, so at small ``M``
  ``n`` block rows of similar block count (padded with zero blocks that read a zero activation
  block) are stacked into one ``[n*M, P*B] x [P*B, n*B]`` product whose ``n`` diagonal ``[M, B]``
  tiles are the outputs: ``n`` times the multiply-adds (free at small M) for one call instead of
  ``n``. ``n`` is about ``sqrt(STACK_WORK / M)`` (``stacked_wide``: twice that). A call is one gather of
  every group's activation blocks (rows ordered token-major, which makes each group's operand a contiguous
  slice: no transpose), the GEMMs into slices of one buffer, and one gather of the diagonal tiles.
* ``vnni``: native AVX-512 VNNI kernels (``accel.cpu.native``, compiled on this machine at first use): the
  quantization in one pass, then one pass over the stored blocks reading the activation blocks in place (no
  gather, no GEMM call per block row) with the epilogue applied as the sums are stored. Same integers, scales
  and epilogue order as the other strategies. Offered where the kernels build and pass their check
  (:func:`accel.cpu.native.int8_available`). ``vnni_amx``: the same with the product on AMX tiles (``tdpbusd``), where
  the CPU has them (:func:`accel.cpu.native.int8_amx_available`).
* ``float``: the same integers through accel's fp32 block-sparse path (``accel.cpu.bsr``): exact
  products, fp32 sums (~1e-7 relative). The strategy of CPUs whose int8 dot products saturate
  (no VNNI, where ``torch._int_mm`` is a slow reference loop; see ``accel.cpu.int8``).

The int8 strategies are exact (int32 accumulation) and run only where ``torch._int_mm`` is an
exact engine for the activation range (:func:`strategies`).
"""

from __future__ import annotations

import math

import torch

from ..formats import bsr_row_indices
from ..quant import activate
from . import bsr as cpu_bsr
from . import int8 as cpu_int8
from . import native as cpu_native
from .packcache import cached
from .workspace import scratch

STRATEGIES = ("rows", "stacked", "stacked_wide", "float", "vnni", "vnni_amx")
STACKED = ("stacked", "stacked_wide")
#: bytes of gathered int8 activation per chunk of block rows (about an L2 slice)
ROWS_CHUNK_BYTES = 1 << 20
#: ``stacked``: about ``n * n * M`` of this (the wasted multiply-adds grow as n^2 * M, calls fall as 1/n)
STACK_WORK = 256
#: a token scale past this may overflow ``acc * scale`` (|acc| < 2**31) in fp32: the epilogue takes those rows in fp64
HUGE_SCALE = 2.0 ** 96


def strategies(qmax: int, m: int | None = None) -> tuple[str, ...]:
    """The strategies exact for activation range ``qmax`` on this machine (the ``torch._int_mm`` ones need it to be
    an exact engine: VNNI/AMX; every GEMM here has K >= B >= 16; ``vnni`` needs the native kernels). With ``m``
    (tokens per call): the stacked ones only while they stack rows (:func:`stack_size` > 1): beyond, ``rows`` does
    the same work, and their one gather of every group's activations would grow with ``m``."""
    native = (("vnni",) if cpu_native.int8_available() else ()) + \
        (("vnni_amx",) if cpu_native.int8_amx_available() else ())
    if "int_mm" not in cpu_int8.exact_engines(qmax, 16):
        return native + ("float",)
    return ("rows",) + (STACKED if m is None or stack_size(m) > 1 else ()) + native + ("float",)


def default_strategy(qmax: int, m: int) -> str:
    """The unmeasured choice (``ACCEL_ENGINE_MEASURE=0``, tracing): the native kernel where it runs."""
    allowed = strategies(qmax, m)
    if "vnni" in allowed:
        return "vnni"
    if "rows" not in allowed:
        return "float"
    return "stacked" if m <= 16 else "rows"


def stack_size(m: int, wide: bool = False) -> int:
    """Block rows per stacked GEMM at ``m`` tokens: a power of two near ``sqrt(STACK_WORK / m)``, twice that for
    ``stacked_wide`` (half the GEMM calls for twice the wasted multiply-adds: which pays is measured)."""
    n = max(1, round(math.sqrt(STACK_WORK / max(1, m))))
    return (2 if wide else 1) << (n.bit_length() - 1)


# ---------------------------------------------------------------------------------------------
# quantization and epilogue
# ---------------------------------------------------------------------------------------------
def quantize_padded(x: torch.Tensor, qmax: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(v, q, scale)``: ``v`` the rounded fp32 integers ``[M, K]`` (scratch), ``q`` the same as int8
    ``[M, width]`` zero-padded past K (scratch), ``scale [M]`` (NaN for tokens holding NaN/inf)."""
    xf = cpu_int8.as_fp32(x, "int8_bsr.x32")
    m, k = xf.shape
    scale, inv = cpu_int8.act_scale_inv(xf, qmax, None)
    v = cpu_int8._scaled_rounded(xf, inv[:, None], qmax, False, "int8_bsr.v")
    q = scratch("int8_bsr.q", m * width, torch.int8).view(m, width)
    q[:, :k].copy_(v)
    if width > k:
        q[:, k:].zero_()
    return v, q, scale


def epilogue(acc: torch.Tensor, scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             activation: str, out_dtype: torch.dtype) -> torch.Tensor:
    """``act(((acc * scale[:, None]) * w_scale) + bias)`` in fp32 (the Triton kernel's order), then ``out_dtype``.

    ``acc``: ``[M, N]``, or ``[M, R, B]`` (any strides) for block rows of ``B`` outputs, ``R * B >= N``."""
    n = w_scale.shape[0]
    m = acc.shape[0]
    # (int32 -> fp32, then the scale: a mixed int32 x fp32 mul takes a slow casting loop, ~1.3x these two)
    if acc.dim() == 3:
        y = torch.empty(m, acc.shape[1] * acc.shape[2], dtype=torch.float32)
        y.view(acc.shape).copy_(acc).mul_(scale[:, None, None])
        y = y[:, :n]
    else:
        y = torch.empty(acc.shape, dtype=torch.float32)
        y.copy_(acc).mul_(scale[:, None])
    if bias is not None:  # one pass: bias + y * w_scale
        torch.addcmul(bias if bias.dtype == torch.float32 else bias.float(), y, w_scale, out=y)
    else:
        y.mul_(w_scale)
    big = scale > HUGE_SCALE  # acc * scale may overflow fp32 before w_scale brings it back: those rows in fp64
    if bool(big.any()):
        r = big.nonzero().flatten()
        a = (acc.reshape(m, -1)[:, :n] if acc.dim() == 3 else acc).index_select(0, r).double()
        yr = (a * scale.index_select(0, r).double()[:, None]) * w_scale.double()
        y[r] = (yr if bias is None else yr + bias.double()).float()
    y = activate(y, activation, inplace=True)
    if not y.is_contiguous():  # N not a multiple of B
        y = y.contiguous()
    return y if out_dtype == torch.float32 else y.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def _row_panels(values_q: torch.Tensor, crow: torch.Tensor) -> list[torch.Tensor | None]:
    """``W_row^T [P*B, B]`` (a column-major view of the contiguous ``[B, P*B]`` panel) per block row."""
    bs = values_q.shape[1]
    c = crow.tolist()
    out = []
    for r in range(len(c) - 1):
        p = c[r + 1] - c[r]
        out.append(values_q[c[r]:c[r + 1]].permute(1, 0, 2).reshape(bs, p * bs).contiguous().t() if p else None)
    return out


def _rows_plan(crow: torch.Tensor, col: torch.Tensor, cap_blocks: int):
    """Consecutive block rows in chunks of at most ``cap_blocks`` stored blocks (a row longer than that is
    a chunk of its own): ``[(first row, end row, col indices of the chunk, first block of the chunk)]``."""
    c = crow.tolist()
    nbr = len(c) - 1
    chunks, r = [], 0
    while r < nbr:
        e = r + 1
        while e < nbr and c[e + 1] - c[r] <= cap_blocks:
            e += 1
        if c[e] > c[r]:
            chunks.append((r, e, col[c[r]:c[e]], c[r]))
        r = e
    return chunks, c


#: bound views kept per plan (one per recent (M, buffers) combination)
BOUND_KEEP = 8


class _Bound:
    """Per-call views of a plan (GEMM operand slices of the reused buffers), rebuilt when the buffers or M
    change: building ~2 views per block row costs about as much as the GEMMs at small M. Keeps the
    :data:`BOUND_KEEP` most recent bindings (each holds its buffers alive)."""

    def __init__(self) -> None:
        self.entries: dict = {}

    def get(self, key, build):
        hit = self.entries.pop(key, None)
        if hit is None:
            hit = build()
            while len(self.entries) >= BOUND_KEEP:
                self.entries.pop(next(iter(self.entries)))
        self.entries[key] = hit
        return hit


def _rows(q, values_q, crow, col, nbr, bs) -> torch.Tensor:
    m, width = q.shape
    nbc = width // bs
    cap = max(1, ROWS_CHUNK_BYTES // max(1, m * bs))
    cap = 1 << (cap.bit_length() - 1)
    chunks, c, bound = cached("int8_bsr_rows_plan", (crow, col), (cap,), lambda: _rows_plan(crow, col, cap) + (_Bound(),))
    panels = cached("int8_bsr_row_panels", (values_q, crow), (), lambda: _row_panels(values_q, crow))
    acc = scratch("int8_bsr.acc", nbr * m * bs, torch.int32).view(nbr, m, bs)
    g = scratch("int8_bsr.g", m * max((cols.numel() for *_, cols, _ in chunks), default=0) * bs, torch.int8)

    def build():
        x3 = q.view(m, nbc, bs)
        work = []
        for r0, r1, cols, b0 in chunks:
            gc = g[:m * cols.numel() * bs].view(m, cols.numel() * bs)
            gemms = [(gc[:, (c[r] - b0) * bs:(c[r + 1] - b0) * bs], panels[r], acc[r]) for r in range(r0, r1)
                     if panels[r] is not None]
            work.append((x3, cols, gc.view(m, cols.numel(), bs), gemms))
        empty = (crow[1:] == crow[:-1]).nonzero().flatten()
        return work, (acc, empty) if empty.numel() else None

    work, zero = bound.get((m, width, q.data_ptr(), g.data_ptr(), acc.data_ptr(), id(panels)), build)
    if zero is not None:
        zero[0].index_fill_(0, zero[1], 0)
    for x3, cols, g3, gemms in work:
        torch.index_select(x3, 1, cols, out=g3)
        for a, w, out in gemms:
            torch._int_mm(a, w, out=out)
    return acc.permute(1, 0, 2)  # [M, nbr, B]


# ---------------------------------------------------------------------------------------------
# stacked
# ---------------------------------------------------------------------------------------------
def _stack_plan(values_q: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, nbc: int, n: int):
    """Groups of ``n`` block rows by descending block count, each padded to its longest row with zero
    blocks at the zero activation column ``nbc``: ``[(rows, cols [n_g * P], W^T [P*B, n_g*B])]`` (rows without
    blocks are in no group)."""
    bs = values_q.shape[1]
    counts = crow[1:] - crow[:-1]
    order = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[order].tolist()
    nnz = col.numel()
    p_max = sorted_counts[0] if sorted_counts else 0
    rows_of = bsr_row_indices(crow, col)
    slot = torch.full((counts.numel(), p_max), -1, dtype=torch.int64)  # [block row, position] -> stored block
    slot[rows_of, torch.arange(nnz) - crow[rows_of]] = torch.arange(nnz)
    groups = []
    for s in range(0, len(sorted_counts), n):
        p = sorted_counts[s]
        if p == 0:
            break
        rows = order[s:s + n]
        ng = rows.numel()
        sl = slot[rows, :p]  # [ng, p] stored block or -1 (padding)
        pad = sl < 0
        cols = torch.where(pad, torch.full_like(sl, nbc), col[sl.clamp_min(0)])
        blocks = values_q[sl.clamp_min(0).flatten()].view(ng, p, bs, bs)
        blocks = blocks.masked_fill(pad[:, :, None, None], 0)
        w = blocks.permute(0, 2, 1, 3).reshape(ng * bs, p * bs).contiguous()  # [ng*B out, P*B in]
        groups.append((rows, cols.flatten().contiguous(), w.t()))
    return groups


def _stack_bind(groups, m: int, nbc: int, nbr: int, bs: int):
    """The per-``m`` index plan of :func:`_stacked`: ``(gather index [m * slots], slots, diag index [m * nbr],
    result rows)``. Group ``g``'s GEMM operand is the contiguous ``[m, n_g * P_g, B]`` slice of one gather
    (rows ordered (token, block row), so no transpose), its ``[m * n_g, n_g * B]`` result a contiguous slice
    of one buffer, and the outputs (the diagonal tiles) come out of it in one ``index_select`` of ``B``-wide
    rows; rows with no blocks read the zero row after the results."""
    tok = torch.arange(m, dtype=torch.int64)
    gather = []
    diag = torch.full((m, nbr), -1, dtype=torch.int64)
    slots = res_rows = 0
    for rows, cols, _ in groups:
        ng = rows.numel()
        gather.append((tok * (nbc + 1))[:, None] + cols[None, :])  # [m, n_g * P]
        i = torch.arange(ng, dtype=torch.int64)
        # B-row of result tile (t, i, i): row t * ng + i of [m * ng, ng * B], tile column i
        diag[:, rows] = res_rows + (tok[:, None] * ng + i[None, :]) * ng + i[None, :]
        slots += cols.numel()
        res_rows += m * ng * ng
    diag[diag < 0] = res_rows  # rows in no group read the zero row after the results
    return torch.cat([g.flatten() for g in gather]), slots, diag.flatten(), res_rows + 1


def _stacked(q, values_q, crow, col, nbr, bs, wide: bool = False) -> torch.Tensor:
    m, width = q.shape
    nbc = width // bs - 1  # the last block column of q is the zero block the padding reads
    n = stack_size(m, wide)
    groups, bound, indexes = cached("int8_bsr_stack_plan", (values_q, crow, col), (nbc, n),
                                    lambda: (_stack_plan(values_q, crow, col, nbc, n), _Bound(), _Bound()))
    gidx, slots, didx, res_rows = indexes.get(m, lambda: _stack_bind(groups, m, nbc, nbr, bs))
    g = scratch("int8_bsr.sg", m * slots * bs, torch.int8).view(m * slots, bs)
    res = scratch("int8_bsr.sres", res_rows * bs, torch.int32).view(res_rows, bs)

    def build():
        work, off, roff = [], 0, 0
        for rows, cols, wt in groups:
            ng, kb = rows.numel(), wt.shape[0]
            a = g[off * m:(off + cols.numel()) * m].view(m * ng, kb)  # rows (token, block row)
            out = res[roff:roff + m * ng * ng].view(m * ng, ng * bs)
            work.append((a, wt, out))
            off += cols.numel()
            roff += m * ng * ng
        return work

    work = bound.get((m, width, q.data_ptr(), g.data_ptr(), res.data_ptr()), build)
    torch.index_select(q.view(-1, bs), 0, gidx, out=g)  # every group's activation blocks, in one gather
    for a, wt, out in work:
        torch._int_mm(a, wt, out=out)  # [ng*M, ng*B]: the diagonal tiles are the outputs
    res[-1].zero_()
    return res.index_select(0, didx).view(m, nbr, bs)


# ---------------------------------------------------------------------------------------------
# vnni (the native kernel)
# ---------------------------------------------------------------------------------------------
def native_runner(values_q, w_scale, crow, col, out_features: int, k: int, bias, activation: str, qmax: int,
                  dtype: torch.dtype, amx: bool):
    """The ``vnni`` / ``vnni_amx`` strategy for one layer's operands, fetched once (the packed blocks, fp32 scales and
    bias): a function of ``x [M, k]`` in ``dtype`` (``accel.cpu.native.int8_runner``, then the activation and the
    conversion to ``dtype``)."""
    w = cached("int8_bsr_native", (values_q, crow, col), (), lambda: cpu_native.pack(values_q, crow, col))
    b = None if bias is None else bias.detach().float().contiguous()
    return cpu_native.int8_runner(w, w_scale.detach().float().contiguous(), b, out_features, qmax, k, amx, dtype,
                                  activation)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _float_values(values_q: torch.Tensor) -> torch.Tensor:
    return cached("int8_bsr_values_f32", (values_q,), (), lambda: values_q.float())


def int8_bsr_linear_cpu(
    x: torch.Tensor,
    values_q: torch.Tensor,
    w_scale: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    qmax: int = 127,
    strategy: str = "rows",
) -> torch.Tensor:
    """``act((q(x) @ W_q^T) * x_scale * w_scale + bias)`` for float ``x [M, K]``, in ``x``'s dtype.

    The structure and shapes are the caller's to validate (``accel.ops.int8_bsr_linear``); a strategy
    that is not exact for ``qmax`` here raises.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown CPU int8 block-sparse strategy {strategy!r}, expected one of {STRATEGIES}")
    m, k = x.shape
    bs = values_q.shape[1]
    if strategy not in strategies(qmax):
        raise ValueError(f"CPU int8 block-sparse strategy {strategy!r} is not available for activation qmax {qmax} on "
                         f"this CPU (torch._int_mm needs VNNI/AMX; the native kernels AVX-512 VNNI and a C++ "
                         f"compiler); available here: {strategies(qmax)}")
    nbr, nbc = math.ceil(out_features / bs), math.ceil(k / bs)
    if m == 0 or k == 0:  # no products: the bias (activated)
        y = torch.zeros(m, out_features, dtype=torch.float32)
        if bias is not None:
            y += bias.float()
        return activate(y, activation).to(x.dtype)
    if col.numel() == 0:  # every block pruned: 0 * x_scale, so tokens holding NaN/inf still give NaN rows
        scale, _ = cpu_int8.act_scale_inv(x if x.dtype == torch.float32 else x.float(), qmax, None)
        return epilogue(torch.zeros(m, out_features, dtype=torch.int32), scale, w_scale, bias, activation, x.dtype)
    if strategy in ("vnni", "vnni_amx"):
        return native_runner(values_q, w_scale, crow, col, out_features, k, bias, activation, qmax, x.dtype,
                             strategy == "vnni_amx")(x)
    pad = bs if strategy in STACKED else 0  # a zero block column for the padding slots
    v, q, scale = quantize_padded(x, qmax, nbc * bs + pad)
    if strategy == "float":
        acc = cpu_bsr.bsr_dense_mm_cpu(v, _float_values(values_q), crow, col, out_features,
                                       strategy=cpu_bsr.pick_strategy(m))
    elif strategy == "rows":
        acc = _rows(q, values_q, crow, col, nbr, bs)
    else:
        acc = _stacked(q, values_q, crow, col, nbr, bs, strategy == "stacked_wide")
    return epilogue(acc, scale, w_scale, bias, activation, x.dtype)


def int8_bsr_linear_reference(x, values_q, w_scale, crow, col, out_features, bias=None, activation="none",
                              qmax: int = 127) -> torch.Tensor:
    """The same integers through an fp64 dense product (exact), then the fp32 epilogue: the yardstick a
    strategy must match before ``accel.engines`` may choose it. Returns fp32."""
    from ..formats import bsr_to_dense

    xf = x.float()
    scale, inv = cpu_int8.act_scale_inv(xf, qmax, None)
    v = torch.round((xf * inv[:, None]).clamp(-qmax, qmax))
    w = bsr_to_dense(values_q.double(), crow, col, (out_features, x.shape[1]))
    acc = (v.double() @ w.t()).float()
    return epilogue(acc, scale, w_scale, bias, activation, torch.float32)
