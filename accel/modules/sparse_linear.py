"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is block-sparse."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats import (
    BSRMatrix,
    as_block_mask,
    block_grid,
    block_norms,
    bsr_to_dense,
    check_block_size,
    expand_block_mask,
    topk_block_mask,
)
from ..ops._plans import forget_plans
from ..ops.bsr_linear import module_bsr_linear
from ._bsr_state import bsr_state_error, load_bsr_state, masked_outside_autograd
from ._common import autocast_dtype, cast_param, normal_tensor, per_component, refuse_weight, same_grad, weight_view

MODES = ("auto", "sparse", "dense")


def _check_size(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"SparseLinear: {name} must be an int >= 0, got {v!r}")
    return v


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored as block-sparse rows (``accel.formats``).

    Modes:

    * ``"auto"`` (default) and ``"sparse"`` store parameter ``values [nnz, B, B]`` and buffers
      ``crow_indices`` / ``col_indices``, and train through the block-sparse kernels (gradients reach
      only the stored blocks). In inference on the CPU, ``"sparse"`` runs the block-sparse strategy
      ``accel.engines`` measured fastest for this shape and batch bucket; ``"auto"`` may also run the
      densified weight (cached) where the sparse kernels do not pay on this machine, so an ``auto``
      layer is never slower than dense at a batch size it has run. On CUDA: the Triton kernels.
    * ``"dense"``: parameter ``weight [N, K]`` (pruned blocks zero) and buffer ``block_mask``; runs
      ``F.linear``. When the weight needs a gradient the mask is applied in the forward, so pruned
      blocks stay zero under training.

    The state dict carries the mode; loading validates the incoming block structure (and leaves
    the module unchanged when it is invalid), restores the layout and resizes ``values`` to the
    stored number of blocks.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 32, *,
                 mode: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = _check_size("in_features", in_features)
        self.out_features = _check_size("out_features", out_features)
        self.block_size = check_block_size(block_size, "SparseLinear: block_size")
        if mode not in MODES:
            raise ValueError(f"SparseLinear: mode must be one of {MODES}, got {mode!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"SparseLinear: dtype must be a floating dtype, got {dtype}")
        self.mode = "sparse" if mode == "dense" else mode  # an empty weight starts sparse; _set_structure sets dense
        nbr, _ = block_grid((out_features, in_features), block_size)
        # an all-pruned weight until from_dense / load_state_dict fills it in; normal tensors even when built
        # under torch.inference_mode, so the layer can train and load afterwards
        with torch.inference_mode(False):
            self.values = nn.Parameter(torch.empty(0, block_size, block_size, device=device, dtype=dtype))
            self.register_buffer("crow_indices", torch.zeros(nbr + 1, dtype=torch.int64, device=device))
            self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int64, device=device))
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        if mode == "dense":
            self._set_structure(self.bsr(), "dense")

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
        * ``mask``: a binary (bool, or only 0/1) elementwise ``[N, K]`` mask (zeroed elements are zero in
          the kept blocks at conversion; only the block mask is stored, so training may make them nonzero
          again; a block is kept if any element is) or a ``[ceil(N/B), ceil(K/B)]`` block mask;
        * neither: the blocks of ``linear.weight`` that hold any nonzero.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects nn.Linear, got {type(linear).__name__}")
        if sparsity is not None and mask is not None:
            raise ValueError("pass either sparsity or mask, not both")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        check_block_size(block, "SparseLinear.from_dense: block")
        if sparsity is not None and (isinstance(sparsity, bool) or not 0.0 <= float(sparsity) <= 1.0):
            raise ValueError(f"SparseLinear.from_dense: sparsity must be in [0, 1], got {sparsity!r}")
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"SparseLinear.from_dense: the weight {tuple(w.shape)} holds NaN/inf")
        shape = (linear.out_features, linear.in_features)
        if mask is not None:
            mask = mask.to(w.device)
            block_mask = as_block_mask(mask, shape, block)
            if tuple(mask.shape) == shape:
                w = torch.where(mask.bool(), w, torch.zeros((), dtype=w.dtype, device=w.device))
        elif sparsity is not None:
            block_mask = topk_block_mask(block_norms(w, block, p=norm), sparsity)
        else:
            block_mask = None
        bsr = BSRMatrix.from_dense(w, block, block_mask)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, block_size=block,
                device=w.device, dtype=w.dtype)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        m._set_structure(bsr, mode)
        m.requires_grad_(False)  # frozen stays frozen: each parameter as the source layer's
        (m.values if m.storage == "sparse" else m.weight).requires_grad_(linear.weight.requires_grad)
        if m.bias is not None:
            m.bias.requires_grad_(linear.bias.requires_grad)
        return m

    def _set_structure(self, bsr: BSRMatrix, mode: str) -> None:
        prev = self._parameters.get("values", self._parameters.get("weight"))
        grad = True if prev is None else prev.requires_grad  # a frozen layer stays frozen
        for name in ("values", "weight"):
            if name in self._parameters:
                del self._parameters[name]
        for name in ("crow_indices", "col_indices", "block_mask"):
            if name in self._buffers:
                del self._buffers[name]
        self.mode = mode
        with torch.inference_mode(False):
            if mode != "dense":
                self.values = nn.Parameter(normal_tensor(bsr.values.contiguous()), requires_grad=grad)
                self.register_buffer("crow_indices", normal_tensor(bsr.crow_indices))
                self.register_buffer("col_indices", normal_tensor(bsr.col_indices))
            else:
                self.weight = nn.Parameter(normal_tensor(bsr.to_dense().contiguous()), requires_grad=grad)
                self.register_buffer("block_mask", normal_tensor(bsr.block_mask()))
            if self.bias is not None and self.bias.is_inference():
                self.bias = nn.Parameter(normal_tensor(self.bias.detach()), requires_grad=self.bias.requires_grad)

    @property
    def storage(self) -> str:
        """"sparse" (values + indices) or "dense" (masked weight)."""
        return "dense" if self.mode == "dense" else "sparse"

    # ------------------------------------------------------------------ views of the weight
    def bsr(self) -> BSRMatrix:
        shape = (self.out_features, self.in_features)
        if self.storage == "sparse":
            return BSRMatrix(self.values.detach(), self.crow_indices, self.col_indices, shape, self.block_size)
        return BSRMatrix.from_dense(self.weight.detach(), self.block_size, self.block_mask)

    def dense_weight(self) -> torch.Tensor:
        return self.bsr().to_dense()

    @property
    def density(self) -> float:
        nbr, nbc = block_grid((self.out_features, self.in_features), self.block_size)
        kept = self.values.shape[0] if self.storage == "sparse" else int(self.block_mask.sum())
        return kept / (nbr * nbc) if nbr * nbc else 1.0

    def to_linear(self) -> nn.Linear:
        w = self.dense_weight()
        # built on the meta device: no random init, so the global random state is not drawn from
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta",
                        dtype=w.dtype).to_empty(device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        same_grad(lin, self)
        lin.train(self.training)
        return lin

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:
            return per_component(self, x)
        if self.storage == "sparse":
            p, b = self._parameters, self._buffers
            values, bias = p["values"], p.get("bias")
            dt = autocast_dtype(x)
            if dt is not None:  # torch.autocast: compute in its dtype, as nn.Linear does (fresh casts: no plan)
                x, values, bias = x.to(dt), cast_param(values, dt), cast_param(bias, dt)
            return module_bsr_linear(x, values, b["crow_indices"], b["col_indices"],
                                     (self.out_features, self.in_features), bias, self.mode == "auto",
                                     None if dt is not None else self)
        w = self.weight
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear: x must have shape [..., {self.in_features}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dtype != w.dtype and autocast_dtype(x) is None:  # (the sparse storage's errors, not torch's)
            raise TypeError(f"SparseLinear: x dtype {x.dtype} must equal the layer's dtype {w.dtype}")
        if torch.is_grad_enabled() and w.requires_grad:
            w = w * expand_block_mask(self.block_mask, self.block_size, tuple(w.shape)).to(w.dtype)
        else:
            w = masked_outside_autograd(w, self.block_mask,
                                        lambda: expand_block_mask(self.block_mask, self.block_size, tuple(w.shape)))
        return F.linear(x, w, self.bias)

    def _apply(self, fn, recurse=True):
        forget_plans(self)  # the resolved calls hold the tensors (and weights derived from them) being replaced
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and "values" in self.__dict__.get("_parameters", {}):
            refuse_weight(self)
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name == "weight" and "values" in self.__dict__["_parameters"]:
            # sparse storage: model code reading layer.weight gets the dense (pruned) weight, read-only
            p, b = self.__dict__["_parameters"], self.__dict__["_buffers"]
            return weight_view((p["values"], b["crow_indices"], b["col_indices"]), p["values"].dtype,
                               lambda: bsr_to_dense(p["values"], b["crow_indices"], b["col_indices"],  # differentiable
                                                    (self.out_features, self.in_features)), self.training)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        return {"mode": self.mode, "block_size": self.block_size,
                "in_features": self.in_features, "out_features": self.out_features}

    def set_extra_state(self, state) -> None:
        mine = (self.block_size, self.in_features, self.out_features)
        theirs = (state["block_size"], state["in_features"], state["out_features"])
        if mine != theirs:
            raise ValueError(f"SparseLinear state is for (block, in, out) = {theirs}, this module is {mine}")
        self.mode = state["mode"]

    def _incoming_error(self, state_dict, prefix) -> str | None:
        """Why the incoming state cannot be loaded (None if it can): checked before anything changes."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            return "missing _extra_state (mode, block size, shape)"
        if not isinstance(extra, dict) or extra.get("mode") not in MODES:
            return f"bad _extra_state {extra!r}"
        mine = (self.block_size, self.in_features, self.out_features)
        theirs = (extra.get("block_size"), extra.get("in_features"), extra.get("out_features"))
        if mine != theirs:
            return f"state is for (block, in, out) = {theirs}, this module is {mine}"
        return bsr_state_error(state_dict, prefix, extra["mode"], self.bias is not None, self.block_size,
                               (self.out_features, self.in_features), (self.out_features, self.in_features),
                               "SparseLinear")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_bsr_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
                       (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.density:.3f}, mode={self.mode}")
