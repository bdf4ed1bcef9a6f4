"""Activation quantization as fused loops: accel's per-token rule compiled by ``torch.compile`` (Inductor's C++
backend), for the ``onednn_cq`` CPU int8 linear engine (``accel.cpu.int8``).

In eager PyTorch, quantizing an activation takes a pass over memory per op (for bf16 input: convert, two
reductions, scale, round-and-offset, narrow to uint8). On the 2-core dev machine (Sapphire Rapids) those passes
cost as much as oneDNN's AMX int8 GEMM itself, so int8 lost to a plain bf16 ``F.linear``. Compiled, the same rule
is two loops over the input (one reduction, one quantizing pass writing uint8): 4096x768 bf16 1.5 ms instead of
4.9, 4096x3072 4.7 ms instead of 35 (one thread each).

The integers are accel's, exactly: the row maxima come from the compiled reduction, the scale and its inverse
are computed eagerly (``qmax / absmax`` correctly rounded: Inductor would multiply by a reciprocal, which is 1 ulp
off for some values and changes ties), and the compiled pass only multiplies, rounds half to even and adds the
zero point. The engine layer checks the outputs against the reference before choosing the engine anyway.

Needs a C++ compiler (Inductor's). Before its first use for a dtype, the compiled code is checked against the
eager steps on rows of many lengths (:data:`CHECK_K`). Where compiling fails or the check finds a difference, the
eager formulation of the same steps runs (same integers, slower) and one logged warning (logger ``accel``) says
why; calls under autocast, a torch-function / dispatch mode, the profiler or functorch take the eager steps too.
``ACCEL_COMPILE=0`` disables compiling, and the engines are then not offered at all (:func:`available`).
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings

import torch

from .. import engines
from . import native

_lock = threading.RLock()
_compiled: dict[str, object] = {}  # name -> its torch.compile wrapper
_failed: list[str] = []  # why compiling is off in this process (empty while it is on)
_verified: set = set()  # dtypes whose compiled code was checked against the eager steps
_compiled_ok: set = set()  # functions whose compiled code has run: a later failure is that call's, not the compiler's
_log = logging.getLogger("accel")


def _row_absmax_eager(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` per row of ``x [M, K]`` in fp32 (NaN propagates, inf stays inf, an all-zero row gives +0)."""
    return x.float().abs().amax(dim=1)


def _quantize_eager(x: torch.Tensor, inv: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``round_half_even(x * inv[:, None]) + zp`` as uint8, for ``|x * inv| <= zp`` (NaN rows: any byte); ``zp`` a
    0-d fp32 tensor (a Python float would be compiled into the code: one graph per value)."""
    return (torch.round(x.float() * inv[:, None]) + zp).to(torch.uint8)


def _scale_bias_eager(y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``y = bias + y * s[:, None]`` in place, in fp32 arithmetic rounded once to ``y``'s dtype: what
    ``torch.addcmul`` gives for half-precision tensors (the product of two half-precision values is exact in fp32,
    so a fused multiply-add rounds the same). In place: a fresh output cost 5.1 ms where this takes 2.5 (a 4096x3072
    bf16 output, dev machine)."""
    return y.copy_((y.float() * s.float()[:, None] + bias.float()).to(y.dtype))


def _scale_eager(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``y *= s[:, None]`` in place, in fp32 arithmetic rounded once to ``y``'s dtype (``Tensor.mul_`` for half
    precision)."""
    return y.copy_((y.float() * s.float()[:, None]).to(y.dtype))


def available() -> bool:
    """Whether compiled quantization may be offered here: not disabled (``ACCEL_COMPILE=0``, read as accel's other
    variables: ``accel.engines.reload_env``), Inductor importable and a C++ compiler on the PATH (``CXX`` or
    ``g++``/``c++``/``clang++``). Compiling itself happens at the first use; a failure there falls back to the
    eager steps."""
    return _available(engines.generation())


@functools.lru_cache(maxsize=4)
def _available(_gen: int) -> bool:
    if (engines.env("ACCEL_COMPILE") or "1").strip() == "0":
        return False
    try:  # imported now, without its import-time deprecation warnings (under -W error they would fail the compile)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch._inductor.compile_fx  # noqa: F401
    except Exception:  # noqa: BLE001 - no Inductor in this build: nothing to compile with
        return False
    return native.compiler() is not None


def _get(name: str, eager):
    fn = _compiled.get(name)
    if fn is None:
        with _lock:
            fn = _compiled.get(name)
            if fn is None:
                fn = _compiled[name] = torch.compile(eager, dynamic=True, fullgraph=True)
    return fn


#: input dtypes compiled (others run the eager steps). Each function has one graph per dtype and dispatch keys of its
#: tensors (see :func:`_run`): 6 for one thread count, within torch.compile's 8 per function; a call needing a graph
#: past that runs the eager steps. Sizes 0 and 1 would get graphs of their own: such inputs run the eager steps too.
COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: row lengths the compiled code is checked on before its first use: vector bodies and tails (Inductor's AVX2
#: reduction, forced by ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU, returned wrong row maxima at K = 16 and 32,
#: torch 2.13)
CHECK_K = (2, 3, 8, 15, 16, 17, 31, 32, 33, 48, 64, 100, 128, 257, 768)


def _fail(why: str) -> None:
    """Compiling is off in this process: one logged warning (not ``warnings.warn``: under ``-W error`` it would fail
    the user's forward, which the eager steps serve correctly)."""
    with _lock:
        if not _failed:
            _failed.append(why)
            _log.warning("accel: compiled activation quantization is off in this process (%s); the *_cq engines run "
                         "their eager steps (same results, slower). ACCEL_COMPILE=0 stops offering them.", why)


def _outside_context() -> bool:
    """A context whose state the compiled code's guards include, or in which it cannot run: autocast, a
    torch-function or dispatch mode (``torch.device(...)``, FlopCounterMode), the profiler, functorch transforms.
    Such calls take the eager steps (each would cost a new graph, or fail)."""
    return (torch.is_autocast_enabled("cpu") or torch._C._is_torch_function_mode_enabled() or
            torch._C._len_torch_dispatch_stack() > 0 or torch._C._autograd._profiler_enabled() or
            torch._C._functorch.maybe_current_level() is not None)


def _verify(dtype: torch.dtype) -> None:
    """Check the compiled steps against the eager ones for ``dtype`` inputs on rows of every length in
    :data:`CHECK_K`, with zero, NaN and inf rows; a mismatch turns the compiled path off (:func:`_fail`). (The
    graphs for other kinds of tensors are the same generated code.)"""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for k in CHECK_K:
            x = (torch.randn(5, k, generator=g) * 3).to(dtype)
            x[1] = 0
            x[2, k // 2] = float("nan")
            x[3, k - 1] = float("inf")
            a, want = _get("absmax", _row_absmax_eager)(x), _row_absmax_eager(x)
            if not torch.equal(a.nan_to_num(-1.0), want.nan_to_num(-1.0)):
                raise _Mismatch(f"wrong row maxima of {dtype} rows of {k}")
            inv = torch.where(want > 0, 127.0 / want, 0.0).nan_to_num(0.0, 0.0, 0.0)
            ok = inv > 0  # (NaN/inf rows' bytes are unspecified)
            zp = _zp(128)
            u, want_u = _get("quantize", _quantize_eager)(x, inv, zp), _quantize_eager(x, inv, zp)
            if not torch.equal(u[ok], want_u[ok]):
                raise _Mismatch(f"wrong integers for {dtype} rows of {k}")
            if dtype == torch.bfloat16:  # (the epilogue compiled for bf16 outputs only)
                y, s, b = x.nan_to_num(0.0, 0.0, 0.0), want.nan_to_num(0.0, 0.0, 0.0).to(dtype), x[0].clone()
                sb, sc = _get("scale_bias", _scale_bias_eager), _get("scale", _scale_eager)
                if not torch.equal(sb(y.clone(), s, b), _scale_bias_eager(y.clone(), s, b)) or \
                        not torch.equal(sc(y.clone(), s), _scale_eager(y.clone(), s)):
                    raise _Mismatch(f"wrong epilogue for {dtype} rows of {k}")


class _Mismatch(Exception):
    pass


def _run(name: str, eager, x: torch.Tensor, *args, internal: bool = True):
    """``eager(x, *args)`` through its compiled code. The compiled code is per dtype and per dispatch keys of the
    tensors passed (inference tensor or not, seen in inference mode or not): an ``internal`` step (its outputs stay
    inside the engine) runs in inference mode, so only ``x``'s kind varies; a step whose output reaches the user runs
    in the caller's mode (its output a normal tensor outside inference mode). Global state (thread count, ...) adds
    graphs too: a call past torch.compile's limit per function takes the eager steps (:data:`COMPILED_DTYPES`)."""
    x = x.detach()  # (the int8 engines compute no gradient)
    if _failed or x.dtype not in COMPILED_DTYPES or x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 2 or \
            not x.is_contiguous() or torch.compiler.is_compiling() or _outside_context():
        return eager(x, *args)  # (inside a user's torch.compile: traced as plain ops)
    try:
        if x.dtype not in _verified:
            with _lock:
                if x.dtype not in _verified:
                    _verify(x.dtype)
                    _verified.add(x.dtype)
        with torch.inference_mode() if internal else torch.no_grad():
            out = _get(name, eager)(x, *args)
        _compiled_ok.add(name)
        return out
    except _Mismatch as e:
        _fail(f"{e}, checked against the eager steps")
    except Exception as e:  # noqa: BLE001 - a compiler problem: the same integers from the eager steps
        if name not in _compiled_ok:  # never compiled: the compiler fails here
            _fail(f"compiling failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        # else: this call's state (a new graph past the recompile limit, ...): eager for this call only
    return eager(x, *args)


def failure() -> str | None:
    """Why compiling failed in this process (the eager steps run instead), or None."""
    return _failed[0] if _failed else None


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """:func:`_row_absmax_eager` of a contiguous ``x [M, K]``, compiled."""
    return _run("absmax", _row_absmax_eager, x)


@functools.lru_cache(maxsize=8)
def _zp(zp: int) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(float(zp))


def quantize(x: torch.Tensor, inv: torch.Tensor, zp: int) -> torch.Tensor:
    """:func:`_quantize_eager` of a contiguous ``x [M, K]`` (uint8 ``[M, K]``), compiled."""
    if not inv.is_inference():  # (one kind of ``inv`` for the compiled code: see _run)
        with torch.inference_mode():
            inv = inv.clone()
    return _run("quantize", _quantize_eager, x, inv, _zp(zp))


def scale_bias(y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = bias + y * s[:, None]`` (or ``y * s[:, None]`` without bias) in place, rounded once to ``y``'s dtype:
    the epilogue of a bf16 int8 linear in one compiled pass. Returns ``y``."""
    if bias is None:
        return _run("scale", _scale_eager, y, s, internal=False)
    return _run("scale_bias", _scale_bias_eager, y, s, bias, internal=False)


def warm(x: torch.Tensor) -> None:
    """Compile (and check) the steps for inputs like ``x`` now, before an engine measurement times them:
    compiling takes seconds, and its worker processes would make the machine look busy."""
    with torch.inference_mode(x.is_inference()):  # (the compiled code is per kind of tensor)
        row_absmax(torch.zeros(2, 8, dtype=x.dtype))
        quantize(torch.zeros(2, 8, dtype=x.dtype), torch.zeros(2, dtype=torch.float32), 128)
