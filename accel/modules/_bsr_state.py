"""State-dict validation and loading shared by the block-sparse float modules (``SparseLinear``,
``SparseConv2d``): both store ``values`` / ``crow_indices`` / ``col_indices`` (sparse storage) or a
masked ``weight`` / ``block_mask`` (dense storage) of one block-sparse matrix."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formats import BSRMatrix, block_grid, check_bsr
from ._common import load_refused


def bsr_state_error(state_dict, prefix: str, mode: str, has_bias: bool, block: int, matrix_shape: tuple[int, int],
                    weight_shape: tuple[int, ...], what: str) -> str | None:
    """Why the tensors of an incoming ``mode`` state cannot be loaded (None if they can): bias presence,
    dense ``weight`` / ``block_mask`` or sparse ``values`` and a valid structure of ``matrix_shape``."""
    incoming_bias = (prefix + "bias") in state_dict
    if incoming_bias != has_bias:
        return f"bias {'present' if incoming_bias else 'missing'} in the state, but this module has " \
               f"{'a' if has_bias else 'no'} bias"
    nbr, nbc = block_grid(matrix_shape, block)
    if mode == "dense":
        w, bm = state_dict.get(prefix + "weight"), state_dict.get(prefix + "block_mask")
        if w is None or bm is None:
            return "dense state needs 'weight' and 'block_mask'"
        if tuple(w.shape) != tuple(weight_shape) or not w.is_floating_point():
            return f"weight must be a float {tuple(weight_shape)}, got {w.dtype} {tuple(w.shape)}"
        if tuple(bm.shape) != (nbr, nbc) or bm.dtype != torch.bool:
            return f"block_mask must be bool {(nbr, nbc)}, got {bm.dtype} {tuple(bm.shape)}"
        return None
    values = state_dict.get(prefix + "values")
    crow, col = state_dict.get(prefix + "crow_indices"), state_dict.get(prefix + "col_indices")
    if values is None or crow is None or col is None:
        missing = [n for n, t in (("values", values), ("crow_indices", crow), ("col_indices", col)) if t is None]
        return f"sparse state is missing {missing}"
    if values.dim() != 3 or tuple(values.shape[1:]) != (block, block) or not values.is_floating_point():
        return f"values must be float [nnz, {block}, {block}], got {values.dtype} {tuple(values.shape)}"
    try:
        check_bsr(crow, col, values.shape[0], matrix_shape, block, f"{what} state")
    except ValueError as e:
        return str(e)
    return None


def load_bsr_state(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs, matrix_shape: tuple[int, int]) -> None:
    """``_load_from_state_dict`` of a block-sparse module: the whole incoming state is validated first
    (``module._incoming_error``), so a failed load leaves the module exactly as it was; the number of
    stored blocks and the mode are data, so the module is shaped like the incoming state (placeholders
    in its dtype/device) before the parent loader copies into it, and restored if that fails. A state with the
    layer's own storage shapes (a checkpoint of the same layer) is copied in place: its Parameters stay the
    objects an optimizer built earlier holds."""
    if load_refused(module, state_dict, prefix, missing_keys, error_msgs):
        return
    mode = state_dict[prefix + "_extra_state"]["mode"]
    saved = (dict(module._parameters), dict(module._buffers), module.mode)
    names = ("weight", "block_mask") if mode == "dense" else ("values", "crow_indices", "col_indices")
    current = {**module._parameters, **module._buffers}
    in_place = all(current.get(n) is not None and tuple(current[n].shape) == tuple(state_dict[prefix + n].shape)
                   for n in names)
    if in_place:  # the same storage: copied in place, so the Parameters stay the objects an optimizer holds
        with torch.no_grad():
            contents = {n: t.detach().clone() for n, t in current.items() if t is not None}
        module.mode = mode
    else:  # shaped like the incoming state: placeholders in the layer's dtype and device
        ref = module.values if module.storage == "sparse" else module.weight
        bs = module.block_size
        nbr, _ = block_grid(matrix_shape, bs)
        nnz = state_dict[prefix + "values"].shape[0] if mode != "dense" else 0
        module._set_structure(BSRMatrix(torch.zeros(nnz, bs, bs, device=ref.device, dtype=ref.dtype),
                                        torch.zeros(nbr + 1, dtype=torch.int64, device=ref.device),
                                        torch.zeros(nnz, dtype=torch.int64, device=ref.device), matrix_shape, bs),
                              mode)
    n_errors = len(error_msgs)
    nn.Module._load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                    error_msgs)
    if len(error_msgs) > n_errors:  # restore the old structure (and, loaded in place, the old contents)
        module._parameters.clear()
        module._parameters.update(saved[0])
        module._buffers.clear()
        module._buffers.update(saved[1])
        module.mode = saved[2]
        if in_place:
            with torch.no_grad():
                for n, t in contents.items():
                    current[n].copy_(t)
    elif module.storage == "sparse" and module.crow_indices.dtype != torch.int64:
        module.crow_indices = module.crow_indices.long()


def masked_outside_autograd(w: torch.Tensor, block_mask: torch.Tensor, mask_like_w) -> torch.Tensor:
    """``w`` with its pruned blocks zero, for a call autograd does not record (dense storage): ``w`` itself
    while it holds zeros there, else a masked copy; checked (and the copy made) once per version of ``w``
    and the mask. Training masks in the graph; a weight loaded or edited in place with values in pruned
    blocks must give the same output in every grad mode (``mask_like_w()``: the mask expanded to ``w``)."""
    from ..cpu.packcache import cached

    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # traced: the mask in the graph, no data checks
        return w * mask_like_w().to(w.dtype)

    def build():
        with torch.inference_mode(False):  # (a later call may need it saved for backward)
            m = mask_like_w().to(w.dtype)
            wd = w.detach()
            return None if not bool(wd.masked_select(m == 0).ne(0).any()) else wd * m  # None: w is clean

    masked = cached("dense_storage_masked", (w, block_mask), (), build)
    return w if masked is None else masked
