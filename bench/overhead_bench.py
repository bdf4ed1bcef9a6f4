"""Fixed cost of an accel layer call, next to the engine it runs.

For a small layer (default Linear 256x256; Conv2d 64->64 3x3 on 8x8: int8, and 75% block-sparse in fp32 and bf16)
the accel module call is timed side by side with the engine's own call (the function the dispatch picked, called
directly with the same arguments) and with the float layer: ``fixed µs = module - engine`` is what validation,
dispatch and the engine decision cost per call. The int8 conv rows run NCHW and channels_last images: the engines
compute in channels_last, so for NCHW the module's fixed cost also holds converting its output back to NCHW (as
``nn.Conv2d`` returns it), a copy that grows with the output.

    python -m bench.overhead_bench             # JSON in bench/results/overhead_bench-cpu.json
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn as nn

from accel import QuantConv2d, QuantLinear, SparseConv2d, SparseLinear, engines
from accel.cpu import bsr as cpu_bsr
from accel.cpu import int8 as cpu_int8

from .common import compare, format_table, save_results

ops_bsr_linear = importlib.import_module("accel.ops.bsr_linear")  # (accel.ops.bsr_linear is also the function)
ops_bsr_conv = importlib.import_module("accel.ops.bsr_conv")


def _engine(op: str) -> str:
    key = engines.last_key(op)
    d = engines.decision(key) if key else None
    return d.engine if d is not None else "(default)"


def cases(n: int):
    torch.manual_seed(0)
    lin = nn.Linear(n, n)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    for m in (1, 256):
        x = torch.randn(m, n)
        q = QuantLinear.from_float(lin, "dynamic")
        with torch.no_grad():
            q(x)
        eng = engines.forced("int8_linear") or _engine("int8_linear")
        if eng == "(default)":
            eng = cpu_int8.default_linear_engine(cpu_int8.act_qmax(), m, n)
        qmax = cpu_int8.act_qmax()
        yield (f"QuantLinear {n}x{n} dynamic", m, eng, lambda q=q, x=x: q(x),
               lambda q=q, x=x, e=eng: cpu_int8.linear_int8_cpu(x, q.weight_q, q.weight_scale, q.bias, "none", None,
                                                                  qmax, e),
               lambda x=x: lin(x))
        s = SparseLinear.from_dense(lin, sparsity=0.75, mode="sparse")
        with torch.no_grad():
            s(x)
        strat = _engine("bsr_linear")
        strat = cpu_bsr.pick_strategy(m) if strat == "(default)" else strat
        yield (f"SparseLinear {n}x{n} 75%", m, strat, lambda s=s, x=x: s(x),
               lambda s=s, x=x, e=strat: ops_bsr_linear.run_cpu(e, x, s.values, s.crow_indices, s.col_indices, n,
                                                                 s.bias),
               lambda x=x: lin(x))
    for b, fmt in ((1, "NCHW"), (8, "NCHW"), (1, "channels_last"), (8, "channels_last")):
        x = torch.randn(b, 64, 8, 8)
        if fmt == "channels_last":  # (the engines' own layout: no conversion of the output to the input's layout)
            x = x.contiguous(memory_format=torch.channels_last)
        qc = QuantConv2d.from_float(conv)
        with torch.no_grad():
            qc(x)
        eng = _engine("int8_conv2d")
        eng = "onednn" if eng == "(default)" else eng
        yield (f"QuantConv2d 64->64 3x3 8x8 {fmt}", b, eng, lambda x=x, qc=qc: qc(x),
               lambda x=x, qc=qc, e=eng: cpu_int8.conv2d_int8_cpu(x, qc.weight_q, qc.weight_scale, qc.bias, qc.stride,
                                                                   qc.padding, qc.dilation, "none", None,
                                                                   cpu_int8.act_qmax(), e),
               lambda x=x: conv(x))
    for dtype in (torch.float32, torch.bfloat16):  # (channels_last: the engines' layout)
        sc = SparseConv2d.from_dense(conv, sparsity=0.75, mode="sparse").to(dtype)
        fconv = nn.Conv2d(64, 64, 3, padding=1).to(dtype)
        for b in (1, 8):
            x = torch.randn(b, 64, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                sc(x)
            eng = _engine("bsr_conv2d")
            eng = ops_bsr_conv.default_engine(64, sc.block_size, b * 64) if eng == "(default)" else eng
            yield (f"SparseConv2d 64->64 3x3 8x8 75% {str(dtype)[6:]}", b, eng, lambda x=x, sc=sc: sc(x),
                   lambda x=x, sc=sc, e=eng: ops_bsr_conv.run_cpu(e, x, sc.values, sc.crow_indices, sc.col_indices,
                                                                  sc.weight_shape, sc.bias, sc.stride, sc.padding,
                                                                  sc.dilation),
                   lambda x=x, fconv=fconv: fconv(x))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--warm", type=int, default=20, help="calls per turn (a small layer is timed warm)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = []
    with torch.no_grad():
        for name, m, engine, module_call, engine_call, float_call in cases(args.n):
            res = compare({"module": module_call, "engine": engine_call, "float": float_call}, "float",
                          budget_s=args.budget, inner=args.warm)
            t = {k: min(v.samples_s) * 1e6 for k, v in res.items()}  # min over rounds: the fixed cost, not the noise
            rows.append({"layer": name, "m": m, "engine": engine, "us_module": t["module"], "us_engine": t["engine"],
                         "us_float": t["float"], "us_fixed": t["module"] - t["engine"],
                         "us_over_float": t["module"] - t["float"]})
            print(f"{name} M={m}: module {t['module']:.1f} us, engine {t['engine']:.1f} us, fixed "
                  f"{t['module'] - t['engine']:.1f} us, float {t['float']:.1f} us", flush=True)
    cols = [("layer", "layer", "s"), ("m", "M/B", "d"), ("engine", "engine", "s"), ("us_module", "module us", ".1f"),
            ("us_engine", "engine us", ".1f"), ("us_fixed", "fixed us", ".1f"), ("us_float", "float us", ".1f")]
    print()
    print(format_table(rows, cols))
    print(f"\nsaved {save_results('overhead_bench', rows, path=args.json)}")


if __name__ == "__main__":
    main()
