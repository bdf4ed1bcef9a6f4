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


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function: a few microseconds a call)."""
    return -(-a // b)


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


# ---------------------------------------------------------------------------------------------
# Launching: one entry point for every kernel launch, with a direct path for repeated launches
# ---------------------------------------------------------------------------------------------
#: Launch each specialisation's compiled binary directly after its first launch (GPU only; see
#: :func:`launch`). ``ACCEL_TRITON_DIRECT=0`` turns it off (every launch through Triton's own path).
DIRECT = os.environ.get("ACCEL_TRITON_DIRECT", "1") != "0"
#: tests only: under the interpreter, remember launches as if they had compiled binaries
#: (:class:`_InterpretedBinary` re-enters the interpreter by argument position), so the direct path's
#: grids, configs and keys are exercised on a CPU
INTERPRET_AS_BINARY = False

#: key -> the launches remembered under it (one per set of heuristic results)
_direct: dict = {}
#: a value the key cannot hold: such a launch always goes through Triton
_UNKEYED = object()


@functools.lru_cache(maxsize=None)
def _kernel_info(kernel) -> tuple:
    """``(jit function, heuristics in the order Triton applies them, constexpr parameter names,
    autotune key names, autotuned, rememberable)`` of a launchable: ``@triton.jit`` under optional
    ``@triton.autotune`` / ``@triton.heuristics`` wrappers. An autotuner below a heuristics wrapper
    is not remembered (its config could not be read back for the key)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    heuristics, fn, rememberable = {}, kernel, True
    while isinstance(fn, (Autotuner, Heuristics)):
        if isinstance(fn, Heuristics):
            heuristics.update(fn.values)
        elif fn is not kernel:
            rememberable = False
        fn = fn.fn
    autotuned = isinstance(kernel, Autotuner)
    return fn, heuristics, _constexpr_names(fn), frozenset(kernel.keys if autotuned else ()), autotuned, rememberable


def _constexpr_names(jit_fn) -> frozenset:
    params = getattr(jit_fn, "params", None)
    if params is not None:
        return frozenset(p.name for p in params if p.is_constexpr)
    import inspect  # interpreted functions: the annotations say it

    return frozenset(n for n, p in inspect.signature(jit_fn.fn).parameters.items() if "constexpr" in str(p.annotation))


def _tuned_config(autotuner, args: dict):
    """The config the autotuner holds for ``args`` (its own key: the key arguments' values, then the
    dtypes of the tensor arguments in order; a one-config autotuner runs that one), None if none."""
    if len(autotuner.configs) == 1:
        return autotuner.configs[0]
    key = [args[k] for k in autotuner.keys if k in args]
    key += [str(v.dtype) for v in args.values() if hasattr(v, "dtype")]
    return autotuner.cache.get(tuple(key))


def _heuristic_values(heuristics: dict, args: dict, base: dict) -> dict:
    """The heuristics' results, as ``triton.heuristics`` computes them: each sees the arguments, the
    config's keyword arguments (``num_warps``... included) and the earlier heuristics' results."""
    if not heuristics:
        return {}
    meta = {**args, **base}
    for k, f in heuristics.items():
        meta[k] = f(meta)
    return {k: meta[k] for k in heuristics}


class _Direct:
    """A remembered launch: the compiled binary, the kernel's parameter order, the config it ran, ``base``
    (the options and the config's keyword arguments: what the heuristics and the grid see of it, and the
    meta-parameters' values) and the heuristics' results it was compiled with."""

    __slots__ = ("binary", "names", "config", "base", "heuristic_values")

    def __init__(self, binary, names, config, base, heuristic_values):
        self.binary, self.names, self.config, self.base, self.heuristic_values = binary, names, config, base, heuristic_values


class _InterpretedBinary:
    """Tests only: stands in for a compiled binary under the interpreter, launching the jitted
    function with the positional values :func:`launch` passes a binary (constexprs included)."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self.launches = 0

    def __getitem__(self, grid):
        def run(*values):
            self.launches += 1
            self.jit_fn[grid](**dict(zip(self.jit_fn.arg_names, values)))
        return run


def _config_key(config):
    if config is None:
        return None
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages,
            getattr(config, "num_ctas", 1), getattr(config, "maxnreg", None))


_PLAIN = (bool, int, float, str)
_Tensor = torch.Tensor


def _launch_key(jit_fn, config, args: dict, options: dict, by_value: frozenset):
    """The direct-launch key of a call, None when a value cannot be keyed. A constexpr or autotune-key
    argument is keyed by its typed value (Triton compiles ``True`` and ``1`` apart); a runtime argument
    by what Triton's launch-time specialisation sees of it, or finer: a tensor's dtype and 16-byte
    alignment, an int's ``== 1``, divisibility by 16 and 32/64-bit range, a float (always fp32), a
    bool or None itself. Written out inline: it runs on every launch."""
    parts = []
    append = parts.append
    for k, v in args.items():
        t = v.__class__
        if k in by_value:
            if v is None or t in _PLAIN or t is torch.dtype:
                append((t, v))
            else:
                return None
        elif t is _Tensor or isinstance(v, _Tensor):
            append((v.dtype, not v.data_ptr() & 15))
        elif t is int:  # == 1 / divisible by 16 / i32 range / u64 range, as one small int
            append((v == 1) | ((not v & 15) << 1) | ((-(2**31) <= v < 2**31) << 2) | ((v >= 2**63) << 3))
        elif t is bool or v is None:
            append((t, v))
        elif t is float:
            append(float)
        else:
            return None
    device = None if INTERPRET else torch.cuda.current_device()
    return (id(jit_fn), _config_key(config), tuple(sorted(options.items())) if options else (), tuple(args),
            tuple(parts), device)


def launch(kernel, grid, args: dict, config=None, **options):
    """Launch ``kernel`` (autotuned, heuristics-wrapped or plain ``@triton.jit``) on ``grid`` (a tuple, or
    a function of the launch's meta-parameters) with the keyword arguments ``args``; ``config`` forces a
    ``triton.Config`` instead of autotuning; ``options`` (``num_warps``...) go to a plain kernel.
    Returns the config the launch ran with (None for a plain kernel).

    On a GPU the first launch of each specialisation goes through Triton (autotuning, compiling), and
    its compiled binary is remembered with the config it ran. A later launch with the same
    specialisation calls the binary directly with every parameter by position, as Triton's launcher
    does: the same dtypes, 16-byte alignments and integer classes (``== 1``, divisible by 16,
    32/64-bit) that Triton specialises on, the same (typed) values of the constexprs and of the
    autotuner's key, the same current device, and the same heuristic results (recomputed every call).
    That skips the autotuner's and the JIT's per-call argument binding: on an H200 machine a bare
    Triton launch took 14 us of host time, the int8 GEMM's two launches 219 us. Not carried over to a
    direct launch: Triton's debug knobs changed after the first launch, and its check that the
    kernel's global variables have not changed (the kernels read none)."""
    jit_fn, heuristics, constexprs, tune_keys, autotuned, rememberable = _kernel_info(kernel)
    key = None
    if DIRECT and rememberable and (not INTERPRET or INTERPRET_AS_BINARY):
        key = _launch_key(jit_fn, config, args, options, constexprs | tune_keys if config is None else constexprs)
        for entry in _direct.get(key, ()) if key is not None else ():
            values = _heuristic_values(heuristics, args, entry.base)
            if values == entry.heuristic_values:
                meta = {**args, **entry.base, **values}
                g = grid(meta) if callable(grid) else grid
                entry.binary[tuple(g) + (1,) * (3 - len(g))](*[meta[n] for n in entry.names])
                return entry.config
    ran = kernel_for(kernel, config)[grid](**args, **config_kwargs(config), **options)
    tuned = autotuned and config is None
    # the autotuner's config for this key, read from its cache (its best_config attribute is shared)
    cfg = _tuned_config(kernel, args) if tuned else config
    if key is not None and not (tuned and cfg is None):
        # what Triton's launch returned: the CompiledKernel it ran (anything else is not remembered)
        binary = _InterpretedBinary(jit_fn) if INTERPRET else (ran if hasattr(ran, "packed_metadata") else None)
        base = {**options, **(cfg.all_kwargs() if cfg is not None else {})}
        values = _heuristic_values(heuristics, args, base)
        entry = _Direct(binary, tuple(jit_fn.arg_names), cfg, base, values)
        # every parameter needs a value to pass (none of the kernels leaves one to its default)
        if binary is not None and all(n in args or n in base or n in values for n in entry.names):
            entries = _direct.setdefault(key, [])
            if all(e.heuristic_values != values for e in entries):
                entries.append(entry)
    return cfg if cfg is not None or not tuned else chosen_config(kernel, None)


def bind(kernel, *positional, **named) -> dict:
    """Keyword arguments of a launch of ``kernel`` from arguments given in the kernel's parameter order
    (the form :func:`launch` takes)."""
    names = _kernel_info(kernel)[0].arg_names
    if len(positional) > len(names):
        raise TypeError(f"{names[0]}...: {len(positional)} positional arguments for {len(names)} parameters")
    return {**dict(zip(names, positional)), **named}


def clear_direct() -> None:
    """Forget every remembered launch (tests; the binaries stay in Triton's own caches)."""
    _direct.clear()
