"""Where an op runs: the Triton kernels for CUDA tensors, the PyTorch CPU paths for CPU tensors.

With ``TRITON_INTERPRET=1`` (set before triton is imported) *and* ``ACCEL_FORCE_TRITON=1``, CPU
tensors go through the interpreted Triton kernels instead: that is how the CPU test suite runs
the GPU code path end to end.
"""

from __future__ import annotations

import torch

from ..engines import env

try:
    from .. import kernels
except ImportError:  # triton missing: CPU only, and CUDA inputs raise below
    kernels = None


def use_triton(x: torch.Tensor, what: str) -> bool:
    if x.is_cuda:
        if kernels is None:
            raise RuntimeError(f"{what}: CUDA input but triton is not installed")
        return True
    if env("ACCEL_FORCE_TRITON") == "1":
        if kernels is None or not kernels.INTERPRET:
            raise RuntimeError("ACCEL_FORCE_TRITON=1 on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    if x.device.type != "cpu":
        raise ValueError(f"{what}: unsupported device {x.device} (accel runs on CUDA and CPU)")
    return False


def check_tensors(what: str, required: tuple, optional: tuple = ()) -> None:
    """A TypeError naming the first argument of ``(name, value)`` pairs that is not a tensor (``optional``
    ones may also be None), before anything reads tensor attributes off it."""
    for name, t in required:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    for name, t in optional:
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor or None, got {type(t).__name__}")


def graph_mode() -> bool:
    """Under torch.compile or torch.jit.trace (one opaque node in the graph, and the ops' fake kernels for
    shapes), or inside a torch.func transform (vmap: PyTorch batches the ops by its fallback): calls must go
    through the registered custom ops."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or \
        torch._C._functorch.peek_interpreter_stack() is not None


def not_a_view(y: torch.Tensor) -> torch.Tensor:
    """``y`` as an output autograd may record: a view (a permuted or strided result) detached from its internal
    base, since autograd refuses in-place ops (ReLU(inplace)) on a custom op's or Function's view output."""
    return y.detach() if y._is_view() else y


def eager_function(name: str, forward_impl, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` for eager training that runs ``forward_impl`` (the body of a custom op)
    with the op's own ``setup_context(ctx, inputs, output)`` and ``backward``: the same gradients without
    the custom-op dispatch, which costs ~0.1 ms a call on a CPU (the ops stay for :func:`graph_mode`)."""

    def forward(ctx, *inputs):
        out = not_a_view(forward_impl(*inputs))
        setup_context(ctx, inputs, out)
        ctx.eager = True  # (the custom op's own autograd, also traced with fake tensors, never sets this)
        return out

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def _batched(t: torch.Tensor) -> bool:
    """A vmap-batched (or other functorch-wrapped) tensor: ``is_grads_batched=True``, vectorized jacobians."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or "Batched" in str(torch._C._dispatch_keys(t))


def backward_call(ctx, dy: torch.Tensor, op, impl):
    """What a backward formula calls: the custom op's body directly in an :func:`eager_function`'s backward,
    the op itself in the op's own (traced by torch.compile, export and opcheck with fake tensors), under
    :func:`graph_mode`, for a batched ``dy`` (the bodies run real kernels; PyTorch batches the ops) and when
    the backward is itself recorded (``create_graph=True``: the op's autograd formula then refuses double
    backward in one clear line)."""
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled() and not graph_mode() and not _batched(dy):
        return impl
    return op


def needs_op(*tensors: torch.Tensor | None) -> bool:
    """Whether to call the registered custom op rather than its implementation directly: under
    torch.compile (so the graph holds one opaque node) and when autograd must record the call.
    Eager inference skips the op dispatch, which costs ~0.1 ms a call on CPU."""
    if graph_mode():  # (torch.jit.trace records the op as one node)
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_out_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``nn.Conv2d`` gives its output for input ``x``: channels_last for a channels_last
    input, else contiguous NCHW (so model code may ``.view()`` it, as it can an ``nn.Conv2d`` output).
    A tensor that is both (C = 1, or 1x1 images) counts as NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


_NCHW_COPY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # (accel.cpu.native.to_nchw)


def as_conv_output(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in :func:`conv_out_format` of ``x`` (a copy only when the engine produced the other layout; a large
    channels_last fp32/bf16/fp16 CPU output in a plain eager call (:func:`_plain_eager`) goes to NCHW by accel's
    native transposing copy)."""
    fmt = conv_out_format(x)
    if y.numel() == 0 and y.dim() == 4:  # (an empty tensor counts as contiguous in every format: give it the strides
        return y.as_strided(y.shape, torch.empty(y.shape, memory_format=fmt, device="meta").stride())  # nn.Conv2d's)
    if y.is_contiguous(memory_format=fmt):
        return y
    if (fmt == torch.contiguous_format and _plain_eager(y) and y.device.type == "cpu" and y.dtype in _NCHW_COPY_DTYPES
            and y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)):
        from ..cpu import native

        out = native.to_nchw(y)
        if out is not None:
            return out
    return y.contiguous(memory_format=fmt)


def _plain_eager(y: torch.Tensor) -> bool:
    """Whether ``y`` is a plain tensor in a plain eager call, so a native kernel may write a copy of it through raw
    pointers: no autograd history or forward-mode tangent, no tracing or compiling (which would record the empty
    output and not the write), no functorch wrapper or tensor subclass."""
    return (type(y) is torch.Tensor and not y.requires_grad and not torch.jit.is_tracing() and
            not torch.compiler.is_compiling() and torch.autograd.forward_ad._current_level < 0 and
            not torch._C._functorch.is_functorch_wrapped_tensor(y))
