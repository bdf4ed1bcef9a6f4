"""int8 Linear and Conv2d microbenchmark.

Linear (default 4096x4096, M in 1/16/256): accel's QuantLinear in modes dynamic (per-token int8
activations), static and weight-only, against nn.Linear fp32 and bf16 and torch's dynamic int8
Linear (``torch.ao.quantization.quantize_dynamic``), plus ``torch._int_mm`` on the pre-quantized
integers (the bare int8 GEMM). Conv2d: ResNet-like layers (64..256 channels, 56x56..14x14),
QuantConv2d against nn.Conv2d fp32 (NCHW and channels_last) and bf16. On CUDA the baselines are
cuBLAS/cuDNN fp16 and bf16 and ``torch._int_mm``.

All providers of one row run side by side in the same rounds (``bench.common.compare``). A
provider slower than ``--slow-cutoff`` times the baseline (``torch._int_mm`` on CPUs without VNNI
falls back to a reference loop, ~10 s a call at M=256) is timed once and kept out of the rounds.

    python -m bench.int8_microbench                 # linear + conv, JSON in bench/results/
    python -m bench.int8_microbench --only linear --ms 1 16 256 --warm 5
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn

from accel import QuantConv2d, QuantLinear, engines
from accel.cpu.int8 import act_qmax
from accel.quant import sqnr

from .common import compare, format_table, ratio, save_results

warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")

CONV_LAYERS = [
    # (C_in, C_out, H=W, kernel, stride): ResNet-18/50 shapes
    (64, 64, 56, 3, 1),
    (64, 128, 56, 3, 2),
    (128, 128, 28, 3, 1),
    (256, 256, 14, 3, 1),
    (256, 64, 56, 1, 1),
]


def _torch_dynamic(linear: nn.Linear):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)


def _time_once(fn, device) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _run_row(providers: dict, base: str, device: str, budget: float, inner: int, slow_cutoff: float, ref_out, outputs):
    """Time ``providers`` side by side; the ones slower than ``slow_cutoff`` x baseline are timed once."""
    base_once = _time_once(providers[base], device)
    slow = {}
    for name in list(providers):
        if name != base and name.startswith("torch_int_mm"):
            t = _time_once(providers[name], device)
            if t > slow_cutoff * base_once:
                slow[name] = t
                del providers[name]
    res = compare(providers, base, device=device, budget_s=budget, inner=inner)
    row = {f"ms_{n}": t.median_s * 1e3 for n, t in res.items()}
    row.update({f"x_{n}": t.speedup for n, t in res.items() if n != base})
    for name, t in slow.items():
        row[f"ms_{name}"] = t * 1e3
        row[f"x_{name}"] = res[base].median_s / t
        row[f"{name}_timed_once"] = True
    row.update({f"sqnr_{n}": sqnr(ref_out, out) for n, out in outputs.items()})
    row["rounds"] = res[base].rounds
    return row, res


def _vs(res, row, base: str, mine: str) -> float:
    """How many times faster ``mine`` ran than ``base``: the median of per-round ratios (both timed in the same
    rounds), or the ratio of medians for a provider timed once."""
    if base in res and mine in res:
        return ratio(res, base, mine)
    return row[f"ms_{base}"] / row[f"ms_{mine}"]


def _int_mm_quant(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What a user can write in plain torch ops: per-token int8 quantization, ``torch._int_mm``, dequant."""
    s = x.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    q = torch.round(x / s).to(torch.int8)
    return torch._int_mm(q, w_t).float() * (s * w_scale) + bias


def _decide(modules_inputs) -> None:
    """Run each accel module once so this machine's engine decisions are made before timing."""
    for m, x in modules_inputs:
        m(x)


def linear_rows(n, k, ms, device, budget, inner, slow_cutoff):
    rows = []
    torch.manual_seed(0)
    lin = nn.Linear(k, n).to(device)
    half = torch.float16 if device == "cuda" else torch.float32
    base = "fp16" if device == "cuda" else "fp32"
    lin_base = nn.Linear(k, n).to(device, half)
    lin_base.load_state_dict(lin.state_dict())
    lin_bf16 = nn.Linear(k, n).to(device, torch.bfloat16)
    lin_bf16.load_state_dict(lin.state_dict())
    q_dyn = QuantLinear.from_float(lin, "dynamic")
    q_wo = QuantLinear.from_float(lin, "weight_only")
    q_auto = QuantLinear.from_float(lin, "auto")
    q_auto_bf16 = QuantLinear.from_float(lin_bf16, "auto")
    b_int = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device).t()  # [K, N] column-major
    w_t = q_dyn.weight_q.t()
    torch_dyn = _torch_dynamic(_copy_linear(lin)) if device == "cpu" else None
    for m in ms:
        x = torch.randn(m, k, device=device)
        xb, x16 = x.to(half), x.bfloat16()
        a_int = torch.randint(-127, 128, (max(m, 17), k), dtype=torch.int8, device=device)
        with torch.no_grad():
            ref = lin(x)
            q_static = QuantLinear.from_float(lin, act_scale=x.abs().amax() / (act_qmax() if device == "cpu" else 127))
            _decide([(q_dyn, x), (q_wo, x), (q_auto, x), (q_auto_bf16, x16), (q_static, x)])
            providers = {
                base: lambda: lin_base(xb),
                "bf16": lambda: lin_bf16(x16),
                "accel_dynamic": lambda: q_dyn(x),
                "accel_static": lambda: q_static(x),
                "accel_weight_only": lambda: q_wo(x),
                "accel_auto": lambda: q_auto(x),
                "accel_auto_bf16": lambda: q_auto_bf16(x16),
                "torch_int_mm": lambda: torch._int_mm(a_int, b_int),
                "torch_int_mm_quant": lambda: _int_mm_quant(x, w_t, q_dyn.weight_scale, lin.bias),
            }
            if torch_dyn is not None:
                providers["torch_dynamic_int8"] = lambda: torch_dyn(x)
            outputs = {"accel_dynamic": q_dyn(x), "accel_static": q_static(x), "accel_weight_only": q_wo(x),
                       "accel_auto": q_auto(x), "accel_auto_bf16": q_auto_bf16(x16).float(), "bf16": lin_bf16(x16)}
            if torch_dyn is not None:
                outputs["torch_dynamic_int8"] = torch_dyn(x)
            row, res = _run_row(providers, base, device, budget, inner, slow_cutoff, ref, outputs)
        best_fp32_in = [b for b in (base, "bf16", "torch_dynamic_int8", "torch_int_mm_quant") if f"ms_{b}" in row]
        best = min(best_fp32_in, key=lambda b: row[f"ms_{b}"])
        row.update(layer="linear", shape=f"{n}x{k}", m=m, auto_mode=q_auto.resolved_mode(x),
                   auto_mode_bf16=q_auto_bf16.resolved_mode(x16), best_baseline=best,
                   x_auto_vs_best=_vs(res, row, best, "accel_auto"),
                   x_auto_bf16_vs_bf16=_vs(res, row, "bf16", "accel_auto_bf16"),
                   x_weight_only_vs_fp32=_vs(res, row, base, "accel_weight_only"))
        rows.append(row)
        print(f"linear {n}x{k} M={m:<4} auto ({row['auto_mode']}) {row['x_auto_vs_best']:.2f}x best ({best}); "
              + " ".join(f"{key[2:]}={val:.2f}x" for key, val in row.items() if key.startswith("x_")), flush=True)
    return rows


def _copy_linear(lin):
    new = nn.Linear(lin.in_features, lin.out_features)
    new.load_state_dict(lin.state_dict())
    return new


def conv_rows(batches, device, budget, inner, slow_cutoff):
    rows = []
    torch.manual_seed(0)
    half = torch.float16 if device == "cuda" else torch.float32
    base = "fp16" if device == "cuda" else "fp32"
    for c_in, c_out, hw, k, s in CONV_LAYERS:
        conv = nn.Conv2d(c_in, c_out, k, s, k // 2).to(device)
        conv_base = nn.Conv2d(c_in, c_out, k, s, k // 2).to(device, half)
        conv_base.load_state_dict(conv.state_dict())
        conv_cl = nn.Conv2d(c_in, c_out, k, s, k // 2).to(device, half).to(memory_format=torch.channels_last)
        conv_cl.load_state_dict(conv.state_dict())
        conv_bf16 = nn.Conv2d(c_in, c_out, k, s, k // 2).to(device, torch.bfloat16).to(memory_format=torch.channels_last)
        conv_bf16.load_state_dict(conv.state_dict())
        q = QuantConv2d.from_float(conv)  # dynamic int8
        q_auto = QuantConv2d.from_float(conv, "auto")
        q_auto_bf16 = QuantConv2d.from_float(conv_bf16, "auto")  # a bf16 model's layer: bf16 in, bf16 out
        for b in batches:
            x = torch.randn(b, c_in, hw, hw, device=device)
            xb, xcl = x.to(half), x.to(half).contiguous(memory_format=torch.channels_last)
            x16 = x.bfloat16().contiguous(memory_format=torch.channels_last)
            xq_cl = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref = conv(x)
                _decide([(q, x), (q, xq_cl), (q_auto, x), (q_auto, xq_cl), (q_auto_bf16, x16)])
                providers = {
                    base: lambda: conv_base(xb),
                    f"{base}_channels_last": lambda: conv_cl(xcl),
                    "bf16_channels_last": lambda: conv_bf16(x16),
                    "accel_int8": lambda: q(x),
                    "accel_int8_channels_last": lambda: q(xq_cl),
                    "accel_auto": lambda: q_auto(x),
                    "accel_auto_channels_last": lambda: q_auto(xq_cl),
                    "accel_auto_bf16_in": lambda: q_auto_bf16(x16),
                }
                row, res = _run_row(providers, base, device, budget, inner, slow_cutoff, ref,
                               {"accel_int8": q(x), "accel_auto": q_auto(x), "bf16_channels_last": conv_bf16(x16)})
            baselines = (base, f"{base}_channels_last", "bf16_channels_last")
            best = min(baselines, key=lambda p: row[f"ms_{p}"])
            best_fp32 = min(baselines[:2], key=lambda p: row[f"ms_{p}"])
            mine = min(("accel_auto", "accel_auto_channels_last"), key=lambda p: row[f"ms_{p}"])
            with torch.no_grad():
                q_auto(x)
                form = _conv_form()
                q_auto_bf16(x16)
                form_bf16 = _conv_form()
            row.update(layer="conv", shape=f"{c_in}->{c_out} {hw}x{hw} k{k} s{s}", m=b, best_baseline=best,
                       x_auto_vs_best=_vs(res, row, best, mine),
                       x_auto_vs_best_fp32=_vs(res, row, best_fp32, mine),
                       x_auto_bf16_in_vs_bf16=_vs(res, row, "bf16_channels_last", "accel_auto_bf16_in"),
                       x_int8_vs_best=max(_vs(res, row, best, "accel_int8"), _vs(res, row, best, "accel_int8_channels_last")),
                       auto_form=form, auto_form_bf16=form_bf16)
            rows.append(row)
            print(f"conv {row['shape']} B={b} auto ({row['auto_form']}) {row['x_auto_vs_best']:.2f}x best ({best}); "
                  + " ".join(f"{key[2:]}={val:.2f}x" for key, val in row.items() if key.startswith("x_")), flush=True)
    return rows


def _conv_form() -> str:
    from accel import engines

    key = engines.last_key("int8_conv2d")
    d = engines.decision(key) if key else None
    return "-" if d is None else (d.engine if d.engine.startswith("float") else f"int8 ({d.engine})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["linear", "conv"])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    ap.add_argument("--warm", type=int, default=1, metavar="N", help="N back-to-back calls per turn (default 1: cold)")
    ap.add_argument("--slow-cutoff", type=float, default=20.0, help="time once providers slower than this x baseline")
    ap.add_argument("--json", help="output path (default bench/results/int8_microbench-<device>.json)")
    args = ap.parse_args(argv)
    rows = []
    if args.only in (None, "linear"):
        rows += linear_rows(args.n, args.k, args.ms, args.device, args.budget, args.warm, args.slow_cutoff)
    if args.only in (None, "conv"):
        rows += conv_rows(args.batches, args.device, args.budget, args.warm, args.slow_cutoff)
    base = "fp16" if args.device == "cuda" else "fp32"
    print()
    lin = [r for r in rows if r["layer"] == "linear"]
    if lin:
        cols = [("shape", "linear", "s"), ("m", "M", "d"), (f"ms_{base}", f"{base} ms", ".3f"),
                ("auto_mode", "auto picks", "s"), ("x_accel_auto", f"x auto vs {base}", ".2f"),
                ("best_baseline", "best baseline", "s"), ("x_auto_vs_best", "x auto vs best", ".2f"),
                ("x_accel_dynamic", "x int8 dyn", ".2f"), ("x_accel_static", "x int8 static", ".2f"),
                ("x_weight_only_vs_fp32", "x w-only", ".2f"), ("x_bf16", "x bf16", ".2f"),
                ("x_torch_dynamic_int8", "x torch dyn int8", ".2f"), ("x_torch_int_mm_quant", "x _int_mm+quant", ".2f"),
                ("x_torch_int_mm", "x torch._int_mm", ".2f"), ("x_auto_bf16_vs_bf16", "auto bf16 x bf16", ".2f"),
                ("sqnr_accel_auto", "SQNR auto", ".1f"), ("sqnr_torch_dynamic_int8", "SQNR torch", ".1f")]
        print(format_table(lin, cols))
    conv = [r for r in rows if r["layer"] == "conv"]
    if conv:
        cols = [("shape", "conv", "s"), ("m", "B", "d"), (f"ms_{base}", f"{base} ms", ".3f"),
                ("auto_form", "auto runs (fp32 in)", "s"), ("x_auto_vs_best_fp32", "x auto vs best fp32", ".2f"),
                ("best_baseline", "best baseline", "s"), ("x_auto_vs_best", "x auto vs best", ".2f"),
                ("auto_form_bf16", "auto runs (bf16 in)", "s"), ("x_auto_bf16_in_vs_bf16", "bf16 in: x bf16 NHWC", ".2f"),
                ("x_int8_vs_best", "x int8 vs best", ".2f"),
                ("x_accel_int8", "x int8", ".2f"), ("x_accel_int8_channels_last", "x int8 (NHWC in)", ".2f"),
                (f"x_{base}_channels_last", f"x {base} NHWC", ".2f"), ("x_bf16_channels_last", "x bf16 NHWC", ".2f"),
                ("sqnr_accel_int8", "SQNR int8", ".1f")]
        print()
        print(format_table(conv, cols))
    extra = {"cpu_act_qmax": act_qmax() if args.device == "cpu" else 127,
             "engine_decisions": {k: vars(d) for k, d in engines.decisions().items()}}
    path = save_results("int8_microbench", rows, extra=extra, path=args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
