"""Where the kernels learn how Triton is being run, and the small helpers every launcher shares.

`TRITON_INTERPRET=1` must be set before triton is imported: `@triton.jit` reads it when it is
applied. In that mode the kernels run on CPU tensors through Triton's numpy interpreter, which
(triton 3.9) cannot autotune over more than one config, cannot `do_bench`, and computes garbage
for bfloat16 arithmetic and `tl.dot` (triton-lang/triton#11584). The kernels therefore take an
``UPCAST`` constexpr that converts bf16 tiles to fp32 right after loading, set only here.

Version range: the kernels must compile with triton 3.6 (the GPU machines: torch 2.11, CUDA 13)
through 3.9 (the development machine). Two rules follow: an integer ``tl.dot`` that is given an
accumulator names ``out_dtype=tl.int32`` (3.6 asserts ``acc.dtype == out_dtype``, whose default is
fp32), and nothing uses block pointers (removed in 3.9) or APIs newer than 3.6.
"""

from __future__ import annotations

import functools
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
    """The autotuned ``kernel``, or its bare jitted function when one ``triton.Config`` is forced
    (heuristics wrappers are kept: they compute constexprs such as ``EVEN_K``)."""
    if config is None:
        return kernel
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def config_kwargs(config) -> dict:
    """Launch keyword arguments of a forced ``triton.Config`` (nothing when autotuning)."""
    if config is None:
        return {}
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def chosen_config(kernel, config):
    """The config a launch ran with: the forced one, or the one the autotuner picked for it."""
    return config if config is not None else kernel.best_config


def needs_upcast(dtype: torch.dtype) -> bool:
    """bf16 tiles are converted to fp32 after loading when the interpreter runs the kernel."""
    return INTERPRET and dtype == torch.bfloat16


def pow2_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (0 stays 0): the autotune key for token counts, so a new
    batch size reuses the tuning of its bucket instead of autotuning again."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def density_bucket(density: float) -> int:
    """Autotune key for block density: 0 for >= 0.375, 1 for >= 0.175, 2 for >= 0.075, 3 below
    (around the 0.5 / 0.25 / 0.1 / 0.05 points the benchmarks sweep)."""
    for i, edge in enumerate((0.375, 0.175, 0.075)):
        if density >= edge:
            return i
    return 3


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.major * 10 + p.minor, p.multi_processor_count


def capability(device: torch.device) -> int:
    """Compute capability as an int (90 for sm_90); 0 for the interpreter's CPU tensors."""
    if device.type != "cuda":
        return 0
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[0]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (persistent grids); 4 for the interpreter."""
    if device.type != "cuda":
        return 4
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[1]


def ensure_allocator() -> None:
    """Device-side tensor descriptors (``tl.make_tensor_descriptor``) need a global scratch buffer
    per launch, allocated through ``triton.set_allocator``; install a torch-backed one if the
    process has none (it allocates on the current stream, so CUDA graph capture works)."""
    if INTERPRET:
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device="cuda", dtype=torch.int8))


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
