"""Pruning: block-norm and channel importance, global or per-layer sparsity, one-shot and gradual
(cubic) schedules, and a per-layer sensitivity scan.

Blocks are the kernels' blocks: a Linear weight ``[N, K]`` is cut into ``block x block`` tiles
(padded at the edges, as ``accel.formats``), a Conv2d weight ``[O, C, kh, kw]`` is read as the
``[O, kh*kw*C]`` matrix of its implicit GEMM in ``(kh, kw, c)`` order (as ``SparseConv2d`` stores it).
A block mask keeps whole tiles, so a pruned Linear (Conv2d) converts to ``SparseLinear``
(``SparseConv2d``) without losing anything. Channel pruning keeps whole output channels
(rows); in BSR form a fully pruned group of ``block`` rows is an empty block row the kernels skip.

Masks are dicts ``{module name: bool tensor}``: ``[nbr, nbc]`` block masks or ``[out]`` channel masks.

Hugging Face ``Conv1D`` (GPT-2; weight ``[in, out]``) is pruned as the Linear it is: its blocks are cut from
the ``[out, in]`` matrix, as ``SparseLinear`` stores it. Layers whose weight is computed (parametrized,
e.g. ``parametrizations.weight_norm``, or old-style ``weight_norm`` / ``spectral_norm`` hooks) are read
(masks, ``sensitivity_scan``) but not written: ``prune_`` / ``apply_masks_`` / ``GradualPruner`` refuse
them with a ValueError naming them, since zeros written into a computed weight do not stick.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .formats import block_norms, expand_block_mask, topk_block_mask
from .inputs import as_call, eval_mode
from .shrink import ShrinkError, ShrinkPlan, apply_plan, layer_shapes, plan_shrink, resize_, shrink_  # noqa: F401

FilterFn = Callable[[nn.Module, str], bool]


# ------------------------------------------------------------------------------------------------ layer kinds
# One reading of "a Linear / Conv2d / Embedding layer", shared by pruning, sparsify_, quantize_, calibrate and QAT:
# the stock layer itself, the same layer with a parametrized or hook-computed weight (torch.nn.utils.parametrize /
# parametrizations.weight_norm, old-style torch.nn.utils.weight_norm / spectral_norm), and Hugging Face's ``Conv1D``
# (GPT-2's projections: weight ``[in, out]``, ``y = x @ W + b``), which is a Linear with a transposed weight.
_PLAIN = (nn.Linear, nn.Conv2d, nn.Embedding)


def _unparametrized_class(m: nn.Module) -> type:
    t = type(m)
    return t.__bases__[0] if parametrize.is_parametrized(m) and t.__bases__ else t


def is_conv1d(m: nn.Module) -> bool:
    """A layer with Hugging Face ``Conv1D``'s layout (weight ``[in, out]``, attribute ``nf``)."""
    return (getattr(type(m), "_accel_conv1d", False) or any(c.__name__ == "Conv1D" for c in type(m).__mro__)) and \
        hasattr(m, "nf") and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2


def base_kind(m: nn.Module) -> type | None:
    """``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` when ``m`` is exactly that layer (its weight stored or
    computed by a parametrization / weight-norm hook), ``nn.Linear`` for a Hugging Face ``Conv1D``, else None
    (subclasses with their own forward, e.g. fake-quantized QAT layers, are not the stock layer)."""
    cls = _unparametrized_class(m)
    if cls in _PLAIN:
        return cls
    if cls.__name__ == "Conv1D" and is_conv1d(m):
        return nn.Linear
    return None


def own_forward_reason(m: nn.Module) -> str | None:
    """Why ``m`` is not converted though it is an ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding``: a subclass
    with its own forward (Hugging Face ``FalconLinear``, a custom layer), which a converted layer would drop,
    or one keeping the stock forward (an attention's ``out_proj``, whose owner reads its weight directly).
    None for the stock layers and accel's own layers. The one reading shared by pruning, ``sparsify_``,
    ``quantize_`` and QAT."""
    if base_kind(m) is not None or not isinstance(m, _PLAIN) or is_accel_layer(m):
        return None
    stock = next(k for k in _PLAIN if isinstance(m, k))
    if type(m).forward is stock.forward:  # e.g. nn.MultiheadAttention's out_proj, whose owner reads its weight
        return (f"{type(m).__name__} subclasses {stock.__name__} (accel converts the stock layer only: an owner "
                "may use its weight directly, as nn.MultiheadAttention does with out_proj)")
    if is_qat_layer(m):
        return f"{type(m).__name__} is a fake-quantized QAT layer: accel.convert(model) makes it int8"
    return f"{type(m).__name__} subclasses {stock.__name__} with its own forward, which a converted layer would drop"


def is_accel_layer(m: nn.Module) -> bool:
    """One of accel's converted layers (``accel.modules``: SparseLinear, QuantLinear, ...)."""
    return type(m).__module__.startswith("accel.modules")


def is_qat_layer(m: nn.Module) -> bool:
    """One of ``accel.qat``'s fake-quantized twins (pruned during QAT like the layers they stand for)."""
    return type(m).__module__ == "accel.qat"


def weight_source(m: nn.Module) -> str | None:
    """How ``m``'s weight (or bias) is computed when it is not a stored parameter: a parametrization
    (``torch.nn.utils.parametrize``, e.g. ``parametrizations.weight_norm``) or an old-style hook
    (``torch.nn.utils.weight_norm`` / ``spectral_norm``) that recomputes it before every forward. None when
    the layer stores its weight. Zeros written into a computed weight do not stick."""
    if is_accel_layer(m):  # accel's own layers derive .weight from their tables
        return None
    if parametrize.is_parametrized(m):
        return "parametrized (" + "; ".join(f"{t}: {', '.join(type(p).__name__ for p in plist)}"
                                            for t, plist in m.parametrizations.items()) + ")"
    computed = [t for t in ("weight", "bias") if isinstance(getattr(m, t, None), torch.Tensor) and t not in m._parameters
                and t not in m._buffers]
    if computed:
        hooks = sorted({type(h).__name__ for h in m._forward_pre_hooks.values() if hasattr(h, "compute_weight")})
        return f"{' and '.join(computed)} recomputed before every forward by {', '.join(hooks) or 'a forward pre-hook'}"
    return None


def _current(m: nn.Module, name: str) -> torch.Tensor | None:
    """``m.<name>`` as the layer computes it now (an old-style weight-norm hook's attribute can be stale)."""
    for h in m._forward_pre_hooks.values():
        if getattr(h, "name", None) == name and hasattr(h, "compute_weight"):
            from torch.nn.utils.spectral_norm import SpectralNorm

            return h.compute_weight(m, do_power_iteration=False) if isinstance(h, SpectralNorm) else h.compute_weight(m)
    return getattr(m, name, None)


@torch.no_grad()
def as_plain(m: nn.Module) -> nn.Module | None:
    """``m`` as the stock layer :func:`base_kind` names: ``m`` itself when it is one and stores its weight,
    otherwise a new ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` holding the weight ``m`` computes
    (parametrized, weight-norm hook) or the transposed weight of a ``Conv1D``; None for other modules."""
    kind = base_kind(m)
    if kind is None:
        return None
    if type(m) is kind and weight_source(m) is None:
        return m
    w, b = _current(m, "weight").detach(), _current(m, "bias")
    b = None if b is None else b.detach()
    if kind is nn.Linear:
        if _unparametrized_class(m) is not nn.Linear:  # Conv1D: weight [in, out]
            w = w.t()
        new = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=b is not None, device=w.device,
                                       dtype=w.dtype)
    elif kind is nn.Conv2d:
        new = torch.nn.utils.skip_init(nn.Conv2d, m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                                       m.dilation, m.groups, b is not None, m.padding_mode, device=w.device, dtype=w.dtype)
    else:
        new = torch.nn.utils.skip_init(nn.Embedding, m.num_embeddings, m.embedding_dim, m.padding_idx, m.max_norm,
                                       m.norm_type, m.scale_grad_by_freq, m.sparse, device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w.clone())
    if b is not None:
        new.bias = nn.Parameter(b.clone())
    new.train(m.training)
    return new


def as_linear(m: nn.Module) -> nn.Linear | None:
    """``m`` as an ``nn.Linear``: itself, or the equivalent Linear of a parametrized Linear or a Hugging Face
    ``Conv1D`` (:func:`as_plain`); None for anything else."""
    return as_plain(m) if base_kind(m) is nn.Linear else None


def default_filter(module: nn.Module, name: str) -> bool:
    """Linear layers, Hugging Face ``Conv1D`` included (the block-sparse kernels' target)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """The matrix the blocks are cut from: a Linear's weight (a ``Conv1D``'s transposed, ``[out, in]``); a
    conv's ``[O, C, kh, kw]`` weight as the ``[O, kh*kw*C]`` implicit-GEMM matrix in ``(kh, kw, c)`` order
    (``SparseConv2d``'s layout)."""
    w = module.weight.detach()
    if is_conv1d(module):
        return w.t()
    if w.dim() > 2:
        w = w.movedim(1, -1)
    return w.reshape(w.shape[0], -1)


def tied_weights(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> names of the other layers`` for every module whose weight Parameter another module
    object also holds (tied weights: a language model's output head and its token embeddings). A module
    registered under several names is one module, not a tie."""
    owners: dict[int, list[tuple[int, str]]] = {}
    seen = set()
    for name, m in model.named_modules():
        if id(m) in seen:
            continue
        seen.add(id(m))
        w = m._parameters.get("weight")
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append((id(m), name))
    tied: dict[int, list[str]] = {}
    for group in owners.values():
        if len(group) > 1:
            for mid, _ in group:
                tied[mid] = [n for other, n in group if other != mid]
    return tied


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """The Linear (``Conv1D`` included) and Conv2d layers ``filter_fn`` (default: Linear layers) selects, less
    the layers whose weight another layer holds (tied weights, e.g. an output head tied to the token
    embeddings: zeros written into it would prune the embeddings too), which a warning names."""
    if filter_fn is None:  # the default leaves out layers accel cannot convert: their zeros would buy no speed
        own = {n: r for n, m in model.named_modules()
               if default_filter(m, n) and not is_qat_layer(m) and (r := own_forward_reason(m))}
        if own:
            warnings.warn(f"pruning leaves out {len(own)} layer(s) accel cannot convert (pass a filter_fn selecting "
                          f"them to prune them anyway): " + "; ".join(f"{n!r}: {r}" for n, r in list(own.items())[:6])
                          + (f" (+{len(own) - 6})" if len(own) > 6 else ""), stacklevel=3)
        def filter_fn(m, n, own=own):
            return default_filter(m, n) and n not in own
    chosen = {name: m for name, m in model.named_modules()
              if (isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m)) and filter_fn(m, name)}
    tied = tied_weights(model) if chosen else {}
    skipped = [f"{n!r} (tied to {', '.join(repr(o) for o in tied[id(m)])})" for n, m in chosen.items() if id(m) in tied]
    if skipped:
        warnings.warn(f"pruning leaves out {len(skipped)} layer(s) whose weight another layer holds (tied weights: "
                      f"pruning would change that layer too): {', '.join(skipped)}", stacklevel=3)
    return {n: m for n, m in chosen.items() if id(m) not in tied}


def nothing_to_prune(model: nn.Module, filter_fn: FilterFn | None) -> str:
    """The error of a pruning call that found no layer, with what the model holds instead."""
    why = []
    accel_layers = [n for n, m in model.named_modules() if is_accel_layer(m)]
    if accel_layers:
        why.append(f"{len(accel_layers)} layer(s) are already converted by accel (e.g. {accel_layers[0]!r}): prune "
                   "the dense model and convert once")
    own = [n for n, m in model.named_modules() if own_forward_reason(m) is not None and not is_qat_layer(m)]
    if own:
        why.append(f"{len(own)} cannot be converted (e.g. {own[0]!r}: {own_forward_reason(model.get_submodule(own[0]))})")
    tied = tied_weights(model)
    if tied:
        why.append(f"{len(tied)} share a tied weight")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not accel_layers]
    if filter_fn is None and convs:
        why.append(f"the {len(convs)} nn.Conv2d layer(s) are pruned only when a filter_fn selects them")
    return "no layer to prune: the filter selected no nn.Linear / nn.Conv2d" + (f" ({'; '.join(why)})" if why else "")


def _refuse_computed(what: str, layers: dict[str, nn.Module]) -> None:
    """Pruning writes zeros into the weight: refuse (before anything changes) layers whose weight is computed,
    and accel's converted layers (whose ``.weight`` is a read-only view of their tables)."""
    done = [n for n, m in layers.items() if is_accel_layer(m)]
    if done:
        raise ValueError(f"{what}: {len(done)} layer(s) are already converted by accel (e.g. {done[0]!r}): prune the "
                         "dense model and convert once")
    bad = [f"{n!r} ({src})" for n, m in layers.items() if (src := weight_source(m)) is not None]
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} layer(s) compute their weight instead of storing it, so zeros written into it would "
            f"not stick: {', '.join(bad)}. Remove the parametrization first (torch.nn.utils.parametrize."
            f"remove_parametrizations(layer, 'weight') or torch.nn.utils.remove_weight_norm(layer), which keep the "
            f"current weight), or leave these layers out with filter_fn. (accel.sparsify_ / quantize_ convert such "
            f"layers from their computed weight.)")


def _layer_bounds(n: int, min_density: float, max_density: float) -> tuple[int, int]:
    """(fewest, most) blocks a layer of ``n`` blocks may keep; at least one block unless max_density is 0."""
    lo = min(n, max(1 if max_density > 0 else 0, math.ceil(min_density * n - 1e-9)))
    hi = max(lo, min(n, math.floor(max_density * n + 1e-9)))
    return lo, hi


def _keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.sort(scores.flatten(), descending=True, stable=True).indices[:keep]] = True
    return mask.view_as(scores)


def block_masks(model: nn.Module, sparsity: float, block: int = 32, norm: int = 2, scope: str = "global",
                filter_fn: FilterFn | None = None, *, min_density: float = 0.0, max_density: float = 1.0,
                example_inputs=None, sparsities: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9, 0.95)
                ) -> dict[str, torch.Tensor]:
    """Keep the highest-norm blocks, every layer keeping between ``min_density`` and ``max_density`` of
    its blocks (and at least one).

    * ``scope="layer"``: ``sparsity`` of the blocks of every layer;
    * ``scope="global"``: ``sparsity`` of all blocks of the selected layers together, blocks ranked by
      their L``norm`` divided by the mean block norm of their layer (raw norms would strip the
      layers whose weights happen to be small); layers that would fall below the floor are held at
      it, with a warning naming them;
    * ``scope="sensitivity"``: per-layer sparsities chosen to reach ``sparsity`` overall with the
      least output error: each layer is pruned alone at ``sparsities`` and the model's output on
      ``example_inputs`` compared with the unpruned output (:func:`sensitivity_scan`), then blocks
      are taken greedily from the layers whose output error grows least per block pruned.
    """
    if scope not in ("global", "layer", "sensitivity"):
        raise ValueError(f"scope must be 'global', 'layer' or 'sensitivity', got {scope!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    if not 0.0 <= min_density <= max_density <= 1.0:
        raise ValueError(f"need 0 <= min_density <= max_density <= 1, got {min_density}, {max_density}")
    layers = prunable_layers(model, filter_fn)
    if not layers:
        raise ValueError(nothing_to_prune(model, filter_fn))
    scores = {name: block_norms(_weight_matrix(m), block, p=norm) for name, m in layers.items()}
    bounds = {name: _layer_bounds(s.numel(), min_density, max_density) for name, s in scores.items()}
    if scope == "layer":
        return {name: _keep_top(s, min(max(int(round((1.0 - sparsity) * s.numel())), bounds[name][0]), bounds[name][1]))
                for name, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    target = int(round((1.0 - sparsity) * total))
    if scope == "sensitivity":
        if example_inputs is None:
            raise ValueError("scope 'sensitivity' needs example_inputs")
        keep = _allocate_by_sensitivity(model, layers, scores, bounds, target, block, norm, example_inputs, sparsities)
        return {name: _keep_top(scores[name], keep[name]) for name in scores}
    normalized = {name: s / s.mean().clamp_min(1e-30) for name, s in scores.items()}
    keep = _water_fill(normalized, bounds, target)
    raw = _water_fill(normalized, {n: (0, s.numel()) for n, s in scores.items()}, target)
    held = [f"{n} (would keep {raw[n]}/{scores[n].numel()} blocks)" for n in scores if raw[n] < bounds[n][0]]
    if held:
        warnings.warn(f"global pruning held {len(held)} layer(s) at the floor min_density={min_density}: "
                      + ", ".join(held), stacklevel=2)
    return {name: _keep_top(normalized[name], keep[name]) for name in scores}


def _water_fill(scores: dict[str, torch.Tensor], bounds: dict[str, tuple[int, int]], target: int) -> dict[str, int]:
    """Blocks kept per layer: those scoring above one global threshold, clamped to each layer's bounds,
    with the threshold chosen so the total is as close to ``target`` as the bounds allow."""
    sorted_scores = {n: torch.sort(s.flatten(), descending=True).values for n, s in scores.items()}
    lo_total = sum(b[0] for b in bounds.values())
    hi_total = sum(b[1] for b in bounds.values())
    target = min(max(target, lo_total), hi_total)

    def kept_at(t: float) -> dict[str, int]:
        out = {}
        for n, v in sorted_scores.items():
            c = int((v >= t).sum())
            out[n] = min(max(c, bounds[n][0]), bounds[n][1])
        return out

    cands = torch.unique(torch.cat([v for v in sorted_scores.values()])).flip(0)  # descending thresholds
    lo_i, hi_i = 0, cands.numel() - 1
    if cands.numel() == 0:
        return {n: b[0] for n, b in bounds.items()}
    while lo_i < hi_i:  # smallest index (highest threshold) whose kept total reaches target
        mid = (lo_i + hi_i) // 2
        if sum(kept_at(float(cands[mid])).values()) >= target:
            hi_i = mid
        else:
            lo_i = mid + 1
    keep = kept_at(float(cands[lo_i]))
    excess = sum(keep.values()) - target  # ties at the threshold: drop the excess from layers above their floor
    for n in sorted(keep, key=lambda n: -keep[n]):
        if excess <= 0:
            break
        give = min(excess, keep[n] - bounds[n][0])
        keep[n] -= give
        excess -= give
    return keep


def _flat_output(out) -> torch.Tensor:
    """All floating tensors of a model output (tensor, tuple/list, dict / ModelOutput) as one vector."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten() if out.is_floating_point() else torch.zeros(0, dtype=torch.float64)
    if isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [_flat_output(o) for o in out]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return torch.zeros(0, dtype=torch.float64)


def output_sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm().clamp_min(1e-30) / noise))


def _allocate_by_sensitivity(model, layers, scores, bounds, target, block, norm, example_inputs, sparsities):
    rows = sensitivity_scan(model, example_inputs=example_inputs, sparsities=sparsities, block=block, norm=norm,
                            filter_fn=lambda m, n: n in layers)
    noise: dict[str, dict[int, float]] = {n: {s.numel(): 0.0} for n, s in scores.items()}  # kept -> output noise
    for r in rows[1:]:
        n = r["layer"]
        kept = int(round((1.0 - r["sparsity"]) * scores[n].numel()))
        noise[n][kept] = 10 ** (-r["metric"] / 10) if math.isfinite(r["metric"]) else 0.0
    # each layer moves down its options (fewer blocks kept) within its bounds; greedily take the move
    # with the least added output noise per block removed until the target is reached
    options = {n: sorted((k for k in noise[n] if bounds[n][0] <= k <= bounds[n][1]), reverse=True) for n in noise}
    for n in options:
        if bounds[n][0] not in options[n] and bounds[n][0] < scores[n].numel():
            lowest = min(noise[n])
            options[n].append(bounds[n][0])
            noise[n][bounds[n][0]] = noise[n][lowest] * max(1.0, lowest / max(1, bounds[n][0]))  # extrapolated
    keep = {n: options[n][0] if options[n] else bounds[n][1] for n in noise}
    step = {n: 0 for n in noise}
    while sum(keep.values()) > target:
        best, best_cost = None, math.inf
        for n in noise:
            if step[n] + 1 >= len(options[n]):
                continue
            k0, k1 = options[n][step[n]], options[n][step[n] + 1]
            cost = (noise[n][k1] - noise[n][k0]) / max(1, k0 - k1)
            if cost < best_cost:
                best, best_cost = n, cost
        if best is None:
            break
        over = sum(keep.values()) - target
        k0, k1 = options[best][step[best]], options[best][step[best] + 1]
        if k0 - k1 > over:  # a partial step lands exactly on the target
            keep[best] = k0 - over
            break
        step[best] += 1
        keep[best] = k1
    return keep


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
    if is_conv1d(module):  # weight [in, out]: the mask of the [out, in] matrix, transposed
        if mask.dim() == 1:
            return mask.to(w.device).view(1, -1).expand_as(w)
        return expand_block_mask(mask.to(w.device), block, (w.shape[1], w.shape[0])).t()
    if mask.dim() == 1:  # channels
        return mask.to(w.device).view(-1, *([1] * (w.dim() - 1))).expand_as(w)
    full = expand_block_mask(mask.to(w.device), block, tuple(_weight_matrix(module).shape))
    if w.dim() > 2:  # back from (kh, kw, c) order
        return full.reshape(w.movedim(1, -1).shape).movedim(-1, 1)
    return full.reshape(w.shape)


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor], block: int = 32) -> None:
    """Zero the pruned weights (and, for channel masks, the pruned channels' biases) in place. Layers whose
    weight is computed (parametrized, weight-norm hooks) are refused with a ValueError before anything changes."""
    modules = dict(model.named_modules())
    missing = sorted(n for n in masks if n not in modules)
    if missing:
        raise ValueError(f"apply_masks_: the masks name layers this model does not have: {missing}")
    _refuse_computed("apply_masks_", {n: modules[n] for n in masks})
    for name, mask in masks.items():
        m = modules[name]
        m.weight.mul_(element_mask(m, mask, block).to(m.weight.dtype))
        if mask.dim() == 1 and m.bias is not None:
            m.bias.mul_(mask.to(m.bias.device, m.bias.dtype))


def prune_(model: nn.Module, sparsity: float, block: int = 32, norm: int = 2, scope: str = "global",
           filter_fn: FilterFn | None = None, structure: str = "block") -> dict[str, torch.Tensor]:
    """One-shot pruning: compute masks (``structure`` "block" or "channel"), zero the weights, return the masks.
    Layers whose weight is computed (parametrized, weight-norm hooks) are refused with a ValueError naming
    them, before anything changes: remove the parametrization or leave them out with ``filter_fn``."""
    with warnings.catch_warnings():  # (the mask functions select the same layers again, and warn once)
        warnings.simplefilter("ignore")
        _refuse_computed("prune_", prunable_layers(model, filter_fn))
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
                 filter_fn: FilterFn | None = None, min_density: float = 0.0, max_density: float = 1.0) -> None:
        if not 0 <= begin < end or frequency < 1:
            raise ValueError(f"need 0 <= begin < end and frequency >= 1, got begin={begin}, end={end}, "
                             f"frequency={frequency}")
        for what, v in (("final_sparsity", final_sparsity), ("initial_sparsity", initial_sparsity)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:  # (NaN fails too)
                raise ValueError(f"GradualPruner: {what} must be in [0, 1], got {v!r}")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"GradualPruner: initial_sparsity {initial_sparsity} exceeds final_sparsity "
                             f"{final_sparsity}")
        if not 0.0 <= min_density <= max_density <= 1.0:
            raise ValueError(f"GradualPruner: need 0 <= min_density <= max_density <= 1, got {min_density}, "
                             f"{max_density}")
        self.model, self.final, self.initial = model, final_sparsity, initial_sparsity
        self.begin, self.end, self.frequency = begin, end, frequency
        self.block, self.norm, self.scope, self.filter_fn = block, norm, scope, filter_fn
        if scope not in ("global", "layer"):
            raise ValueError(f"GradualPruner scope must be 'global' or 'layer', got {scope!r}")
        _refuse_computed("GradualPruner", prunable_layers(model, filter_fn))
        self.min_density, self.max_density = min_density, max_density
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
            with warnings.catch_warnings():  # the floor warning would repeat every schedule step
                warnings.simplefilter("ignore")
                self.masks = block_masks(self.model, target, self.block, self.norm, self.scope, self.filter_fn,
                                         min_density=self.min_density, max_density=self.max_density)
            self.sparsity = target
        if self.masks:
            apply_masks_(self.model, self.masks, self.block)
        return self.sparsity

    def state_dict(self) -> dict:
        """The schedule's progress (step, enforced sparsity, masks): save it with the model and optimizer."""
        return {"step_count": self.step_count, "sparsity": self.sparsity,
                "masks": {k: v.clone() for k, v in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Resume a schedule saved by :meth:`state_dict` (after loading the model): the masks are enforced again
        at once, so an optimizer's momentum cannot revive pruned blocks. Masks must name this pruner's layers
        with its block grid; nothing changes on a bad state."""
        try:
            step, sparsity, masks = int(state["step_count"]), float(state["sparsity"]), dict(state["masks"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"GradualPruner.load_state_dict: not a GradualPruner state ({type(e).__name__}: {e})") \
                from None
        if step < 0 or not 0.0 <= sparsity <= 1.0:  # (NaN fails too)
            raise ValueError(f"GradualPruner.load_state_dict: need step_count >= 0 and sparsity in [0, 1], got "
                             f"{step}, {sparsity}")
        layers = prunable_layers(self.model, self.filter_fn)
        for name, mask in masks.items():
            m = layers.get(name)
            if m is None:
                raise ValueError(f"GradualPruner.load_state_dict: mask for {name!r}, which this pruner does not prune "
                                 f"(its layers: {sorted(layers)[:6]})")
            grid = tuple(-(-d // self.block) for d in _weight_matrix(m).shape)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != grid:
                raise ValueError(f"GradualPruner.load_state_dict: mask for {name!r} must be a bool {grid} block grid, "
                                 f"got {getattr(mask, 'dtype', type(mask).__name__)} "
                                 f"{tuple(getattr(mask, 'shape', ()))}")
        self.step_count, self.sparsity, self.masks = step, sparsity, {k: v.clone() for k, v in masks.items()}
        if self.masks:
            apply_masks_(self.model, self.masks, self.block)


def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float] | None = None, *,
                     example_inputs=None, sparsities: tuple[float, ...] = (0.5, 0.75, 0.9), block: int = 32,
                     norm: int = 2, filter_fn: FilterFn | None = None) -> list[dict]:
    """Prune one layer at a time (one-shot, no fine-tuning) and score the model: how much each layer
    can lose. The score is ``evaluate(model)`` (e.g. accuracy), or, with ``example_inputs`` instead
    (a tuple of positional inputs, a dict of keyword inputs, or ``(args, kwargs)``), the SQNR in dB
    of the model's output against the unpruned output (output reconstruction; higher is better).

    Returns rows ``{"layer", "sparsity", "metric"}`` plus one ``sparsity=0`` baseline row. The layers
    are pruned in place and restored after each trial; a layer whose weight is computed (parametrized,
    weight-norm hooks) is swapped for a plain layer holding its pruned computed weight during its trials.
    """
    if (evaluate is None) == (example_inputs is None):
        raise ValueError("sensitivity_scan: pass exactly one of evaluate or example_inputs")
    # eval mode for example inputs (a user's evaluate sets its own); every module's own flag restored after
    with eval_mode(model, train=False if evaluate is None else None):
        if evaluate is None:
            args, kwargs = as_call(example_inputs)
            with torch.no_grad():
                ref = _flat_output(model(*args, **kwargs))

            def evaluate(m):  # noqa: F811
                with torch.no_grad():
                    return output_sqnr(ref, _flat_output(m(*args, **kwargs)))
        layers = prunable_layers(model, filter_fn)
        if not layers:
            raise ValueError("sensitivity_scan: " + nothing_to_prune(model, filter_fn))
        rows = [{"layer": None, "sparsity": 0.0, "metric": evaluate(model)}]
        for name, m in layers.items():
            if weight_source(m) is not None:
                rows += _scan_computed(model, name, m, evaluate, sparsities, block, norm)
                continue
            saved = m.weight.detach().clone()
            for s in sparsities:
                mask = topk_block_mask(block_norms(_weight_matrix(m), block, p=norm), s)
                with torch.no_grad():
                    m.weight.mul_(element_mask(m, mask, block).to(m.weight.dtype))
                try:
                    rows.append({"layer": name, "sparsity": s, "metric": evaluate(model)})
                finally:
                    with torch.no_grad():
                        m.weight.copy_(saved)
    return rows


def _scan_computed(model, name, m, evaluate, sparsities, block, norm) -> list[dict]:
    """Trials of a layer whose weight is computed: a plain copy holding the pruned weight takes its place."""
    from .api import replace_module

    plain = as_plain(m) if base_kind(m) is not None else None
    if plain is None:
        raise ValueError(f"sensitivity_scan: layer {name!r} ({type(m).__name__}) computes its weight "
                         f"({weight_source(m)}) and cannot be pruned here; leave it out with filter_fn")
    full = plain.weight.detach().clone()
    rows = []
    try:
        replace_module(model, name, plain)
        for s in sparsities:
            mask = topk_block_mask(block_norms(_weight_matrix(plain), block, p=norm), s)
            with torch.no_grad():
                plain.weight.copy_(full * element_mask(plain, mask, block).to(full.dtype))
            rows.append({"layer": name, "sparsity": s, "metric": evaluate(model)})
    finally:
        replace_module(model, name, m)
    return rows


def sparsity_of(model: nn.Module, filter_fn: FilterFn | None = None) -> float:
    """Fraction of zero weights over the selected layers."""
    total = zeros = 0
    for m in prunable_layers(model, filter_fn).values():
        total += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    return zeros / total if total else 0.0


__all__ = ["GradualPruner", "ShrinkError", "ShrinkPlan", "apply_masks_", "apply_plan", "as_linear", "as_plain",
           "base_kind", "block_masks", "channel_masks", "cubic_sparsity", "is_conv1d", "layer_shapes", "plan_shrink",
           "prune_", "resize_", "sensitivity_scan", "shrink_", "sparsity_of", "weight_source"]
