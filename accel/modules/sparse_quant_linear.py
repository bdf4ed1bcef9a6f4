"""``SparseQuantLinear``: a block-sparse Linear whose kept blocks are int8 (inference)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formats import BSRMatrix, block_grid, bsr_row_indices, bsr_to_dense, check_block_size, check_bsr
from ..ops._plans import forget_plans
from ..ops.int8_bsr_linear import check_weight, dequantized_values, module_int8_bsr_linear
from ..quant import ACTIVATIONS, QMAX, ieee_div
from ._common import load_refused, per_component, refuse_weight, weight_view
from .quant_linear import _check_qmax, _check_size
from .sparse_linear import SparseLinear


def quantize_blocks(values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, out_features: int,
                    qmax: int = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 quantization of BSR blocks ``values [nnz, B, B]`` (``[out, in]``):
    ``(values_q int8, scale fp32 [out_features])``, the scale of a channel from the largest magnitude of
    its kept blocks. The integers equal ``accel.quant.quantize_weight`` of the dense weight (pruned blocks
    are zero). A channel without kept values gets scale 0; NaN/inf weights are refused."""
    bs = values.shape[1]
    nbr = crow.numel() - 1
    v = values.detach().float()
    if not torch.isfinite(v).all():
        raise ValueError(f"SparseQuantLinear: the weight blocks {tuple(values.shape)} hold NaN/inf")
    rows = bsr_row_indices(crow, col)
    absmax = torch.zeros(nbr * bs, dtype=torch.float32, device=v.device)
    if v.shape[0]:
        channel = (rows[:, None] * bs + torch.arange(bs, device=v.device)).flatten()
        absmax.scatter_reduce_(0, channel, v.abs().amax(2).flatten(), "amax")
    absmax = absmax.view(nbr, bs)
    inv = torch.where(absmax > 0, ieee_div(qmax, absmax), torch.zeros_like(absmax))
    q = torch.round((v * inv[rows][:, :, None]).clamp_(-qmax, qmax)).to(torch.int8)
    return q, (absmax / qmax).flatten()[:out_features].contiguous()


class SparseQuantLinear(nn.Module):
    """``act(x @ W^T + b)`` with ``W`` block-sparse (``accel.formats`` BSR) and its kept blocks int8 with
    one scale per output channel; ``x`` is quantized per token at run time (int32 accumulation, fused
    dequantization, bias and activation: ``accel.ops.int8_bsr_linear``). Inference only, like
    ``QuantLinear``: gradients reach ``x`` straight through; outputs have the input's dtype.

    Buffers: ``values_q [nnz, B, B]`` int8, ``weight_scale [out]`` fp32 (kept fp32 by ``.to()``),
    ``crow_indices`` / ``col_indices`` int64, optional ``bias``. ``act_qmax``: the activation range
    (63 or 127; 0: the running machine's native range, as ``QuantLinear`` records it). The state dict
    carries block size, shape, activation and ``act_qmax``; loading validates the incoming state first
    (a failed load leaves the module unchanged) and resizes ``values_q`` to the stored number of blocks.

    Build with :meth:`from_sparse` (a ``SparseLinear``) or :meth:`from_float` (an ``nn.Linear`` and a mask
    or a sparsity); ``accel.quantize_`` does it for the ``SparseLinear`` layers of a model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 32, *,
                 activation: str = "none", act_qmax: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        name = "SparseQuantLinear"
        self.in_features = _check_size(name, "in_features", in_features)
        self.out_features = _check_size(name, "out_features", out_features)
        self.block_size = check_block_size(block_size, f"{name}: block_size")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"{name}: dtype must be a floating dtype, got {dtype}")
        self.activation = activation
        self.act_qmax = _check_qmax(name, act_qmax)
        self.float_dtype = dtype or torch.float32  # the float layer's dtype: what .weight shows (not saved)
        nbr, _ = block_grid((out_features, in_features), block_size)
        with torch.inference_mode(False):  # normal tensors: in-place updates bump the versions the caches see
            self.register_buffer("values_q", torch.zeros(0, block_size, block_size, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
            self.register_buffer("crow_indices", torch.zeros(nbr + 1, dtype=torch.int64, device=device))
            self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int64, device=device))
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device)
                                 if bias else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_sparse(cls, sparse: SparseLinear, *, activation: str = "none",
                    act_qmax: int | None = None) -> "SparseQuantLinear":
        """Quantize the kept blocks of ``sparse`` (per-output-channel symmetric int8). ``activation`` fuses a
        following ReLU/GELU."""
        if not isinstance(sparse, SparseLinear):
            raise TypeError(f"SparseQuantLinear.from_sparse expects SparseLinear, got {type(sparse).__name__}")
        bsr = sparse.bsr()
        ref = bsr.values
        m = cls(sparse.in_features, sparse.out_features, bias=sparse.bias is not None, block_size=sparse.block_size,
                activation=activation, act_qmax=act_qmax, device=ref.device, dtype=ref.dtype)
        q, s = quantize_blocks(bsr.values, bsr.crow_indices, bsr.col_indices, sparse.out_features)
        m._set(q, s, bsr.crow_indices.long(), bsr.col_indices.long(),
               None if sparse.bias is None else sparse.bias.detach())
        return m

    @classmethod
    def from_float(cls, linear: nn.Linear, sparsity: float | None = None, block: int = 32, *,
                   mask: torch.Tensor | None = None, norm: int = 2, activation: str = "none",
                   act_qmax: int | None = None) -> "SparseQuantLinear":
        """Prune ``linear`` to blocks (``sparsity``, or a ``mask``, or its nonzero blocks: see
        ``SparseLinear.from_dense``), then quantize the kept blocks."""
        sparse = SparseLinear.from_dense(linear, sparsity, block, mask=mask, norm=norm, mode="sparse")
        return cls.from_sparse(sparse, activation=activation, act_qmax=act_qmax)

    def _set(self, values_q, w_scale, crow, col, bias) -> None:
        check_weight("SparseQuantLinear", values_q, w_scale, crow, col, (self.out_features, self.in_features),
                     None if bias is None else bias.to(w_scale.device))
        with torch.no_grad(), torch.inference_mode(False):
            self.values_q = values_q.contiguous().clone()
            self.weight_scale = w_scale.float().clone()
            self.crow_indices = crow.clone()
            self.col_indices = col.clone()
            if bias is not None:
                self.bias.copy_(bias)

    # ------------------------------------------------------------------ views
    @property
    def nnz(self) -> int:
        return self.values_q.shape[0]

    @property
    def density(self) -> float:
        nbr, nbc = block_grid((self.out_features, self.in_features), self.block_size)
        return self.nnz / (nbr * nbc) if nbr * nbc else 1.0

    def dequantized_weight(self) -> torch.Tensor:
        """The dense fp32 ``[out, in]`` weight the layer computes with (pruned blocks zero)."""
        vals = dequantized_values(self.values_q, self.weight_scale, self.crow_indices, self.col_indices, torch.float32)
        return bsr_to_dense(vals, self.crow_indices, self.col_indices, (self.out_features, self.in_features))

    def to_sparse(self) -> SparseLinear:
        """The float ``SparseLinear`` of the dequantized blocks (in the bias' dtype)."""
        dt = self.bias.dtype if self.bias is not None else torch.float32
        vals = dequantized_values(self.values_q, self.weight_scale, self.crow_indices, self.col_indices, dt)
        m = SparseLinear(self.in_features, self.out_features, bias=self.bias is not None, block_size=self.block_size,
                         mode="sparse", device=vals.device, dtype=dt)
        bsr = BSRMatrix(vals.clone(), self.crow_indices.clone(), self.col_indices.clone(),
                        (self.out_features, self.in_features), self.block_size)
        m._set_structure(bsr, "sparse")
        if self.bias is not None:
            with torch.no_grad():
                m.bias.copy_(self.bias)
        return m

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_nested:
            return per_component(self, x)
        b = self._buffers
        return module_int8_bsr_linear(x, b["values_q"], b["weight_scale"], b["crow_indices"], b["col_indices"],
                                      (self.out_features, self.in_features), b["bias"], self.activation, self.act_qmax,
                                      self)

    # ------------------------------------------------------------------ state
    def get_extra_state(self):
        return {"block_size": self.block_size, "in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation, "act_qmax": self.act_qmax}

    def set_extra_state(self, state) -> None:
        why = self._extra_error(state)
        if why is not None:
            raise ValueError(f"SparseQuantLinear: {why}")
        self.activation, self.act_qmax = state["activation"], int(state.get("act_qmax", 0))

    def _extra_error(self, extra) -> str | None:
        if not isinstance(extra, dict):
            return f"bad _extra_state {extra!r}"
        mine = (self.block_size, self.in_features, self.out_features)
        theirs = (extra.get("block_size"), extra.get("in_features"), extra.get("out_features"))
        if mine != theirs:
            return f"state is for (block, in, out) = {theirs}, this module is {mine}"
        if extra.get("activation") not in ACTIVATIONS or extra.get("act_qmax", 0) not in (0, 63, 127):
            return f"bad activation / act_qmax in _extra_state {extra!r}"
        return None

    def _incoming_error(self, state_dict, prefix) -> str | None:
        """Why the incoming state cannot be loaded (None if it can): checked before anything changes."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            return "missing _extra_state (block size, shape, activation, act_qmax)"
        why = self._extra_error(extra)
        if why is not None:
            return why
        has_bias = (prefix + "bias") in state_dict
        if has_bias != (self.bias is not None):
            return f"bias {'present' if has_bias else 'missing'} in the state, but this module has " \
                   f"{'a' if self.bias is not None else 'no'} bias"
        names = ("values_q", "weight_scale", "crow_indices", "col_indices")
        t = {n: state_dict.get(prefix + n) for n in names}
        missing = [n for n in names if t[n] is None]
        if missing:
            return f"state is missing {missing}"
        bs, shape = self.block_size, (self.out_features, self.in_features)
        v, s = t["values_q"], t["weight_scale"]
        if v.dtype != torch.int8 or v.dim() != 3 or tuple(v.shape[1:]) != (bs, bs):
            return f"values_q must be int8 [nnz, {bs}, {bs}], got {v.dtype} {tuple(v.shape)}"
        if tuple(s.shape) != (self.out_features,) or not s.is_floating_point() or not torch.isfinite(s).all() or \
                bool((s < 0).any()):
            return f"weight_scale must be finite, >= 0, float [{self.out_features}], got {s.dtype} {tuple(s.shape)}"
        if has_bias:
            b = state_dict[prefix + "bias"]
            if tuple(b.shape) != (self.out_features,) or not b.is_floating_point():
                return f"bias must be float [{self.out_features}], got {b.dtype} {tuple(b.shape)}"
        try:
            check_bsr(t["crow_indices"], t["col_indices"], v.shape[0], shape, bs, "SparseQuantLinear state")
        except ValueError as e:
            return str(e)
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if load_refused(self, state_dict, prefix, missing_keys, error_msgs):
            return
        # the number of stored blocks is data: shape the buffers like the incoming state, restore on failure
        saved = (dict(self._buffers), self.activation, self.act_qmax)
        nnz = state_dict[prefix + "values_q"].shape[0]
        dev = self.values_q.device
        with torch.inference_mode(False):
            self._buffers["values_q"] = torch.zeros(nnz, self.block_size, self.block_size, dtype=torch.int8, device=dev)
            self._buffers["col_indices"] = torch.zeros(nnz, dtype=torch.int64, device=dev)
            self._buffers["crow_indices"] = torch.zeros_like(self.crow_indices)
            self._buffers["weight_scale"] = torch.zeros_like(self.weight_scale)
            if self.bias is not None:
                self._buffers["bias"] = torch.zeros_like(self.bias)
        n_errors = len(error_msgs)
        with torch.inference_mode(False):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        if len(error_msgs) > n_errors:
            self._buffers.clear()
            self._buffers.update(saved[0])
            self.activation, self.act_qmax = saved[1], saved[2]

    def _apply(self, fn, recurse=True):
        forget_plans(self)  # the resolved calls hold the tensors (and weights derived from them) being replaced
        # weight_scale follows the module's device but stays float32 (fp16 would turn small scales into 0)
        keep = self._buffers["weight_scale"]
        self._buffers["weight_scale"] = None
        try:
            with torch.inference_mode(False):
                out = super()._apply(fn, recurse)
        finally:
            probe = fn(torch.empty(0, dtype=keep.dtype, device=keep.device))
            with torch.inference_mode(False):
                self._buffers["weight_scale"] = keep.to(device=probe.device, dtype=torch.float32)
            probe = fn(torch.empty(0, dtype=self.float_dtype))
            if probe.is_floating_point():
                self.float_dtype = probe.dtype
        return out

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and "values_q" in self.__dict__.get("_buffers", {}):
            refuse_weight(self)
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        if name == "weight":  # what model code reading layer.weight (dtype, device, shape) expects: read-only
            b = self.__dict__["_buffers"]
            return weight_view((b["values_q"], b["weight_scale"], b["crow_indices"], b["col_indices"]),
                               self.float_dtype, lambda: self.dequantized_weight())
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        q = f", act_qmax={self.act_qmax}" if self.act_qmax else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.density:.3f}, activation={self.activation}{q}")
