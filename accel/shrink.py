"""Structural channel pruning: physically remove the least important channels and leave a smaller
dense model made of stock layers (``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.Linear``, ``nn.LayerNorm``,
... with smaller shapes), in the manner of Torch-Pruning's DepGraph and NNCF's filter pruning.

    report = shrink_(model, example_inputs, 0.5)            # half the channels of every prunable layer
    opt = torch.optim.Adam(model.parameters())              # create optimizers AFTER shrinking

How it works
------------
1. **Trace.** ``model`` runs once on ``example_inputs`` (eval mode, no grad) under a
   ``TorchFunctionMode`` that sees every torch call made outside the known layers, plus forward
   hooks on the known layers. Every output channel of a Conv / Linear is an *element*; every traced
   tensor carries the elements of its channel dimension (``_Info``: the labels and their period in
   the row-major flat index, so ``view`` / ``flatten`` / ``unsqueeze`` keep them for free and the
   Linear after a flatten sees each channel as ``H*W`` consecutive features).
2. **Couple.** Operations that tie channels together union their elements (union-find): residual
   adds and other element-wise ops, ``torch.cat`` along another dimension, several calls of one
   layer, whole groups of a grouped conv. A connected set of elements is a *unit*: removing it
   removes those channels from every layer that produces, normalises or consumes them. Elements
   that reach something the planner cannot follow (the model's outputs, an unknown op, a reshape
   that splits the channel dimension, a parameter used outside its layer, ``ignore``) are joined to
   the *fixed* element and never removed.
3. **Choose.** Units are scored by the summed L1 / L2 magnitude of every weight slice they own
   (producer rows, norm scales, consumer columns) or by a user callable; the lowest go, per group
   of coupled layers (``scope="layer"``) or across the model (``scope="global"``, scores divided by
   their group's mean), never taking a layer below ``max(min_channels, ceil(floor * channels))``.
4. **Cut and check.** New, smaller layers are built from slices of the old ones (new
   ``nn.Parameter`` objects with the old ``requires_grad``; BatchNorm running statistics sliced;
   hooks carried over) and swapped in; the model is then run again and every traced op must give
   the shape the plan predicts (so a hard-coded ``view(-1, 4096)`` is caught), and it must still
   run in train mode where the original does on those inputs (a train-only branch the eval trace
   did not see). Any failure swaps the original layers back and raises: the model is unchanged
   unless ``shrink_`` returns.

Limits: the trace follows the path the forward takes on ``example_inputs`` (keep them small: the
trace holds the traced activations until it ends); side effects of the forward (state it stores)
are not seen.

Supported
---------
* ``nn.Conv1d/2d/3d`` with ``groups=1`` (in and out channels), depthwise convs (``groups ==
  in_channels``, any multiplier: channels pass through, coupled to the input's), other grouped
  convs (whole groups only: a group's input and output channels form one unit);
  ``nn.ConvTranspose1d/2d/3d`` with ``groups=1``; ``nn.Linear`` (on the last dimension);
  ``nn.BatchNorm1d/2d/3d``, ``nn.InstanceNorm1d/2d/3d``, ``nn.LayerNorm`` over the channel dimension
  (sliced: note a LayerNorm then normalises over fewer features, so it is not exactly equivalent).
* element-wise ops with broadcasting (``+ - * /``, activations, ``where``, dropout, casts ...),
  pooling / interpolation / ``F.pad`` over spatial dimensions, reductions that keep the channel
  dimension (``mean((2, 3))``), ``softmax`` over another dimension, ``view`` / ``reshape`` /
  ``flatten`` / ``squeeze`` / ``unsqueeze`` that keep or flatten the channel dimension, ``permute`` /
  ``transpose``, ``expand``, ``x[:, 0]``-style indexing that keeps the channel dimension whole,
  ``torch.cat`` / ``stack`` (along the channels: offsets; along another dimension: coupling),
  ``split`` / ``chunk`` along another dimension.

Refused (those channels stay, the report says why)
---------------------------------------------------
Anything else touching a channel dimension: ``matmul`` / attention, reshapes that split channels
(heads), ``split`` along channels, GroupNorm, PReLU with per-channel weights, ``F.conv2d`` called with
a layer's weight, tied parameters, grouped ConvTranspose, layers whose outputs are model outputs.
Models containing TorchScript modules, or whose forward fails on ``example_inputs``, raise
``ShrinkError`` before anything changes.

Save / reload
-------------
``torch.save(model)`` works as is (stock layers). A ``state_dict`` of a shrunk model loads into a
model of the same shrunk shapes: either keep ``plan = plan_shrink(...)`` and call
``apply_plan(fresh, plan)`` (or ``ShrinkPlan.from_dict(plan.to_dict())`` from JSON), or save
``layer_shapes(model)`` (a JSON dict) with the weights and call ``resize_(fresh, shapes)`` before
``fresh.load_state_dict(state)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .inputs import as_call, eval_mode

ImportanceFn = Callable[[str, nn.Module], torch.Tensor]

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_BN = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_IN = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
_LEAF = (*_CONV, *_CONVT, nn.Linear, *_BN, *_IN, nn.LayerNorm)
_PARAM_NAMES = {"weight", "bias"}
_BUFFER_NAMES = {"running_mean", "running_var", "num_batches_tracked"}


class ShrinkError(RuntimeError):
    """The model could not be traced, or did not run as planned after shrinking (it was left unchanged)."""


# ------------------------------------------------------------------------------------------------ labels
class _UnionFind:
    """Channel elements; element 0 is the fixed element (channels that must stay)."""

    def __init__(self) -> None:
        self.parent = [0]
        self.space = [-1]

    def add(self, n: int, space: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.space.extend([space] * n)
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, e: int) -> int:
        p = self.parent
        while p[e] != e:
            p[e] = p[p[e]]
            e = p[e]
        return e

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb == 0:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in np.unique(np.stack([a, b], 1), axis=0):
            if x != y:
                self.union(int(x), int(y))

    def union_all(self, elems: np.ndarray) -> None:
        elems = np.unique(elems)
        for x in elems[1:]:
            self.union(int(elems[0]), int(x))


@dataclass
class _Info:
    """Channel labels of a tensor: the element at row-major flat index ``f`` is
    ``base[(f // period) % len(base)]``. Reshapes keep it; other ops recompute ``period``."""

    base: np.ndarray
    period: int


def _inner(shape, j: int) -> int:
    return math.prod(shape[j + 1:])


def _valid_at(shape, info: _Info, j: int) -> int | None:
    """``r`` if the labels depend only on the coordinate of dim ``j`` (``base[(k // r) % C]``), else None."""
    c, p, inner = len(info.base), info.period, _inner(shape, j)
    if inner == 0 or shape[j] == 0 or p % inner or (shape[j] * inner) % (p * c):
        return None
    return p // inner


def _locate(shape, info: _Info, prefer: int | None = None) -> tuple[int, int] | None:
    if prefer is not None and 0 <= prefer < len(shape) and (r := _valid_at(shape, info, prefer)) is not None:
        return prefer, r
    for j in range(len(shape)):
        if (r := _valid_at(shape, info, j)) is not None:
            return j, r
    return None


def _positions(info: _Info, size: int, r: int) -> np.ndarray:
    return info.base[(np.arange(size) // r) % len(info.base)]


def _tensors(obj) -> list[torch.Tensor]:
    """Tensors in nested lists / tuples / dicts / dataclasses, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    return []


def _fname(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        name = "." + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


def _dims(d, ndim: int) -> tuple[int, ...]:
    ds = d if isinstance(d, (tuple, list, torch.Size)) else (d,)
    return tuple(int(x) % ndim for x in ds)


# ops: name -> handler. Names are those of the torch function / Tensor method / property ("." prefix).
_QUERIES = {
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "element_size", "data_ptr",
    "storage_offset", "is_floating_point", "is_complex", "get_device", "__len__", "__format__", "__repr__",
    "__hash__", "dim_order", "is_nonzero", "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
    ".shape", ".dtype", ".device", ".ndim", ".requires_grad", ".is_cuda", ".layout", ".grad_fn", ".is_leaf",
    ".grad", ".names", "._version", ".is_sparse", ".is_quantized", ".is_meta", ".is_nested", ".is_mkldnn",
    ".output_nr", "._base", ".itemsize", ".nbytes", ".is_cpu", ".is_mps", ".is_xpu",
}
_IDENTITY = {
    "clone", "contiguous", "detach", "detach_", "float", "half", "double", "bfloat16", "to", "type", "type_as",
    "requires_grad_", "cpu", "cuda", ".data", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_alpha_dropout", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
}
_POINTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "true_divide", "rsub", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__",
    "__rtruediv__", "__itruediv__", "__neg__", "neg", "neg_", "pow", "pow_", "__pow__", "__rpow__", "maximum",
    "minimum", "fmax", "fmin", "where", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "relu",
    "relu_", "relu6", "gelu", "silu", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish", "hardswish_",
    "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "celu", "mish",
    "softplus", "softsign", "tanhshrink", "logsigmoid", "threshold", "threshold_", "abs", "abs_", "exp",
    "exp_", "log", "log_", "log1p", "expm1", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "reciprocal",
    "sign", "floor", "ceil", "round", "trunc", "nan_to_num", "masked_fill", "masked_fill_", "lerp", "addcmul",
    "addcdiv", "eq", "ne", "gt", "lt", "ge", "le", "__eq__", "__ne__", "__gt__", "__lt__", "__ge__", "__le__",
    "logical_and", "logical_or", "logical_not", "__and__", "__or__", "bitwise_not",
}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "nansum", "nanmean",
           "all", "any"}
_SOFTMAX = {"softmax", "log_softmax", "softmin"}
_SPATIAL = {
    **{f"{p}{d}d": d for p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool")
       for d in (1, 2, 3)},
    **{f"{p}{d}d_with_indices": d for p in ("max_pool", "adaptive_max_pool") for d in (1, 2, 3)},
    "interpolate": -2, "upsample": -2, "upsample_nearest": -2, "upsample_bilinear": -2, "pad": 0,
}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
            "view_as", "reshape_as", "ravel"}
_PERMUTE = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", ".T", ".mT"}
_EXPAND = {"expand", "expand_as", "broadcast_to"}
_CAT = {"cat", "concat", "concatenate"}


# ------------------------------------------------------------------------------------------------ trace
@dataclass
class _Layer:
    """What the trace learnt about one known layer."""

    name: str
    module: nn.Module
    kind: str  # conv | dw | gconv | convt | linear | norm | unsupported
    out: np.ndarray | None = None  # elements of its output channels (a producer's own space)
    inp: np.ndarray | None = None  # labels of its input channel positions (a consumer)
    through: np.ndarray | None = None  # labels of the channels it passes through (norm, depthwise)
    why: str = ""


def _layer_kind(m: nn.Module) -> tuple[str, str]:
    t = type(m)
    extra = set(m._parameters) - _PARAM_NAMES
    if extra or set(m._buffers) - _BUFFER_NAMES:
        return "unsupported", f"unexpected parameters/buffers {sorted(extra | (set(m._buffers) - _BUFFER_NAMES))}"
    if t in _CONV:
        if m.groups == 1:
            return "conv", ""
        if m.groups == m.in_channels and m.out_channels % m.in_channels == 0:
            return "dw", ""
        return "gconv", ""
    if t in _CONVT:
        return ("convt", "") if m.groups == 1 else ("unsupported", f"grouped ConvTranspose (groups={m.groups})")
    if t is nn.Linear:
        return "linear", ""
    if t is nn.LayerNorm:
        if len(m.normalized_shape) != 1:
            return "unsupported", f"LayerNorm over {len(m.normalized_shape)} dims"
        return "norm", ""
    return "norm", ""


class _Tracer(TorchFunctionMode):
    """Runs the model once and records (labels mode) channel labels and couplings, or (shapes mode)
    only the sequence of ops and their output shapes, for the check after shrinking."""

    def __init__(self, model: nn.Module, labels: bool = True) -> None:
        super().__init__()
        self.model, self.labels = model, labels
        self.uf = _UnionFind()
        self.spaces: list[tuple[str, int]] = []  # (producer layer, channels)
        self.infos: dict[int, tuple[torch.Tensor, _Info]] = {}
        self.events: list[tuple[str, list[tuple[tuple[int, ...], _Info | None]]]] = []
        self.layers: dict[str, _Layer] = {}
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.touched: dict[str, str] = {}
        self.depth = 0
        self.owner: dict[int, str] = {}
        self._names: dict[int, str] = {}
        for name, m in model.named_modules():
            if type(m) in _LEAF:
                self._names[id(m)] = name
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None:
                        self.owner[id(t)] = name

    # -- running
    def run(self, args: tuple, kwargs: dict):
        hooks = []
        for name, m in self.model.named_modules():
            if type(m) in _LEAF:
                hooks.append(m.register_forward_pre_hook(self._pre))
                hooks.append(m.register_forward_hook(self._post, with_kwargs=True))
        try:
            with self:
                out = self.model(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        if self.labels:
            for t in _tensors(out):
                if (info := self.info(t)) is not None:
                    self.block(info.base, "reaches the model's output")
        return out

    def _pre(self, module, args):
        self.depth += 1

    def _post(self, module, args, kwargs, out):
        self.depth -= 1
        if self.depth:
            return
        name = self._names[id(module)]
        x = args[0] if args else next(iter(kwargs.values()), None)
        if self.labels and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
            try:
                self._on_layer(name, module, x, out)
            except Exception as e:  # an input layout the planner does not follow
                self.layers[name] = _Layer(name, module, "unsupported", why=f"{type(e).__name__}: {e}")
                self._unknown(f"layer {name}", (x,), {}, out)
        elif self.labels:
            self._unknown(f"layer {name}", (args, kwargs), {}, out)
        self.events.append((f"layer {name}", [(tuple(t.shape), self.info(t)) for t in _tensors(out)]))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth:
            return out
        name = _fname(func)
        if name in _QUERIES:
            return out
        if self.labels:
            self._on_op(name, args, kwargs, out)
        self.events.append((name, [(tuple(t.shape), self.info(t)) for t in _tensors(out)]))
        return out

    # -- labels
    def info(self, t) -> _Info | None:
        rec = self.infos.get(id(t))
        return rec[1] if rec is not None and rec[0] is t else None

    def set(self, t: torch.Tensor, info: _Info | None) -> None:
        if info is None:
            if self.info(t) is not None:
                del self.infos[id(t)]
        else:
            self.infos[id(t)] = (t, info)

    def block(self, elems: np.ndarray, reason: str) -> None:
        elems = np.unique(elems)
        for e in elems:
            self.uf.union(0, int(e))
        self.blocks.append((elems, reason))

    def channel_labels(self, x: torch.Tensor, cdim: int, who: str) -> np.ndarray:
        """Labels of ``x``'s channel dimension ``cdim`` as a layer reads it (fixed if untraced)."""
        info = self.info(x)
        if info is not None:
            r = _valid_at(tuple(x.shape), info, cdim)
            if r is not None:  # r > 1: e.g. the Linear after a flatten sees each channel as r features
                return _positions(info, x.shape[cdim], r)
            self.block(info.base, f"{who} reads it along another dimension")
        return np.zeros(x.shape[cdim], dtype=np.int64)

    def _on_layer(self, name: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        rec = self.layers.get(name)
        if rec is None:
            kind, why = _layer_kind(m)
            rec = self.layers[name] = _Layer(name, m, kind, why=why)
        if rec.kind == "unsupported":
            self._unknown(f"layer {name} ({rec.why})", (x,), {}, y)
            return
        t = type(m)
        nd = _CONV.get(t) or _CONVT.get(t) or _BN.get(t) or _IN.get(t)
        if t is nn.Linear or t is nn.LayerNorm:
            cdim = x.dim() - 1
        elif t in _BN:
            cdim = 1
        else:
            cdim = x.dim() - nd - 1
        lab = self.channel_labels(x, cdim, f"layer {name}")

        def merge(old, new):
            if old is not None:
                self.uf.union_pairs(old, new)
                return old
            return new

        def produce(n):
            if rec.out is None:
                rec.out = self.uf.add(n, len(self.spaces))
                self.spaces.append((name, n))
            return rec.out

        if rec.kind in ("conv", "convt", "linear"):
            rec.inp = merge(rec.inp, lab)
            out = produce(m.out_channels if rec.kind != "linear" else m.out_features)
            self.set(y, _Info(out, _inner(y.shape, cdim)))
        elif rec.kind == "gconv":
            rec.inp = merge(rec.inp, lab)
            out = produce(m.out_channels)
            g, ip, op = m.groups, m.in_channels // m.groups, m.out_channels // m.groups
            for gi in range(g):
                self.uf.union_all(np.concatenate([lab[gi * ip:(gi + 1) * ip], out[gi * op:(gi + 1) * op]]))
            self.set(y, _Info(out, _inner(y.shape, cdim)))
        elif rec.kind == "dw":
            rec.through = merge(rec.through, lab)
            self.set(y, _Info(np.repeat(rec.through, m.out_channels // m.in_channels), _inner(y.shape, cdim)))
        else:  # norm: channels pass through
            info = self.info(x)
            if t is nn.LayerNorm and info is not None and _valid_at(tuple(x.shape), info, cdim) is None:
                self.set(y, info if tuple(y.shape) == tuple(x.shape) else None)  # labels on an unnormalised dim
                return
            rec.through = merge(rec.through, lab)
            self.set(y, _Info(rec.through, _inner(y.shape, cdim)) if tuple(y.shape) == tuple(x.shape) else None)

    def _on_op(self, name: str, args: tuple, kwargs: dict, out) -> None:
        for t in _tensors((args, kwargs)):
            if (owner := self.owner.get(id(t))) is not None:
                self.touched.setdefault(owner, f"its parameters are used directly by {name}")
        ts = _tensors((args, kwargs))
        if not any(self.info(t) is not None for t in ts):
            for t in _tensors(out):
                self.set(t, None)
            return
        if name in _IDENTITY:
            handler = self._identity
        elif name in _POINTWISE or (name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor)):
            handler = self._pointwise
        elif name in _REDUCE:
            handler = self._reduce
        elif name in _SOFTMAX:
            handler = self._softmax
        elif name in _SPATIAL:
            handler = self._spatial
        elif name in _RESHAPE:
            handler = self._reshape
        elif name in _PERMUTE:
            handler = self._permute
        elif name in _EXPAND:
            handler = self._expand
        elif name in _CAT or name == "stack":
            handler = self._cat
        elif name in ("split", "chunk"):
            handler = self._split
        elif name == "__getitem__":
            handler = self._getitem
        else:
            handler = self._unknown
        try:
            handler(name, args, kwargs, out)
        except Exception:  # arguments in a form the handler does not expect: be conservative
            self._unknown(name, args, kwargs, out, f"{name} with arguments the planner does not follow")

    def _unknown(self, name, args, kwargs, out, reason: str | None = None) -> None:
        for t in _tensors((args, kwargs)):
            if (info := self.info(t)) is not None:
                self.block(info.base, reason or f"consumed by {name}, which the planner does not follow")
        for t in _tensors(out):
            self.set(t, None)

    def _identity(self, name, args, kwargs, out) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        info = self.info(x) if x is not None else None
        for t in _tensors(out):
            self.set(t, info if x is not None and t.shape == x.shape else None)

    def _pointwise(self, name, args, kwargs, out) -> None:
        outs = _tensors(out)
        if len(outs) != 1:
            return self._unknown(name, args, kwargs, out)
        y = outs[0]
        ops = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        ops = self._drop_broadcast_single(name, ops, y)
        placed = []
        for t in ops:
            if (info := self.info(t)) is None:
                continue
            loc = _locate(tuple(t.shape), info)
            jo = None if loc is None else loc[0] + y.dim() - t.dim()
            if loc is None or jo < 0 or t.shape[loc[0]] != y.shape[jo]:
                return self._unknown(name, args, kwargs, out, f"{name} broadcasts it across the channel dimension")
            placed.append((jo, loc[1], info))
        jo, r0, info0 = placed[0]
        if any(p[0] != jo for p in placed):
            return self._unknown(name, args, kwargs, out, f"{name} combines channels of different dimensions")
        pos0 = _positions(info0, y.shape[jo], r0)
        for _, r, info in placed[1:]:
            self.uf.union_pairs(pos0, _positions(info, y.shape[jo], r))
        for t in ops:
            k = jo - (y.dim() - t.dim())
            if self.info(t) is None and k >= 0 and t.shape[k] > 1:
                self.block(info0.base, f"{name} combines it with a tensor not traced to a layer (a constant or a "
                                       "free parameter of the channel size)")
        self.set(y, _Info(info0.base, r0 * _inner(y.shape, jo)))

    def _drop_broadcast_single(self, name, ops: list, y: torch.Tensor) -> list:
        """``ops`` without the operands holding the single channel of a 1-channel layer broadcast across the other
        operands' channels (an attention gate ``h * sigmoid(conv_C->1(h))``): such a channel cannot be cut anyway,
        and broadcasting it does not couple the other channels. Its layer is fixed."""
        traced = [t for t in ops if self.info(t) is not None]
        multi = [t for t in traced if len(self.info(t).base) > 1]
        if not multi or len(multi) == len(traced):
            return ops
        loc = _locate(tuple(multi[0].shape), self.info(multi[0]))
        if loc is None:
            return ops
        jo = loc[0] + y.dim() - multi[0].dim()
        keep = []
        for t in ops:
            info = self.info(t)
            k = jo - (y.dim() - t.dim())
            if info is not None and len(info.base) == 1 and (k < 0 or t.shape[k] == 1):
                self.block(info.base, f"a single channel (broadcast by {name})")
                continue
            keep.append(t)
        return keep

    def _reduce(self, name, args, kwargs, out) -> None:
        x = args[0]
        info = self.info(x)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        loc = _locate(tuple(x.shape), info)
        if dim is None or loc is None or not isinstance(dim, (int, tuple, list)):
            return self._unknown(name, args, kwargs, out, f"{name} reduces over the channel dimension")
        dims = _dims(dim, x.dim())
        j, r = loc
        if j in dims:
            return self._unknown(name, args, kwargs, out, f"{name} reduces over the channel dimension")
        for t in _tensors(out):
            jo = j if t.dim() == x.dim() else j - sum(d < j for d in dims)
            ok = 0 <= jo < t.dim() and t.shape[jo] == x.shape[j]
            self.set(t, _Info(info.base, r * _inner(t.shape, jo)) if ok else None)

    def _softmax(self, name, args, kwargs, out) -> None:
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        loc = _locate(tuple(x.shape), self.info(x))
        if dim is None or loc is None or _dims(dim, x.dim())[0] == loc[0]:
            return self._unknown(name, args, kwargs, out, f"{name} normalises over the channel dimension")
        self._identity(name, args, kwargs, out)

    def _spatial(self, name, args, kwargs, out) -> None:
        x = args[0]
        info = self.info(x)
        k = _SPATIAL[name]
        pad = None
        if k < 0:
            k = x.dim() + k
        elif k == 0:  # F.pad
            pad = args[1] if len(args) > 1 else kwargs.get("pad", ())
            k = len(pad) // 2
        loc = _locate(tuple(x.shape), info)
        if loc is not None and pad is not None and loc[0] >= x.dim() - k:
            p = x.dim() - 1 - loc[0]  # F.pad's pairs run from the last dimension: a zero pair leaves it alone
            if pad[2 * p] == 0 and pad[2 * p + 1] == 0:
                k = x.dim() - 1 - loc[0]
        if loc is None or loc[0] >= x.dim() - k:
            return self._unknown(name, args, kwargs, out, f"{name} works over the channel dimension")
        j, r = loc
        for t in _tensors(out):
            ok = t.dim() == x.dim() and t.shape[j] == x.shape[j]
            self.set(t, _Info(info.base, r * _inner(t.shape, j)) if ok else None)

    def _reshape(self, name, args, kwargs, out) -> None:
        info = self.info(args[0])
        outs = _tensors(out)
        if len(outs) != 1 or _locate(tuple(outs[0].shape), info) is None:
            return self._unknown(name, args, kwargs, out, f"{name} splits the channel dimension or mixes it "
                                                          "with another one")
        self.set(outs[0], info)

    def _permute(self, name, args, kwargs, out) -> None:
        x, y = args[0], out
        info = self.info(x)
        loc = _locate(tuple(x.shape), info)
        n = x.dim()
        perm = list(range(n))
        if name == "permute":
            dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
            if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
                dims = dims[0]
            perm = [int(d) % n for d in dims]
        elif name == ".T":
            perm = perm[::-1]
        elif name == ".mT" or (name == "t" and n == 2):
            perm[-2], perm[-1] = perm[-1], perm[-2]
        elif name != "t":
            d0 = args[1] if len(args) > 1 else kwargs.get("dim0")
            d1 = args[2] if len(args) > 2 else kwargs.get("dim1")
            d0, d1 = int(d0) % n, int(d1) % n
            perm[d0], perm[d1] = perm[d1], perm[d0]
        if loc is None or not isinstance(y, torch.Tensor) or sorted(perm) != list(range(n)):
            return self._unknown(name, args, kwargs, out)
        jo = perm.index(loc[0])
        self.set(y, _Info(info.base, loc[1] * _inner(y.shape, jo)))

    def _expand(self, name, args, kwargs, out) -> None:
        x, y = args[0], out
        info = self.info(x)
        loc = _locate(tuple(x.shape), info)
        if loc is None or not isinstance(y, torch.Tensor):
            return self._unknown(name, args, kwargs, out)
        jo = loc[0] + y.dim() - x.dim()
        if y.shape[jo] != x.shape[loc[0]]:
            return self._unknown(name, args, kwargs, out)
        self.set(y, _Info(info.base, loc[1] * _inner(y.shape, jo)))

    def _cat(self, name, args, kwargs, out) -> None:
        ts = list(args[0] if args else kwargs.get("tensors", ()))
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        y = out
        if not isinstance(y, torch.Tensor) or not ts:
            return self._unknown(name, args, kwargs, out)
        dim = int(dim) % y.dim()
        stack = name == "stack"
        locs = []
        for t in ts:
            info = self.info(t)
            # channels found on the concatenated dimension first (a 1-channel operand fits any size-1 dimension)
            loc = None if info is None else _locate(tuple(t.shape), info, None if stack else dim)
            if info is not None and loc is None:
                return self._unknown(name, args, kwargs, out)
            locs.append((t, info, loc))
        if not stack and any(loc is not None and loc[0] == dim for _, _, loc in locs):
            if any(loc is not None and loc[0] != dim for _, _, loc in locs):
                return self._unknown(name, args, kwargs, out, f"{name} mixes channel dimensions")
            parts = [np.zeros(t.shape[dim], np.int64) if info is None else _positions(info, t.shape[dim], loc[1])
                     for t, info, loc in locs]
            self.set(y, _Info(np.concatenate(parts), _inner(y.shape, dim)))
            return
        # along another dimension: the operands' channels are the same channels
        placed = [(t, info, loc) for t, info, loc in locs if info is not None]
        j, r0 = placed[0][2]
        if any(loc[0] != j for _, _, loc in placed):
            return self._unknown(name, args, kwargs, out, f"{name} mixes channel dimensions")
        t0, info0 = placed[0][0], placed[0][1]
        pos0 = _positions(info0, t0.shape[j], r0)
        for t, info, loc in placed[1:]:
            self.uf.union_pairs(pos0, _positions(info, t.shape[j], loc[1]))
        if any(info is None and t.shape[j] > 1 for t, info, _ in locs):
            self.block(info0.base, f"{name} joins it with a tensor not traced to a layer")
        jo = j + 1 if stack and dim <= j else j
        self.set(y, _Info(info0.base, r0 * _inner(y.shape, jo)))

    def _split(self, name, args, kwargs, out) -> None:
        x = args[0]
        info = self.info(x)
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        loc = _locate(tuple(x.shape), info)
        if loc is None or int(dim) % x.dim() == loc[0]:
            return self._unknown(name, args, kwargs, out, f"{name} splits the channel dimension")
        j, r = loc
        for t in _tensors(out):
            self.set(t, _Info(info.base, r * _inner(t.shape, j)) if t.dim() == x.dim() else None)

    def _getitem(self, name, args, kwargs, out) -> None:
        x, idx = args[0], args[1]
        info = self.info(x)
        loc = _locate(tuple(x.shape), info)
        idx = idx if isinstance(idx, tuple) else (idx,)
        simple = all(e is None or e is Ellipsis or isinstance(e, (int, slice)) for e in idx)
        if loc is None or not simple or not isinstance(out, torch.Tensor) or sum(e is Ellipsis for e in idx) > 1:
            return self._unknown(name, args, kwargs, out, "indexed in a way the planner does not follow")
        used = sum(e is not None and e is not Ellipsis for e in idx)
        full = []
        for e in idx:
            full.extend([slice(None)] * (x.dim() - used) if e is Ellipsis else [e])
        j, r = loc
        d_in = d_out = 0
        jo = None
        for e in full:
            if e is None:
                d_out += 1
                continue
            if d_in == j:
                whole = (isinstance(e, slice) and e.start in (None, 0) and e.step in (None, 1)
                         and (e.stop is None or e.stop >= x.shape[j]))
                if not whole:
                    return self._unknown(name, args, kwargs, out, "indexed along the channel dimension")
                jo = d_out
            d_in += 1
            d_out += 0 if isinstance(e, int) else 1
        if jo is None:
            jo = d_out + (j - d_in)
        if not (0 <= jo < out.dim()) or out.shape[jo] != x.shape[j]:
            return self._unknown(name, args, kwargs, out)
        self.set(out, _Info(info.base, r * _inner(out.shape, jo)))


# ------------------------------------------------------------------------------------------------ plan
@dataclass
class ShrinkPlan:
    """Which channels each layer keeps: ``cuts[layer] = {"out": kept output channels or None (all),
    "in": kept input channels or None}`` (norms use "out"). ``report`` is what ``shrink_`` returns.
    ``to_dict`` / ``from_dict`` give a JSON form for :func:`apply_plan`."""

    cuts: dict[str, dict[str, list[int] | None]]
    report: list[dict] = field(default_factory=list)
    _events: list | None = field(default=None, repr=False)  # the trace, to check the shrunk model's shapes
    _kept: np.ndarray | None = field(default=None, repr=False)
    _out_shapes: list | None = field(default=None, repr=False)
    _train_shapes: list | Exception | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"cuts": self.cuts}

    @classmethod
    def from_dict(cls, d: dict) -> ShrinkPlan:
        return cls({k: dict(v) for k, v in d["cuts"].items()})


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    return as_call(example_inputs, "shrink: example_inputs")


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"shrink: model must be an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise ShrinkError(f"shrink: {name or 'the model'} is a TorchScript module; its ops cannot be traced "
                              "(shrink the eager model, script it afterwards)")


def _ignored(model: nn.Module, ignore) -> set[str]:
    if ignore is None:
        return set()
    if callable(ignore) and not isinstance(ignore, nn.Module):
        return {n for n, m in model.named_modules() if ignore(n, m)}
    if isinstance(ignore, (str, nn.Module)):
        ignore = [ignore]
    names = {id(m): n for n, m in model.named_modules()}
    known = dict(model.named_modules())
    out = set()
    for item in ignore:
        if isinstance(item, str):
            if item not in known:
                raise ValueError(f"shrink: ignore names {item!r}, which is not a submodule of the model")
            out.add(item)
        elif isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"shrink: ignore holds a {type(item).__name__} that is not a submodule of the model")
            out.add(names[id(item)])
        else:
            raise TypeError(f"shrink: ignore entries must be names or modules, got {type(item).__name__}")
    # a container's name ignores the layers inside it
    return {n for n in known if any(n == i or n.startswith(i + ".") or i == "" for i in out)}


def _check_args(ratio, scope, importance, min_channels, floor, round_to) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"shrink: ratio must be a number in [0, 1) (the fraction of channels removed), got {ratio!r}")
    if scope not in ("global", "layer"):
        raise ValueError(f"shrink: scope must be 'global' or 'layer', got {scope!r}")
    if not callable(importance) and importance not in ("l1", "l2"):
        raise ValueError(f"shrink: importance must be 'l1', 'l2' or a callable (name, module) -> scores per output "
                         f"channel, got {importance!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise ValueError(f"shrink: min_channels must be an int >= 1, got {min_channels!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise ValueError(f"shrink: floor must be a fraction in [0, 1] (of each layer's channels kept), got {floor!r}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"shrink: round_to must be None or an int >= 1, got {round_to!r}")


def _trace(model: nn.Module, args: tuple, kwargs: dict, labels: bool = True) -> tuple[_Tracer, object]:
    tracer = _Tracer(model, labels)
    try:
        with torch.no_grad(), eval_mode(model):
            out = tracer.run(args, kwargs)
    except ShrinkError:
        raise
    except Exception as e:
        what = ("running the model on example_inputs failed" if labels else
                "after cutting, the model fails on example_inputs (a size the planner cannot follow, e.g. a "
                "hard-coded view/reshape?)")
        raise ShrinkError(f"shrink: {what} ({type(e).__name__}: {e}); the model was not changed") from e
    return tracer, out


def _weight_scores(w: torch.Tensor, dim: int, p: int) -> np.ndarray:
    w = w.detach().float().abs()
    if p == 2:
        w = w * w
    other = [d for d in range(w.dim()) if d != dim]
    return (w.sum(other) if other else w).cpu().double().numpy()


def _element_scores(tracer: _Tracer, importance) -> np.ndarray:
    n = len(tracer.uf.parent)
    s = np.zeros(n)
    p = 1 if importance == "l1" else 2
    for rec in tracer.layers.values():
        m = rec.module
        if rec.kind == "unsupported":
            continue
        if callable(importance):
            if rec.out is None:
                continue
            v = importance(rec.name, m)
            v = torch.as_tensor(v).detach().float().flatten().cpu().double().numpy()
            if v.shape != rec.out.shape or not np.isfinite(v).all():
                raise ValueError(f"shrink: importance({rec.name!r}) must give {len(rec.out)} finite scores (one per "
                                 f"output channel), got shape {tuple(v.shape)}")
            np.add.at(s, rec.out, np.abs(v))
            continue
        if rec.kind in ("conv", "gconv", "linear"):
            np.add.at(s, rec.out, _weight_scores(m.weight, 0, p))
        if rec.kind in ("conv", "linear"):
            np.add.at(s, rec.inp, _weight_scores(m.weight, 1, p))
        if rec.kind == "convt":
            np.add.at(s, rec.out, _weight_scores(m.weight, 1, p))
            np.add.at(s, rec.inp, _weight_scores(m.weight, 0, p))
        if rec.kind == "dw":
            np.add.at(s, np.repeat(rec.through, m.out_channels // m.in_channels), _weight_scores(m.weight, 0, p))
        if rec.kind == "norm" and rec.through is not None and getattr(m, "weight", None) is not None:
            np.add.at(s, rec.through, _weight_scores(m.weight, 0, p))
    return s


def plan_shrink(model: nn.Module, example_inputs, ratio: float, *, scope: str = "layer",
                importance: str | ImportanceFn = "l2", min_channels: int = 1, floor: float = 0.1,
                round_to: int | None = None, ignore=None) -> ShrinkPlan:
    """Trace ``model`` and choose the channels :func:`shrink_` would remove, without changing the model.
    Arguments as :func:`shrink_`."""
    _check_args(ratio, scope, importance, min_channels, floor, round_to)
    _check_model(model)
    args, kwargs = _split_inputs(example_inputs)
    ignored = _ignored(model, ignore)
    tracer, model_out = _trace(model, args, kwargs)
    uf = tracer.uf

    # layers the planner cannot slice safely
    by_param: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if type(m) in _LEAF:
            for t in m._parameters.values():
                if t is not None:
                    by_param.setdefault(id(t), []).append(name)
    for names in by_param.values():
        if len(names) > 1:
            for n in names:
                tracer.touched.setdefault(n, f"shares a parameter with {', '.join(x for x in names if x != n)}")
    for name, rec in tracer.layers.items():
        why = tracer.touched.get(name)
        if why is not None:
            for lab in (rec.out, rec.inp, rec.through):
                if lab is not None:
                    tracer.block(lab, f"layer {name}: {why}")
        if name in ignored:
            lab = rec.out if rec.out is not None else rec.through
            if lab is not None:
                tracer.block(lab, f"layer {name} is ignored")

    n_el = len(uf.parent)
    roots = np.fromiter((uf.find(e) for e in range(n_el)), np.int64, n_el)
    space_of = np.asarray(uf.space, np.int64)
    fixed = roots[0]
    n_sp = len(tracer.spaces)
    sizes = np.array([n for _, n in tracer.spaces], np.int64)

    # groups: spaces joined by any coupling
    sp = _UnionFind()
    sp.parent = list(range(n_sp))
    for e in range(1, n_el):
        if roots[e] != fixed:
            sp.union(int(space_of[e]), int(space_of[roots[e]]))
    gid: dict[int, int] = {}
    group_of = np.array([gid.setdefault(sp.find(s), len(gid)) for s in range(n_sp)], np.int64)
    n_groups = len(gid)

    # units: the prunable connected sets of elements
    members = np.arange(1, n_el)
    free = members[roots[members] != fixed]
    units, unit_idx = np.unique(roots[free], return_inverse=True)
    pair, counts = np.unique(np.stack([unit_idx, space_of[free]], 1), axis=0, return_counts=True)
    unit_spaces: list[list[tuple[int, int]]] = [[] for _ in units]
    for (u, s), c in zip(pair, counts):
        unit_spaces[u].append((int(s), int(c)))
    unit_group = np.array([group_of[us[0][0]] for us in unit_spaces], np.int64)

    escore = _element_scores(tracer, importance)
    if callable(importance) or importance == "l1":
        uscore = np.bincount(unit_idx, weights=escore[free], minlength=len(units))
    else:
        uscore = np.sqrt(np.bincount(unit_idx, weights=escore[free], minlength=len(units)))

    # each group is measured on its widest layer (ref) for the report and round_to; the ratio counts
    # the channels of all its layers (a residual unit removes one channel from each coupled layer)
    ref = np.full(n_groups, -1, np.int64)
    total = np.zeros(n_groups, np.int64)
    for s in range(n_sp):
        g = group_of[s]
        total[g] += sizes[s]
        if ref[g] < 0 or sizes[s] > sizes[ref[g]]:
            ref[g] = s
    keep_min = np.minimum(sizes, np.maximum(min_channels, np.ceil(floor * sizes - 1e-9).astype(np.int64)))
    remaining = sizes.copy()
    removed = np.zeros(len(units), bool)
    cost = np.array([sum(c for _, c in us) for us in unit_spaces], np.int64)
    gone_ch = np.zeros(n_groups, np.int64)

    def try_remove(u: int, budget: float) -> None:
        if gone_ch[unit_group[u]] + cost[u] > budget + 1e-9 or any(remaining[s] - c < keep_min[s]
                                                                    for s, c in unit_spaces[u]):
            return
        for s, c in unit_spaces[u]:
            remaining[s] -= c
        removed[u] = True
        gone_ch[unit_group[u]] += cost[u]

    with_units = np.unique(unit_group)
    if scope == "layer":
        for g in with_units:
            cand = np.flatnonzero(unit_group == g)
            for u in cand[np.argsort(uscore[cand], kind="stable")]:
                try_remove(int(u), ratio * total[g])
    else:
        norm = uscore.copy()
        for g in with_units:
            cand = unit_group == g
            mean = uscore[cand].mean()
            if mean > 0:
                norm[cand] = uscore[cand] / mean
        budget = ratio * total[with_units].sum()
        for u in np.argsort(norm, kind="stable"):
            try_remove(int(u), budget - (gone_ch.sum() - gone_ch[unit_group[u]]))
    if round_to:
        for g in with_units:
            back = np.array([u for u in np.flatnonzero((unit_group == g) & removed)
                             if any(s == ref[g] for s, _ in unit_spaces[u])], np.int64)
            for u in back[np.argsort(-uscore[back], kind="stable")]:
                if remaining[ref[g]] % round_to == 0:
                    break
                removed[u] = False
                gone_ch[g] -= cost[u]
                for s, c in unit_spaces[u]:
                    remaining[s] += c

    gone = np.zeros(n_el, bool)
    gone[free] = removed[unit_idx]
    kept = ~gone

    # cuts
    cuts: dict[str, dict[str, list[int] | None]] = {}

    def idx(mask: np.ndarray | None):
        return None if mask is None or mask.all() else np.flatnonzero(mask).tolist()

    for name, rec in tracer.layers.items():
        if rec.kind == "unsupported":
            continue
        m = rec.module
        out_mask = in_mask = None
        if rec.kind in ("conv", "convt", "linear"):
            out_mask, in_mask = kept[rec.out], kept[rec.inp]
        elif rec.kind == "gconv":
            out_mask = kept[rec.out]
            g = m.groups
            in_mask = np.repeat(out_mask.reshape(g, -1)[:, 0], m.in_channels // g)
        elif rec.kind == "dw":
            in_mask = kept[rec.through]
            out_mask = np.repeat(in_mask, m.out_channels // m.in_channels)
        elif rec.through is not None:
            out_mask = kept[rec.through]
        cut = {"out": idx(out_mask), "in": idx(in_mask)}
        if cut["out"] is not None or cut["in"] is not None:
            cuts[name] = cut

    # report: one row per group of coupled layers
    reasons: list[list[str]] = [[] for _ in range(n_groups)]
    for elems, why in tracer.blocks:
        elems = elems[elems > 0]
        for g in np.unique(group_of[space_of[elems]]) if len(elems) else ():
            if why not in reasons[g]:
                reasons[g].append(why)
    group_layers: list[list[int]] = [[] for _ in range(n_groups)]
    for s in range(n_sp):
        group_layers[group_of[s]].append(s)
    consumers: list[list[str]] = [[] for _ in range(n_groups)]
    for name, rec in tracer.layers.items():
        for lab in (rec.inp, rec.through):
            if lab is not None and (lab > 0).any():
                for g in np.unique(group_of[space_of[lab[lab > 0]]]):
                    if name not in consumers[g] and name not in [tracer.spaces[s][0] for s in group_layers[g]]:
                        consumers[g].append(name)
    report = []
    for g in range(n_groups):
        ss = group_layers[g]
        before, after = int(sizes[ref[g]]), int(remaining[ref[g]])
        prunable = bool((unit_group == g).any())
        report.append({
            "group": g,
            "layers": [tracer.spaces[s][0] for s in ss],
            "coupled": consumers[g],
            "channels_before": before,
            "channels_after": after,
            "per_layer": {tracer.spaces[s][0]: [int(sizes[s]), int(remaining[s])] for s in ss},
            "status": "pruned" if after < before else ("kept" if prunable else "fixed"),
            "reason": "; ".join(reasons[g][:4]) or ("" if prunable else _JOINED_FIXED),
        })
    named = {n for r in report for n in r["layers"] + r["coupled"]}
    for name, m in model.named_modules():  # weighted layers the planner does not cut: reported, not skipped silently
        if name not in named and (why := _not_cut(m)) is not None:
            out = next((getattr(m, a) for a in ("out_channels", "out_features", "num_features", "embedding_dim")
                        if hasattr(m, a)), 0)
            report.append({"group": len(report), "layers": [name], "coupled": [], "channels_before": int(out),
                           "channels_after": int(out), "per_layer": {name: [int(out), int(out)]}, "status": "fixed",
                           "reason": why})
    train_shapes = _train_run(model, args, kwargs) if cuts else None
    return ShrinkPlan(cuts, report, tracer.events, kept, _shapes(model_out), train_shapes)


# ------------------------------------------------------------------------------------------------ cutting
def _param(t: torch.Tensor | None, like: torch.Tensor | None) -> nn.Parameter | None:
    if t is None:
        return None
    t = t.detach().clone()
    if like is not None and like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(
            memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return nn.Parameter(t, requires_grad=like.requires_grad)


def _take(t: torch.Tensor | None, dim: int, idx: list[int] | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device))


def _whole_groups(idx: list[int], per: int, n: int, what: str, name: str) -> list[int]:
    """The groups (of ``per`` consecutive channels, ``n`` groups) that ``idx`` keeps whole."""
    rows = np.asarray(idx, np.int64).reshape(-1, per) if len(idx) % per == 0 else None
    if rows is None or len(rows) == 0 or not (rows == rows[:, :1] + np.arange(per)).all() or (rows[:, 0] % per).any() \
            or rows[-1, 0] // per >= n:
        raise ValueError(f"shrink: the {what} kept for grouped layer {name!r} are not whole groups of {per}")
    return (rows[:, 0] // per).tolist()


def _check_idx(idx, n: int, what: str, name: str) -> None:
    if idx is None:
        return
    if (not isinstance(idx, (list, tuple)) or not idx or any(not isinstance(i, int) for i in idx)
            or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n):
        raise ValueError(f"shrink: the {what} kept for {name!r} must be a non-empty increasing list of ints in "
                         f"[0, {n}), got {str(idx)[:80]}")


def _rebuild(name: str, m: nn.Module, out_idx, in_idx) -> nn.Module:
    """A new stock layer holding the kept slices of ``m``."""
    t = type(m)
    kind, why = _layer_kind(m) if t in _LEAF else ("unsupported", f"{t.__name__} is not a layer shrink can cut")
    if kind == "unsupported":
        raise ValueError(f"shrink: cannot cut {name!r}: {why}")
    w = m.weight
    meta = {"device": "meta", "dtype": w.dtype if w is not None else None}
    if t in _CONV or t in _CONVT or t is nn.Linear:
        n_in = m.in_features if t is nn.Linear else m.in_channels
        n_out = m.out_features if t is nn.Linear else m.out_channels
        _check_idx(out_idx, n_out, "output channels", name)
        _check_idx(in_idx, n_in, "input channels", name)
        new_in = n_in if in_idx is None else len(in_idx)
        new_out = n_out if out_idx is None else len(out_idx)
        bias = _take(m.bias, 0, out_idx)
        if t is nn.Linear:
            new = nn.Linear(new_in, new_out, m.bias is not None, **meta)
            weight = _take(_take(w, 0, out_idx), 1, in_idx)
        elif t in _CONVT:
            new = t(new_in, new_out, m.kernel_size, m.stride, m.padding, m.output_padding, 1, m.bias is not None,
                    m.dilation, m.padding_mode, **meta)
            weight = _take(_take(w, 0, in_idx), 1, out_idx)
        elif m.groups == 1:
            new = t(new_in, new_out, m.kernel_size, m.stride, m.padding, m.dilation, 1, m.bias is not None,
                    m.padding_mode, **meta)
            weight = _take(_take(w, 0, out_idx), 1, in_idx)
        else:
            g = m.groups
            go = _whole_groups(out_idx or list(range(n_out)), n_out // g, g, "output channels", name)
            gi = _whole_groups(in_idx or list(range(n_in)), n_in // g, g, "input channels", name)
            if go != gi:
                raise ValueError(f"shrink: grouped layer {name!r} keeps output groups {go} but input groups {gi}")
            new = t(new_in, new_out, m.kernel_size, m.stride, m.padding, m.dilation, len(go), m.bias is not None,
                    m.padding_mode, **meta)
            weight = _take(w, 0, out_idx)
        new.weight = _param(weight, w)
        new.bias = _param(bias, m.bias)
    else:  # norms: "out" are the kept channels
        n = m.normalized_shape[0] if t is nn.LayerNorm else m.num_features
        _check_idx(out_idx, n, "channels", name)
        if in_idx is not None and in_idx != out_idx:
            raise ValueError(f"shrink: norm layer {name!r} takes one list of channels ('out'), got 'in' too")
        k = n if out_idx is None else len(out_idx)
        extra = {} if m.bias is not None or w is None else {"bias": False}
        if t is nn.LayerNorm:
            new = nn.LayerNorm(k, m.eps, m.elementwise_affine, **extra, **meta)
        else:
            new = t(k, m.eps, m.momentum, m.affine, m.track_running_stats, **extra, **meta)
        new.weight = _param(_take(w, 0, out_idx), w)
        new.bias = _param(_take(m.bias, 0, out_idx), m.bias)
        for b in ("running_mean", "running_var"):
            if getattr(m, b, None) is not None:
                setattr(new, b, _take(m._buffers[b], 0, out_idx).clone())
        if getattr(m, "num_batches_tracked", None) is not None:
            new.num_batches_tracked = m.num_batches_tracked.clone()
    for k in [k for k, v in new.named_parameters()] + [k for k, v in new.named_buffers()]:
        tensor = new.get_parameter(k) if k in new._parameters else new.get_buffer(k)
        if tensor.is_meta:
            raise AssertionError(f"shrink: {name}.{k} was left unset")  # a bug here, not bad input
    new.train(m.training)
    for k, v in m.__dict__.items():  # the user's hooks stay attached
        if k.startswith("_") and "hooks" in k and isinstance(v, dict):
            new.__dict__[k] = v
    return new


def _module_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def _swap(model: nn.Module, new: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``new[name]`` at ``name`` and every alias of the module there; return what was replaced."""
    aliases = _module_names(model)
    old = {}
    for name, module in new.items():
        for alias in aliases[id(model.get_submodule(name))]:
            parent, _, child = alias.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            old[alias] = holder._modules[child]
            holder._modules[child] = module
    return old


def _restore(model: nn.Module, old: dict[str, nn.Module]) -> None:
    for alias, module in old.items():
        parent, _, child = alias.rpartition(".")
        (model.get_submodule(parent) if parent else model)._modules[child] = module


def _shapes(out) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _tensors(out)]


def _predicted(events, kept: np.ndarray) -> list[tuple[str, list[tuple[int, ...]]]]:
    pred = []
    for name, outs in events:
        shapes = []
        for shape, info in outs:
            loc = None if info is None else _locate(shape, info)
            if loc is not None:
                j = loc[0]
                shape = (*shape[:j], shape[j] // len(info.base) * int(kept[info.base].sum()), *shape[j + 1:])
            shapes.append(tuple(shape))
        pred.append((name, shapes))
    return pred


def _verify(model: nn.Module, args: tuple, kwargs: dict, expected_out: list, events, kept,
            train_shapes: list | None) -> None:
    """Run the shrunk model in eval mode (checking every op's shape against the plan when known) and
    in train mode (buffers and RNG restored) if the original ran in train mode: raise ShrinkError
    on any failure."""
    tracer, out = _trace(model, args, kwargs, labels=False)
    if events is not None:
        pred = _predicted(events, kept)
        got = [(n, [s for s, _ in outs]) for n, outs in tracer.events]
        for i, (a, b) in enumerate(zip(pred, got)):
            if a != b:
                raise ShrinkError(f"shrink: after cutting, op #{i} ({b[0]}) gave shapes {b[1]} where the plan expects "
                                  f"{a[1]} ({a[0]}): the forward uses a size the planner cannot follow (e.g. a "
                                  "hard-coded view/reshape); the model was not changed")
        if len(pred) != len(got):
            raise ShrinkError(f"shrink: after cutting, the forward ran {len(got)} ops instead of {len(pred)} "
                              "(shape-dependent control flow?); the model was not changed")
    if _shapes(out) != expected_out:
        raise ShrinkError(f"shrink: after cutting, the model's outputs have shapes {_shapes(out)} instead of "
                          f"{expected_out}; the model was not changed")
    if train_shapes is not None:
        got = _train_run(model, args, kwargs)
        if isinstance(got, Exception):
            raise ShrinkError(f"shrink: after cutting, the model fails in train mode ({type(got).__name__}: {got}); a "
                              "layer that only runs in training may read the cut channels; the model was not "
                              "changed") from got
        if got != train_shapes:
            raise ShrinkError(f"shrink: after cutting, the model's train-mode outputs have shapes {got} instead of "
                              f"{train_shapes}; the model was not changed")


def _train_run(model: nn.Module, args: tuple, kwargs: dict) -> list | Exception:
    """Output shapes of a train-mode forward (no grad; buffers and RNG state restored), or its exception."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in _tensors((args, kwargs)) if t.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(model, train=True):
            return _shapes(model(*args, **kwargs))
    except Exception as e:
        return e
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)


def apply_plan(model: nn.Module, plan: ShrinkPlan | dict, example_inputs=None) -> list[str]:
    """Cut ``model``'s layers as ``plan`` says (in place) and return the names of the layers replaced.

    Use it to rebuild the shrunk shapes on a fresh instance of the architecture (then
    ``load_state_dict``), or to cut another copy of the model the same way. With ``example_inputs``
    the result is run (eval and train mode) and the original layers are put back if it fails.
    All new layers are built before any is swapped in: a bad plan raises with the model unchanged.
    """
    if isinstance(plan, Mapping):
        plan = ShrinkPlan.from_dict(plan)
    _check_model(model)
    expected = events = train_shapes = None
    if example_inputs is not None:
        args, kwargs = _split_inputs(example_inputs)
        if plan._events is None or plan._out_shapes is None:
            with torch.no_grad(), eval_mode(model):
                try:
                    expected = _shapes(model(*args, **kwargs))
                except Exception as e:
                    raise ShrinkError(f"shrink: running the model on example_inputs failed ({type(e).__name__}: "
                                      f"{e}); the model was not changed") from e
            train_shapes = _train_run(model, args, kwargs)
        else:
            events, expected, train_shapes = plan._events, plan._out_shapes, plan._train_shapes
        if isinstance(train_shapes, Exception):
            train_shapes = None  # the original does not run in train mode on these inputs either
    modules = dict(model.named_modules())
    new = {}
    for name, cut in plan.cuts.items():
        if name not in modules:
            raise ValueError(f"shrink: the plan cuts {name!r}, which is not a submodule of this model")
        unknown = set(cut) - {"out", "in"}
        if unknown:
            raise ValueError(f"shrink: the cut for {name!r} has unknown keys {sorted(unknown)} (expected 'out', 'in')")
        new[name] = _rebuild(name, modules[name], cut.get("out"), cut.get("in"))
    old = _swap(model, new)
    if example_inputs is not None:
        try:
            _verify(model, args, kwargs, expected, events, plan._kept, train_shapes)
        except BaseException:
            _restore(model, old)
            raise
    return list(new)


def shrink_(model: nn.Module, example_inputs, ratio: float, *, scope: str = "layer",
            importance: str | ImportanceFn = "l2", min_channels: int = 1, floor: float = 0.1,
            round_to: int | None = None, ignore=None, verify: bool = True) -> list[dict]:
    """Remove the least important channels of ``model`` in place; return one report row per group of
    coupled layers (see the module docstring for what is supported).

    ``example_inputs``: a tensor, a tuple of positional args, a dict of keyword args, or
    ``(args, kwargs)``; the model is run on them (eval mode, no grad) to trace it.
    ``ratio`` in [0, 1): the fraction of channels removed (counted over the layers of a group: a
    residual unit removes one channel from each coupled layer, a grouped-conv unit a whole group),
    from every group of coupled layers (``scope="layer"``: each group loses at most ``ratio`` of its
    channels) or from all prunable groups together (``scope="global"``: the lowest scores of the
    whole model go, each group's scores divided by their mean first, so layers of different weight
    scales compete on the shape of their distribution).
    ``importance``: "l2" / "l1" (summed magnitude of each channel's weights in every layer of its
    group: producer rows, norm scales, consumer columns) or ``fn(name, module) -> scores`` giving
    one score per output channel of each Conv / Linear (higher = keep).
    ``min_channels`` / ``floor``: every layer keeps at least ``max(min_channels, ceil(floor * channels))``.
    ``round_to``: keep a multiple of this many channels per group (where the floor allows).
    ``ignore``: layer names, modules or ``fn(name, module) -> bool``: their output channels (and all
    coupled to them) stay.
    ``verify``: run the shrunk model (eval and train mode) and undo everything if it fails.

    Rows: ``{"group", "layers" (producers), "coupled" (norms / consumers sliced with them),
    "channels_before", "channels_after", "per_layer" {layer: [before, after]}, "status"
    ("pruned" / "kept" / "fixed"), "reason" (why channels are fixed)}``.

    The layers that change are new modules holding new ``nn.Parameter`` objects (``requires_grad``
    as before): create optimizers (and ``accel.distill.FeatureDistiller``) after shrinking.
    """
    plan = plan_shrink(model, example_inputs, ratio, scope=scope, importance=importance, min_channels=min_channels,
                       floor=floor, round_to=round_to, ignore=ignore)
    apply_plan(model, plan, example_inputs if verify and plan.cuts else None)
    return plan.report


#: the reason of a fixed group no block was recorded on: joined to fixed channels through an elementwise op
_JOINED_FIXED = ("joined (elementwise op, concatenation or a shared input) to channels that stay: a fixed layer, "
                 "the model's output, or values the tracer cannot attribute to a layer")


def _not_cut(m: nn.Module) -> str | None:
    """Why shrink leaves the weighted layer ``m`` alone when it is not a layer the planner follows: an accel
    layer (shrink before converting) or a subclass of a stock layer with its own forward; None otherwise."""
    from .modules import QuantConv2d, QuantEmbedding, QuantLinear, SparseConv2d, SparseLinear, SparseQuantLinear

    if isinstance(m, (QuantConv2d, QuantEmbedding, QuantLinear, SparseConv2d, SparseLinear, SparseQuantLinear)):
        return f"{type(m).__name__} is an accel layer: shrink_ before sparsify_ / quantize_"
    for stock in (*_CONV, *_CONVT, nn.Linear):
        if isinstance(m, stock) and type(m) is not stock:
            own = " with its own forward" if type(m).forward is not stock.forward else ""
            return f"{type(m).__name__} subclasses {stock.__name__}{own}: shrink cuts the stock layers only"
    return None


# ------------------------------------------------------------------------------------------------ shapes
def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """The channel counts of every layer shrink can cut (JSON-able), to rebuild a shrunk model's
    shapes on a fresh instance with :func:`resize_` before ``load_state_dict``."""
    out = {}
    for name, m in model.named_modules():
        t = type(m)
        if t in _CONV or t in _CONVT:
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif t is nn.Linear:
            out[name] = {"in": m.in_features, "out": m.out_features}
        elif t is nn.LayerNorm and len(m.normalized_shape) == 1:
            out[name] = {"out": m.normalized_shape[0]}
        elif t in _BN or t in _IN:
            out[name] = {"out": m.num_features}
    return out


def resize_(model: nn.Module, shapes: dict[str, dict[str, int]]) -> list[str]:
    """Give ``model`` (a fresh instance of the original architecture) the channel counts in ``shapes``
    (from :func:`layer_shapes` of a shrunk model), keeping the first channels of each layer, so the
    shrunk model's ``state_dict`` loads into it. Returns the layers replaced."""
    current = layer_shapes(model)
    cuts = {}
    for name, want in shapes.items():
        have = current.get(name)
        if have is None:
            raise ValueError(f"shrink: resize_: {name!r} is not a layer of this model that shrink can cut")
        cut = {}
        for key in ("out", "in"):
            if key not in want:
                continue
            if want[key] > have[key] or want[key] < 1:
                raise ValueError(f"shrink: resize_: {name}.{key} = {want[key]} must be in [1, {have[key]}]")
            if want[key] != have[key]:
                cut[key] = list(range(want[key]))
        if cut:
            cuts[name] = {"out": cut.get("out"), "in": cut.get("in")}
    return apply_plan(model, ShrinkPlan(cuts))


def format_report(rows: list[dict]) -> str:
    """A plain-text table of a :func:`shrink_` report."""
    lines = [f"{'group':>5}  {'channels':>11}  {'status':<7}  layers / reason"]
    for r in rows:
        layers = ", ".join(r["layers"][:4]) + (f" (+{len(r['layers']) - 4})" if len(r["layers"]) > 4 else "")
        lines.append(f"{r['group']:>5}  {r['channels_before']:>4} -> {r['channels_after']:<4}  {r['status']:<7}  "
                     f"{layers}" + (f"  [{r['reason']}]" if r["reason"] else ""))
    return "\n".join(lines)


__all__ = ["ShrinkError", "ShrinkPlan", "apply_plan", "format_report", "layer_shapes", "plan_shrink", "resize_",
           "shrink_"]
