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


def _check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block_size}")


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
    _check_block_size(block_size)
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


def as_block_mask(mask: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Accept an elementwise ``[N, K]`` mask (a block is kept if any element is) or a ``[nbr, nbc]`` block mask."""
    grid = block_grid(shape, block_size)
    mask = mask.to(torch.bool)
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
        _check_block_size(block_size)
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
