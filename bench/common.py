"""Shared benchmark harness: side-by-side timing, environment metadata, JSON results.

The machines these run on are shared and noisy, so nothing here times one provider and then the
next. :func:`compare` runs the providers round-robin (in a shuffled order each round) and reports,
for every provider, the median time and the median of its per-round ratio to a baseline measured
in the same round. Absolute times move with the load; the ratios are what the tables report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Median seconds per call, and the median per-round speedup of this provider over the baseline."""

    median_s: float
    speedup: float
    rounds: int
    samples_s: list[float] = field(repr=False, default_factory=list)


def compare(
    providers: dict[str, Callable[[], object]],
    baseline: str,
    *,
    device: str = "cpu",
    min_rounds: int = 5,
    max_rounds: int = 50,
    budget_s: float = 2.0,
    warmup: int = 1,
    seed: int = 0,
    inner: int = 1,
) -> dict[str, Timing]:
    """Time every provider side by side; see the module docstring.

    Each round gives every provider a turn, in a shuffled order. Rounds continue until ``budget_s``
    is spent (at least ``min_rounds``, at most ``max_rounds``). ``speedup`` is the median over rounds
    of ``t(baseline) / t(provider)``, so a slow period hits both sides of each ratio.

    ``inner=1`` (cold): a turn is one call, so each call finds the caches holding the other
    providers' data, as a layer does inside a model. ``inner=n > 1`` (warm): a turn is ``n``
    back-to-back calls and the time is the mean of the last ``n - 1``, as a layer called in a loop.
    """
    if inner < 1:
        raise ValueError(f"inner must be >= 1, got {inner}")
    if baseline not in providers:
        raise ValueError(f"baseline {baseline!r} is not one of the providers {sorted(providers)}")
    names = list(providers)
    for name in names:
        for _ in range(warmup):
            providers[name]()
    _sync(device)
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            fn = providers[name]
            if inner > 1:
                fn()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(max(1, inner - 1)):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / max(1, inner - 1))
        rounds += 1
    base = samples[baseline]
    return {
        n: Timing(
            median_s=statistics.median(s),
            speedup=statistics.median(b / x for b, x in zip(base, s)),
            rounds=rounds,
            samples_s=s,
        )
        for n, s in samples.items()
    }


def ratio(results: dict[str, Timing], num: str, den: str) -> float:
    """Median over rounds of ``t(num) / t(den)``: how many times faster ``den`` ran than ``num``."""
    return statistics.median(a / b for a, b in zip(results[num].samples_s, results[den].samples_s))


def environment() -> dict:
    """Device, versions and date, stored with every result file."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
        ).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def save_results(name: str, rows: list[dict], extra: dict | None = None, path: str | None = None) -> str:
    """Write ``{"environment": ..., "rows": rows}`` to ``path`` or ``bench/results/<name>-<device>.json``."""
    env = environment()
    if path is None:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        dev = "cuda" if env["device"] != "cpu" else "cpu"
        path = os.path.join(RESULTS_DIR, f"{name}-{dev}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "environment": env, **(extra or {}), "rows": rows}, f, indent=1)
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are (key, header, format spec)."""
    head = [h for _, h, _ in columns]
    body = [[format(r[k], spec) if r.get(k) is not None else "-" for k, _, spec in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
