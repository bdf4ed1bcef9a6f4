"""Shared benchmark harness: side-by-side timing (``accel.timing.compare``), environment metadata,
JSON results.

The machines these run on are shared and noisy, so nothing here times one provider and then the
next: ``compare`` runs the providers round-robin (in a shuffled order each round) and reports, for
every provider, the median time and the median of its per-round ratio to a baseline measured in
the same round. Absolute times move with the load; the ratios are what the tables report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess

import torch

from accel.timing import Timing, compare  # noqa: F401  (re-exported for the benchmarks)

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def ratio(results: dict[str, Timing], num: str, den: str) -> float:
    """Median over rounds of ``t(num) / t(den)``: how many times faster ``den`` ran than ``num``."""
    return statistics.median(a / b for a, b in zip(results[num].samples_s, results[den].samples_s))


def environment() -> dict:
    """Device, versions and date, stored with every result file: the CPU model and ISA flags (and what
    accel and oneDNN make of them, ``accel.engines.machine``), the GPU and driver where there is one."""
    from accel import engines

    m = engines.machine()
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": m["cpu"],
        "cpu_flags": m["cpu_flags"],
        "cpu_isa": {"hardware": m["hardware_isa"], "accel": m["accel_isa"], "onednn": m["onednn_isa"]},
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": m,
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
    # the GPU machine gets a copy of the working tree, whose .git (if any) need not be at the commit sent:
    # the commit named by whoever sent it wins
    env["git_commit"] = os.environ.get("ACCEL_GIT_COMMIT") or env["git_commit"]
    return env


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
