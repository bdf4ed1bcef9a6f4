"""Model inputs as users have them: ``example_inputs`` is a tuple of positional inputs, a dict (any
Mapping, e.g. a tokenizer's ``BatchEncoding``) of keyword inputs, ``(args, kwargs)``, or a tensor.
One interpretation, used by ``sparsify_``, ``quantize_``, ``calibrate``, ``sensitivity_scan``,
``block_masks(scope="sensitivity")`` and ``shrink_``."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def as_call(example_inputs, what: str = "example_inputs") -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call a model with (see the module docstring)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], (tuple, list)) and \
                isinstance(example_inputs[1], Mapping):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise TypeError(f"{what} must be a tuple of positional inputs, a dict of keyword inputs, (args, kwargs) "
                    f"or a tensor, got {type(example_inputs).__name__}")


def batch_size_of(example_inputs) -> int | None:
    """Dim 0 of the first tensor input (None without tensors)."""
    args, kwargs = as_call(example_inputs)
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def at_batch(example_inputs, batch: int) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)`` with every tensor's dim 0 resized to ``batch`` (rows
    repeated cyclically): the same kind of input at another batch size."""
    args, kwargs = as_call(example_inputs)

    def resize(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] in (batch, 0):
            return t
        return t.index_select(0, torch.arange(batch, device=t.device) % t.shape[0])

    return tuple(resize(a) for a in args), {k: resize(v) for k, v in kwargs.items()}


def loader_batch_call(batch) -> tuple[tuple, dict]:
    """How a calibration batch feeds the model: a dict -> keyword inputs; ``(args, kwargs)``; a
    ``(x, y, ...)`` tuple -> ``x`` (the usual ``(inputs, labels)`` loader); a tensor -> itself."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[0], (tuple, list)) and isinstance(batch[1], Mapping):
            return tuple(batch[0]), dict(batch[1])
        return (batch[0],), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    raise TypeError(f"calibration batches must be tensors, (inputs, labels) tuples, dicts of keyword inputs or "
                    f"(args, kwargs), got {type(batch).__name__}")
