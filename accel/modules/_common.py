"""Helpers shared by the accel modules."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cpu.packcache import cached


def weight_view(sources: tuple[torch.Tensor, ...], dtype: torch.dtype, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The ``.weight`` a converted layer shows to model code: its effective float weight in ``dtype`` (the
    dtype the layer computes and returns), as ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` would hold it.

    Model code reads ``layer.weight.dtype`` / ``.device`` / ``.shape`` (Hugging Face T5, ViT and CLIP do,
    to cast their inputs), so a converted layer must answer, with the right values. The tensor is derived
    (computed on first use and cached against ``sources``, re-derived when they change) and read-only: it
    is an inference tensor, so an in-place write to it raises instead of silently changing nothing.
    Reading it materializes a float copy of the weight for as long as the layer lives."""
    def make():
        with torch.inference_mode():
            return build().to(dtype)

    return cached("weight_view", sources, (dtype,), make)


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal (non-inference) copy of it: a layer built under ``torch.inference_mode`` must
    still train, load state dicts and bump version counters afterwards."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` asks a Linear/Conv2d to compute in for ``x`` (None when off): a
    converted layer follows it as ``nn.Linear`` does (custom ops get no autocast handling of their own)."""
    dev = x.device.type
    if not x.is_floating_point() or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def cast_param(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` for an autocast region: differentiable where it needs a gradient, else cached."""
    if t is None or t.dtype == dtype:
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        return t.to(dtype)
    return cached("autocast_cast", (t,), (dtype,), lambda: t.detach().to(dtype))
