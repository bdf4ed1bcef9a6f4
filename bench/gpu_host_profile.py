"""Where the host time of one accel launch goes: per-call CPU wall time and a cProfile of the hottest
functions, for the M = 1 calls that ``bench.gpu_suite``'s ``host`` section times, next to a bare Triton
launch (the floor any Triton kernel pays on this host) and ``F.linear`` (what a user's dense layer pays).

    python -m bench.gpu_host_profile [--calls 200] [--top 14] [--out host_profile.txt]

On a machine without a GPU, ``--dry-run`` runs it on CPU tensors through the Triton interpreter
(a check of this script's code paths; its numbers mean nothing), and ``--stand-in`` measures accel's
own host work around its kernels on any machine: the layers take their Triton paths on CPU tensors
(``ACCEL_FORCE_TRITON=1``), each launch's first call runs in the interpreter, and then every
remembered launch (``accel.kernels._triton.launch``) gets a binary that does nothing, so a call costs
accel's Python, the direct-launch bookkeeping and the tensor allocations, without the C launch itself.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time


class _NoOpBinary:
    def __getitem__(self, grid):
        return lambda *values: None


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
    ap.add_argument("--stand-in", action="store_true",
                    help="accel's own host work: Triton paths on CPU tensors, kernels replaced by no-ops after "
                         "their first (interpreted) launch")
    args = ap.parse_args(argv)
    if args.stand_in:  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["ACCEL_FORCE_TRITON"] = "1"
    import torch

    device = "cpu" if (args.dry_run or args.stand_in) else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_host_profile: no CUDA device here (use --dry-run)")
        return 2
    calls = args.calls if (device == "cuda" or args.stand_in) else 2
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    report = io.StringIO()
    summary = []
    provs = providers(device)
    if args.stand_in:
        from accel.kernels import _triton as T

        T.INTERPRET_AS_BINARY = True
        provs = {k: v for k, v in provs.items() if k != "triton_bare_launch"}  # not launched through accel
    with torch.no_grad():
        for name, fn in provs.items():
            fn()  # the first call: through Triton (here the interpreter), remembered
            if args.stand_in:
                for entries in T._direct.values():
                    for e in entries:
                        e.binary = _NoOpBinary()
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
