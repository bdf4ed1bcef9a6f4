"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is block-sparse."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats import BLOCK_SIZES, BSRMatrix, as_block_mask, block_grid, block_norms, expand_block_mask, topk_block_mask
from ..ops.bsr_linear import bsr_linear

#: Above this block density the sparse kernels stop paying and ``mode="auto"`` keeps the layer
#: dense (masked). Measured on the CPU path with ``python -m bench.bsr_microbench --densities 0.7 0.6
#: 0.5 0.4`` (4096x4096, block 32, 2-core AMD EPYC, cold caches): the sparse path is at least as
#: fast as dense fp32 at M in {1, 16, 256} up to density 0.4 (M=256: 1.06x) and loses at M=256
#: from 0.5 (0.87x). GPU break-even is not yet measured.
DENSE_ABOVE_DENSITY = 0.4

MODES = ("auto", "sparse", "dense")


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored as block-sparse rows (``accel.formats``).

    Two storage modes:

    * ``"sparse"``: parameter ``values [nnz, B, B]`` and buffers ``crow_indices``/``col_indices``;
      runs the Triton kernel on CUDA and the PyTorch BSR path on CPU; gradients reach only the
      stored blocks.
    * ``"dense"``: parameter ``weight [N, K]`` (pruned blocks zero) and buffer ``block_mask``; runs
      ``F.linear``. When the weight needs a gradient the mask is applied in the forward, so pruned
      blocks stay zero under training.

    ``mode="auto"`` picks ``"dense"`` when the block density exceeds :data:`DENSE_ABOVE_DENSITY`.
    The state dict carries the mode, so loading restores the same layout and resizes ``values`` to
    the stored number of blocks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 32, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.mode = "sparse"
        nbr, _ = block_grid((out_features, in_features), block_size)
        # an all-pruned weight until from_dense / load_state_dict fills it in
        self.values = nn.Parameter(torch.empty(0, block_size, block_size, device=device, dtype=dtype))
        self.register_buffer("crow_indices", torch.zeros(nbr + 1, dtype=torch.int64, device=device))
        self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        sparsity: float | None = None,
        block: int = 32,
        *,
        mask: torch.Tensor | None = None,
        norm: int = 2,
        mode: str = "auto",
    ) -> "SparseLinear":
        """Convert ``linear``. Blocks to keep come from exactly one of:

        * ``sparsity``: drop that fraction of blocks with the smallest L``norm`` block norm;
        * ``mask``: an elementwise ``[N, K]`` mask (zeroed elements stay zero; a block is kept if any
          element is) or a ``[ceil(N/B), ceil(K/B)]`` block mask;
        * neither: the blocks of ``linear.weight`` that hold any nonzero.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects nn.Linear, got {type(linear).__name__}")
        if sparsity is not None and mask is not None:
            raise ValueError("pass either sparsity or mask, not both")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        w = linear.weight.detach()
        shape = (linear.out_features, linear.in_features)
        if mask is not None:
            mask = mask.to(w.device)
            block_mask = as_block_mask(mask, shape, block)
            if tuple(mask.shape) == shape:
                w = w * mask.to(w.dtype)
        elif sparsity is not None:
            block_mask = topk_block_mask(block_norms(w, block, p=norm), sparsity)
        else:
            block_mask = None
        bsr = BSRMatrix.from_dense(w, block, block_mask)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, block_size=block,
                device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        if mode == "auto":
            mode = "dense" if bsr.density > DENSE_ABOVE_DENSITY else "sparse"
        m._set_structure(bsr, mode)
        return m

    def _set_structure(self, bsr: BSRMatrix, mode: str) -> None:
        for name in ("values", "weight"):
            if name in self._parameters:
                del self._parameters[name]
        for name in ("crow_indices", "col_indices", "block_mask"):
            if name in self._buffers:
                del self._buffers[name]
        self.mode = mode
        if mode == "sparse":
            self.values = nn.Parameter(bsr.values.contiguous())
            self.register_buffer("crow_indices", bsr.crow_indices)
            self.register_buffer("col_indices", bsr.col_indices)
        else:
            self.weight = nn.Parameter(bsr.to_dense().contiguous())
            self.register_buffer("block_mask", bsr.block_mask())

    # ------------------------------------------------------------------ views of the weight
    def bsr(self) -> BSRMatrix:
        shape = (self.out_features, self.in_features)
        if self.mode == "sparse":
            return BSRMatrix(self.values.detach(), self.crow_indices, self.col_indices, shape, self.block_size)
        return BSRMatrix.from_dense(self.weight.detach(), self.block_size, self.block_mask)

    def dense_weight(self) -> torch.Tensor:
        return self.bsr().to_dense()

    @property
    def density(self) -> float:
        nbr, nbc = block_grid((self.out_features, self.in_features), self.block_size)
        kept = self.values.shape[0] if self.mode == "sparse" else int(self.block_mask.sum())
        return kept / (nbr * nbc) if nbr * nbc else 1.0

    def to_linear(self) -> nn.Linear:
        w = self.dense_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "sparse":
            return bsr_linear(x, self.values, self.crow_indices, self.col_indices,
                              (self.out_features, self.in_features), self.bias)
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            w = w * expand_block_mask(self.block_mask, self.block_size, tuple(w.shape)).to(w.dtype)
        return F.linear(x, w, self.bias)

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        return {"mode": self.mode, "block_size": self.block_size,
                "in_features": self.in_features, "out_features": self.out_features}

    def set_extra_state(self, state) -> None:
        mine = (self.block_size, self.in_features, self.out_features)
        theirs = (state["block_size"], state["in_features"], state["out_features"])
        if mine != theirs:
            raise ValueError(f"SparseLinear state is for (block, in, out) = {theirs}, this module is {mine}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The number of stored blocks and the mode are data: shape this module like the incoming state
        # (with zero placeholders) so the parent loader can copy into it.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and extra.get("mode") in ("sparse", "dense"):
            values = state_dict.get(prefix + "values")
            nnz = values.shape[0] if extra["mode"] == "sparse" and values is not None else 0
            ref = self.values if self.mode == "sparse" else self.weight
            bs = self.block_size
            nbr, _ = block_grid((self.out_features, self.in_features), bs)
            placeholder = BSRMatrix(
                torch.zeros(nnz, bs, bs, device=ref.device, dtype=ref.dtype),
                torch.zeros(nbr + 1, dtype=torch.int64, device=ref.device),
                torch.zeros(nnz, dtype=torch.int64, device=ref.device),
                (self.out_features, self.in_features), bs,
            )
            self._set_structure(placeholder, extra["mode"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.density:.3f}, mode={self.mode}")

