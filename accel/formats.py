"""Weight formats.

Block-sparse rows (BSR) with square blocks: a weight ``W [N, K]`` is padded to whole blocks and
kept as ``values [nnz, B, B]`` (nonzero blocks, each oriented ``[out, in]``, ordered by block row
then column), ``col_indices [nnz]`` and ``crow_indices [ceil(N/B) + 1]`` (int64). The same
arrays feed the Triton kernels, the CPU path and ``torch.sparse_bsr_tensor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_SIZES = (16, 32, 64, 128)


def check_block_size(block_size, what: str = "block size") -> int:
    """``block_size`` if it is an int in :data:`BLOCK_SIZES`, else a ValueError naming it."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise ValueError(f"{what} must be an int in {BLOCK_SIZES}, got {block_size!r}")
    return block_size


def check_bsr(crow: torch.Tensor, col: torch.Tensor, nnz: int, shape: tuple[int, int], block_size: int,
              what: str = "BSR") -> None:
    """Check the BSR invariants, raising a ValueError that names the first broken one: int32/int64 1-D
    indices on one device, ``len(crow) == ceil(N/B) + 1``, ``crow[0] == 0``, ``crow`` non-decreasing,
    ``crow[-1] == nnz == len(col)``, ``0 <= col < ceil(K/B)`` and columns strictly increasing within
    each block row (no duplicates). One pass over the indices; on CUDA it synchronises once."""
    nbr, nbc = block_grid(shape, block_size)
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
            raise ValueError(f"{what}: {name} must be a 1-D int32/int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if crow.device != col.device:
        raise ValueError(f"{what}: crow_indices on {crow.device} but col_indices on {col.device}")
    if crow.numel() != nbr + 1:
        raise ValueError(f"{what}: crow_indices has {crow.numel()} entries, expected ceil({shape[0]}/{block_size}) + 1 "
                         f"= {nbr + 1}")
    if col.numel() != nnz:
        raise ValueError(f"{what}: col_indices has {col.numel()} entries but there are {nnz} blocks")
    c = crow.to(torch.int64)
    first, last = (int(v) for v in c[[0, -1]].tolist())
    if first != 0 or last != nnz:
        raise ValueError(f"{what}: crow_indices must start at 0 and end at nnz={nnz}, got {first} ... {last}")
    counts = c[1:] - c[:-1]
    if nbr and bool((counts < 0).any()):
        r = int((counts < 0).nonzero()[0])
        raise ValueError(f"{what}: crow_indices decreases at block row {r} ({int(c[r])} -> {int(c[r + 1])})")
    if nnz:
        cc = col.to(torch.int64)
        lo, hi = (int(v) for v in torch.aminmax(cc))
        if lo < 0 or hi >= nbc:
            raise ValueError(f"{what}: col_indices must lie in [0, {nbc}) for K={shape[1]}, block {block_size}; "
                             f"got values in [{lo}, {hi}]")
        if nnz > 1:
            same_row = torch.ones(nnz - 1, dtype=torch.bool, device=cc.device)
            starts = c[1:-1]
            starts = starts[(starts > 0) & (starts < nnz)]
            same_row[starts - 1] = False
            bad = same_row & (cc[1:] <= cc[:-1])
            if bool(bad.any()):
                p = int(bad.nonzero()[0]) + 1
                raise ValueError(f"{what}: col_indices must increase strictly within a block row; position {p} "
                                 f"({int(cc[p - 1])} then {int(cc[p])})")


_CHECKED: dict = {}


def check_bsr_cached(crow: torch.Tensor, col: torch.Tensor, nnz: int, shape: tuple[int, int], block_size: int,
                     what: str = "BSR") -> None:
    """:func:`check_bsr`, skipped when these very index tensors (same objects, versions and data) were
    already checked for this shape: the per-call cost of validation stays a few microseconds. Skipped while
    traced (torch.compile, torch.jit.trace: data-dependent, and a trace must record the same ops every run)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return

    def state(t):
        return (id(t), t.data_ptr(), -1 if t.is_inference() else t._version)

    key = (state(crow), state(col), nnz, tuple(shape), block_size)
    if _CHECKED.get(id(crow)) == key and not crow.is_inference() and not col.is_inference():
        return
    check_bsr(crow, col, nnz, shape, block_size, what)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[id(crow)] = key


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """(block rows, block columns) of a ``[N, K]`` matrix padded to whole blocks."""
    n, k = shape
    return math.ceil(n / block_size), math.ceil(k / block_size)


def pad_to_blocks(dense: torch.Tensor, block_size: int) -> torch.Tensor:
    nbr, nbc = block_grid(tuple(dense.shape), block_size)
    n, k = dense.shape
    if (n, k) == (nbr * block_size, nbc * block_size):
        return dense
    out = dense.new_zeros(nbr * block_size, nbc * block_size)
    out[:n, :k] = dense
    return out


def block_norms(dense: torch.Tensor, block_size: int, p: int = 2) -> torch.Tensor:
    """``[nbr, nbc]`` L1 (p=1) or L2 (p=2) norm of each block of ``dense`` (padding counts as 0)."""
    check_block_size(block_size)
    if p not in (1, 2):
        raise ValueError(f"block norm order must be 1 or 2, got {p}")
    nbr, nbc = block_grid(tuple(dense.shape), block_size)
    blocks = pad_to_blocks(dense.detach().float(), block_size).view(nbr, block_size, nbc, block_size)
    return blocks.abs().sum(dim=(1, 3)) if p == 1 else blocks.pow(2).sum(dim=(1, 3)).sqrt()


def topk_block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * numel)`` highest-scoring blocks (ties: lower index first)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    keep = int(round((1.0 - sparsity) * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        idx = torch.sort(scores.flatten(), descending=True, stable=True).indices[:keep]
        mask[idx] = True
    return mask.view_as(scores)


def expand_block_mask(block_mask: torch.Tensor, block_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Elementwise ``[N, K]`` mask from a ``[nbr, nbc]`` block mask."""
    nbr, nbc = block_mask.shape
    full = block_mask[:, None, :, None].expand(nbr, block_size, nbc, block_size).reshape(nbr * block_size, nbc * block_size)
    return full[: shape[0], : shape[1]]


def check_binary_mask(mask: torch.Tensor, what: str = "mask") -> torch.Tensor:
    """``mask`` as bool if it is bool or holds only 0 and 1; a ValueError naming other values (0.5, NaN, ...)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{what} must be bool or hold only 0 and 1, got dtype {mask.dtype}")
    bad = ~((mask == 0) | (mask == 1))
    if bool(bad.any()):
        vals = mask[bad].flatten()[:4].tolist()
        raise ValueError(f"{what} must be bool or hold only 0 and 1 (it is a mask, not a scale), got values like {vals}")
    return mask != 0


def as_block_mask(mask: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Accept an elementwise ``[N, K]`` mask (a block is kept if any element is) or a ``[nbr, nbc]`` block mask."""
    grid = block_grid(shape, block_size)
    mask = check_binary_mask(mask)
    if tuple(mask.shape) == tuple(shape):
        nbr, nbc = grid
        return pad_to_blocks(mask, block_size).view(nbr, block_size, nbc, block_size).any(dim=3).any(dim=1)
    if tuple(mask.shape) == grid:
        return mask
    raise ValueError(
        f"mask must be elementwise {tuple(shape)} or a block mask {grid} for block size {block_size}, "
        f"got shape {tuple(mask.shape)}"
    )


@dataclass
class BSRMatrix:
    """A ``[N, K]`` matrix in block-sparse-row form (see the module docstring)."""

    values: torch.Tensor
    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    shape: tuple[int, int]
    block_size: int

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_size: int, block_mask: torch.Tensor | None = None) -> "BSRMatrix":
        """Blocks where ``block_mask`` is True (default: blocks with any nonzero) become stored blocks.

        Stored blocks keep their zeros; unstored blocks are dropped even if nonzero, so pass the
        mask you pruned with.
        """
        check_block_size(block_size)
        if dense.dim() != 2:
            raise ValueError(f"dense must be 2-D, got shape {tuple(dense.shape)}")
        shape = (int(dense.shape[0]), int(dense.shape[1]))
        nbr, nbc = block_grid(shape, block_size)
        blocks = pad_to_blocks(dense, block_size).view(nbr, block_size, nbc, block_size).transpose(1, 2)
        if block_mask is None:
            block_mask = blocks.ne(0).any(dim=3).any(dim=2)
        else:
            block_mask = as_block_mask(block_mask, shape, block_size).to(dense.device)
        rows, cols = block_mask.nonzero(as_tuple=True)  # row-major order
        values = blocks[rows, cols].contiguous()
        counts = torch.bincount(rows, minlength=nbr)
        crow = torch.zeros(nbr + 1, dtype=torch.int64, device=dense.device)
        crow[1:] = torch.cumsum(counts, 0)
        return cls(values, crow, cols.to(torch.int64), shape, block_size)

    def to_dense(self) -> torch.Tensor:
        return bsr_to_dense(self.values, self.crow_indices, self.col_indices, self.shape)

    def block_mask(self) -> torch.Tensor:
        nbr, nbc = block_grid(self.shape, self.block_size)
        mask = torch.zeros(nbr, nbc, dtype=torch.bool, device=self.values.device)
        mask[bsr_row_indices(self.crow_indices, self.col_indices), self.col_indices] = True
        return mask

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of blocks stored (1.0 for an empty matrix)."""
        nbr, nbc = block_grid(self.shape, self.block_size)
        return self.nnz_blocks / (nbr * nbc) if nbr * nbc else 1.0

    def to_torch_sparse(self) -> torch.Tensor:
        """The padded matrix as ``torch.sparse_bsr_tensor`` (for comparisons with torch's BSR kernels)."""
        nbr, nbc = block_grid(self.shape, self.block_size)
        return torch.sparse_bsr_tensor(
            self.crow_indices, self.col_indices, self.values, size=(nbr * self.block_size, nbc * self.block_size),
            check_invariants=True,
        )


def bsr_row_indices(crow_indices: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
    """Block row (int64) of every stored block; ``col_indices`` only gives the number of blocks."""
    return torch._convert_indices_from_csr_to_coo(crow_indices.to(torch.int64), col_indices.to(torch.int64))[0]


def bsr_to_dense(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Dense ``[N, K]`` from BSR arrays; differentiable in ``values``."""
    bs = values.shape[-1]
    nbr, nbc = block_grid(shape, bs)
    rows = bsr_row_indices(crow, col)
    flat = values.new_zeros(nbr * nbc, bs, bs).index_put((rows * nbc + col,), values)
    return flat.view(nbr, nbc, bs, bs).transpose(1, 2).reshape(nbr * bs, nbc * bs)[: shape[0], : shape[1]]


def bsr_transpose_structure(
    crow: torch.Tensor, col: torch.Tensor, n_block_cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structure of ``W^T``: (crow_t, col_t, block_index) where ``block_index[q]`` is the stored block
    of ``W`` that sits at position ``q`` of ``W^T`` (to be used transposed)."""
    rows = bsr_row_indices(crow, col)
    nbr = crow.numel() - 1
    order = torch.argsort(col * max(nbr, 1) + rows, stable=True)  # sort by (col, row)
    counts = torch.bincount(col, minlength=n_block_cols)
    crow_t = torch.zeros(n_block_cols + 1, dtype=torch.int64, device=crow.device)
    crow_t[1:] = torch.cumsum(counts, 0)
    return crow_t, rows[order], order
