"""Helpers shared by the accel modules."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cpu.packcache import cached


def weight_view(sources: tuple[torch.Tensor, ...], dtype: torch.dtype, build: Callable[[], torch.Tensor],
                training: bool = False) -> torch.Tensor:
    """The ``.weight`` a converted layer shows to model code: its effective float weight in ``dtype`` (the
    dtype the layer computes and returns), as ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` would hold it.

    Model code reads ``layer.weight.dtype`` / ``.device`` / ``.shape`` (Hugging Face T5, ViT and CLIP do,
    to cast their inputs), so a converted layer must answer, with the right values. The tensor is derived
    (computed on first use and cached against ``sources``, re-derived when they change) and read-only: it
    is an inference tensor, so an in-place write to it raises instead of silently changing nothing, and
    assigning ``layer.weight`` raises (:func:`refuse_weight`). Writes that bypass those checks (through
    ``.data``, or inside ``torch.inference_mode``) reach only this cached copy, never the layer: change a
    converted layer through its own tensors (``weight_q``, ``values``) or convert again. Reading it
    materializes a float copy of the weight for as long as the layer lives. Inside ``torch.compile`` /
    ``torch.export`` tracing, and (``training``: the layer is in train mode) in a forward autograd records when
    the sources are trainable (a SparseLinear's values), it is computed in the graph instead (differentiable
    in those sources)."""
    if torch.compiler.is_compiling():  # traced (torch.compile, torch.export): part of the graph, no cache
        return build().to(dtype)
    if training and torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        # a training forward (a decoder tied to a SparseLinear's weight): the weight as a function of the
        # layer's trainable tensors, so gradients reach them (they change every step: nothing to cache)
        return build().to(dtype)

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
    if not x.is_floating_point() or x.dtype == torch.float64:  # autocast leaves fp64 alone
        return None
    try:
        on = torch.is_autocast_enabled(dev)
    except RuntimeError:  # a device autocast does not know (meta, ...): the op's own device check speaks
        return None
    return torch.get_autocast_dtype(dev) if on else None


def cast_param(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` for an autocast region: differentiable where it needs a gradient, else cached."""
    if t is None or t.dtype == dtype:
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        return t.to(dtype)
    return cached("autocast_cast", (t,), (dtype,), lambda: t.detach().to(dtype))


def refuse_weight(module) -> None:
    """Assigning ``layer.weight`` (Hugging Face ``tie_weights`` does) on a converted layer: its ``.weight``
    is derived from the int8 / block-sparse tensors, so a new one would be ignored by the forward."""
    raise AttributeError(f"{type(module).__name__}.weight is derived from the layer's int8 / block-sparse weights and "
                         f"read-only: tie or replace weights before accel.quantize_ / sparsify_, or keep this layer "
                         f"float (filter_fn); save converted models with accel.save")


def state_absent(module, state_dict, prefix: str, missing_keys: list) -> bool:
    """True (and this module's keys recorded as missing) when ``state_dict`` holds none of this module's
    own keys: ``load_state_dict(part, strict=False)`` of another part of the model leaves it untouched,
    as torch's own layers do (with ``strict=True`` torch then raises, listing the missing keys)."""
    own = [prefix + n for n, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
    own.append(prefix + "_extra_state")
    if any(k in state_dict for k in own):
        return False
    missing_keys.extend(own)
    return True


def load_refused(module, state_dict, prefix: str, missing_keys: list, error_msgs: list) -> bool:
    """The start of a validating ``_load_from_state_dict``: True when this module must not load, because
    ``state_dict`` holds none of its keys (:func:`state_absent`) or its incoming state is invalid
    (``module._incoming_error``, recorded in ``error_msgs``). Nothing has been changed either way."""
    if state_absent(module, state_dict, prefix, missing_keys):  # a load of another part of the model
        return True
    why = module._incoming_error(state_dict, prefix)
    if why is None:
        return False
    error_msgs.append(f"{type(module).__name__} {prefix.rstrip('.') or '(root)'}: {why}")
    return True


def same_padding_reason(conv) -> str | None:
    """Why ``conv``'s ``padding='same'`` has no symmetric explicit form (an even dilated kernel pads one
    more on one side), or None (including for explicit / ``'valid'`` padding)."""
    if conv.padding != "same":
        return None
    if any(d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation)):
        return "padding='same' with an even dilated kernel (asymmetric padding); give explicit padding"
    return None


def explicit_padding(conv) -> tuple[int, int]:
    """``conv``'s padding as a pair of ints (``'valid'``: 0; ``'same'``: half the dilated kernel, for the
    convs :func:`same_padding_reason` accepts)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def same_grad(dense, sparse) -> None:
    """``dense`` (the stock layer a block-sparse one converts back to) takes the sparse layer's ``requires_grad``
    per parameter: a frozen layer stays frozen."""
    src = sparse.values if sparse.storage == "sparse" else sparse.weight
    dense.weight.requires_grad_(src.requires_grad)
    if dense.bias is not None:
        dense.bias.requires_grad_(sparse.bias.requires_grad)



def per_component(layer, x: torch.Tensor) -> torch.Tensor:
    """A nested tensor through ``layer`` one component at a time (``nn.TransformerEncoder`` packs a padded batch
    into one, and its layers then call their Linear layers on it), nested again in ``x``'s layout."""
    fwd = type(layer).forward  # (not layer(t): the layer's hooks run once, for the nested call)
    return torch.nested.as_nested_tensor([fwd(layer, t) for t in x.unbind()], layout=x.layout)
