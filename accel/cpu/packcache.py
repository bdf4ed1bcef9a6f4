"""Derived weights (packed for an engine, transposed, dequantized, densified) cached against the
tensors they come from.

An entry is keyed by the source tensors' identities and checked against their data pointers,
version counters, dtypes and shapes on every lookup, so a weight replaced, loaded into or changed
in place is re-derived on the next call, in every grad mode. Entries die with their sources
(weak references). Tensors created under ``torch.inference_mode`` carry no version counter: the
modules keep their weights as normal tensors; :func:`clear_cache` covers writes through ``.data``.
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict = {}


def _state(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, tuple(t.shape))


def cached(kind: str, tensors: tuple[torch.Tensor, ...], extra: tuple, build):
    """``build()``, computed once per (``kind``, ``tensors`` in their current state, ``extra``)."""
    key = (kind, tuple(id(t) for t in tensors), extra)
    states = tuple(_state(t) for t in tensors)
    hit = _CACHE.get(key)
    if hit is not None:
        refs, old, value = hit
        if old == states and all(r() is t for r, t in zip(refs, tensors)):
            return value
    value = build()
    refs = tuple(weakref.ref(t, lambda _, key=key, cache=_CACHE: cache.pop(key, None)) for t in tensors)
    _CACHE[key] = (refs, states, value)
    return value


def drop(kind: str, tensors: tuple[torch.Tensor, ...], extra: tuple = ()) -> None:
    """Forget one entry (e.g. a densified weight an engine decision did not keep)."""
    _CACHE.pop((kind, tuple(id(t) for t in tensors), extra), None)


def clear_cache() -> None:
    """Forget every derived weight (needed only after writing a weight through ``.data``), and every
    decision memoized against them (the layers' resolved calls hold derived weights too)."""
    from .. import engines

    _CACHE.clear()
    engines._bump()
