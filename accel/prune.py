"""Pruning: block-norm and channel importance, global or per-layer sparsity, one-shot and gradual
(cubic) schedules, and a per-layer sensitivity scan.

Blocks are the kernels' blocks: a Linear weight ``[N, K]`` is cut into ``block x block`` tiles
(padded at the edges, as ``accel.formats``), a Conv2d weight ``[O, C, kh, kw]`` is read as the
``[O, C*kh*kw]`` matrix of its implicit GEMM. A block mask keeps whole tiles, so a pruned Linear
converts to ``SparseLinear`` without losing anything. Channel pruning keeps whole output channels
(rows); in BSR form a fully pruned group of ``block`` rows is an empty block row the kernels skip.

Masks are dicts ``{module name: bool tensor}``: ``[nbr, nbc]`` block masks or ``[out]`` channel masks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

from .formats import block_norms, expand_block_mask, topk_block_mask

FilterFn = Callable[[nn.Module, str], bool]


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers (the block-sparse kernels' target)."""
    return isinstance(module, nn.Linear)


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    w = module.weight.detach()
    return w.reshape(w.shape[0], -1)


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    filter_fn = filter_fn or default_filter
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and filter_fn(m, name)}


def block_masks(model: nn.Module, sparsity: float, block: int = 32, norm: int = 2, scope: str = "global",
                filter_fn: FilterFn | None = None) -> dict[str, torch.Tensor]:
    """Keep the highest-norm blocks. ``scope="layer"``: ``sparsity`` of the blocks of every layer;
    ``scope="global"``: ``sparsity`` of all blocks of the selected layers together, ranked by their
    raw L``norm`` (layers with small weights lose more blocks)."""
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError("no layer to prune: the filter selected no nn.Linear / nn.Conv2d")
    scores = {name: block_norms(_weight_matrix(m), block, p=norm) for name, m in layers.items()}
    if scope == "layer":
        return {name: topk_block_mask(s, sparsity) for name, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = topk_block_mask(flat, sparsity).flatten()
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i:i + s.numel()].view_as(s)
        i += s.numel()
    return out


def channel_masks(model: nn.Module, sparsity: float, norm: int = 2, filter_fn: FilterFn | None = None
                  ) -> dict[str, torch.Tensor]:
    """Per layer, keep the ``1 - sparsity`` fraction of output channels with the largest L``norm``."""
    out = {}
    for name, m in prunable_layers(model, filter_fn).items():
        w = _weight_matrix(m)
        score = w.abs().sum(1) if norm == 1 else w.pow(2).sum(1).sqrt()
        out[name] = topk_block_mask(score[:, None], sparsity).flatten()
    return out


def element_mask(module: nn.Module, mask: torch.Tensor, block: int) -> torch.Tensor:
    """The weight-shaped 0/1 mask of a block or channel mask."""
    w = module.weight
    if mask.dim() == 1:  # channels
        return mask.to(w.device).view(-1, *([1] * (w.dim() - 1))).expand_as(w)
    return expand_block_mask(mask.to(w.device), block, tuple(_weight_matrix(module).shape)).reshape(w.shape)


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor], block: int = 32) -> None:
    """Zero the pruned weights (and, for channel masks, the pruned channels' biases) in place."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        m = modules[name]
        m.weight.mul_(element_mask(m, mask, block).to(m.weight.dtype))
        if mask.dim() == 1 and m.bias is not None:
            m.bias.mul_(mask.to(m.bias.device, m.bias.dtype))


def prune_(model: nn.Module, sparsity: float, block: int = 32, norm: int = 2, scope: str = "global",
           filter_fn: FilterFn | None = None, structure: str = "block") -> dict[str, torch.Tensor]:
    """One-shot pruning: compute masks (``structure`` "block" or "channel"), zero the weights, return the masks."""
    if structure == "block":
        masks = block_masks(model, sparsity, block, norm, scope, filter_fn)
    elif structure == "channel":
        masks = channel_masks(model, sparsity, norm, filter_fn)
    else:
        raise ValueError(f"structure must be 'block' or 'channel', got {structure!r}")
    apply_masks_(model, masks, block)
    return masks


def cubic_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_end - t_0))^3`` between
    ``begin`` and ``end``, ``initial`` before and ``final`` after."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    frac = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - frac) ** 3


class GradualPruner:
    """Gradual block pruning during (fine-)tuning.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()``: every ``frequency``
    steps between ``begin`` and ``end`` it recomputes the masks at the scheduled sparsity (pruned
    blocks are zero, so they stay pruned), and on every step it re-applies them, so the optimizer
    cannot revive pruned weights.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, begin: int, end: int, frequency: int = 1,
                 initial_sparsity: float = 0.0, block: int = 32, norm: int = 2, scope: str = "global",
                 filter_fn: FilterFn | None = None) -> None:
        if not 0 <= begin < end or frequency < 1:
            raise ValueError(f"need 0 <= begin < end and frequency >= 1, got begin={begin}, end={end}, "
                             f"frequency={frequency}")
        self.model, self.final, self.initial = model, final_sparsity, initial_sparsity
        self.begin, self.end, self.frequency = begin, end, frequency
        self.block, self.norm, self.scope, self.filter_fn = block, norm, scope, filter_fn
        self.step_count = 0
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.final, self.begin, self.end, self.initial)

    def step(self) -> float:
        """Advance one step; returns the sparsity now enforced."""
        self.step_count += 1
        t = self.step_count
        due = t >= self.begin and ((t - self.begin) % self.frequency == 0 or t >= self.end)
        target = self.sparsity_at(t)
        if due and target > self.sparsity:
            self.masks = block_masks(self.model, target, self.block, self.norm, self.scope, self.filter_fn)
            self.sparsity = target
        if self.masks:
            apply_masks_(self.model, self.masks, self.block)
        return self.sparsity


def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float],
                     sparsities: tuple[float, ...] = (0.5, 0.75, 0.9), block: int = 32, norm: int = 2,
                     filter_fn: FilterFn | None = None) -> list[dict]:
    """Prune one layer at a time (one-shot, no fine-tuning) and evaluate: how much each layer can lose.

    Returns rows ``{"layer", "sparsity", "metric"}`` plus one ``sparsity=0`` baseline row.
    """
    rows = [{"layer": None, "sparsity": 0.0, "metric": evaluate(model)}]
    for name in prunable_layers(model, filter_fn):
        for s in sparsities:
            trial = copy.deepcopy(model)
            prune_(trial, s, block, norm, "layer", lambda m, n, name=name: n == name)
            rows.append({"layer": name, "sparsity": s, "metric": evaluate(trial)})
    return rows


def sparsity_of(model: nn.Module, filter_fn: FilterFn | None = None) -> float:
    """Fraction of zero weights over the selected layers."""
    total = zeros = 0
    for m in prunable_layers(model, filter_fn).values():
        total += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    return zeros / total if total else 0.0


__all__ = ["GradualPruner", "apply_masks_", "block_masks", "channel_masks", "cubic_sparsity", "prune_",
           "sensitivity_scan", "sparsity_of"]
