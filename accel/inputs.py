"""Model inputs as users have them: ``example_inputs`` is a tuple of positional inputs, a dict (any
Mapping, e.g. a tokenizer's ``BatchEncoding``) of keyword inputs, ``(args, kwargs)``, or a tensor.
One interpretation, used by ``sparsify_``, ``quantize_``, ``calibrate``, ``sensitivity_scan``,
``block_masks(scope="sensitivity")`` and ``shrink_``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn as nn


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


def _tensor_inputs(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    named = [(f"args[{i}]", a) for i, a in enumerate(args)] + [(repr(k), v) for k, v in kwargs.items()]
    return [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.dim() >= 1]


def detect_batch_size(example_inputs) -> int | None:
    """The batch size of ``example_inputs`` (inputs are batch-first): the dim 0 the batched inputs share.

    The batched inputs are the tensors of 2 or more dims (all tensors if every one is 1-D); one whose dim 0
    is 1 broadcasts and does not count when others are larger. None without tensor inputs; a ValueError
    naming every input's shape when they disagree (e.g. sequence-first inputs beside a ``[B, T]`` mask, or a
    ``[T, T]`` attention bias beside ``[B, T]`` ids)."""
    tensors = _tensor_inputs(*as_call(example_inputs))
    if not tensors:
        return None
    primary = [t for _, t in tensors if t.dim() >= 2] or [t for _, t in tensors]
    sizes = {int(t.shape[0]) for t in primary}
    if len(sizes) > 1:
        sizes.discard(1)
    if len(sizes) != 1:
        shapes = ", ".join(f"{n}: {list(t.shape)}" for n, t in tensors)
        raise ValueError(f"cannot tell the batch size of example_inputs: the batched inputs (2-D or more; 1-D when all "
                         f"are) disagree on dim 0 ({shapes}). batch_sizes resizes dim 0 of the inputs whose dim 0 is the "
                         f"batch size, so it must be one number: give batch-first inputs, or leave batch_sizes unset")
    return sizes.pop()


def batch_size_of(example_inputs) -> int | None:
    """:func:`detect_batch_size`, or None when it cannot be told."""
    try:
        return detect_batch_size(example_inputs)
    except ValueError:
        return None


def at_batch(example_inputs, batch: int) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)`` at another batch size: every tensor whose dim 0 is the batch size
    (:func:`detect_batch_size`) has dim 0 resized to ``batch`` (rows repeated cyclically); the other inputs
    (``[T]`` position ids, ``[heads]`` masks, broadcasting ``[1, ...]`` tensors, non-tensors) are passed as they
    are. Raises ValueError, naming the inputs' shapes, when the batch size cannot be told or is 0."""
    args, kwargs = as_call(example_inputs)
    b0 = detect_batch_size(example_inputs)
    if b0 is None or b0 == batch:
        return tuple(args), dict(kwargs)
    if b0 == 0:
        shapes = ", ".join(f"{n}: {list(t.shape)}" for n, t in _tensor_inputs(args, kwargs))
        raise ValueError(f"example_inputs have batch size 0 ({shapes}): no rows to make batch size {batch} from")

    def resize(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != b0:
            return t
        r = t.index_select(0, torch.arange(batch, device=t.device) % b0)
        if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
            r = r.contiguous(memory_format=torch.channels_last)  # the layout the model is fed (and is decided for)
        return r

    return tuple(resize(a) for a in args), {k: resize(v) for k, v in kwargs.items()}


def resized_inputs(example_inputs, batch: int) -> str:
    """Which inputs :func:`at_batch` resizes for ``batch`` (for error messages)."""
    args, kwargs = as_call(example_inputs)
    b0 = batch_size_of(example_inputs)
    parts = [f"{n} {list(t.shape)}" + (f" -> dim 0 = {batch}" if t.shape[0] == b0 and b0 != batch else " (kept)")
             for n, t in _tensor_inputs(args, kwargs)]
    return ", ".join(parts)


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


@contextlib.contextmanager
def eval_mode(*modules: nn.Module, train: bool | None = False):
    """``m.train(train)`` for each of ``modules`` for the block (``train=None``: left as they are, e.g. to a
    user's ``evaluate`` that sets them), then each as it was: its own ``train(was)`` where its mode changed (so
    a model's ``train()`` undoes what it did; if that raises, as in an inference-only model, the flags are still
    set, and the block's own error is never replaced), then every submodule's own training flag (a frozen
    BatchNorm kept in eval inside a training model stays in eval; ``model.train(was)`` alone would set them all
    to the model's flag)."""
    flags = {id(m): (m, m.training) for root in modules for m in root.modules()}
    try:
        for root in modules if train is not None else ():
            root.train(train)
        yield
    finally:
        for root in modules:
            was = flags[id(root)][1]
            if root.training != was or train is not None:
                with contextlib.suppress(Exception):
                    root.train(was)
        for m, f in flags.values():
            m.training = f


def unnested(t: torch.Tensor) -> torch.Tensor:
    """A layer input as a plain tensor: a nested tensor (``nn.TransformerEncoder`` packs a padded batch into one
    for its Linear layers) as the rows its components hold, ``[rows, features]``, the work those layers do;
    anything else as it is."""
    if not t.is_nested:
        return t
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in t.unbind()])
