"""Where the host time of one accel launch goes: per-call CPU wall time and a cProfile of the hottest
functions, for the M = 1 calls that ``bench.gpu_suite``'s ``host`` section times, next to a bare Triton
launch (the floor any Triton kernel pays on this host) and ``F.linear`` (what a user's dense layer pays).

    python -m bench.gpu_host_profile [--calls 200] [--top 14] [--out host_profile.txt]

On a machine without a GPU, ``--dry-run`` runs it on CPU tensors through the Triton interpreter
(a check of this script's code paths; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time


def providers(device: str) -> dict:
    import torch
    import torch.nn.functional as F
    import triton
    import triton.language as tl
    from accel.kernels.int8_matmul import int8_mm, quantize_rows

    from accel import QuantLinear, SparseLinear

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)

    n = 4096 if device == "cuda" else 256
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    lin = torch.nn.Linear(n, n, device=device, dtype=dtype)
    x = torch.randn(1, n, device=device, dtype=dtype)
    y = torch.empty_like(x)
    sparse = SparseLinear.from_dense(lin, sparsity=0.5, block=32, mode="sparse")
    dyn = QuantLinear.from_float(lin, mode="dynamic")
    wo = QuantLinear.from_float(lin, mode="weight_only")
    x_q, x_s = quantize_rows(x)
    out_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return {
        "F.linear": lambda: F.linear(x, lin.weight, lin.bias),
        "triton_bare_launch": lambda: _copy[(1,)](x, y, n, BLOCK=n),
        "quantize_rows": lambda: quantize_rows(x),
        "int8_mm": lambda: int8_mm(x_q, dyn.weight_q, x_s, dyn.weight_scale, out_dtype=out_dtype),
        "SparseLinear": lambda: sparse(x),
        "QuantLinear_dynamic": lambda: dyn(x),
        "QuantLinear_weight_only": lambda: wo(x),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_host_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--out", default=None, help="also write the report here")
    ap.add_argument("--dry-run", action="store_true", help="CPU tensors through the Triton interpreter")
    args = ap.parse_args(argv)
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_host_profile: no CUDA device here (use --dry-run)")
        return 2
    calls = args.calls if device == "cuda" else 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report = io.StringIO()
    summary = []
    with torch.no_grad():
        for name, fn in providers(device).items():
            for _ in range(5):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            us = (time.perf_counter() - t0) / calls * 1e6
            sync()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn()
            prof.disable()
            sync()
            summary.append(f"{name:26s} {us:8.1f} us/call (CPU wall, no sync)")
            report.write(f"\n===== {name}: {us:.1f} us per call =====\n")
            pstats.Stats(prof, stream=report).sort_stats("tottime").print_stats(args.top)
    text = report.getvalue() + "\n" + "\n".join(summary) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
