"""Shared test helpers: references, random block-sparse weights, SQNR."""

from __future__ import annotations

import torch

from accel.formats import BSRMatrix, topk_block_mask


def random_bsr(n: int, k: int, block: int, sparsity: float, dtype=torch.float32, empty_rows=(), seed=0) -> BSRMatrix:
    """A ``[n, k]`` Gaussian weight with a random ``sparsity`` fraction of blocks dropped; block rows in
    ``empty_rows`` hold no block at all."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    nbr, nbc = -(-n // block), -(-k // block)
    mask = topk_block_mask(torch.rand(nbr, nbc, generator=g), sparsity)
    for r in empty_rows:
        mask[r] = False
    bsr = BSRMatrix.from_dense(w, block, mask)
    return BSRMatrix(bsr.values.to(dtype), bsr.crow_indices, bsr.col_indices, bsr.shape, block)


def reference_linear(x: torch.Tensor, bsr: BSRMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T + bias`` in float64 with the dense weight."""
    y = x.double() @ bsr.to_dense().double().t()
    return y if bias is None else y + bias.double()


#: (atol, rtol) per dtype for fp32-accumulated matmuls of Gaussian data with K up to a few hundred
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 1e-2),
    torch.bfloat16: (1.5e-1, 2e-2),
}


def assert_close_dtype(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, k: int = 1) -> None:
    atol, rtol = TOL[dtype]
    scale = max(1.0, k ** 0.5 / 8)
    torch.testing.assert_close(out.double(), ref.double(), atol=atol * scale, rtol=rtol)


def interpret_mode() -> bool:
    from accel.kernels import INTERPRET

    return INTERPRET


def kernel_device() -> str:
    """Where the Triton kernels run in this session: CPU tensors in the interpreter, else CUDA."""
    return "cpu" if interpret_mode() else "cuda"
