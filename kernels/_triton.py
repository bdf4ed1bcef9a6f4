"""Where the kernels learn how Triton is being run.

`TRITON_INTERPRET=1` must be set before triton is imported: `@triton.jit` reads it when it is
applied. In that mode the kernels run on CPU tensors through Triton's numpy interpreter, which
(triton 3.9) cannot autotune over more than one config, cannot `do_bench`, and computes garbage
for bfloat16 arithmetic and `tl.dot` (triton-lang/triton#11584). The kernels therefore take an
``UPCAST`` constexpr that converts bf16 tiles to fp32 right after loading, set only here.
"""

from __future__ import annotations

import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    HAS_TRITON = False


def pick_configs(configs: list, interpret_config) -> list:
    """All autotune configs on a GPU, the single interpreter-safe one under TRITON_INTERPRET=1
    (the interpreter's autotuner cannot benchmark: "0 active drivers")."""
    return [interpret_config] if INTERPRET else list(configs)


def kernel_for(kernel, config):
    """The autotuned ``kernel``, or its bare jitted function when one ``triton.Config`` is forced."""
    return kernel if config is None else kernel.fn


def config_kwargs(config) -> dict:
    """Launch keyword arguments of a forced ``triton.Config`` (nothing when autotuning)."""
    if config is None:
        return {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def needs_upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles are converted to fp32 after loading when the interpreter runs the kernel."""
    return INTERPRET and dtype == torch.bfloat16


def check_launchable(*tensors: torch.Tensor, what: str) -> None:
    """A Triton launch needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1, all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    (device,) = devices
    if device.type == "cuda":
        return
    if device.type == "cpu" and INTERPRET:
        return
    raise ValueError(
        f"{what}: the Triton kernel needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported), got device {device}"
    )


TORCH_TO_TRITON_PTR = {
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float32: "*fp32",
    torch.int8: "*i8",
    torch.int32: "*i32",
    torch.int64: "*i64",
}
