"""Side-by-side timing of callables, used by the benchmarks and by ``accel.sparsify_`` /
``accel.quantize_`` to keep each layer in the faster form at its real shape."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


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
