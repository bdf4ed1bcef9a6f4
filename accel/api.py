"""Model-level API: swap layers for the kernel-backed modules, keep the ones that would get slower,
report every decision; save and load compressed models as safetensors.

``sparsify_`` and ``quantize_`` follow torchao's ``quantize_(model, config, filter_fn)`` shape. With
``example_inputs`` they run the model once to capture each candidate layer's real input, time the
original layer and its replacement side by side on it (``accel.timing.compare``) and keep the
original where the replacement is not faster. The returned rows say what happened to each layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .modules import QuantConv2d, QuantLinear, SparseLinear
from .prune import block_masks
from .timing import compare

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class SparsityConfig:
    """Block sparsity for ``sparsify_``: one-shot masks (``sparsity``, ``block``, L``norm``, ``scope``)
    unless masks from a pruner are passed."""

    sparsity: float = 0.75
    block: int = 32
    norm: int = 2
    scope: str = "global"
    measure: bool = True
    min_speedup: float = 1.0
    budget_s: float = 0.5


@dataclass
class QuantConfig:
    """int8 for ``quantize_``: ``linear_mode`` (QuantLinear: auto/dynamic/static/weight_only) and
    ``conv_mode`` (QuantConv2d: dynamic/static); static modes take ``act_scales`` from ``accel.calibrate``."""

    linear_mode: str = "dynamic"
    conv_mode: str = "dynamic"
    act_scales: dict[str, float] = field(default_factory=dict)
    measure: bool = True
    min_speedup: float = 1.0
    budget_s: float = 0.5


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``model`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], example_inputs: tuple) -> dict[str, torch.Tensor]:
    """The input each named module receives when ``model(*example_inputs)`` runs."""
    seen, hooks = {}, []
    modules = dict(model.named_modules())
    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda m, args, name=name: seen.setdefault(name, args[0].detach().clone())))
    was_training = model.training
    model.eval()
    try:
        model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


@torch.no_grad()
def _measure(old: nn.Module, new: nn.Module, x: torch.Tensor, budget_s: float) -> tuple[float, float, float]:
    """(old ms, new ms, speedup of new over old), side by side."""
    res = compare({"old": lambda: old(x), "new": lambda: new(x)}, "old", device=x.device.type, budget_s=budget_s,
                  min_rounds=5)
    return res["old"].median_s * 1e3, res["new"].median_s * 1e3, res["new"].speedup


def _row(name, module, x, decision, reason="", timing=None):
    row = {"layer": name, "kind": type(module).__name__, "input_shape": None if x is None else list(x.shape),
           "decision": decision, "reason": reason}
    if timing is not None:
        row.update(ms_before=timing[0], ms_after=timing[1], speedup=timing[2])
    return row


def sparsify_(model: nn.Module, config: SparsityConfig | None = None, filter_fn: FilterFn | None = None, *,
              masks: dict[str, torch.Tensor] | None = None, example_inputs: tuple | None = None) -> list[dict]:
    """Replace ``nn.Linear`` layers by block-sparse ``SparseLinear`` (in place) and report.

    Blocks come from ``masks`` (e.g. ``GradualPruner.masks``) or are chosen one-shot by ``config``.
    With ``example_inputs`` (and ``config.measure``), a layer whose sparse form is not at least
    ``min_speedup`` times faster at its real input keeps a dense, masked weight
    (``SparseLinear`` mode "dense"); without, ``SparseLinear``'s density rule decides.
    """
    config = config or SparsityConfig()
    if masks is None:
        def linear_only(m, n):
            return type(m) is nn.Linear and (filter_fn is None or filter_fn(m, n))

        masks = block_masks(model, config.sparsity, config.block, config.norm, config.scope, linear_only)
    modules = dict(model.named_modules())
    for name in masks:
        if type(modules.get(name)) is not nn.Linear:
            raise ValueError(f"sparsify_: mask for {name!r}, which is {type(modules.get(name)).__name__}, not nn.Linear")
    inputs = capture_inputs(model, list(masks), example_inputs) if example_inputs is not None and config.measure else {}
    rows = []
    for name, mask in masks.items():
        lin = modules[name]
        sparse = SparseLinear.from_dense(lin, mask=mask, block=config.block, mode="sparse")
        x = inputs.get(name)
        if x is None:
            new = SparseLinear.from_dense(lin, mask=mask, block=config.block, mode="auto")
            rows.append(_row(name, lin, None, new.mode, f"density {new.density:.3f} (not measured)"))
        else:
            dense = SparseLinear.from_dense(lin, mask=mask, block=config.block, mode="dense")
            timing = _measure(dense, sparse, x, config.budget_s)
            faster = timing[2] >= config.min_speedup
            new = sparse if faster else dense
            rows.append(_row(name, lin, x, new.mode, f"density {sparse.density:.3f}; sparse {timing[2]:.2f}x dense",
                             timing))
        replace_module(model, name, new)
    return rows


def linearize_kept_dense_(model: nn.Module, sparsify_rows: list[dict]) -> list[str]:
    """Turn the layers ``sparsify_`` kept dense back into plain ``nn.Linear`` (masked weights, so their
    zeros stay zero), in place, so ``quantize_`` can still try int8 on them. Returns their names."""
    names = [r["layer"] for r in sparsify_rows if r["decision"] == "dense"]
    for name in names:
        replace_module(model, name, model.get_submodule(name).to_linear())
    return names


def quantize_(model: nn.Module, config: QuantConfig | None = None, filter_fn: FilterFn | None = None, *,
              example_inputs: tuple | None = None) -> list[dict]:
    """Replace ``nn.Linear`` by ``QuantLinear`` and ``nn.Conv2d`` by ``QuantConv2d`` (in place) and report.

    Layers QuantConv2d cannot serve stay in floating point, with the reason. With ``example_inputs``
    (and ``config.measure``), a layer whose int8 form is not at least ``min_speedup`` times faster
    at its real input stays in floating point too.
    """
    config = config or QuantConfig()
    candidates = {name: m for name, m in model.named_modules()
                  if type(m) in (nn.Linear, nn.Conv2d) and (filter_fn is None or filter_fn(m, name))}
    inputs = (capture_inputs(model, list(candidates), example_inputs)
              if example_inputs is not None and config.measure else {})
    rows = []
    for name, m in candidates.items():
        x = inputs.get(name)
        scale = config.act_scales.get(name)
        if isinstance(m, nn.Conv2d):
            reason = QuantConv2d.unsupported_reason(m)
            if reason is not None:
                rows.append(_row(name, m, x, "float", reason))
                continue
            mode = "static" if scale is not None else config.conv_mode
            if mode == "static" and scale is None:
                raise ValueError(f"quantize_: conv_mode 'static' needs act_scales[{name!r}] (accel.calibrate)")
            new = QuantConv2d.from_float(m, mode, act_scale=scale)
        else:
            mode = "static" if scale is not None else config.linear_mode
            if mode == "static" and scale is None:
                raise ValueError(f"quantize_: linear_mode 'static' needs act_scales[{name!r}] (accel.calibrate)")
            new = QuantLinear.from_float(m, mode, act_scale=scale)
        if x is None:
            rows.append(_row(name, m, None, f"int8 {new.mode}", "not measured"))
            replace_module(model, name, new)
            continue
        timing = _measure(m, new, x, config.budget_s)
        if timing[2] >= config.min_speedup:
            rows.append(_row(name, m, x, f"int8 {new.mode}", f"int8 {timing[2]:.2f}x float", timing))
            replace_module(model, name, new)
        else:
            rows.append(_row(name, m, x, "float", f"int8 slower here ({timing[2]:.2f}x)", timing))
    return rows


def format_report(rows: list[dict]) -> str:
    lines = [f"{'layer':<28} {'kind':<8} {'input':<20} {'decision':<18} reason"]
    for r in rows:
        shape = "x".join(map(str, r["input_shape"])) if r["input_shape"] else "-"
        lines.append(f"{r['layer']:<28} {r['kind']:<8} {shape:<20} {r['decision']:<18} {r['reason']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ save / load
def _describe(m: nn.Module) -> dict:
    if isinstance(m, SparseLinear):
        return {"type": "SparseLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "block_size": m.block_size}
    if isinstance(m, QuantLinear):
        return {"type": "QuantLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    return {"type": "QuantConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
            "dilation": list(m.dilation), "bias": m.bias is not None}


def _build(desc: dict) -> nn.Module:
    desc = dict(desc)
    kind = desc.pop("type")
    if kind == "SparseLinear":
        return SparseLinear(desc["in_features"], desc["out_features"], desc["bias"], desc["block_size"])
    if kind == "QuantLinear":
        return QuantLinear(desc["in_features"], desc["out_features"], desc["bias"])
    if kind == "QuantConv2d":
        return QuantConv2d(desc["in_channels"], desc["out_channels"], desc["kernel_size"], desc["stride"],
                           desc["padding"], desc["dilation"], desc["bias"])
    raise ValueError(f"unknown accel module type {kind!r} in the file")


def save(model: nn.Module, path: str) -> None:
    """Write ``model``'s state to ``path`` (safetensors), with the accel layer types and their extra
    state in the file's metadata so :func:`load` can rebuild them on a fresh float model."""
    from safetensors.torch import save_file

    sd = model.state_dict()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    extra = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    layers = {name: _describe(m) for name, m in model.named_modules()
              if isinstance(m, (SparseLinear, QuantLinear, QuantConv2d))}
    save_file(tensors, path, metadata={"accel": json.dumps({"layers": layers, "extra_state": extra})})


def load(model: nn.Module, path: str) -> nn.Module:
    """Load a file written by :func:`save` into ``model``, a fresh instance of the *uncompressed*
    architecture: the layers the file records as accel modules are rebuilt first. Returns ``model``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "accel" not in meta:
        raise ValueError(f"{path} was not written by accel.save (no 'accel' metadata)")
    info = json.loads(meta["accel"])
    for name, desc in info["layers"].items():
        replace_module(model, name, _build(desc))
    sd = load_file(path)
    sd.update(info["extra_state"])
    model.load_state_dict(sd, strict=True)
    return model
