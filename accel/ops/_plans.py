"""A layer's resolved calls (CPU eager inference): what makes a settled layer call cost about its engine.

A layer (``owner``) keeps, per kind of input (dtype, device, rank, features / channels, bucket of rows, image
size and layout, autocast), the function its decided form and engine run, with the derived weight already
fetched. :func:`_settled` finds it (the checks the first call passed stand for the later ones); :func:`_planned`
makes it. Plans are valid while the layer's tensors are the same objects at the same versions and storages,
its settings are unchanged and no engine decision changed (``accel.engines.stamp``). Used by the int8 layers
(``accel.ops.int8``) and the block-sparse layers (``accel.ops.bsr_linear``, ``accel.ops.bsr_conv``).

As the derived-weight cache (``accel.cpu.packcache``), a plan cannot see writes that bypass version counters:
``layer.weight.data = other`` reusing the same storage address, in-place writes through ``.data``
(``p.data.add_(...)``, as some older optimizers update parameters) and in-place writes to inference tensors
(no counter); call ``accel.cpu.int8.clear_cache()`` and :func:`forget_plans` after such edits.
"""

from __future__ import annotations

import math
import weakref

import torch

from .. import engines


class _Plan:
    """One layer's resolved call for one kind of input (dtype, bucket of rows, ...): the form and engine
    decided, the derived weight fetched, and the function that runs them (``any_rank``: it takes the
    layer's input as given, else its 2-D ``[rows, features]`` view). Valid while the layer's tensors are
    the same objects at the same versions and storages, its settings are unchanged and no engine decision
    changed. ``notes``: the decision keys the call used, noted again on every call (``accel.engines.last_key``)."""

    __slots__ = ("fn", "any_rank", "stamp", "tensors", "checks", "settings", "notes")

    def __init__(self, fn, stamp, tensors, settings, notes, any_rank=False):
        self.fn, self.any_rank, self.stamp, self.tensors, self.settings = fn, any_rank, stamp, tensors, settings
        self.notes = {op: k for op, k in notes if k is not None}
        # (tensor, version or None for an inference tensor (no counter), storage): ``t.data = other`` keeps
        # the object and its version
        self.checks = tuple((t, None if t.is_inference() else t._version, t.data_ptr()) for t in tensors
                            if t is not None)

    def valid(self, tensors, settings, stamp) -> bool:
        mine = self.tensors
        if self.stamp != stamp or self.settings != settings or mine[0] is not tensors[0] or \
                mine[1] is not tensors[1] or mine[2] is not tensors[2] or mine[3] is not tensors[3] or \
                (len(mine) > 4 and mine[4] is not tensors[4]):
            return False
        for t, version, ptr in self.checks:
            if (version is not None and t._version != version) or t.data_ptr() != ptr:
                return False
        return True


#: module -> {input kind: _Plan}; weak, so plans die with their layer (and are never pickled or copied)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_plans(owner: object) -> None:
    """Drop ``owner``'s resolved calls (its tensors are being moved or replaced)."""
    _PLANS.pop(owner, None)


def _plan_key(x: torch.Tensor, shape, image: bool) -> tuple:
    """The kind of input a plan serves: everything the module's checks looked at (dtype, device, rank, the
    feature / channel count), the bucket of rows, and for images their size and layout. A plan exists only
    for a kind that passed those checks, so finding one stands for them. (:func:`_settled` computes the
    same key inline.)"""
    autocast = torch.is_autocast_enabled("cpu")  # F.linear / F.conv2d then compute in another dtype
    if image:
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return (x.dtype, x.device, 4, shape[1], engines.m_bucket(shape[0]), shape[2], shape[3], cl, autocast)
    rows = math.prod(shape[:-1]) if len(shape) != 2 else shape[0]
    return (x.dtype, x.device, len(shape), shape[-1], engines.m_bucket(rows), autocast)


_is_compiling = torch.compiler.is_compiling


def _settled(owner, x: torch.Tensor, shape, tensors: tuple, settings: tuple, image: bool = False):
    """``owner``'s valid plan for ``x``'s kind of input (its notes recorded), or None: the fast path of a
    settled layer, which skips the checks a plan already passed. Never under torch.compile or when autograd
    must record the call, never for empty inputs (which take the checked path).

    Written flat (the key and the validity checks inline): between a model's large GEMMs this runs with
    cold caches, where each Python call level costs microseconds (measured: ~60 us per layer call before,
    ~15 us after, next to a bare ``F.linear``)."""
    if owner is None or _is_compiling() or torch.jit.is_tracing():  # first: under torch.compile nothing here is
        return None  # traced (and torch.jit.trace gives sizes as tensors)
    if x.requires_grad and torch.is_grad_enabled():
        return None
    plans = _PLANS.get(owner)
    if not plans or engines.forcing_here():  # (a thread's engines.force is not for the others' plans)
        return None
    stamp = engines.stamp()
    nd = len(shape)
    if image:
        if nd != 4 or not shape[0] or not shape[1] or not shape[2] or not shape[3]:
            return None
        m = shape[0]
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        key = (x.dtype, x.device, 4, shape[1], m if m <= 1 else min(1 << (m - 1).bit_length(), 8192),
               shape[2], shape[3], cl, torch.is_autocast_enabled("cpu"))
    else:
        if not nd:
            return None
        m = shape[0] if nd == 2 else math.prod(shape[:-1])
        if not m or not shape[-1]:
            return None
        key = (x.dtype, x.device, nd, shape[-1], m if m <= 1 else min(1 << (m - 1).bit_length(), 8192),
               torch.is_autocast_enabled("cpu"))
    plan = plans.get(key)
    if plan is None or not plan.valid(tensors, settings, stamp):
        return None
    if plan.notes:
        engines.note_keys(plan.notes)
    return plan


def _planned(owner, key: tuple, tensors: tuple, settings: tuple, ops: tuple[str, ...], resolve) -> _Plan:
    """``owner``'s resolved call for inputs of kind ``key``, made by ``resolve()`` (which returns
    ``(fn, any_rank)``) when missing or stale.

    A settled call then costs a dictionary lookup and identity/version checks before the engine runs,
    instead of the dispatch chain (form, engine, derived-weight cache lookups)."""
    stamp = engines.stamp()  # before deciding: a decision changed meanwhile makes the plan stale at once
    if engines.forcing_here():  # this thread's pinned engines: resolved for this call, shared with no one
        fn, any_rank = resolve()
        return _Plan(fn, stamp, tensors, settings, tuple((op, engines.last_key(op)) for op in ops), any_rank)
    plans = _PLANS.get(owner)
    if plans is None:
        plans = _PLANS[owner] = {}
    plan = plans.get(key)
    if plan is None or not plan.valid(tensors, settings, stamp):
        if plan is not None:  # the layer changed: every kind's plan is stale, and holds the old tensors
            plans.clear()
        undecided = engines.undecided_count()
        fn, any_rank = resolve()
        plan = _Plan(fn, stamp, tensors, settings, tuple((op, engines.last_key(op)) for op in ops), any_rank)
        if engines.undecided_count() == undecided:  # (a call that could not decide its engine runs, unkept)
            plans[key] = plan
    engines.note_keys(plan.notes)
    return plan


def call_linear(plan: _Plan, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """Run a linear layer's plan on ``x [..., K]``: on ``x`` as given where the plan takes any rank and ``x`` is
    contiguous (``F.linear`` on a strided N-D half-precision input rounds differently from the 2-D view), else
    on the 2-D view, reshaped back."""
    if x.dim() == 2 or (plan.any_rank and x.is_contiguous()):
        return plan.fn(x)
    return plan.fn(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], out_features)

