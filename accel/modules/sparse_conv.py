"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose weight is block-sparse."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cpu.bsr_conv import conv_weight_from_bsr
from ..cpu.int8 import float_conv2d_cpu
from ..formats import (
    BSRMatrix,
    as_block_mask,
    block_grid,
    block_norms,
    check_binary_mask,
    expand_block_mask,
    topk_block_mask,
)
from ..ops._dispatch import as_conv_output
from ..ops._plans import forget_plans
from ..ops.bsr_conv import BLOCK_SIZES, check_geometry, conv_pair, module_bsr_conv2d
from ._bsr_state import bsr_state_error, load_bsr_state, masked_outside_autograd
from ._common import (
    autocast_dtype,
    cast_param,
    explicit_padding,
    normal_tensor,
    refuse_weight,
    same_grad,
    same_padding_reason,
    weight_view,
)

MODES = ("auto", "sparse", "dense")


def _check_size(name: str, v, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"SparseConv2d: {name} must be an int >= {low}, got {v!r}")
    return v


def _check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block not in BLOCK_SIZES:
        raise ValueError(f"SparseConv2d: block size must be an int in {BLOCK_SIZES}, got {block!r}")
    return block


def _ohwi(w: torch.Tensor) -> torch.Tensor:
    """``[O, C, KH, KW]`` -> the implicit-GEMM matrix ``[O, KH*KW*C]`` in ``(kh, kw, c)`` order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


class SparseConv2d(nn.Module):
    """``y = conv2d(x, W) + b`` with ``W [O, C, KH, KW]`` stored as block-sparse rows of its implicit-GEMM
    matrix ``[O, KH*KW*C]`` in ``(kh, kw, c)`` order (``accel.ops.bsr_conv``): zero padding, stride,
    dilation, groups = 1, block sizes 16, 32, 64.

    Modes, as ``SparseLinear``'s:

    * ``"auto"`` (default) and ``"sparse"`` store parameter ``values [nnz, B, B]`` and buffers
      ``crow_indices`` / ``col_indices`` and train through the block-sparse ops (gradients reach only
      the stored blocks). In inference on the CPU, ``"sparse"`` runs the block-sparse engine
      ``accel.engines`` measured fastest for this layer, input size and batch bucket; ``"auto"`` may
      also run the dense conv of the densified weight (cached) where the sparse engines do not pay.
      On CUDA: the Triton kernels. Outputs are ``channels_last``.
    * ``"dense"``: parameter ``weight [O, C, KH, KW]`` (pruned blocks zero) and buffer ``block_mask``;
      runs ``F.conv2d``. When the weight needs a gradient the mask is applied in the forward.

    The state dict carries the mode; loading validates the incoming state first (a failed load
    leaves the module unchanged) and resizes ``values`` to the stored number of blocks.
    """

    MODES = MODES

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, block_size: int = 32, *, mode: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = _check_size("in_channels", in_channels, 1)
        self.out_channels = _check_size("out_channels", out_channels, 1)
        kh, kw = conv_pair(kernel_size, "kernel_size", "SparseConv2d")
        if kh < 1 or kw < 1:
            raise ValueError(f"SparseConv2d: kernel_size must be >= 1, got {(kh, kw)}")
        self.kernel_size = (kh, kw)
        stride, padding, dilation = check_geometry(stride, padding, dilation, "SparseConv2d")
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.block_size = _check_block(block_size)
        if mode not in MODES:
            raise ValueError(f"SparseConv2d: mode must be one of {MODES}, got {mode!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"SparseConv2d: dtype must be a floating dtype, got {dtype}")
        self.mode = "sparse" if mode == "dense" else mode  # an empty weight starts sparse; _set_structure sets dense
        nbr, _ = self._grid()
        with torch.inference_mode(False):  # normal tensors even under inference_mode: the layer can train later
            self.values = nn.Parameter(torch.empty(0, block_size, block_size, device=device, dtype=dtype))
            self.register_buffer("crow_indices", torch.zeros(nbr + 1, dtype=torch.int64, device=device))
            self.register_buffer("col_indices", torch.zeros(0, dtype=torch.int64, device=device))
            self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        if mode == "dense":
            self._set_structure(self.bsr(), "dense")

    # ------------------------------------------------------------------ geometry
    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _matrix_shape(self) -> tuple[int, int]:
        kh, kw = self.kernel_size
        return self.out_channels, kh * kw * self.in_channels

    def _grid(self) -> tuple[int, int]:
        return block_grid(self._matrix_shape(), self.block_size)

    @staticmethod
    def unsupported_reason(conv: nn.Module) -> str | None:
        """Why ``conv`` cannot become a SparseConv2d (``None`` if it can); ``accel.sparsify_`` leaves such
        layers dense and reports the reason."""
        if type(conv) is not nn.Conv2d:
            return f"not an nn.Conv2d ({type(conv).__name__})"
        if conv.groups != 1:
            return f"groups={conv.groups} (the block-sparse conv serves groups=1 only)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} (only zero padding)"
        return same_padding_reason(conv)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        sparsity: float | None = None,
        block: int = 32,
        *,
        mask: torch.Tensor | None = None,
        norm: int = 2,
        mode: str = "auto",
    ) -> "SparseConv2d":
        """Convert ``conv``. Blocks of the ``[O, KH*KW*C]`` matrix to keep come from exactly one of:

        * ``sparsity``: drop that fraction of blocks with the smallest L``norm`` block norm;
        * ``mask``: a binary elementwise mask shaped like the weight ``[O, C, KH, KW]`` (zeroed elements are
          zero in the kept blocks at conversion; only the block mask is stored, so training may make them
          nonzero again; a block is kept if any element is) or a ``[ceil(O/B), ceil(KH*KW*C/B)]`` block
          mask (what ``accel.prune`` makes for a Conv2d);
        * neither: the blocks of the weight that hold any nonzero.
        """
        reason = cls.unsupported_reason(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d.from_dense: cannot convert {conv}: {reason}; keep this layer dense")
        if sparsity is not None and mask is not None:
            raise ValueError("pass either sparsity or mask, not both")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_block(block)
        if sparsity is not None and (isinstance(sparsity, bool) or not 0.0 <= float(sparsity) <= 1.0):
            raise ValueError(f"SparseConv2d.from_dense: sparsity must be in [0, 1], got {sparsity!r}")
        w = conv.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"SparseConv2d.from_dense: the weight {tuple(w.shape)} holds NaN/inf")
        w2 = _ohwi(w)
        shape = tuple(w2.shape)
        if mask is not None:
            mask = check_binary_mask(mask).to(w.device)
            if tuple(mask.shape) == tuple(w.shape):
                m2 = _ohwi(mask)
                block_mask = as_block_mask(m2, shape, block)
                w2 = torch.where(m2, w2, torch.zeros((), dtype=w.dtype, device=w.device))
            else:
                try:
                    block_mask = as_block_mask(mask, shape, block)
                except ValueError:
                    raise ValueError(f"SparseConv2d.from_dense: mask must be elementwise like the weight "
                                     f"{tuple(w.shape)}, elementwise over its [O, KH*KW*C] matrix {shape}, or a block "
                                     f"mask {block_grid(shape, block)} for block size {block}, got shape "
                                     f"{tuple(mask.shape)}") from None
        elif sparsity is not None:
            block_mask = topk_block_mask(block_norms(w2, block, p=norm), sparsity)
        else:
            block_mask = None
        bsr = BSRMatrix.from_dense(w2, block, block_mask)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, explicit_padding(conv),
                conv.dilation, bias=conv.bias is not None, block_size=block, device=w.device, dtype=w.dtype)
        if conv.bias is not None:
            m.bias.data.copy_(conv.bias.detach())
        m._set_structure(bsr, mode)
        m.requires_grad_(False)  # frozen stays frozen: each parameter as the source layer's
        (m.values if m.storage == "sparse" else m.weight).requires_grad_(conv.weight.requires_grad)
        if m.bias is not None:
            m.bias.requires_grad_(conv.bias.requires_grad)
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
                o, kh, kw, c = self.out_channels, *self.kernel_size, self.in_channels
                w = bsr.to_dense().reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()
                self.weight = nn.Parameter(normal_tensor(w), requires_grad=grad)
                self.register_buffer("block_mask", normal_tensor(bsr.block_mask()))
            if self.bias is not None and self.bias.is_inference():
                self.bias = nn.Parameter(normal_tensor(self.bias.detach()), requires_grad=self.bias.requires_grad)

    @property
    def storage(self) -> str:
        """"sparse" (values + indices) or "dense" (masked weight)."""
        return "dense" if self.mode == "dense" else "sparse"

    # ------------------------------------------------------------------ views of the weight
    def bsr(self) -> BSRMatrix:
        """The ``[O, KH*KW*C]`` matrix in BSR form."""
        if self.storage == "sparse":
            return BSRMatrix(self.values.detach(), self.crow_indices, self.col_indices, self._matrix_shape(),
                             self.block_size)
        return BSRMatrix.from_dense(_ohwi(self.weight.detach()), self.block_size, self.block_mask)

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[O, C, KH, KW]`` weight (pruned blocks zero)."""
        o, kh, kw, c = self.out_channels, *self.kernel_size, self.in_channels
        return self.bsr().to_dense().reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()

    @property
    def density(self) -> float:
        nbr, nbc = self._grid()
        kept = self.values.shape[0] if self.storage == "sparse" else int(self.block_mask.sum())
        return kept / (nbr * nbc)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (pruned blocks zero)."""
        w = self.dense_weight()
        # built on the meta device: no random init, so the global random state is not drawn from
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, bias=self.bias is not None, device="meta", dtype=w.dtype).to_empty(device=w.device)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        same_grad(conv, self)
        conv.train(self.training)
        return conv

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.storage == "sparse":
            p, b = self._parameters, self._buffers
            values, bias = p["values"], p.get("bias")
            dt = autocast_dtype(x)
            if dt is not None:  # torch.autocast: compute in its dtype, as nn.Conv2d does (fresh casts: no plan)
                x, values, bias = x.to(dt), cast_param(values, dt), cast_param(bias, dt)
            return module_bsr_conv2d(x, values, b["crow_indices"], b["col_indices"], self.weight_shape,
                                     bias, self.stride, self.padding, self.dilation, self.mode == "auto",
                                     None if dt is not None else self)
        w = self.weight
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(f"SparseConv2d: expected a [B, {self.in_channels}, H, W] or [{self.in_channels}, H, W] "
                             f"input, got shape {tuple(x.shape)}")
        if x.dtype != w.dtype and autocast_dtype(x) is None:  # (the sparse storage's errors, not torch's)
            raise TypeError(f"SparseConv2d: x dtype {x.dtype} must equal the layer's dtype {w.dtype}")
        if any((n + 2 * p - d * (k - 1) - 1) < 0 for n, p, d, k in
               zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size)):
            raise ValueError(f"SparseConv2d: input {tuple(x.shape[-2:])} with padding {tuple(self.padding)} is smaller "
                             f"than the dilated kernel {tuple(self.kernel_size)} (dilation {tuple(self.dilation)})")

        def mask_like_w():
            mask = expand_block_mask(self.block_mask, self.block_size, self._matrix_shape())
            o, kh, kw, c = self.out_channels, *self.kernel_size, self.in_channels
            return mask.reshape(o, kh, kw, c).permute(0, 3, 1, 2)

        if torch.is_grad_enabled() and w.requires_grad:
            w = w * mask_like_w().to(w.dtype)
        else:
            w = masked_outside_autograd(w, self.block_mask, mask_like_w)
        if x.is_cuda or autocast_dtype(x) is not None:
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation)
        # torch's CPU conv crashes or returns garbage on some geometries: routed (accel.cpu.int8.float_conv2d_cpu)
        squeeze = x.dim() == 3
        x4 = x.unsqueeze(0) if squeeze else x
        y = as_conv_output(float_conv2d_cpu(x4, w, self.bias, self.stride, self.padding, self.dilation), x4)
        return y.squeeze(0) if squeeze else y

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
                               lambda: conv_weight_from_bsr(p["values"], b["crow_indices"], b["col_indices"],
                                                            self.weight_shape).contiguous(),  # differentiable
                               self.training)
        return super().__getattr__(name)

    # ------------------------------------------------------------------ state
    def _geometry_state(self) -> dict:
        return {"block_size": self.block_size, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation)}

    def get_extra_state(self):
        return {"mode": self.mode, **self._geometry_state()}

    def set_extra_state(self, state) -> None:
        mine, theirs = self._geometry_state(), {k: state.get(k) for k in self._geometry_state()}
        if mine != theirs:
            raise ValueError(f"SparseConv2d state is for {theirs}, this module is {mine}")
        self.mode = state["mode"]

    def _incoming_error(self, state_dict, prefix) -> str | None:
        """Why the incoming state cannot be loaded (None if it can): checked before anything changes."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            return "missing _extra_state (mode, block size, geometry)"
        if not isinstance(extra, dict) or extra.get("mode") not in MODES:
            return f"bad _extra_state {extra!r}"
        mine = self._geometry_state()
        theirs = {k: extra.get(k) for k in mine}
        if mine != theirs:
            return f"state is for {theirs}, this module is {mine}"
        return bsr_state_error(state_dict, prefix, extra["mode"], self.bias is not None, self.block_size,
                               self._matrix_shape(), self.weight_shape, "SparseConv2d")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        load_bsr_state(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
                       self._matrix_shape())

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.density:.3f}, mode={self.mode}")
