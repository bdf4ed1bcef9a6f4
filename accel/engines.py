"""Engines: every machine-dependent choice of accel, made on the machine that runs it.

An *op* (int8 linear, weight-only int8 linear, int8 conv2d, block-sparse linear, and the
per-layer "form" of the ``auto`` modules) has candidate implementations, *engines* (FBGEMM,
oneDNN, ``torch._int_mm``, dense float, ...). Which one is fastest depends on the CPU (AVX2 /
AVX-512 / VNNI / AMX), the thread count, the torch version and the shape, so nothing here is a
constant measured on one box: the first call of an op at a new *key* (op, shape, M bucket, dtype,
...) times every candidate on the real input, side by side and interleaved, and the winner is
cached in memory and on disk for this machine.

Measurement (:func:`measure`) is built to give the same answer on a noisy shared machine:

* every round runs each candidate once, in a shuffled order; a candidate's figure is the
  **minimum** over rounds (contention only ever adds time);
* a candidate whose first call is more than :data:`TOO_SLOW` times the fastest first call is
  dropped without timing (``torch._int_mm`` on CPUs without VNNI is a reference loop);
* a candidate must beat the incumbent (the op's documented default) by :data:`MARGIN`, so a close
  call keeps the same answer on every run; close calls get extra rounds between the two;
* candidates are checked against a reference output first: one that is wrong (below
  ``min_sqnr`` dB against the reference, or raises) is never chosen, and the reason is recorded;
  a call whose reference output holds NaN/inf (its input does) decides nothing: it runs the default
  and the next call measures; measurements run with autocast off (the key names the dtypes);
* on a busy machine the timings decide nothing (a multi-threaded op whose threads lose their CPUs
  runs anywhere from 1x to 100x its quiet time, round to round): the incumbent is kept and the key
  is flagged ``contended``. It is measured again by the next process, and in this one by the first
  call for it at least :data:`RETRY_S` seconds later on a quiet machine. Busy means the
  load average is above the threads accel uses, or accel's threads waited for a CPU (Linux
  scheduler statistics, seen at once) for :data:`CONTENDED_WAIT` of the measurement.

Cache: ``$ACCEL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/accel`` or ``~/.cache/accel``), one JSON
file per machine fingerprint (CPU model and ISA flags, torch version, threads, oneDNN / ATen ISA
caps, accel's engine version and native kernel sources). Writes take an ``flock`` and merge, then replace the file
atomically, so concurrent processes are safe. A malformed file (not JSON, wrong structure) or
entry is ignored with one :class:`EngineCacheWarning` naming the file, and rewritten on the next
save. ``ACCEL_ENGINE_CACHE=0`` keeps decisions in memory only; ``ACCEL_ENGINE_MEASURE=0`` never
measures (the defaults are used and reported as such).

Forcing: ``ACCEL_ENGINE="int8_linear=onednn,bsr_linear=dense"`` (or :func:`force` in code) pins
an op's engine. Entries are checked against the ops and engines accel knows (:func:`known_ops`;
:func:`register_op` adds one): an unknown op or engine raises :class:`ConfigError` at the first call
that reads the variable. A known engine that cannot run a call raises :class:`ForcedEngineError`
rather than silently running something else (also inside an ``auto`` layer's measurement).
``accel engines`` prints this machine's description, the forced engines and every decision with
its measured times.

ISA: :func:`cpu_isa` is accel's view of the CPU (``avx2``, ``avx512``, ``avx512_vnni``, ``amx``);
``ACCEL_CPU_ISA`` caps it, and ``ONEDNN_MAX_CPU_ISA`` caps what oneDNN uses, so every
ISA-dependent branch runs on any machine that has at least that ISA.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import random
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

#: bump when candidates or keys change meaning, so old cache files are not reused
ENGINE_VERSION = 9
#: a challenger must be this much faster than the incumbent (default) engine to replace it
MARGIN = 0.05
#: two best candidates closer than this get extra rounds between them
CLOSE = 0.10
#: candidates slower than this times the fastest first call are dropped unmeasured
TOO_SLOW = 8.0
#: ... and slower than this in absolute terms (a loaded machine can slow one first call down 10x)
TOO_SLOW_ABS_S = 0.05
#: default time budget of one measurement, seconds (at least MIN_ROUNDS rounds are run anyway)
BUDGET_S = 0.25
MIN_ROUNDS = 5
MAX_ROUNDS = 40

ISA_LEVELS = ("default", "avx2", "avx512", "avx512_vnni", "amx")


class ConfigError(ValueError):
    """A bad value of one of accel's environment variables (``ACCEL_ENGINE``, ``ACCEL_CPU_ISA``, ...) or of
    :func:`force`: raised at the first call that reads it, naming the bad entry and what is valid."""


class ForcedEngineError(ValueError):
    """The engine forced for an op cannot run this call. Never taken for a candidate that merely failed:
    it propagates out of a measurement (an ``auto`` layer does not quietly run another form)."""


class EngineCacheWarning(UserWarning):
    """An engine cache file (or an entry of it) is malformed and was ignored; it is rewritten on the next save."""

# ------------------------------------------------------------------------------------------------ environment
#: environment variables accel reads; they are read once (as oneDNN and ATen read theirs) and again
#: on :func:`reload_env`, so the per-call cost of a decision is a dictionary lookup
ENV_VARS = ("ACCEL_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ACCEL_CPU_ACT_QMAX",
            "ACCEL_ENGINE", "ACCEL_CACHE_DIR", "XDG_CACHE_HOME", "ACCEL_ENGINE_CACHE", "ACCEL_ENGINE_MEASURE",
            "ACCEL_FORCE_TRITON", "ACCEL_COMPILE")
_env_snapshot: dict[str, str | None] | None = None
_generation = 0
_stamp = 0  # bumped whenever any decision may change: callers may memoize choose() results against it


def stamp() -> int:
    """A counter that changes whenever a :func:`choose` result may change (new decision, cache cleared,
    environment reloaded, forcing entered or left, a busy-machine decision due to be measured again):
    memoize per-call choices against it."""
    if _retry_at != math.inf and _retry_at <= time.monotonic():  # a busy-machine decision is due: memos ask again
        _retry_due()
    return _stamp


#: a decision made on a busy machine is measured again by the first call for its key at least this many
#: seconds later, if the machine is quiet then (else it waits as long again)
RETRY_S = 60.0
_retry_at = math.inf  # monotonic time at which the earliest such decision of this process is due
_made_at: dict[str, float] = {}  # key -> monotonic time its busy-machine decision was made (or last postponed)


_retry_lock = threading.Lock()  # _retry_at and _made_at change from any thread's layer call


def _retry_due() -> None:
    global _retry_at
    with _retry_lock:
        now = time.monotonic()  # the busy-machine decisions not yet due keep their turn
        _retry_at = min((t + RETRY_S for t in tuple(_made_at.values()) if t + RETRY_S > now), default=math.inf)
    _bump()


def _schedule_retry(key: str) -> None:
    global _retry_at
    with _retry_lock:
        now = time.monotonic()
        _made_at[key] = now
        _retry_at = min(_retry_at, now + RETRY_S)


#: counts the calls that ran a default without deciding (:class:`Undecidable`): a memo or plan made across one
#: is not kept, so the next call decides (see :func:`undecided_count`)
_undecided = 0


def undecided_count() -> int:
    """Read before resolving a call and compare after: a change means some choice in between was not decided
    (its input held NaN/inf), so what was resolved must not be memoized."""
    return _undecided


def _measure_again(key: str, dec: "Decision") -> bool:
    """Whether ``key``'s busy-machine decision should be measured again now: it is due, and the machine is
    quiet (else it is postponed by :data:`RETRY_S`)."""
    made = _made_at.get(key)
    if not dec.contended or made is None or time.monotonic() - made < RETRY_S:
        return False
    if _contended():
        _schedule_retry(key)
        return False
    return True


def _bump() -> None:
    global _stamp
    _stamp += 1


def reload_env() -> None:
    """Read accel's environment variables again (after changing them in this process)."""
    global _env_snapshot, _generation
    _env_snapshot = {k: os.environ.get(k) for k in ENV_VARS}
    _generation += 1
    _bump()
    if "_CACHE" in globals():  # decisions belong to the machine the old variables described
        _CACHE.clear()


def env(name: str) -> str | None:
    """The value of one of :data:`ENV_VARS` as last read (see :func:`reload_env`)."""
    return _env(name)


def _env(name: str) -> str | None:
    if _env_snapshot is None:
        reload_env()
    return _env_snapshot[name]


def generation() -> int:
    """Changes whenever :func:`reload_env` runs: derived values cached on it are recomputed."""
    if _env_snapshot is None:
        reload_env()
    return _generation


# ------------------------------------------------------------------------------------------------ the machine
@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's flags in ``/proc/cpuinfo``, read once per process (op dispatch asks on every call; the file is
    long on a many-core machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _hardware_isa() -> str:
    """The highest ISA level of :data:`ISA_LEVELS` this CPU has (what torch reports, not capped)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_vnni_supported", lambda: False)():
        return "avx512_vnni"
    if getattr(cpu, "_is_avx512_supported", lambda: False)():
        return "avx512"
    if getattr(cpu, "_is_avx2_supported", lambda: False)():
        return "avx2"
    return "default"


def _cap(level: str, cap: str | None) -> str:
    if cap is None:
        return level
    return ISA_LEVELS[min(ISA_LEVELS.index(level), ISA_LEVELS.index(cap))]


def _env_isa_cap() -> str | None:
    env = _env("ACCEL_CPU_ISA")
    if env is None or env == "":
        return None
    env = env.lower()
    if env not in ISA_LEVELS:
        raise ConfigError(f"ACCEL_CPU_ISA must be one of {ISA_LEVELS}, got {env!r}")
    return env


def _onednn_cap() -> str | None:
    """The ISA cap ``ONEDNN_MAX_CPU_ISA`` puts on oneDNN, in accel's levels (None: no cap)."""
    env = _env("ONEDNN_MAX_CPU_ISA") or _env("DNNL_MAX_CPU_ISA")
    if not env:
        return None
    env = env.upper()
    if "AMX" in env or env == "ALL":
        return None if env == "ALL" else "amx"
    if "VNNI" in env and "AVX512" in env:
        return "avx512_vnni"
    if "AVX512" in env:
        return "avx512"
    if "AVX2" in env:  # AVX2_VNNI has VNNI-class int8 dot products but 256-bit: no saturation either
        return "avx512_vnni" if "VNNI" in env else "avx2"
    return "default"


def cpu_isa() -> str:
    """accel's view of the CPU: the hardware level capped by ``ACCEL_CPU_ISA``."""
    return _cpu_isa(generation())


@functools.lru_cache(maxsize=8)
def _cpu_isa(_gen: int) -> str:
    return _cap(_hardware_isa(), _env_isa_cap())


def onednn_isa() -> str:
    """What oneDNN runs with: :func:`cpu_isa` further capped by ``ONEDNN_MAX_CPU_ISA``."""
    return _onednn_isa(generation())


@functools.lru_cache(maxsize=8)
def _onednn_isa(_gen: int) -> str:
    return _cap(cpu_isa(), _onednn_cap())


def has_vnni(level: str | None = None) -> bool:
    """Whether int8 dot products accumulate without int16 saturation at ``level`` (VNNI or AMX)."""
    level = cpu_isa() if level is None else level
    return ISA_LEVELS.index(level) >= ISA_LEVELS.index("avx512_vnni")


def native_act_qmax() -> int:
    """The activation qmax the CPU int8 engines run natively: 127 with VNNI/AMX, 63 without (the
    int16 saturation of ``vpmaddubsw``; see ``accel.cpu.int8``). ``ACCEL_CPU_ACT_QMAX`` overrides."""
    return _native_act_qmax(generation())


@functools.lru_cache(maxsize=8)
def _native_act_qmax(_gen: int) -> int:
    env = _env("ACCEL_CPU_ACT_QMAX")
    if env:
        if env not in ("63", "127"):
            raise ConfigError(f"ACCEL_CPU_ACT_QMAX must be 63 or 127, got {env!r}")
        return int(env)
    return 127 if has_vnni() else 63


def machine() -> dict:
    """What the decisions depend on; stored in every cache file and result JSON."""
    flags = _cpu_flags()
    keep = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or f in ("sse4_2",))
    return {
        "cpu": _cpu_model(),
        "cpu_flags": keep,
        "hardware_isa": _hardware_isa(),
        "accel_isa": cpu_isa(),
        "onednn_isa": onednn_isa(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "engine_version": ENGINE_VERSION,
        "native_kernels": _native_sources(),
    }


@functools.cache
def _native_sources() -> str:
    """A short hash of accel's native kernel sources (``accel/cpu/csrc``): a changed kernel runs at another speed, so
    the decisions measured with the old one are not reused."""
    h = hashlib.sha1()
    folder = os.path.join(os.path.dirname(__file__), "cpu", "csrc")
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return ""
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
        except OSError:
            continue
    return h.hexdigest()[:12]


def _fingerprint_inputs() -> tuple:
    return (generation(), torch.get_num_threads())


@functools.lru_cache(maxsize=16)
def _fingerprint(_inputs: tuple) -> str:
    return hashlib.sha1(json.dumps(machine(), sort_keys=True).encode()).hexdigest()[:12]


def fingerprint() -> str:
    """A short hash of :func:`machine` (memoized on the environment variables and threads it reads)."""
    return _fingerprint(_fingerprint_inputs())


# ------------------------------------------------------------------------------------------------ ops
_BSR_STRATEGIES = ("gather_bmm", "gather_bmm_t", "panels", "rows", "mkl")  # accel.cpu.bsr.STRATEGIES
#: every op that makes engine decisions, and every engine it may choose on some machine for some call: what
#: ``ACCEL_ENGINE`` and :func:`force` are checked against. One table here (the op modules import this one, not
#: the reverse); tests/test_engines.py checks it against the op names in the source and the engine names the
#: op modules define, so it cannot drift. Code outside accel adds its own ops with :func:`register_op`.
_OPS: dict[str, tuple[str, ...]] = {
    "int8_linear": ("fbgemm", "onednn", "int_mm", "fbgemm_split", "onednn_split", "onednn_cq", "amx_tiles",
                    "vnni_tiles"),
    # (accel.cpu.int8.LINEAR_ENGINES)
    "int8_weight_only_linear": ("panels", "int8pack"),  # accel.cpu.int8.WEIGHT_ONLY_ENGINES
    "quant_linear_form": ("dynamic", "dynamic_fused", "weight_only", "float", "float_bf16"),  # accel.ops.int8._auto_forms
    # accel.cpu.int8.CONV_ENGINES + accel.ops.int8.FLOAT_CONV_FORMS (auto layers)
    "int8_conv2d": ("onednn", "im2col", "onednn_split", "im2col_split", "onednn_cq", "im2col_cq", "amx_tiles", "float",
                    "float_nchw", "float_bf16"),
    "bsr_linear": _BSR_STRATEGIES + ("dense", "native", "native_amx"),  # accel.ops.bsr_linear
    "bsr_conv2d": ("gather",) + tuple(f"im2col_{s}" for s in _BSR_STRATEGIES) + ("dense", "native", "native_nchw",
                                                                                 "native_amx", "native_amx_padded"),
    # (accel.ops.bsr_conv)
    "int8_bsr_linear": ("rows", "stacked", "stacked_wide", "float", "vnni", "vnni_amx"),  # accel.cpu.int8_bsr
    "replace": ("old", "new", "sparse float", "int8 dense", "int8 block-sparse"),  # accel.api (SPARSE_FORMS)
}
_ops_lock = threading.Lock()


def register_op(op: str, engines: tuple[str, ...] | list[str]) -> None:
    """Declare ``op`` and the engines it may choose, so ``ACCEL_ENGINE`` / :func:`force` may name them
    (engines of an op already known are added to its list)."""
    if not isinstance(op, str) or not op or "=" in op or "," in op:
        raise ValueError(f"register_op: op must be a non-empty name without '=' or ',', got {op!r}")
    names = tuple(engines)
    bad = [e for e in names if not isinstance(e, str) or not e.strip() or "," in e or e != e.strip()]
    if not names or bad:
        raise ValueError(f"register_op({op!r}): engines must be non-empty names without ',', got {names!r}")
    with _ops_lock:
        old = _OPS.get(op, ())
        _OPS[op] = old + tuple(e for e in dict.fromkeys(names) if e not in old)
    _parse_forced.cache_clear()
    _bump()


def known_ops() -> dict[str, tuple[str, ...]]:
    """Every op and the engines it may choose (what ``ACCEL_ENGINE`` may name)."""
    with _ops_lock:
        return dict(_OPS)


def _hint(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_forced(op: str, engine: str, where: str) -> None:
    """Raise :class:`ConfigError` unless ``engine`` is a known engine of a known ``op``."""
    ops = known_ops()
    if op not in ops:
        raise ConfigError(f"{where}: unknown op {op!r}{_hint(op, ops)}; known ops: {', '.join(sorted(ops))}")
    if engine not in ops[op]:
        raise ConfigError(f"{where}: unknown engine {engine!r} for {op}{_hint(engine, ops[op])}; "
                          f"engines of {op}: {', '.join(ops[op])}")


# ------------------------------------------------------------------------------------------------ forcing
_forced_local = threading.local()
_forcing = 0  # force() blocks open in any thread: while 0, no thread-local lookup is needed (a settled call's check)
_forcing_lock = threading.Lock()


def _env_forced() -> dict[str, str]:
    return _parse_forced(_env("ACCEL_ENGINE") or "")


@functools.lru_cache(maxsize=8)
def _parse_forced(env: str) -> dict[str, str]:
    """``ACCEL_ENGINE`` parsed and checked (a failure is not cached: every call that reads it raises)."""
    out = {}
    for part in filter(None, (p.strip() for p in env.split(","))):
        op, sep, name = part.partition("=")
        op, name = op.strip(), name.strip()
        if not sep or not op or not name:
            raise ConfigError(f"ACCEL_ENGINE entries must be op=engine, got {part!r} in {env!r}")
        _check_forced(op, name, f"ACCEL_ENGINE entry {part!r}")
        if op in out and out[op] != name:
            raise ConfigError(f"ACCEL_ENGINE forces {op} twice ({out[op]!r} and {name!r}) in {env!r}")
        out[op] = name
    return out


def forced(op: str) -> str | None:
    """The engine forced for ``op`` (by :func:`force` or ``ACCEL_ENGINE``), or None.

    Raises :class:`ConfigError` when ``ACCEL_ENGINE`` names an unknown op or engine."""
    env_forced = _env_forced()  # checked on every read, even when force() overrides it
    stack = getattr(_forced_local, "stack", None)
    if stack:
        for mapping in reversed(stack):
            if op in mapping:
                return mapping[op]
    return env_forced.get(op)


def forcing_here() -> bool:
    """Whether this thread is inside :func:`force`: its choices must not be memoized for (or taken from) other
    threads, which :func:`memo` and the layers' resolved calls share."""
    return _forcing > 0 and bool(getattr(_forced_local, "stack", None))


@contextlib.contextmanager
def force(**engines: str):
    """``with accel.engines.force(int8_linear="onednn"): ...`` pins engines in this thread.

    Raises :class:`ConfigError` (on entry) for an unknown op or engine, as ``ACCEL_ENGINE`` does."""
    for op, name in engines.items():
        if not isinstance(name, str):
            raise ConfigError(f"accel.engines.force({op}=...): the engine must be a name, got {name!r}")
        _check_forced(op, name, f"accel.engines.force({op}={name!r})")
    global _forcing
    stack = getattr(_forced_local, "stack", None)
    if stack is None:
        stack = _forced_local.stack = []
    stack.append(dict(engines))
    with _forcing_lock:
        _forcing += 1
    _bump()
    try:
        yield
    finally:
        stack.pop()
        with _forcing_lock:
            _forcing -= 1
        _bump()


def check_env() -> None:
    """Read and check every accel environment variable now (``ACCEL_ENGINE``, ``ACCEL_CPU_ISA``,
    ``ACCEL_CPU_ACT_QMAX``): raises :class:`ConfigError` naming the bad value (the CLI calls this
    before any work)."""
    _env_forced()
    cpu_isa()
    native_act_qmax()


# ------------------------------------------------------------------------------------------------ the cache
def cache_dir() -> str:
    d = _env("ACCEL_CACHE_DIR")
    if d:
        return d
    base = _env("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "accel")


_OFF = ("0", "off", "false", "no")
_ON = ("", "1", "on", "true", "yes")


def _switch(name: str) -> bool:
    """An on/off variable (unset: on): ``0 off false no`` / ``1 on true yes`` in any case; anything else
    raises :class:`ConfigError` rather than silently meaning one of them."""
    v = (_env(name) or "").strip().lower()
    if v in _OFF:
        return False
    if v in _ON:
        return True
    raise ConfigError(f"{name}={_env(name)!r}: expected one of {_OFF} (off) or {_ON[1:]} (on), in any case")


def _disk_enabled() -> bool:
    return _switch("ACCEL_ENGINE_CACHE")


def measuring_enabled() -> bool:
    return _switch("ACCEL_ENGINE_MEASURE")


@dataclass
class Decision:
    engine: str
    measured: bool
    times_ms: dict[str, float] = field(default_factory=dict)  # min over rounds, per candidate
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it cannot be chosen
    rounds: int = 0
    contended: bool = False
    when: str = ""
    note: str = ""

    def ratio(self, other: str) -> float | None:
        """How many times faster the chosen engine measured than ``other``."""
        t, o = self.times_ms.get(self.engine), self.times_ms.get(other)
        return None if not t or not o else o / t


def _short(v) -> str:
    r = repr(v)
    return f"{type(v).__name__} {r if len(r) <= 40 else r[:37] + '...'}"


_DECISION_FIELDS = {"engine": str, "measured": bool, "times_ms": dict, "rejected": dict, "rounds": int,
                    "contended": bool, "when": str, "note": str}


def _decision_from_json(d) -> Decision:
    """A :class:`Decision` from its JSON form, or ValueError saying what is wrong with it."""
    if not isinstance(d, dict):
        raise ValueError(f"a {type(d).__name__}, not an object")
    unknown = sorted(set(d) - set(_DECISION_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    missing = [f for f in ("engine", "measured") if f not in d]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    for name, typ in _DECISION_FIELDS.items():
        if name in d and (not isinstance(d[name], typ) or (typ is int and isinstance(d[name], bool))):
            raise ValueError(f"{name} is {_short(d[name])}, not a {typ.__name__}")
    if not d["engine"]:
        raise ValueError("engine is empty")
    if d.get("rounds", 0) < 0:
        raise ValueError(f"rounds is {d['rounds']}")
    times = d.get("times_ms", {})
    for n, t in times.items():
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"times_ms[{n!r}] is {_short(t)}, not a finite time")
    rejected = d.get("rejected", {})
    for n, why in rejected.items():
        if not isinstance(why, str):
            raise ValueError(f"rejected[{n!r}] is {_short(why)}, not a string")
    return Decision(**{**d, "times_ms": {n: float(t) for n, t in times.items()}, "rejected": dict(rejected)})


class _Cache:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.memory: dict[str, Decision] = {}
        self.loaded_from: str | None = None
        self._warned: set[tuple[str, str]] = set()  # (file, what is wrong with it): warned once

    def path(self) -> str:
        key = (generation(), torch.get_num_threads())
        if getattr(self, "_path_key", None) != key:
            self._path_key, self._path = key, os.path.join(cache_dir(), f"engines-{fingerprint()}.json")
        return self._path

    def _read_file(self, path: str) -> dict[str, Decision]:
        """The well-formed decisions of the file at ``path``: a missing file is empty, a malformed one
        (not JSON, wrong structure) is empty and a malformed entry is dropped, each with one
        :class:`EngineCacheWarning` naming the file (the next save rewrites it well-formed)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except OSError:  # unreadable (a directory, no permission): as absent, the decisions live in memory
            return {}
        except (ValueError, RecursionError) as e:  # truncated, garbage, not UTF-8, absurdly nested
            self._warn(path, f"not valid JSON ({type(e).__name__}: {str(e)[:120]})")
            return {}
        if not isinstance(data, dict):
            self._warn(path, f"the top level is a JSON {type(data).__name__}, not an object")
            return {}
        m = data.get("machine")
        if not isinstance(m, dict) or "engine_version" not in m:
            self._warn(path, f"'machine' is {_short(m)}, not an object with an engine_version")
            return {}
        if m["engine_version"] != ENGINE_VERSION:  # another accel's file: not ours to read
            return {}
        decs = data.get("decisions")
        if not isinstance(decs, dict):
            self._warn(path, f"'decisions' is {_short(decs)}, not an object")
            return {}
        out, bad = {}, []
        for key, d in decs.items():
            try:
                out[key] = _decision_from_json(d)
            except ValueError as e:
                bad.append(f"{key!r}: {e}")
        if bad:
            self._warn(path, f"{len(bad)} malformed decision(s) dropped, e.g. {bad[0]}")
        return out

    def _warn(self, path: str, why: str) -> None:
        if (path, why) in self._warned:  # the load and the next save read the same file: one warning
            return
        self._warned.add((path, why))
        warnings.warn(f"accel: ignoring malformed engine cache {path}: {why}; it is rewritten on the next save",
                      EngineCacheWarning, stacklevel=2)

    def _load(self) -> None:
        path = self.path()
        if self.loaded_from == path:
            return
        self.loaded_from = path
        _bump()
        if not _disk_enabled():
            return
        for key, dec in self._read_file(path).items():
            if not dec.contended:  # measured on a busy machine: measure again in this process
                self.memory.setdefault(key, dec)

    def get(self, key: str) -> Decision | None:
        with self.lock:
            self._load()
            return self.memory.get(key)

    def put(self, key: str, dec: Decision) -> None:
        with self.lock:
            self.memory[key] = dec
            _bump()
            if _disk_enabled():
                try:
                    self._write(key, dec)
                except OSError:  # a read-only home is not an error: the decision lives in memory
                    pass

    def _write(self, key: str, dec: Decision) -> None:
        path = self.path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            decisions = {k: asdict(d) for k, d in self._read_file(path).items()}  # malformed entries dropped
            if dec.contended and key in decisions and not decisions[key]["contended"]:
                return  # another process measured this key on a quiet machine: a busy default must not replace it
            decisions[key] = asdict(dec)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".engines-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"machine": machine(), "decisions": decisions}, f, indent=1, sort_keys=True)
                os.chmod(tmp, 0o644)  # mkstemp makes it 0600: others sharing the cache directory may read it
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):  # no half-written temp files left behind
                    os.unlink(tmp)
                raise

    def clear(self, disk: bool = False) -> None:
        with self.lock:
            _bump()
            self.memory.clear()
            self.loaded_from = None
            self._path_key = None
            if disk:
                with contextlib.suppress(OSError):
                    os.unlink(self.path())

    def all(self) -> dict[str, Decision]:
        with self.lock:
            self._load()
            return dict(self.memory)


_CACHE = _Cache()


def clear(disk: bool = False) -> None:
    """Forget this process's decisions (and the machine's cache file with ``disk=True``)."""
    _CACHE.clear(disk)


def decisions() -> dict[str, Decision]:
    return _CACHE.all()


# ------------------------------------------------------------------------------------------------ keys
def m_bucket(m: int) -> int:
    """Calls are grouped by rows (tokens, images): 0, 1, 2, 4, 8, ... (next power of two), 8192 and up one."""
    m = int(m)  # (a 0-d tensor under torch.jit.trace)
    if m <= 1:
        return max(m, 0)
    return min(1 << (m - 1).bit_length(), 8192)


def make_key(op: str, **parts) -> str:
    return op + "|" + "|".join(f"{k}={parts[k]}" for k in sorted(parts))


# ------------------------------------------------------------------------------------------------ measuring
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: a measurement during which accel's threads waited, runnable, for a CPU at least this fraction of the time
#: (Linux scheduler statistics) was made on a busy machine
CONTENDED_WAIT = 0.05


def _run_delay_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (``/proc/self/task/*/schedstat``),
    or None where the kernel does not report it."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, seen = 0, False
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, ValueError, IndexError):  # a thread that exited meanwhile, or no schedstat
            continue
    return total * 1e-9 if seen else None


def wait_mark() -> tuple[float, float] | None:
    """A starting point for :func:`_contended`: (now, run delay so far), or None without scheduler statistics."""
    d = _run_delay_s()
    return None if d is None else (time.perf_counter(), d)


def _contended(mark: tuple[float, float] | None = None) -> bool:
    """Whether other work competes for the CPUs accel uses: the 1-minute load average above its threads, or,
    given a :func:`wait_mark`, accel's threads waiting for a CPU :data:`CONTENDED_WAIT` of the time since the
    mark. The second is seen at once (another process started a second ago does not show in the load average
    for about a minute) and counts only time taken from this process."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    threads = torch.get_num_threads()
    if load > threads + 0.75 or load > (os.cpu_count() or 1) + 0.25:
        return True
    if mark is None:
        return False
    d = _run_delay_s()
    wall = time.perf_counter() - mark[0]
    if d is None or wall <= 0:
        return False
    # more threads than CPUs this process may use: its own threads wait for each other that much
    own = max(0.0, 1.0 - _usable_cpus() / threads)
    return (d - mark[1]) / (wall * threads) - own >= CONTENDED_WAIT


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    if ref.shape != out.shape:
        return -math.inf
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)):
        return -math.inf
    ref, out = ref[finite], out[finite]
    noise = (ref - out).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm().clamp_min(1e-30) / noise))


class Undecidable(Exception):
    """A call that cannot decide its key (its reference output is not finite): :func:`choose` runs the default
    for it, caches nothing, and the next call measures."""


def _no_autocast() -> contextlib.ExitStack:
    """Autocast off (CPU, and CUDA where present) for a measurement: candidates and references compute in the
    dtypes the op gives them, as the decision's key says."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


def measure(candidates: dict[str, Callable[[], object]], *, incumbent: str, device: str = "cpu",
            reference: Callable[[], torch.Tensor] | None = None, min_sqnr: float | None = None,
            budget_s: float | None = None, seed: int = 0) -> Decision:
    """Time ``candidates`` side by side (see the module docstring) and pick one.

    ``incumbent`` wins unless another candidate is at least :data:`MARGIN` faster. With
    ``reference``, each candidate's first output is compared to it and candidates below
    ``min_sqnr`` dB are rejected (``min_sqnr=None``: only raising candidates are rejected).
    On a busy machine (:func:`_contended`, before or during the timing) the timings decide nothing:
    the incumbent is kept (or, if it cannot run the call, the fastest first call of the others) and the
    decision is flagged ``contended``.
    """
    budget_s = BUDGET_S if budget_s is None else budget_s
    rejected: dict[str, str] = {}
    first: dict[str, float] = {}
    ref = None
    contended = _contended()
    with torch.no_grad(), _no_autocast():  # an enclosing autocast would turn fp32 references into bf16 ones
        if reference is not None:
            ref = reference()
            if isinstance(ref, torch.Tensor) and ref.is_floating_point() and not bool(torch.isfinite(ref).all()):
                raise Undecidable("the reference output holds NaN/inf (the call's input does, or overflows): "
                                  "its accuracy decides nothing")
        errors: dict[str, Exception] = {}
        ref_fits: set[torch.dtype] = set()  # output dtypes the reference was checked to fit

        def attempt(name, fn) -> tuple[bool, object]:
            """``(True, fn())``, or ``(False, None)`` with the reason recorded when the candidate cannot run."""
            try:
                out = fn()
                _sync(device)
                return True, out
            except (ForcedEngineError, ConfigError):  # the user's setting, not this candidate's failure: say so
                raise
            except Exception as e:  # noqa: BLE001 - a candidate that cannot run this call is not chosen
                rejected[name] = f"raised {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                errors[name] = e
                return False, None

        for name, fn in candidates.items():  # warm-up: packs weights, faults in buffers, compiles, decides nested
            attempt(name, fn)                # engines
        # contention counts from here: warm-ups may compile in worker processes (accel's own work, not load)
        mark = wait_mark()
        for name, fn in candidates.items():
            if name in errors:
                continue
            t0 = time.perf_counter()
            ran, out = attempt(name, fn)
            if not ran:
                continue
            first[name] = time.perf_counter() - t0
            if ref is not None and isinstance(out, torch.Tensor) and out.is_floating_point() and \
                    isinstance(ref, torch.Tensor) and ref.dtype != out.dtype and out.dtype not in ref_fits:
                if not bool(torch.isfinite(ref.to(out.dtype)).all()):  # e.g. an fp16 output past 65504
                    raise Undecidable(f"the reference output overflows the call's {out.dtype}: its accuracy decides "
                                      "nothing")
                ref_fits.add(out.dtype)
            if ref is not None and min_sqnr is not None and isinstance(out, torch.Tensor):
                s = _sqnr(ref, out)
                if s < min_sqnr:
                    rejected[name] = f"inaccurate: {s:.1f} dB against the reference (< {min_sqnr:.0f})"
                    del first[name]
    if not first:
        if incumbent in errors:  # nothing runs this call: the error the default (what runs unmeasured) gives,
            raise errors[incumbent]  # not a different one when measuring
        raise RuntimeError(f"no engine could run this call: {rejected}")
    fastest = min(first.values())
    for name, t in list(first.items()):
        if t > TOO_SLOW * fastest and t > TOO_SLOW_ABS_S:
            rejected[name] = f"too slow: first call {t * 1e3:.2f} ms, {t / fastest:.0f}x the fastest"
            del first[name]
    if contended or _contended(mark):
        return _busy(first, incumbent, rejected, 0)
    names = list(first)
    best: dict[str, float] = {n: math.inf for n in names}
    rng = random.Random(seed)

    def rounds(pool: list[str], n_min: int, n_max: int, budget: float) -> int:
        start, done = time.perf_counter(), 0
        with torch.no_grad(), _no_autocast():
            while done < n_max and (done < n_min or time.perf_counter() - start < budget):
                order = pool[:]
                rng.shuffle(order)
                for name in order:
                    fn = candidates[name]
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    best[name] = min(best[name], time.perf_counter() - t0)
                done += 1
        return done

    n = rounds(names, MIN_ROUNDS, MAX_ROUNDS, budget_s) if len(names) > 1 else 0
    if len(names) > 1:
        ranked = sorted(names, key=best.__getitem__)
        a, b = ranked[0], ranked[1]
        if best[b] < best[a] * (1 + CLOSE):  # close call: more rounds between the two
            n += rounds([a, b], MIN_ROUNDS, MAX_ROUNDS, budget_s)
    else:
        best = {names[0]: first[names[0]]}
    if _contended(mark):
        return _busy(best, incumbent, rejected, n)
    winner = min(names, key=best.__getitem__)
    if incumbent in best and winner != incumbent and best[incumbent] < best[winner] * (1 + MARGIN):
        winner = incumbent
    return Decision(engine=winner, measured=True, times_ms={k: v * 1e3 for k, v in best.items()}, rejected=rejected,
                    rounds=n, contended=False,
                    when=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _busy(times: dict[str, float], incumbent: str, rejected: dict[str, str], rounds: int) -> Decision:
    """The decision of a measurement made on a busy machine: timings there move by tens of percent (up to
    100x for a multi-threaded op whose threads lose their CPUs) from round to round, so they decide nothing.
    The incumbent is kept; where it could not run the call (or was far too slow), the fastest of the others."""
    engine = incumbent if incumbent in times else min(times, key=times.__getitem__)
    return Decision(engine=engine, measured=False, times_ms={k: v * 1e3 for k, v in times.items()},
                    rejected=rejected, rounds=rounds, contended=True,
                    when=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    note="machine busy while measuring: the default, measured again by the next process")


_measure_lock = threading.RLock()  # re-entrant: measuring a form measures its engines
#: thread ident -> {op: the key of that thread's last choose}: a dict read (not a threading.local attribute, several
#: times dearer) on every settled layer call; a dead thread's entry is taken over by the next with its ident
_LAST: dict[int, dict[str, str]] = {}
_get_ident = threading.get_ident


def last_key(op: str) -> str | None:
    """The key of this thread's last :func:`choose` for ``op`` (for reports)."""
    return _LAST.get(_get_ident(), {}).get(op)


def note_key(op: str, key: str | None) -> None:
    """Record ``key`` as ``op``'s last key (a caller that memoized a :func:`choose` result)."""
    if key is not None:
        note_keys({op: key})


def note_keys(keys_by_op: dict[str, str]) -> None:
    """:func:`note_key` for several ops at once (a settled layer call: one dictionary update)."""
    mine = _LAST.get(_get_ident())
    if mine is None:  # this thread's first
        if len(_LAST) > 4096:  # (idents of threads long gone)
            _LAST.clear()
        _LAST[_get_ident()] = dict(keys_by_op)
    else:
        mine.update(keys_by_op)


def choose(op: str, key: str, candidates: Callable[[], dict[str, Callable[[], object]]] | dict, *, default: str,
           device: str = "cpu", reference: Callable[[], torch.Tensor] | None = None, min_sqnr: float | None = None,
           budget_s: float | None = None, allowed: tuple[str, ...] | None = None) -> str:
    """The engine for ``key`` (made with :func:`make_key`): forced, cached, or measured now.

    ``candidates`` (or a function returning them, built only when a measurement is needed) maps
    engine names to zero-argument callables running the real call. ``default`` is used when
    measuring is off or impossible (inside ``torch.compile`` tracing) and is the incumbent of a
    measurement. ``allowed`` lists every engine name that could be valid for this call, to
    validate a forced engine: one outside it raises :class:`ForcedEngineError` (which a measurement
    enclosing this call lets through). A bad ``ACCEL_ENGINE`` raises :class:`ConfigError`.
    """
    global _undecided
    note_keys({op: key})
    pinned = forced(op)
    if pinned is not None:
        if allowed is not None and pinned not in allowed:
            raise ForcedEngineError(f"engine {pinned!r} forced for {op} cannot run this call ({key}); "
                             f"engines for it: {sorted(allowed)}")
        return pinned
    dec = _CACHE.get(key)
    usable = dec is not None and (allowed is None or dec.engine in allowed)
    if usable and not (dec.contended and _measuring() and _measure_again(key, dec)):
        return dec.engine
    if not _measuring():
        return default
    with _measure_lock:
        fresh = _CACHE.get(key)
        if fresh is not None and fresh is not dec and (allowed is None or fresh.engine in allowed):
            return fresh.engine  # another thread decided (or measured again) meanwhile
        cands = candidates() if callable(candidates) else candidates
        if len(cands) == 1:
            dec = Decision(engine=next(iter(cands)), measured=False, note="only candidate",
                           when=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        else:
            try:
                dec = measure(cands, incumbent=default if default in cands else next(iter(cands)), device=device,
                              reference=reference, min_sqnr=min_sqnr, budget_s=budget_s)
            except Undecidable:
                _undecided += 1
                return default if default in cands else next(iter(cands))
        _CACHE.put(key, dec)
        if dec.contended:
            _schedule_retry(key)
        else:
            _made_at.pop(key, None)
        return dec.engine


def _measuring() -> bool:
    return measuring_enabled() and not torch.compiler.is_compiling() and not torch.jit.is_scripting()


_MEMO: dict = {}


def memo(op: str, parts: tuple, decide: Callable[[], str]) -> str:
    """``decide()`` (a :func:`choose` for ``op``) memoized per ``(op, parts)`` until :func:`stamp`
    changes: the per-call cost of a settled decision is one dictionary lookup, not a key string."""
    if forcing_here():  # this thread's pins are its own: decide now, keep nothing
        return decide()
    key = (op,) + parts
    hit = _MEMO.get(key)
    if hit is not None and hit[0] == stamp():
        note_key(op, hit[2])
        return hit[1]
    undecided = _undecided
    value = decide()
    if len(_MEMO) > 4096:
        _MEMO.clear()
    if _undecided == undecided:  # (a default run for an undecidable call is not remembered)
        _MEMO[key] = (_stamp, value, last_key(op))
    return value


def decision(key: str) -> Decision | None:
    """The cached decision for ``key`` (None if none was made yet)."""
    return _CACHE.get(key)


def report() -> str:
    """This machine and every decision made so far (what ``accel engines`` prints)."""
    m = machine()
    lines = [f"machine     {m['cpu']}  (isa {m['accel_isa']}, oneDNN {m['onednn_isa']}, ATen "
             f"{m['aten_cpu_capability']}, {m['threads']} threads, torch {m['torch']})",
             f"flags       {' '.join(m['cpu_flags'])}",
             f"cache       {_CACHE.path() if _disk_enabled() else '(disk cache off)'}",
             f"act qmax    {native_act_qmax()} (CPU int8 activations)"]
    pinned = _env_forced()
    if pinned:
        lines.append(f"forced      {', '.join(f'{op}={e}' for op, e in sorted(pinned.items()))} (ACCEL_ENGINE)")
    decs = _CACHE.all()
    if not decs:
        lines.append("no decisions yet: they are measured on first use (or run `accel engines --measure`)")
        return "\n".join(lines)
    width = max(len(k) for k in decs)
    lines.append("")
    lines.append(f"{'op / key':<{width}}  {'engine':<14} times (ms, min over rounds) and rejections")
    for key in sorted(decs):
        d = decs[key]
        t_eng = d.times_ms.get(d.engine)
        times = "  ".join(f"{n} {t:.3f}" + (f" ({t / t_eng:.2f}x)" if t_eng and n != d.engine else "")
                          for n, t in sorted(d.times_ms.items(), key=lambda kv: kv[1]))
        rej = "; ".join(f"{n}: {why}" for n, why in d.rejected.items())
        flag = " [contended]" if d.contended else ""
        lines.append(f"{key:<{width}}  {d.engine:<14} {times}{flag}" + (f"  | {rej}" if rej else ""))
    return "\n".join(lines)
