"""Model-level API: swap layers for the kernel-backed modules, report every decision; save and load
compressed models as safetensors.

``sparsify_`` and ``quantize_`` follow torchao's ``quantize_(model, config, filter_fn)`` shape.
They store the compressed weights and the layer types, not a decision about speed: by default
the layers are ``mode="auto"`` and pick their form per batch-size bucket on the machine that runs
them (block-sparse strategy or the densified weight; dynamic int8, weight-only int8 or the
dequantized float weight), measured once and cached by ``accel.engines``. So a model compressed
on one machine is decided again on the next, and identical layers share one decision.

With ``example_inputs`` (a tuple of positional inputs, a dict of keyword inputs, or
``(args, kwargs)``) they run the model to capture each layer's real input, make those decisions
now for each batch size in ``batch_sizes``, and report them per layer and batch; then they run the
converted model once per batch size and undo the conversion (raising) if it fails.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import engines
from .formats import BLOCK_SIZES, check_block_size
from .inputs import as_call, at_batch, batch_size_of, detect_batch_size, eval_mode, resized_inputs, unnested
from .modules import QuantConv2d, QuantEmbedding, QuantLinear, SparseConv2d, SparseLinear, SparseQuantLinear
from .modules._common import explicit_padding
from .ops._dispatch import conv_out_format
from .prune import (
    _weight_matrix,
    as_linear,
    as_plain,
    base_kind,
    block_masks,
    is_accel_layer,
    is_conv1d,
    is_qat_layer,
    own_forward_reason,
    tied_weights,
    weight_source,
)

__all__ = ["QuantConfig", "SparsityConfig", "as_linear", "capture_inputs", "format_report",
           "linearize_kept_dense_", "load", "quantize_", "replace_module", "replace_modules", "save", "sparsify_"]
from .shrink import layer_shapes, resize_

FilterFn = Callable[[nn.Module, str], bool]
SCOPES = ("global", "layer", "sensitivity")


@dataclass
class SparsityConfig:
    """Block sparsity for ``sparsify_``: one-shot masks (``sparsity``, ``block``, L``norm``, ``scope``)
    unless masks from a pruner are passed. ``scope="global"`` ranks blocks across layers by their
    norm relative to their layer's and keeps every layer between ``min_density`` and
    ``max_density``; ``"sensitivity"`` allocates per-layer sparsity from the output error each
    layer causes on ``example_inputs``; ``"layer"`` prunes every layer alike. ``mode`` is the
    SparseLinear mode ("auto": decide sparse or dense on the running machine). ``convs``: also
    ``nn.Conv2d`` layers (``SparseConv2d``, blocks of the ``[O, KH*KW*C]`` implicit-GEMM matrix);
    masks passed to ``sparsify_`` convert the convs they name either way. ``in_model``: with
    ``example_inputs``, each converted layer is also timed inside the whole model (against its masked
    dense weight); where sparse slows the model down at every batch size, the layer stays dense."""

    sparsity: float = 0.75
    block: int = 32
    norm: int = 2
    scope: str = "global"
    min_density: float = 0.05
    max_density: float = 1.0
    mode: str = "auto"
    measure: bool = True
    budget_s: float = 0.5
    batch_sizes: tuple[int, ...] | None = None
    convs: bool = False
    in_model: bool = True

    def __post_init__(self) -> None:
        _check_fraction("SparsityConfig.sparsity", self.sparsity, allow_one=True)
        check_block_size(self.block, "SparsityConfig.block")
        if self.scope not in SCOPES:
            raise ValueError(f"SparsityConfig.scope must be one of {SCOPES}, got {self.scope!r}")
        _check_fraction("SparsityConfig.min_density", self.min_density, allow_one=True)
        if not self.min_density <= self.max_density <= 1.0:
            raise ValueError(f"SparsityConfig: need min_density <= max_density <= 1, got {self.min_density}, "
                             f"{self.max_density}")
        if self.mode not in ("auto", "sparse", "dense"):
            raise ValueError(f"SparsityConfig.mode must be auto, sparse or dense, got {self.mode!r}")
        _check_batch_sizes(self.batch_sizes)


@dataclass
class QuantConfig:
    """int8 for ``quantize_``: ``linear_mode`` (QuantLinear: auto/dynamic/static/weight_only),
    ``conv_mode`` (QuantConv2d: auto/dynamic/static), ``embeddings`` (weight-only int8
    ``nn.Embedding``); static modes take ``act_scales`` from ``accel.calibrate``; ``act_qmax``
    fixes the activation range (None: the running machine's, except for static layers, which keep the range
    their scale was calibrated for: ``calibrate``'s default on this machine, so a saved static model computes the
    same integers on a CPU with another native range). ``keep_float``: with ``example_inputs``,
    a layer whose int8 form measures slower than the float layer at every batch size measured stays
    the original float layer: measured alone first, then (``in_model``) inside the whole model, where
    the caches hold the other layers' data (int8 embeddings, converted for size, are not reverted)."""

    linear_mode: str = "auto"
    conv_mode: str = "auto"
    embeddings: bool = True
    act_scales: dict[str, float] = field(default_factory=dict)
    act_qmax: int | None = None
    measure: bool = True
    budget_s: float = 0.5
    batch_sizes: tuple[int, ...] | None = None
    keep_float: bool = True
    in_model: bool = True

    def __post_init__(self) -> None:
        if self.linear_mode not in QuantLinear.MODES:
            raise ValueError(f"QuantConfig.linear_mode must be one of {QuantLinear.MODES}, got {self.linear_mode!r}")
        if self.conv_mode not in QuantConv2d.MODES:
            raise ValueError(f"QuantConfig.conv_mode must be one of {QuantConv2d.MODES}, got {self.conv_mode!r}")
        if self.act_qmax not in (None, 63, 127):
            raise ValueError(f"QuantConfig.act_qmax must be None, 63 or 127, got {self.act_qmax!r}")
        _check_act_scales(self.act_scales)
        _check_batch_sizes(self.batch_sizes)


def _check_fraction(name: str, v, allow_one: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v < 1.0 or (allow_one and v == 1.0)):
        raise ValueError(f"{name} must be in [0, 1{']' if allow_one else ')'}, got {v!r}")


def _check_batch_sizes(b) -> None:
    if b is not None and (not isinstance(b, (tuple, list)) or not b or
                          any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in b)):
        raise ValueError(f"batch_sizes must be a non-empty tuple of ints >= 1, got {b!r}")


def _alias_map(model: nn.Module) -> dict[int, list[str]]:
    """Every name each submodule is registered under (a module assigned to two attributes has two)."""
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def replace_modules(model: nn.Module, news: dict[str, nn.Module], aliases: dict[int, list[str]] | None = None) -> None:
    """Put each ``news[name]`` where the submodule ``name`` (dotted path) of ``model`` is, and at every other
    name that same module object is registered under (``model.a = model.b = layer``, a shared block), so
    sharing is kept. Every name is resolved before anything is replaced. ``aliases``: :func:`_alias_map` of
    ``model``, when the caller has it (valid while the modules it names are in place)."""
    aliases = _alias_map(model) if aliases is None else aliases
    targets = []
    for name, new in news.items():
        old = model.get_submodule(name)
        targets += [(n, new) for n in aliases.get(id(old), [name]) if n]
    for n, new in targets:
        parent, _, child = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, new)
        if isinstance(owner, nn.TransformerEncoderLayer) and (is_accel_layer(new) or is_qat_layer(new)):
            _off_the_fused_path(new)


def _runs_accel_layers(module, args):
    """(A forward pre-hook that does nothing: see :func:`_off_the_fused_path`.)"""
    return None


def _off_the_fused_path(layer: nn.Module) -> None:
    """``nn.TransformerEncoderLayer``'s fused inference path reads its Linear layers' ``.weight`` (an accel layer's
    float view) and never calls them: the int8 / block-sparse layer would not run. A forward hook anywhere in the
    encoder layer turns that path off (torch checks for hooks), so each converted layer gets a no-op one."""
    if not any(h is _runs_accel_layers for h in layer._forward_pre_hooks.values()):
        layer.register_forward_pre_hook(_runs_accel_layers)


def carry_over(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (the layer replacing ``old``) with ``old``'s training flag and forward/backward hooks: the same
    hook dictionaries (each family whole: ``_forward_hooks`` with its ``_with_kwargs`` / ``_always_called``
    companions), so a feature-extraction hook keeps firing and its handle still removes it. Hooks computing
    the old weight (``weight_norm``) stay behind, and a ``new`` with hooks of its own gets copies (which the
    old handles then miss). Returns ``new``."""
    new.train(old.training)
    families: dict[str, list[str]] = {}
    for k in _hook_dicts(old):
        fam = next(f for f in ("_forward_pre", "_forward", "_backward_pre", "_backward") if k.startswith(f))
        families.setdefault(fam, []).append(k)
    for keys in families.values():
        if not any(old.__dict__[k] for k in keys):
            continue
        users = {k: {i: h for i, h in old.__dict__[k].items() if not _weight_hook(h)} for k in keys}
        if any(new.__dict__.get(k) for k in keys) or any(len(users[k]) != len(old.__dict__[k]) for k in keys):
            for k in keys:
                mine = type(old.__dict__[k])(new.__dict__.get(k) or {})
                mine.update(users[k])
                new.__dict__[k] = mine
        else:
            for k in keys:
                new.__dict__[k] = old.__dict__[k]
    if old.__dict__.get("_is_full_backward_hook") is not None:
        new.__dict__["_is_full_backward_hook"] = old.__dict__["_is_full_backward_hook"]
    return new


def _hook_dicts(m: nn.Module) -> list[str]:
    """The names of ``m``'s forward/backward hook dictionaries (``_forward_hooks``, ``_forward_pre_hooks_with_kwargs``,
    ``_backward_hooks``, ...)."""
    return [k for k, v in m.__dict__.items()
            if isinstance(v, dict) and k.startswith("_") and "hook" in k and ("forward" in k or "backward" in k)]


def _weight_hook(hook) -> bool:
    """A hook computing the old layer's weight (``weight_norm``, ``spectral_norm``): it belongs to the weight accel
    converted from, not to the layer that replaces it."""
    return type(hook).__module__.startswith("torch.nn.utils")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``model`` is, and under every other name of
    that module (:func:`replace_modules`)."""
    replace_modules(model, {name: new})


def _origin_note(m: nn.Module, name: str, aliases: dict[int, list[str]]) -> str:
    """What a report row adds about a layer converted from a computed weight or registered under several names."""
    notes = []
    if (src := weight_source(m)) is not None:
        notes.append(f"converted from its computed weight ({src}; the parametrization is not kept)")
    others = [n for n in aliases.get(id(m), []) if n != name]
    if others:
        notes.append(f"shared module, also at {', '.join(others)} (all replaced by the same layer)")
    return "; ".join(notes)


def _with_note(rows: list[dict], note: str) -> list[dict]:
    if note:
        for r in rows:
            r["reason"] = f"{r['reason']}; {note}" if r["reason"] else note
    return rows


# ------------------------------------------------------------------------------------------------ inputs
@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], example_inputs) -> dict[str, torch.Tensor]:
    """The first input each named module receives when ``model`` runs on ``example_inputs``."""
    args, kwargs = as_call(example_inputs)
    seen, hooks = {}, []
    modules = dict(model.named_modules())
    def keep(name, args):  # (returns None: a pre-hook's return value would replace the layer's input)
        if args and name not in seen:
            seen[name] = unnested(args[0].detach()).clone()

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(lambda m, a, name=name: keep(name, a)))
    try:
        with eval_mode(model):
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def _measure(old: nn.Module, new: nn.Module, x: torch.Tensor, budget_s: float) -> tuple[float, float, float]:
    """(old ms, new ms, speedup of new over old) for the replacement of ``old`` by ``new`` at input ``x``.

    Measured like an engine decision and kept with them (``accel.engines.choose``: minimum over
    interleaved rounds, close calls measured longer, the replacement kept unless the original is
    faster by the margin, cached per layer type, shape, bucket and dtype): identical layers get one
    answer, and a busy machine does not flip it. The speedup is 1.0 within the margin, and NaN when the
    machine was busy (the replacement is then kept untimed: see :func:`_vs`)."""
    w = getattr(new, "weight_q", None)
    shape = tuple(w.shape) if w is not None else (getattr(new, "out_features", None), getattr(new, "in_features", None),
                                                  getattr(new, "density", None))
    if isinstance(new, SparseConv2d):
        shape = (new.weight_shape, new.stride, new.padding, new.dilation, new.block_size, new.density)
    key = engines.make_key("replace", old=type(old).__name__, new=type(new).__name__, mode=getattr(new, "mode", ""),
                           w=shape, x=tuple(x.shape[1:]), m=engines.m_bucket(x.shape[0]), dt=str(x.dtype)[6:],
                           cl=_channels_last(x))
    engines.choose("replace", key, {"old": lambda: old(x), "new": lambda: new(x)}, default="new",
                   device=x.device.type, budget_s=budget_s, allowed=("old", "new"))
    dec = engines.decision(key)
    times = dec.times_ms if dec is not None and {"old", "new"} <= dec.times_ms.keys() else None
    if times is None:  # forced or unmeasured: time it once, for the report
        d = engines.measure({"old": lambda: old(x), "new": lambda: new(x)}, incumbent="new", device=x.device.type,
                            budget_s=budget_s)
        times, dec = d.times_ms, (d if d.contended else dec)
    t_old, t_new = times.get("old", math.nan), times.get("new", math.nan)
    if (dec is not None and dec.contended) or math.isnan(t_old) or math.isnan(t_new):
        return t_old, t_new, math.nan  # timings on a busy machine decide nothing, and are not reported
    faster_old = dec is not None and dec.engine == "old"
    speedup = t_old / t_new if faster_old or t_old > t_new * (1 + engines.MARGIN) else max(1.0, t_old / t_new)
    return t_old, t_new, speedup


def _vs(timing: tuple[float, float, float], what: str) -> str:
    """The report's speed note for a :func:`_measure` result."""
    if math.isnan(timing[2]):
        return "not timed (the machine was busy while measuring, or one side could not run): the default"
    return f"{timing[2]:.2f}x {what}"


def _row(name, module, x, decision, reason="", timing=None, batch=None):
    row = {"layer": name, "kind": type(module).__name__, "input_shape": None if x is None else list(x.shape),
           "batch": batch, "decision": decision, "reason": reason}
    if timing is not None:
        row.update(ms_before=timing[0], ms_after=timing[1], speedup=None if math.isnan(timing[2]) else timing[2])
    return row


#: a module's own matrix parameters this large (or larger) that no converted layer holds are reported
FOREIGN_MIN_NUMEL = 4096


#: stock layers with weights accel has no int8 or block-sparse form for (reported, not skipped silently)
_NO_FORM = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)


def _no_sparse_rows(model: nn.Module, filter_fn, convs: bool) -> list[dict]:
    """Rows for the stock weighted layers sparsify_ has no block-sparse form for (the convolutions among them
    only when it was asked for convs)."""
    return [_row(n, m, None, "dense", f"not converted: no block-sparse form for {type(m).__name__}")
            for n, m in model.named_modules() if type(m) in _NO_FORM and (convs or type(m) is nn.Bilinear)
            and (filter_fn is None or filter_fn(m, n))]


def _foreign_weight_rows(model: nn.Module, filter_fn) -> list[dict]:
    """Rows for the stacks of matrices a model uses through its own code rather than Linear / Conv2d /
    Embedding layers (fused mixture-of-experts tables ``[experts, out, in]``): accel leaves them float, and says
    so rather than skipping them silently. (2-D parameters are too often something else, e.g. position
    embeddings, to call them weights.) Not with a ``filter_fn`` (which
    chose the layers; it may expect layers only)."""
    rows = []
    for name, m in model.named_modules() if filter_fn is None else ():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding) + ACCEL_TYPES) or is_conv1d(m) or type(m) in _NO_FORM \
                or type(m).__module__.split(".")[0] == "accel":  # (_NO_FORM: reported as such by sparsify_ / quantize_)
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.is_floating_point() and p.dim() >= 3 and p.shape[0] > 1 and p.numel() >= FOREIGN_MIN_NUMEL:
                rows.append(_row(f"{name}.{pname}" if name else pname, m, None, "float",
                                 f"not converted: a {list(p.shape)} parameter {type(m).__name__} uses in its own "
                                 "forward (accel converts nn.Linear / Conv1D / nn.Conv2d / nn.Embedding layers)"))
    return rows


def _inputs_per_batch(model, names, example_inputs, batch_sizes, what: str) -> list[tuple[int | None, tuple, dict, dict]]:
    """``(batch, args, kwargs, {layer: its input})`` per batch size (the inputs as given when ``batch_sizes`` is None)."""
    if example_inputs is None:
        return []
    if batch_sizes is None:
        args, kwargs = as_call(example_inputs)
        return [(batch_size_of(example_inputs), args, kwargs, capture_inputs(model, names, example_inputs))]
    out = []
    for b in batch_sizes:
        args, kwargs = at_batch(example_inputs, b)
        try:
            captured = capture_inputs(model, names, (args, kwargs))
        except Exception as e:  # noqa: BLE001 - the model's own error, reported with what accel changed
            raise RuntimeError(f"{what}: the model fails on example_inputs resized to batch size {b} for batch_sizes "
                               f"(inputs: {resized_inputs(example_inputs, b)}); nothing was changed. The model's error: "
                               f"{type(e).__name__}: {e}") from e
        out.append((b, args, kwargs, captured))
    return out


def _check_batching(example_inputs, batch_sizes, what: str) -> None:
    """batch_sizes needs one batch size in example_inputs: checked before anything is measured or changed."""
    if example_inputs is not None and batch_sizes is not None:
        try:
            detect_batch_size(example_inputs)
        except ValueError as e:
            raise ValueError(f"{what}: batch_sizes={tuple(batch_sizes)}: {e}") from None


#: at most this many seconds of whole-model timing per batch size for the in-model check
IN_MODEL_BUDGET_S = 20.0


def _in_model_check(model: nn.Module, fallbacks: dict[str, nn.Module], calls: list[tuple], budget_s: float,
                    rows: list[dict], kept: str) -> dict[str, nn.Module]:
    """Time every converted layer inside the whole model, against its fallback, and put the fallback back
    where the converted layer is slower at every batch size. Returns ``{name: fallback}`` of those.

    A layer measured alone (a warm loop, ``_measure``) can be faster than the float layer and still slow
    the model down: inside a model the caches hold the other layers' weights and activations. So the
    model runs with all converted layers and with all fallbacks in turn (alternating, the minimum over
    rounds: contention only adds time), with a forward hook timing each layer where it sits. A layer
    keeps its conversion unless its fallback is faster by the engines' margin at every batch size
    measured; on a busy machine (``accel.engines``' contention test, before and during the timing) the
    check changes nothing, so load cannot flip what the model runs. ``fallbacks``: name -> the module to use instead (the
    original float layer for ``quantize_``, the masked dense layer for ``sparsify_``)."""
    import time

    names = [n for n in fallbacks if n in dict(model.named_modules())]
    if not names or not calls or not engines.measuring_enabled():  # ACCEL_ENGINE_MEASURE=0: no timing at all
        return {}
    if engines._contended():  # a busy machine: whole-model timings are noise; the per-layer decisions stand
        return {}
    mark = engines.wait_mark()
    converted = {n: model.get_submodule(n) for n in names}
    margin = engines.MARGIN

    def run(mods: dict[str, nn.Module], args, kwargs) -> dict[str, float]:
        replace_modules(model, mods)
        acc: dict[str, float] = {}
        start: dict[str, float] = {}
        handles = []
        for n, m in mods.items():
            def pre(_m, _a, n=n):
                start[n] = time.perf_counter()

            def post(_m, _a, _o, n=n):
                acc[n] = acc.get(n, 0.0) + time.perf_counter() - start[n]
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        try:
            with torch.no_grad():
                model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        return acc

    slower: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    try:
        with eval_mode(model, *(fallbacks[n] for n in names)):  # (the fallbacks too: they take turns in the model)
            for _batch, args, kwargs in calls:
                t0 = time.perf_counter()
                run(fallbacks, args, kwargs)  # warm both (and time one forward)
                run(converted, args, kwargs)
                per_forward = max((time.perf_counter() - t0) / 2, 1e-6)
                rounds = max(3, min(15, int(min(budget_s, IN_MODEL_BUDGET_S) / (2 * per_forward))))
                best_new = {n: math.inf for n in names}
                best_old = {n: math.inf for n in names}
                for r in range(rounds):
                    order = (("new", converted), ("old", fallbacks)) if r % 2 == 0 else \
                        (("old", fallbacks), ("new", converted))
                    for which, mods in order:
                        times = run(mods, args, kwargs)
                        best = best_new if which == "new" else best_old
                        for n in names:
                            if n in times:
                                best[n] = min(best[n], times[n])
                for n in names:
                    slower[n].append((best_new[n], best_old[n]))
    finally:
        replace_modules(model, converted)
    if engines._contended(mark):  # the machine got busy while timing: as above, nothing is changed
        return {}
    revert = {}
    for n in names:
        pairs = [(a, b) for a, b in slower[n] if math.isfinite(a) and math.isfinite(b)]
        if pairs and all(new > old * (1 + margin) for new, old in pairs):
            revert[n] = fallbacks[n]
            ratio = min(old / new for new, old in pairs)
            label = "kept sparse float" if isinstance(fallbacks[n], (SparseLinear, SparseConv2d)) else kept
            for r in rows:
                if r.get("layer") == n:
                    r["decision"] = label
                    r["reason"] = f"{label}: slower inside the model ({ratio:.2f}x); alone: {r.get('reason', '')}"
    if revert:
        replace_modules(model, revert)
    return revert


@torch.no_grad()
def _check_converted(model: nn.Module, what: str, replaced: dict[str, nn.Module], calls: list[tuple]) -> None:
    """Run the converted model once per call (batch size); if it raises, put every original layer back (the
    model exactly as before) and raise a RuntimeError naming the replacements and the error."""
    if not replaced or not calls:
        return
    failure = None
    with eval_mode(model):
        for batch, args, kwargs in calls:
            try:
                model(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any error of the converted model is reported and undone
                failure = (batch, e)
                break
    if failure is None:
        return
    batch, err = failure
    kinds = Counter(f"{type(old).__name__} -> {type(model.get_submodule(n)).__name__}" for n, old in replaced.items())
    replace_modules(model, replaced)
    before = None
    with eval_mode(model):
        try:
            model(*calls[0][1], **calls[0][2])
        except Exception as e:  # noqa: BLE001
            before = e
    changed = ", ".join(f"{k} (x{c})" for k, c in sorted(kinds.items()))
    at = f" at batch size {batch}" if batch is not None else ""
    if before is not None:
        raise RuntimeError(f"{what}: the model fails on example_inputs{at}, also before conversion "
                           f"({type(before).__name__}: {before}); the model is restored as it was") from err
    raise RuntimeError(f"{what}: the converted model fails on example_inputs{at}, so no layer was converted (the model "
                       f"is restored exactly as it was). Replacements tried: {changed}. The error: "
                       f"{type(err).__name__}: {err}") from err


def _calls(per_batch, example_inputs) -> list[tuple]:
    if per_batch:
        return [(b, args, kwargs) for b, args, kwargs, _ in per_batch]
    if example_inputs is None:
        return []
    return [(batch_size_of(example_inputs), *as_call(example_inputs))]


def _channels_last(x: torch.Tensor) -> int:
    """1 for a channels_last image batch (the engines' layout; an NCHW one runs at other speeds), else 0: part of the
    replacement decisions' keys."""
    return int(conv_out_format(x) == torch.channels_last)


def _decision_of(new: nn.Module, x: torch.Tensor) -> str:
    """What ``new`` runs at input ``x`` on this machine (its mode, resolved by the engine decisions)."""
    if isinstance(new, SparseLinear):
        if new.storage == "dense":
            return "dense"
        key = _last_key("bsr_linear")
        return f"{new.mode}: {engines.decision(key).engine}" if key and engines.decision(key) else new.mode
    if isinstance(new, SparseConv2d):
        if new.storage == "dense":
            return "dense"
        key = _last_key("bsr_conv2d")
        return f"{new.mode}: {engines.decision(key).engine}" if key and engines.decision(key) else new.mode
    if isinstance(new, QuantLinear):
        return f"int8 {new.mode}" + (f": {new.resolved_mode(x)}" if new.mode == "auto" else "")
    if isinstance(new, SparseQuantLinear):
        key = _last_key("int8_bsr_linear")
        dec = engines.decision(key) if key else None
        return "int8 block-sparse" + (f": {dec.engine}" if dec is not None and x.device.type == "cpu" else "")
    if isinstance(new, QuantConv2d):
        key = _last_key("int8_conv2d")
        form = engines.decision(key).engine if key and engines.decision(key) else None
        shown = form if form is None or form.startswith("float") else f"int8 ({form})"
        return f"int8 {new.mode}" + (f": {shown}" if new.mode == "auto" and form else "")
    return type(new).__name__


def _last_key(op: str) -> str | None:
    return engines.last_key(op)


def _block_hint(mask, shape, block: int) -> str:
    """A hint naming the block size a block mask of the wrong grid was made for (``SparsityConfig.block`` must
    be the pruner's), or ""."""
    grid = tuple(torch.as_tensor(mask).shape)
    fits = [b for b in BLOCK_SIZES if b != block and grid == (math.ceil(shape[0] / b), math.ceil(shape[1] / b))]
    return f" (a block mask for block size {fits[0]}: pass SparsityConfig(block={fits[0]}), the pruner's block)" \
        if fits else ""


def _tied_reason(tied: dict[int, list[str]], m: nn.Module) -> str | None:
    others = tied.get(id(m))
    return None if not others else (f"its weight is tied to {', '.join(repr(o) for o in others)} (pruning it would "
                                     f"prune that too)")


def _layer_copy(m: nn.Module) -> nn.Module:
    """A new module object of ``m``'s class with ``m``'s attributes, and its own copies of every table
    (parameters, buffers, children, hooks): no tensor is copied, nothing is shared with ``m``'s tables."""
    out = copy.copy(m)
    for k, v in vars(m).items():
        if isinstance(v, dict):
            out.__dict__[k] = copy.copy(v)
    return out


def _conv1d_template(m: nn.Module) -> nn.Module | None:
    """For a Hugging Face ``Conv1D`` storing its weight: a tensor-free copy (its class and attributes), kept
    by the ``SparseLinear`` made from it so that :func:`_dense_like` can give the layer its type back later."""
    if not is_conv1d(m) or weight_source(m) is not None:
        return None
    t = _layer_copy(m)
    t.__dict__["_parameters"] = {}
    t.__dict__["_accel_template"] = True
    for k, v in t.__dict__.items():  # hooks go with the live layer (carry_over), never from a stale template
        if isinstance(v, dict) and "hook" in k:
            v.clear()
    return t


def _dense_like(orig: nn.Module | None, new: nn.Module) -> nn.Module:
    """The pruned layer ``new`` stored dense, as a layer of ``orig``'s own type (``orig``: the layer it was
    made from, or its :func:`_conv1d_template`) where that is not the stock layer: a Hugging Face ``Conv1D``
    gets its transposed pruned weight back, so a saved model still records, and a fresh instance still
    has, the same layer type there."""
    dense = new.to_linear() if isinstance(new, SparseLinear) else new.to_dense()
    tmpl = None if orig is None or type(orig) is type(dense) else \
        (orig if orig.__dict__.get("_accel_template") else _conv1d_template(orig))
    if tmpl is None or not isinstance(dense, nn.Linear):
        return dense
    out = _layer_copy(tmpl)
    out.__dict__.pop("_accel_template", None)
    out.weight = nn.Parameter(dense.weight.detach().t().contiguous(), requires_grad=dense.weight.requires_grad)
    if dense.bias is not None:
        out.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=dense.bias.requires_grad)
    return out


def sparsify_(model: nn.Module, config: SparsityConfig | None = None, filter_fn: FilterFn | None = None, *,
              masks: dict[str, torch.Tensor] | None = None, example_inputs=None) -> list[dict]:
    """Replace ``nn.Linear`` layers by block-sparse ``SparseLinear`` (and with ``config.convs``, or masks
    naming them, ``nn.Conv2d`` by ``SparseConv2d``), in place, and report. Convs SparseConv2d cannot
    serve (groups > 1, non-zero padding modes, ...) stay dense, with the reason.

    Blocks come from ``masks`` (e.g. ``GradualPruner.masks``) or are chosen one-shot by ``config``
    (``scope="sensitivity"`` needs ``example_inputs``). Layers are ``config.mode`` ("auto": sparse or
    densified per batch bucket, decided on the running machine). With ``example_inputs`` (and
    ``config.measure``) each layer runs at its real input(s) now and the rows report the decision
    and the sparse layer's speed against the dense one. Which layers count, the converted-model check
    and ``batch_sizes``: see :func:`quantize_`. A layer whose weight another layer also holds (tied
    weights: an output head tied to the token embeddings) is not pruned (pruning it would prune the
    other layer too, and a sparse copy would silently untie them); its row says which layer it is tied to.
    """
    config = config or SparsityConfig()
    _check_batching(example_inputs, config.batch_sizes, "sparsify_")

    rows = []
    kinds = (nn.Linear, nn.Conv2d) if config.convs else (nn.Linear,)
    selected = {n for n, m in model.named_modules() if base_kind(m) in kinds and (filter_fn is None or filter_fn(m, n))}
    no_form = _no_sparse_rows(model, filter_fn, config.convs)  # (filter_fn sees the model as it was given)
    tied = tied_weights(model)
    for n in sorted(selected):  # convs SparseConv2d cannot serve are not pruned: they stay dense, reported
        m = model.get_submodule(n)
        why = (_tied_reason(tied, m) if masks is None else None) or \
            (SparseConv2d.unsupported_reason(m) if base_kind(m) is nn.Conv2d else None)  # (masks: their own loop)
        if why is not None:
            selected.discard(n)
            rows.append(_row(n, m, None, "dense", f"not converted: {why}"))

    subs = {n: m for n, m in model.named_modules() if isinstance(m, kinds) and own_forward_reason(m) is not None
            and (filter_fn is None or filter_fn(m, n))}
    if masks is None and (selected or rows):  # layers it cannot convert are reported, not silently left out
        rows += [_row(n, m, None, "dense", f"not converted: {own_forward_reason(m)}") for n, m in sorted(subs.items())]
    if masks is None and not selected and rows:  # every layer chosen is one that cannot be pruned: say why
        return rows + no_form + _foreign_weight_rows(model, filter_fn)
    if masks is None and not selected:
        subs = [f"{n!r} ({type(m).__name__})" for n, m in subs.items()]
        if any(isinstance(m, ACCEL_TYPES) for m in model.modules()):
            raise ValueError("sparsify_: no layer to prune: the model's Linear layers are already converted by accel "
                             "(SparseLinear / QuantLinear ...); to prune further, prune the dense model (or revert "
                             "with linearize_kept_dense_ / to_linear) and convert once")
        raise ValueError("sparsify_: no layer to prune: the filter selected no nn.Linear / Conv1D"
                         + (" / nn.Conv2d" if config.convs else " (convs: SparsityConfig(convs=True))")
                         + (f"; these cannot be converted (subclasses of them: accel converts the stock layers "
                            f"only): {', '.join(subs[:6])}" + (f" (+{len(subs) - 6})" if len(subs) > 6 else "")
                            if subs else ""))
    if masks is None:
        if config.scope == "sensitivity" and example_inputs is None:
            raise ValueError("sparsify_: scope 'sensitivity' needs example_inputs (the output error is measured on them)")
        masks = block_masks(model, config.sparsity, config.block, config.norm, config.scope,
                            lambda m, n: n in selected, min_density=config.min_density,
                            max_density=config.max_density, example_inputs=example_inputs)
    aliases = _alias_map(model)
    every = dict(model.named_modules(remove_duplicate=False))
    modules, news, by_id = {}, {}, {}
    for given, mask in masks.items():  # every conversion checked before the model changes
        m = every.get(given)
        kind = base_kind(m) if m is not None else None
        if kind not in (nn.Linear, nn.Conv2d):
            what = "no such module" if m is None else f"which is {type(m).__name__}"
            raise ValueError(f"sparsify_: mask for {given!r}, {what}, not nn.Linear / Conv1D / nn.Conv2d")
        name = aliases[id(m)][0]  # a shared module: one conversion, under its first name
        if id(m) in by_id:
            first, first_mask = by_id[id(m)]
            if not torch.equal(torch.as_tensor(first_mask).cpu(), torch.as_tensor(mask).cpu()):
                raise ValueError(f"sparsify_: masks {first!r} and {given!r} name the same (shared) module with "
                                 f"different masks")
            continue
        by_id[id(m)] = (given, mask)
        # a tied layer, or a conv SparseConv2d cannot serve: not pruned, reported
        why = _tied_reason(tied, m) or (SparseConv2d.unsupported_reason(m) if kind is nn.Conv2d else None)
        if why is not None:
            if name not in {r["layer"] for r in rows}:
                rows.append(_row(name, m, None, "dense", f"not converted: {why}"))
            continue
        plain = as_plain(m)
        try:
            new = (SparseLinear if kind is nn.Linear else SparseConv2d).from_dense(plain, mask=mask, block=config.block,
                                                                                   mode=config.mode)
        except ValueError as e:
            hint = _block_hint(mask, _weight_matrix(plain).shape, config.block)
            raise ValueError(f"sparsify_: mask for {given!r}: {e}{hint}") from None
        if (tmpl := _conv1d_template(m)) is not None:  # kept dense later: a Conv1D again (linearize_kept_dense_)
            object.__setattr__(new, "_dense_template", tmpl)
        modules[name], news[name] = m, new
    per_batch = _inputs_per_batch(model, list(news), example_inputs, config.batch_sizes, "sparsify_") \
        if config.measure else []
    replaced = {}
    name = None
    try:
        for name, new in news.items():
            lin = modules[name]
            measured, layer_rows = False, []
            for batch, _, _, inputs in per_batch:
                x = inputs.get(name)
                if x is None:
                    continue
                measured = True
                with torch.no_grad():
                    new(x)  # makes (and caches) this machine's decision for this shape and bucket
                timing = _measure(lin, new, x, config.budget_s)
                layer_rows.append(_row(name, lin, x, _decision_of(new, x),
                                       f"density {new.density:.3f}; {_vs(timing, 'dense')}", timing, batch))
            if not measured:
                layer_rows.append(_row(name, lin, None, new.mode, f"density {new.density:.3f} (not measured)"))
            rows += _with_note(layer_rows, _origin_note(lin, name, aliases))
            replace_modules(model, {name: carry_over(lin, new)}, aliases)
            replaced[name] = lin
    except Exception as e:  # noqa: BLE001 - the model goes back exactly as it was, and the error names the layer
        replace_modules(model, replaced)
        raise _layer_error("sparsify_", _LayerError(name, e) if name else e) from e
    calls = _calls(per_batch, example_inputs)
    _check_converted(model, "sparsify_", replaced, calls)
    if per_batch and config.in_model:  # the pruned layer stays, dense (masked weight), where sparse slows the model
        dense = {n: carry_over(m, _dense_like(replaced[n], m)) for n, m in ((n, model.get_submodule(n)) for n in replaced)
                 if isinstance(m, (SparseLinear, SparseConv2d))}
        _in_model_check(model, dense, calls, config.budget_s * max(1, len(dense)), rows, "kept dense")
    return rows + no_form + _foreign_weight_rows(model, filter_fn)


def linearize_kept_dense_(model: nn.Module, sparsify_rows: list[dict]) -> list[str]:
    """Turn the layers ``sparsify_`` stored dense back into plain ``nn.Linear`` (masked weights, so their
    zeros stay zero), in place, so ``quantize_`` can still try int8 on them (a layer ``sparsify_`` made from
    a Hugging Face ``Conv1D`` becomes a ``Conv1D`` again, which ``quantize_`` serves too). Returns their names."""
    by_layer: dict[str, set] = {}
    for r in sparsify_rows:
        by_layer.setdefault(r["layer"], set()).add(r["decision"])
    names = sorted(n for n, ds in by_layer.items() if all(d == "dense" or d.endswith(": dense") for d in ds)
                   and isinstance(model.get_submodule(n), (SparseLinear, SparseConv2d)))
    for name in names:
        m = model.get_submodule(name)
        replace_module(model, name, carry_over(m, _dense_like(getattr(m, "_dense_template", None), m)))
    return names


def quantize_(model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn | None = None, *,
              example_inputs=None) -> list[dict]:
    """Replace ``nn.Linear`` by ``QuantLinear``, ``nn.Conv2d`` by ``QuantConv2d`` and (with
    ``config.embeddings``) ``nn.Embedding`` by ``QuantEmbedding``, in place, and report.

    A block-sparse ``SparseLinear`` (after ``sparsify_``) becomes an int8 block-sparse ``SparseQuantLinear``
    (``linear_mode`` "auto" / "dynamic"); with ``example_inputs`` it becomes whichever of the sparse float layer,
    the dense int8 ``QuantLinear`` and the int8 block-sparse layer measures fastest here (all three times
    reported). A block-sparse ``SparseConv2d`` (there is no int8 block-sparse conv) becomes the dense int8
    ``QuantConv2d`` of its masked weight where, with ``example_inputs``, that measures faster than the sparse
    float layer (both times reported); otherwise it stays. Layers QuantConv2d cannot serve stay in floating
    point, with the reason. The ``auto`` modes (default) decide per batch bucket on the running machine between
    int8 and the dequantized float weight; with ``example_inputs`` (and ``config.measure``) those decisions are
    made now, at each layer's real input, and reported with the int8 layer's speed against the float one.

    Layers: Hugging Face ``Conv1D`` (GPT-2) counts as the Linear it is (weight transposed). A layer whose
    weight is computed (``torch.nn.utils.parametrize`` / ``parametrizations.weight_norm``, old-style
    ``weight_norm`` / ``spectral_norm`` hooks) is converted from the weight it computes now; the
    parametrization is not kept, and its row says so. A module registered under several names is
    converted once and the one new layer put under every name (sharing kept), reported once.
    Static mode: ``act_scales`` (from ``accel.calibrate``) make their layers static; with
    ``linear_mode`` / ``conv_mode`` "static", a layer ``act_scales`` leaves out (calibrate leaves out the
    layers that saw no input or only zeros) runs dynamic int8, with a warning and a note in its row.

    With ``example_inputs`` the converted model runs once on them (per batch size of ``batch_sizes``,
    on the inputs already used to measure): if it raises, every replaced layer is put back, so the
    model is exactly as before, and a RuntimeError names the replacements and the error.
    ``batch_sizes`` resizes dim 0 of the inputs whose dim 0 is the batch size (inputs are taken
    batch-first; ``accel.inputs.at_batch``); when the inputs disagree on it, a ValueError naming their
    shapes is raised before anything changes.
    """
    config = config or QuantConfig()
    _check_act_scales(config.act_scales)
    _check_batching(example_inputs, config.batch_sizes, "quantize_")
    kinds = (nn.Linear, nn.Conv2d) + ((nn.Embedding,) if config.embeddings else ())
    candidates = {name: m for name, m in model.named_modules()
                  if (base_kind(m) in kinds or _is_sparse(m)) and (filter_fn is None or filter_fn(m, name))}
    aliases = _alias_map(model)
    rows, news, no_scale = [], {}, []

    def mode_of(name: str, configured: str, scale) -> str:
        if scale is not None:
            return "static"
        if configured != "static":
            return configured
        if not config.act_scales:
            raise ValueError(f"mode 'static' needs act_scales[{name!r}] (accel.calibrate); none were given")
        no_scale.append(name)  # calibrate leaves out layers that saw no input / only zeros: dynamic int8 for them
        return "dynamic"

    for name, m in model.named_modules():  # layers quantize_ leaves as they are are reported, not skipped silently
        if name in candidates or (filter_fn is not None and not filter_fn(m, name)):
            continue
        if isinstance(m, SparseConv2d):  # (stored dense: its mask kept on a dense weight)
            rows.append(_row(name, m, None, "sparse float", "stored dense (mode 'dense'): kept"))
        elif (why := _no_int8_form(m, config.embeddings)) is not None:
            rows.append(_row(name, m, None, "float", why))
        elif isinstance(m, SparseLinear) and m.storage == "dense":
            rows.append(_row(name, m, None, "sparse float", "stored dense (mode 'dense'): accel.api."
                                                            "linearize_kept_dense_ makes it an nn.Linear for int8"))
        elif isinstance(m, (QuantLinear, QuantConv2d, QuantEmbedding, SparseQuantLinear)):
            rows.append(_row(name, m, None, "int8", "already int8 (converted by accel): kept"))
    for name, m in list(candidates.items()):
        w = next((t for t in m.parameters(recurse=False) if t.is_floating_point()), None)
        if w is not None and w.dtype == torch.float64:  # the int8 layers take fp32/bf16/fp16 inputs only
            rows.append(_row(name, m, None, "float", "float64 layer (int8 layers serve fp32/bf16/fp16): kept"))
            del candidates[name]
    for name, m in candidates.items():  # build every replacement before the model changes
        scale = config.act_scales.get(name)
        kind = base_kind(m)
        # a static scale is absmax / qmax for the qmax calibrate used (its default: this device's range): the layer
        # keeps that qmax, or a CPU with another native range would clip (or waste) half the range
        qmax = config.act_qmax or (_calibrated_qmax(m) if scale is not None else None)
        try:
            if kind is nn.Embedding:
                if m.max_norm is not None or m.sparse:
                    rows.append(_row(name, m, None, "float", "max_norm / sparse embedding"))
                    continue
                news[name] = QuantEmbedding.from_float(as_plain(m))
            elif isinstance(m, SparseConv2d):  # no int8 block-sparse conv: the dense int8 conv of its masked weight,
                dense = m.to_dense()  # where it measures faster than the sparse float layer (_sparse_form)
                reason = QuantConv2d.unsupported_reason(dense)
                if reason is not None:
                    rows.append(_row(name, m, None, "sparse float", reason))
                    continue
                news[name] = QuantConv2d.from_float(dense, mode_of(name, config.conv_mode, scale), act_scale=scale,
                                                    act_qmax=qmax)
            elif kind is nn.Conv2d:
                reason = QuantConv2d.unsupported_reason(m)
                if reason is not None:
                    rows.append(_row(name, m, None, "float", reason))
                    continue
                news[name] = QuantConv2d.from_float(as_plain(m), mode_of(name, config.conv_mode, scale), act_scale=scale,
                                                    act_qmax=qmax)
            elif isinstance(m, SparseLinear):  # int8 block-sparse: activations quantized per token at run time
                if scale is not None or config.linear_mode not in ("auto", "dynamic"):
                    why = "a static activation scale" if scale is not None else f"linear_mode {config.linear_mode!r}"
                    rows.append(_row(name, m, None, "sparse float",
                                     f"the int8 block-sparse layer is dynamic only ({why})"))
                    continue
                news[name] = SparseQuantLinear.from_sparse(m, act_qmax=config.act_qmax)
            else:
                news[name] = QuantLinear.from_float(as_linear(m), mode_of(name, config.linear_mode, scale),
                                                    act_scale=scale, act_qmax=qmax)
        except (ValueError, TypeError) as e:
            raise ValueError(f"quantize_: layer {name!r} ({type(m).__name__}): {e}") from e
    _share_tied_tables(news, candidates)
    if no_scale:
        warnings.warn(f"quantize_: static mode, but act_scales has no scale for {len(no_scale)} layer(s), which run "
                      f"dynamic int8 instead: {', '.join(no_scale)} (accel.calibrate leaves out layers that saw no "
                      f"input or only zeros)", stacklevel=2)
    per_batch = _inputs_per_batch(model, list(news), example_inputs, config.batch_sizes, "quantize_") \
        if config.measure else []
    replaced = {}
    try:
        _quantize_layers(model, news, candidates, aliases, per_batch, no_scale, config, rows, replaced)
    except Exception as e:  # noqa: BLE001 - the model goes back exactly as it was, and the error names the layer
        replace_modules(model, replaced)
        raise _layer_error("quantize_", e) from e
    calls = _calls(per_batch, example_inputs)
    _check_converted(model, "quantize_", replaced, calls)
    if per_batch and config.keep_float and config.in_model:
        _in_model_check(model, {n: old for n, old in replaced.items()
                                if not isinstance(model.get_submodule(n), QuantEmbedding)}, calls,
                        config.budget_s * max(1, len(replaced)), rows, "kept float")
    return rows + _foreign_weight_rows(model, filter_fn)


def _no_int8_form(m: nn.Module, embeddings: bool) -> str | None:
    """Why quantize_ leaves ``m`` float when it is a weighted layer it has no int8 form for; None otherwise."""
    if type(m) in _NO_FORM:
        return f"no int8 form for {type(m).__name__}: kept"
    kinds = (nn.Linear, nn.Conv2d) + ((nn.Embedding,) if embeddings else ())
    if isinstance(m, kinds) and (why := own_forward_reason(m)) is not None:
        return f"{why}: kept"
    return None


def _share_tied_tables(news: dict[str, nn.Module], olds: dict[str, nn.Module]) -> None:
    """Layers that held one weight (tied: token embeddings and the output head, or embeddings shared by an
    encoder and a decoder) get one int8 table: their replacements hold the same ``weight_q`` / ``weight_scale``
    tensors where the int8 values came out equal (per-row scales, the same rounding), so memory and the
    file (``save`` writes a shared tensor once) hold the table once."""
    by_weight: dict[int, list[nn.Module]] = {}
    for name, new in news.items():
        w = olds[name]._parameters.get("weight")
        if isinstance(w, torch.Tensor) and isinstance(new, (QuantLinear, QuantEmbedding)):
            by_weight.setdefault(id(w), []).append(new)
    for group in by_weight.values():
        for other in group[1:]:
            pairs = [(group[0]._buffers[k], other._buffers[k]) for k in ("weight_q", "weight_scale")]
            if all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in pairs):
                other._buffers["weight_q"], other._buffers["weight_scale"] = pairs[0][0], pairs[1][0]


class _LayerError(Exception):
    def __init__(self, name: str, err: Exception):
        super().__init__(name)
        self.name, self.err = name, err


def _layer_error(what: str, e: Exception) -> Exception:
    """The error of a failed conversion, naming the layer, of the original's kind (ValueError/TypeError), else
    a RuntimeError; the model has been restored before it is raised."""
    name, err = (e.name, e.err) if isinstance(e, _LayerError) else (None, e)
    at = f"layer {name!r}: " if name else ""
    msg = f"{what}: {at}{type(err).__name__}: {err} (the model is restored as it was)"
    return (ValueError if isinstance(err, (ValueError, TypeError)) else RuntimeError)(msg)


def _quantize_layers(model, news, candidates, aliases, per_batch, no_scale, config, rows, replaced) -> None:
    for name, new in news.items():
        try:
            _quantize_layer(model, name, new, candidates, aliases, per_batch, no_scale, config, rows, replaced)
        except Exception as e:  # noqa: BLE001
            raise _LayerError(name, e) from e


def _quantize_layer(model, name, new, candidates, aliases, per_batch, no_scale, config, rows, replaced) -> None:
    """Measure one replacement (per batch size), decide, and put it in the model (recorded in ``replaced``)."""
    m = candidates[name]
    note = _origin_note(m, name, aliases)
    if name in no_scale:
        note = "no act_scale (calibrate saw no input for it): dynamic" + (f"; {note}" if note else "")
    if isinstance(new, SparseQuantLinear) or isinstance(m, SparseConv2d):
        chosen, layer_rows = _sparse_form(name, m, new, [(b, x) for b, _, _, x in per_batch], config)
        if chosen is not m:
            replace_modules(model, {name: carry_over(m, chosen)}, aliases)
            replaced[name] = m
        rows += _with_note(layer_rows, note)
        return
    measured, layer_rows = False, []
    for batch, _, _, inputs in per_batch:
        x = inputs.get(name)
        if x is None or isinstance(new, QuantEmbedding):
            continue
        measured = True
        with torch.no_grad():
            new(x)  # makes (and caches) this machine's decision for this shape and bucket
        timing = _measure(m, new, x, config.budget_s)
        layer_rows.append(_row(name, m, x, _decision_of(new, x), _vs(timing, "float"), timing, batch))
    if not measured:
        why = "weight-only int8 rows" if isinstance(new, QuantEmbedding) else "not measured"
        layer_rows.append(_row(name, m, None, f"int8 {getattr(new, 'mode', 'weight_only')}", why))
    keep = config.keep_float and measured and all(r.get("speedup") is not None and r["speedup"] < 1.0
                                                     for r in layer_rows)
    if keep:  # slower than the float layer at every batch size measured: the original stays (and is exact)
        for r in layer_rows:
            r["decision"], r["reason"] = "float", f"kept float: the int8 layer is slower here ({r['reason']})"
    else:
        replace_modules(model, {name: carry_over(m, new)}, aliases)
        replaced[name] = m
    rows += _with_note(layer_rows, note)


def _calibrated_qmax(m: nn.Module) -> int:
    """The activation range ``accel.calibrate`` uses by default for ``m``'s device."""
    from .qat import calibration_qmax  # (qat imports this module)

    w = next((t for t in m.parameters(recurse=False)), None)
    return calibration_qmax("cpu" if w is None else w.device.type)


def _check_act_scales(scales) -> None:
    """Every act_scale one finite positive number, checked (naming the layer) before anything changes."""
    if not isinstance(scales, Mapping):
        raise TypeError(f"QuantConfig.act_scales must be a dict {{layer name: scale}}, got {type(scales).__name__}")
    for name, v in scales.items():
        try:
            t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
            ok = not isinstance(v, bool) and t.numel() == 1 and math.isfinite(t.item()) and t.item() > 0
        except (TypeError, ValueError, RuntimeError):
            t, ok = None, False
        if not ok:
            hint = " (a layer that saw no input or only zeros gets 0: leave it out, as accel.calibrate does)" \
                if t is not None and t.numel() == 1 and t.item() == 0 else ""
            raise ValueError(f"QuantConfig.act_scales[{name!r}] must be one finite positive number, got {v!r}{hint}")


def _is_sparse(m: nn.Module) -> bool:
    return isinstance(m, (SparseLinear, SparseConv2d)) and m.storage == "sparse"


SPARSE_FORMS = ("sparse float", "int8 dense", "int8 block-sparse")


@torch.no_grad()
def _sparse_form(name: str, old: SparseLinear | SparseConv2d, new: SparseQuantLinear | QuantConv2d, per_batch,
                 config: QuantConfig):
    """The fastest int8 form of a block-sparse layer at its real inputs, measured like every engine decision
    (``accel.engines.choose``: interleaved rounds, the default form kept unless another is faster by the margin,
    cached per shape, density, bucket and dtype). A ``SparseLinear``: the sparse float layer, the dense int8
    ``QuantLinear`` of its (masked) weight, or the int8 block-sparse layer ``new`` (the default). A ``SparseConv2d``
    (there is no int8 block-sparse conv): the sparse float layer (the default: it stays) or the dense int8
    ``QuantConv2d`` of its masked weight, ``new``. Over several batch sizes the form chosen at most of them wins
    (ties: the least total time). Returns ``(module to use, report rows)``."""
    conv = isinstance(old, SparseConv2d)
    if conv:
        forms = {"sparse float": old, "int8 dense": new}
        default = "sparse float"
        parts = dict(old="SparseConv2d", new="QuantConv2d", mode=new.mode,
                     w=(old.weight_shape, old.stride, old.padding, old.dilation, old.block_size, old.values.shape[0]))
    else:
        dense = QuantLinear.from_float(old.to_linear(), config.linear_mode, act_qmax=config.act_qmax)
        forms = dict(zip(SPARSE_FORMS, (old, dense, new)))
        default = "int8 block-sparse"
        parts = dict(old="SparseLinear", new="SparseQuantLinear|QuantLinear",
                     w=(new.out_features, new.in_features, new.block_size, new.nnz))
    measured = [(b, inputs[name]) for b, inputs in per_batch if inputs.get(name) is not None]
    if not measured:
        why = "not measured: example_inputs let quantize_ time the dense int8 conv against it" if conv else \
            "not measured"
        return forms[default], [_row(name, old, None, default, f"density {old.density:.3f} ({why})")]
    names = tuple(forms)
    results = []
    for batch, x in measured:
        for f in forms.values():
            f(x)  # each form's own engine decisions first, so they are not timed
        layout = {"cl": _channels_last(x)} if conv else {}
        key = engines.make_key("replace", **parts, x=tuple(x.shape[1:]), m=engines.m_bucket(x.shape[0]),
                               dt=str(x.dtype)[6:], q=getattr(new, "act_qmax", 0), **layout)
        calls = {f: (lambda f=f: forms[f](x)) for f in names}
        winner = engines.choose("replace", key, calls, default=default, device=x.device.type,
                                budget_s=config.budget_s, allowed=names)
        dec = engines.decision(key)
        busy = dec is None or dec.contended
        if dec is not None and set(names) <= dec.times_ms.keys():
            times = dec.times_ms
        else:
            again = engines.measure(calls, incumbent=winner, device=x.device.type, budget_s=config.budget_s)
            times, busy = again.times_ms, again.contended
        results.append((batch, x, winner, times, busy))
    wins = {f: sum(r[2] == f for r in results) for f in names}
    total = {f: sum(r[3].get(f, math.inf) for r in results) for f in names}
    chosen = max(names, key=lambda f: (wins[f], -total[f]))
    rows = []
    for batch, x, winner, times, busy in results:
        old(x), forms[chosen](x)  # so the report names the engines this batch runs
        ms = ", ".join(f"{f} {times[f]:.3f} ms" for f in names if f in times)
        note = "" if winner == chosen else f"; {winner} at this batch"
        if busy or chosen not in times or "sparse float" not in times:  # the timings decided nothing here
            note += "; not timed (the machine was busy): the default form" if busy else ""
            timing = None  # (no speedup claimed from them)
        else:
            timing = (times["sparse float"], times[chosen], times["sparse float"] / times[chosen])
        shown = f"sparse float: {_decision_of(old, x)}" if chosen == "sparse float" else _decision_of(forms[chosen], x)
        rows.append(_row(name, old, x, shown, f"density {old.density:.3f}; {ms}{note}", timing, batch))
    return forms[chosen], rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table of ``sparsify_`` / ``quantize_`` rows, columns sized to their contents."""
    cols = [("layer", "layer"), ("kind", "kind"), ("input", "input"), ("batch", "batch"), ("decision", "decision"),
            ("reason", "reason")]
    body = []
    for r in rows:
        shape = "x".join(map(str, r["input_shape"])) if r.get("input_shape") else "-"
        body.append({"layer": r["layer"], "kind": r["kind"], "input": shape,
                     "batch": "-" if r.get("batch") is None else str(r["batch"]), "decision": r["decision"],
                     "reason": r["reason"]})
    widths = {k: max([len(h)] + [len(str(b[k])) for b in body]) for k, h in cols}
    lines = ["  ".join(h.ljust(widths[k]) for k, h in cols).rstrip()]
    lines += ["  ".join(str(b[k]).ljust(widths[k]) for k, _ in cols).rstrip() for b in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ save / load
ACCEL_TYPES = (SparseLinear, SparseConv2d, QuantLinear, QuantConv2d, QuantEmbedding, SparseQuantLinear)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _describe(m: nn.Module) -> dict:
    if isinstance(m, SparseLinear):
        return {"type": "SparseLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "block_size": m.block_size,
                "dtype": _dtype_name((m.values if m.storage == "sparse" else m.weight).dtype)}
    if isinstance(m, SparseQuantLinear):
        return {"type": "SparseQuantLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "block_size": m.block_size,
                "dtype": _dtype_name(m.bias.dtype) if m.bias is not None else "float32"}
    if isinstance(m, SparseConv2d):
        return {"type": "SparseConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "bias": m.bias is not None, "block_size": m.block_size,
                "dtype": _dtype_name((m.values if m.storage == "sparse" else m.weight).dtype)}
    if isinstance(m, QuantLinear):
        return {"type": "QuantLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "dtype": _dtype_name(m.bias.dtype) if m.bias is not None else "float32"}
    if isinstance(m, QuantEmbedding):
        return {"type": "QuantEmbedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                "dtype": _dtype_name(m.out_dtype)}
    return {"type": "QuantConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
            "dilation": list(m.dilation), "bias": m.bias is not None,
            "dtype": _dtype_name(m.bias.dtype) if m.bias is not None else "float32"}


def _compatible(desc: dict, target: nn.Module | None) -> str | None:
    """Why the layer ``desc`` of a file cannot replace ``target`` (None if it can)."""
    kind = desc.get("type")
    if target is None:
        return "no such module in the model"
    if kind in ("SparseLinear", "QuantLinear", "SparseQuantLinear"):
        ok = isinstance(target, (nn.Linear, SparseLinear, QuantLinear, SparseQuantLinear)) or is_conv1d(target)
        shape = tuple(target.weight.shape) if is_conv1d(target) else \
            (getattr(target, "in_features", None), getattr(target, "out_features", None))  # Conv1D: weight [in, out]
        want = (desc.get("in_features"), desc.get("out_features"))
        if not ok:
            return f"the file has a {kind} there, the model has {type(target).__name__}"
        if shape != want:
            return f"the file's {kind} is (in, out) = {want}, the model's layer is {shape}"
        has_bias = getattr(target, "bias", None) is not None
        if has_bias != bool(desc.get("bias")):
            return f"bias: the file {'has' if desc.get('bias') else 'has no'} bias, the model's layer " \
                   f"{'has' if has_bias else 'has no'} bias"
        return None
    if kind == "SparseConv2d":
        if not isinstance(target, (nn.Conv2d, SparseConv2d)):
            return f"the file has a SparseConv2d there, the model has {type(target).__name__}"
        if type(target) is nn.Conv2d and (why := SparseConv2d.unsupported_reason(target)) is not None:
            return f"the model's Conv2d cannot be a SparseConv2d: {why}"
        pad = explicit_padding(target) if type(target) is nn.Conv2d else target.padding
        mine = (target.in_channels, target.out_channels, list(target.kernel_size), list(target.stride), list(pad),
                list(target.dilation), target.bias is not None)
        want = (desc.get("in_channels"), desc.get("out_channels"), desc.get("kernel_size"), desc.get("stride"),
                desc.get("padding"), desc.get("dilation"), bool(desc.get("bias")))
        return None if mine == want else f"conv geometry (in, out, kernel, stride, padding, dilation, bias): file " \
                                         f"{want}, model {mine}"
    if kind == "QuantConv2d":
        if not isinstance(target, (nn.Conv2d, QuantConv2d)):
            return f"the file has a QuantConv2d there, the model has {type(target).__name__}"
        if type(target) is not QuantConv2d and (why := QuantConv2d.unsupported_reason(target)) is not None:
            return f"the model's Conv2d cannot be a QuantConv2d: {why}"
        pad = explicit_padding(target) if type(target) is not QuantConv2d else target.padding
        mine = (target.in_channels, target.out_channels, list(target.kernel_size), list(target.stride), list(pad),
                list(target.dilation))
        want = (desc.get("in_channels"), desc.get("out_channels"), desc.get("kernel_size"), desc.get("stride"),
                desc.get("padding"), desc.get("dilation"))
        return None if mine == want else f"conv geometry (in, out, kernel, stride, padding, dilation): file {want}, " \
                                         f"model {mine}"
    if kind == "QuantEmbedding":
        if not isinstance(target, (nn.Embedding, QuantEmbedding)):
            return f"the file has a QuantEmbedding there, the model has {type(target).__name__}"
        if isinstance(target, nn.Embedding) and (target.max_norm is not None or target.sparse):
            return ("the model's nn.Embedding there renormalizes (max_norm) or has sparse gradients, which the "
                    "QuantEmbedding in the file would drop")
        mine = (target.num_embeddings, target.embedding_dim)
        want = (desc.get("num_embeddings"), desc.get("embedding_dim"))
        return None if mine == want else f"embedding (rows, dim): file {want}, model {mine}"
    return f"unknown accel module type {kind!r}"


def _build(desc: dict, target: nn.Module) -> nn.Module:
    """The accel module ``desc`` describes, in the dtype and device of the layer it replaces."""
    ref = next((t for t in list(target.parameters()) + list(target.buffers()) if t.is_floating_point()), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None else getattr(torch, desc.get("dtype", "float32"), torch.float32)
    kind = desc["type"]
    if kind == "SparseLinear":
        return SparseLinear(desc["in_features"], desc["out_features"], desc["bias"], desc["block_size"], device=device,
                            dtype=dtype)
    if kind == "SparseConv2d":
        return SparseConv2d(desc["in_channels"], desc["out_channels"], desc["kernel_size"], desc["stride"],
                            desc["padding"], desc["dilation"], desc["bias"], desc["block_size"], device=device,
                            dtype=dtype)
    if kind == "QuantLinear":
        return QuantLinear(desc["in_features"], desc["out_features"], desc["bias"], device=device, dtype=dtype)
    if kind == "SparseQuantLinear":
        return SparseQuantLinear(desc["in_features"], desc["out_features"], desc["bias"], desc["block_size"],
                                 device=device, dtype=dtype)
    if kind == "QuantEmbedding":
        return QuantEmbedding(desc["num_embeddings"], desc["embedding_dim"], device=device, dtype=dtype)
    return QuantConv2d(desc["in_channels"], desc["out_channels"], desc["kernel_size"], desc["stride"],
                       desc["padding"], desc["dilation"], desc["bias"], device=device, dtype=dtype)


def _tensor_identity(t: torch.Tensor) -> tuple:
    """Equal for two state-dict entries that are the same memory seen the same way (a tied weight, a
    shared buffer); an empty tensor is never merged."""
    if t.numel() == 0 or t.device.type == "meta" or t.untyped_storage().data_ptr() == 0:
        return (id(t),)  # no memory to compare (meta tensors all report address 0)
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.is_conj(), t.is_neg())


def _equal_tables(tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """int8 tables (``weight_q`` with its ``weight_scale``) equal to an earlier one are recorded as its aliases
    instead of written again: tied layers whose shared table a device move (``Module.to`` converts each
    layer's buffers separately) turned into equal copies. In place."""
    seen: dict[tuple, list[str]] = {}
    for k in [k for k in tensors if k.endswith(".weight_q")]:
        sk = k[: -len("weight_q")] + "weight_scale"
        if sk not in tensors:
            continue
        t = tensors[k]
        group = seen.setdefault((t.dtype, tuple(t.shape), tuple(tensors[sk].shape)), [])
        for c in group:
            sc = c[: -len("weight_q")] + "weight_scale"
            if torch.equal(tensors[c], t) and torch.equal(tensors[sc], tensors[sk]):
                for key, first in ((k, c), (sk, sc)):
                    del tensors[key]
                    aliases[key] = first
                    for other, to in list(aliases.items()):  # names that pointed at the copy point at the first
                        if to == key:
                            aliases[other] = first
                break
        else:
            group.append(k)


def save(model: nn.Module, path: str) -> None:
    """Write ``model``'s state to ``path`` (safetensors), with the accel layer types and their extra
    state in the file's metadata so :func:`load` can rebuild them on a fresh float model. An entry that
    is the same tensor as an earlier one (tied weights, an int8 table shared by tied layers) is written
    once and recorded as an alias of it."""
    from safetensors.torch import save_file

    from .prune import is_qat_layer

    qat = [n for n, m in model.named_modules() if is_qat_layer(m)]
    if qat:
        warnings.warn(f"accel.save: {len(qat)} layer(s) are fake-quantized QAT layers (e.g. {qat[0]!r}), saved as their "
                      "float weights; run accel.convert(model) first to save int8 layers", stacklevel=2)
    sd = model.state_dict()
    tensors, aliases, first = {}, {}, {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        same = _tensor_identity(v)  # tied weights / shared int8 tables: the state dict holds them once per name
        if same in first:
            aliases[k] = first[same]
            continue
        first[same] = k
        tensors[k] = v.detach().cpu().contiguous().clone()
    _equal_tables(tensors, aliases)
    extra = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    layers = {name: _describe(m) for name, m in model.named_modules(remove_duplicate=False)  # every alias, as the
              if isinstance(m, ACCEL_TYPES)}                                                # state dict has them
    meta = {"layers": layers, "extra_state": extra, "shapes": layer_shapes(model), "aliases": aliases}
    save_file(tensors, path, metadata={"accel": json.dumps(meta)})


def load(model: nn.Module, path: str) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a fresh instance of the *uncompressed*
    architecture: the layers the file records as accel modules are rebuilt (in the dtype and device
    of the layers they replace, with their training flags and hooks), then the state is loaded. An accel
    layer ``model`` already has, as the file describes it, is loaded in place (an optimizer built
    before keeps working). Layers the model ties share their int8 tables again. Every layer of the file is checked
    against the model first (type and shape), and the load runs on a copy: when anything fails,
    ``model`` is left exactly as it was. Returns ``model``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"accel.load: {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if "accel" not in meta:
        raise ValueError(f"{path} was not written by accel.save (no 'accel' metadata)")
    try:
        info = json.loads(meta["accel"])
        layers, extra_state, shapes = dict(info["layers"]), dict(info["extra_state"]), dict(info.get("shapes", {}))
        aliases = {str(k): str(v) for k, v in dict(info.get("aliases", {})).items()}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"accel.load: {path} has corrupt accel metadata ({e})") from None
    try:
        trial = copy.deepcopy(model)  # everything happens on a copy: a failed load leaves `model` as it was
    except Exception as e:  # noqa: BLE001 - torch's errors for uncopyable models: name what to change
        raise ValueError(f"accel.load: cannot copy the model to load into it safely (copy.deepcopy raised "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Typical causes: the old "
                         "torch.nn.utils.weight_norm (use torch.nn.utils.parametrizations.weight_norm), or a tensor "
                         "from a grad-enabled forward kept as a module attribute (delete it first)") from None
    tied = _tied_aliases(model, aliases)  # ties of the model loaded into, before any layer is replaced
    cuttable = layer_shapes(trial)
    want = {k: v for k, v in shapes.items() if k not in layers}
    for name, desc in layers.items():  # accel layers of a shrunk model: give the stock layer their channel counts
        if not isinstance(desc, dict):
            raise ValueError(f"accel.load: {path} has corrupt accel metadata for layer {name!r}")
        io = {"in": desc.get("in_features", desc.get("in_channels")), "out": desc.get("out_features",
                                                                                      desc.get("out_channels"))}
        if name in cuttable and isinstance(io["in"], int) and isinstance(io["out"], int):
            have = cuttable[name]
            if io["in"] <= have["in"] and io["out"] <= have["out"]:
                want[name] = io
    modules = dict(trial.named_modules(remove_duplicate=False))
    for name, io in list(want.items()):
        have = cuttable.get(name)
        if have is None:
            there = type(modules[name]).__name__ if name in modules else "no such module"
            raise ValueError(f"accel.load: {path} does not fit this model: the file has a stock layer with channels "
                             f"{io} at {name!r}, the model has {there} there")
        if isinstance(io, dict) and all(have.get(k) == v for k, v in io.items()):
            del want[name]  # the channel counts it already has: nothing to cut
    try:
        resized = resize_(trial, want)  # channels removed by shrink_
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"accel.load: {path} does not fit this model (channel counts): {e}") from None
    modules = dict(trial.named_modules(remove_duplicate=False))
    problems = [f"{name}: {why}" for name, desc in layers.items()
                if (why := _compatible(desc if isinstance(desc, dict) else {}, modules.get(name))) is not None]
    if problems:
        raise ValueError(f"accel.load: {path} does not fit this model:\n  " + "\n  ".join(problems))
    try:
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"accel.load: cannot read the tensors of {path} ({type(e).__name__}: {e})") from None
    missing = sorted({v for v in aliases.values() if v not in sd})
    if missing:
        raise ValueError(f"accel.load: {path} has corrupt accel metadata: aliases of tensors it does not hold: {missing}")
    sd.update({k: sd[v] for k, v in aliases.items()})
    sd.update(extra_state)
    built: dict[int, tuple[str, dict, nn.Module]] = {}  # a module shared by several names is built once
    news = {}
    # an accel layer the model already has, of the file's description, keeps its objects: the state is loaded into
    # it in place (as load_state_dict does), so an optimizer built before the load still holds its parameters
    own = dict(model.named_modules(remove_duplicate=False))
    kept = {name for name, desc in layers.items()
            if isinstance(own.get(name), ACCEL_TYPES) and isinstance(desc, dict) and _describe(own[name]) == desc}
    for name, desc in layers.items():
        if name in kept:
            continue
        target = modules[name]
        if id(target) not in built:
            try:
                built[id(target)] = (name, desc, _build(desc, target))
            except (KeyError, TypeError, ValueError) as e:  # a hand-edited / corrupt entry: name it, change nothing
                raise ValueError(f"accel.load: {path} has corrupt accel metadata for layer {name!r} "
                                 f"({type(e).__name__}: {e}): {desc}") from None
        first, first_desc, new = built[id(target)]
        if first_desc != desc:
            raise ValueError(f"accel.load: {path} does not fit this model: {first!r} and {name!r} are one shared module "
                             f"here, but the file has different layers there ({first_desc} / {desc})")
        news[name] = new
    replace_modules(trial, news)
    _check_ties(trial, sd, path)
    try:
        trial.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"accel.load: {path} does not load into this model: {e}") from None
    # success: move the rebuilt layers (with the replaced ones' training flags and hooks) and the loaded state into
    # the caller's model
    moved = {}
    for name in dict.fromkeys(list(resized) + [n for n in layers if n not in kept]):  # (a name in both: once)
        new = trial.get_submodule(name)
        if new not in moved.values():
            _drop_copied_hooks(new)  # a layer of the copy holds copies of the old layer's hooks: the old ones go on it
            new = carry_over(own[name], new)
        moved[name] = new
    replace_modules(model, moved)
    model.load_state_dict(trial.state_dict(), strict=True)
    _reshare(model, tied)
    return model


def _drop_copied_hooks(m: nn.Module) -> None:
    """Empty ``m``'s forward/backward hook dictionaries (copies made by ``copy.deepcopy``), so :func:`carry_over`
    gives it the original ones, which the user's handles remove. (accel's own hooks come back with
    :func:`replace_modules`.)"""
    for k in _hook_dicts(m):
        m.__dict__[k] = type(m.__dict__[k])()


def _tied_aliases(model: nn.Module, aliases: dict[str, str]) -> dict[str, str]:
    """The file's aliases (an entry saved once for several names) between layers that ``model`` ties: one module
    under both names, or one weight tensor. Equal tables of untied layers (a cloned head, zero-initialised layers)
    were only written once; they are loaded as copies, not made one tensor."""
    tied = {}
    for alias, first in aliases.items():
        ma, mf = alias.rpartition(".")[0], first.rpartition(".")[0]
        try:
            a, f = model.get_submodule(ma), model.get_submodule(mf)
        except AttributeError:
            continue
        if a is f:
            tied[alias] = first
            continue
        wa, wf = (m._buffers.get("weight_q", m._parameters.get("weight")) for m in (a, f))
        if isinstance(wa, torch.Tensor) and isinstance(wf, torch.Tensor) and \
                _tensor_identity(wa) == _tensor_identity(wf):
            tied[alias] = first
    return tied


def _check_ties(model: nn.Module, sd: dict, path: str) -> None:
    """A ValueError when ``model`` holds one tensor under several names (tied weights) but the file has
    different values for them: loading would silently write one over the other."""
    groups: dict[tuple, list[str]] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            groups.setdefault(_tensor_identity(v), []).append(k)
    for keys in groups.values():
        held = [k for k in keys if isinstance(sd.get(k), torch.Tensor)]
        for k in held[1:]:
            a, b = sd[held[0]], sd[k]
            if a is not b and (a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)):
                raise ValueError(f"accel.load: {path} does not fit this model: {held[0]!r} and {k!r} are one tied "
                                 f"tensor in this model, but the file holds different values for them (the layers "
                                 f"were untied when it was saved); untie them in the model before loading")


def _reshare(model: nn.Module, aliases: dict[str, str]) -> None:
    """Buffers of accel layers that the model ties (:func:`_tied_aliases`: an int8 table of tied layers) become
    one tensor again (they were loaded as equal copies)."""
    for alias, first in aliases.items():
        (ma, _, ka), (mf, _, kf) = alias.rpartition("."), first.rpartition(".")
        try:
            a, f = model.get_submodule(ma), model.get_submodule(mf)
        except AttributeError:  # a key that is not module.path.name (renamed by a state-dict hook): left as loaded
            continue
        if a is f or not isinstance(a, ACCEL_TYPES) or not isinstance(f, ACCEL_TYPES):
            continue
        ta, tf = a._buffers.get(ka), f._buffers.get(kf)
        if ta is not None and tf is not None and ta.shape == tf.shape and ta.dtype == tf.dtype and \
                ta.device == tf.device:
            a._buffers[ka] = tf

