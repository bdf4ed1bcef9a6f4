"""Structural channel pruning end to end: a ResNet-18-shaped CNN (random init, 224x224) with 50% of
the channels of every prunable layer removed by ``accel.shrink.shrink_``, against the dense fp32
model, then shrunk + ``accel.quantize_`` (int8, measured per layer at the benchmarked shape). The
int8 model is fed channels_last images (oneDNN's layout, as ``accel compress`` feeds its compressed
model; the conversion is timed with it); the same model fed NCHW is a row of its own. Dense bf16
channels_last and shrunk bf16 channels_last are reference rows (what a user gets by converting the
whole model to bf16 themselves). All variants are timed side by side
(``bench.common.compare``); speedups are medians of per-round ratios to dense fp32.

Goals: shrunk >= 1.8x and shrunk + int8 >= 3x dense fp32. The weights are random, so no accuracy
is reported: pruning changes the function (recover it with ``accel.distill.train``); the SQNR
column is the int8 error against the shrunk fp32 model only.

    python -m bench.shrink_bench            # batch 1 and 8, JSON in bench/results/
    python -m bench.shrink_bench --quick    # batch 1, short budgets
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn

import accel
from accel.models import ResNet18Shaped
from accel.shrink import shrink_

from .common import compare, format_table, save_results

GOALS = {"shrunk": 1.8, "shrunk+int8": 3.0, "shrunk_bf16+int8": 3.0}


def macs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of the Conv2d / Linear layers for one call (counted on float models)."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total[0] += out.numel() * m.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return float(total[0])


def build(ratio: float, x: torch.Tensor) -> tuple[dict[str, nn.Module], list[dict], dict]:
    """Dense fp32, dense bf16 channels_last, shrunk fp32 and shrunk + int8 variants."""
    torch.manual_seed(0)
    dense = ResNet18Shaped().eval()
    shrunk = copy.deepcopy(dense)
    t0 = time.perf_counter()
    report = shrink_(shrunk, (x,), ratio, scope="layer")
    info = {"shrink_s": time.perf_counter() - t0, "macs_dense": macs(dense, x), "macs_shrunk": macs(shrunk, x),
            "params_dense": sum(p.numel() for p in dense.parameters()),
            "params_shrunk": sum(p.numel() for p in shrunk.parameters())}
    q = copy.deepcopy(shrunk)
    t0 = time.perf_counter()
    decisions = accel.quantize_(q, accel.QuantConfig(budget_s=0.15),
                                example_inputs=(x.contiguous(memory_format=torch.channels_last),))
    info["quantize_s"] = time.perf_counter() - t0
    q16 = copy.deepcopy(shrunk).to(torch.bfloat16).to(memory_format=torch.channels_last)
    decisions_bf16 = accel.quantize_(q16, accel.QuantConfig(budget_s=0.15),
                                     example_inputs=(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),))
    bf16 = copy.deepcopy(dense).to(torch.bfloat16).to(memory_format=torch.channels_last)
    shrunk_bf16 = copy.deepcopy(shrunk).to(torch.bfloat16).to(memory_format=torch.channels_last)
    models = {"dense_fp32": dense, "dense_bf16_cl": bf16, "shrunk": shrunk, "shrunk_bf16_cl": shrunk_bf16,
              "shrunk+int8": q, "shrunk+int8_nchw": q, "shrunk_bf16+int8": q16}
    return models, report, {**info, "int8_decisions": decisions, "int8_decisions_bf16": decisions_bf16}


def bench_batch(batch: int, ratio: float, budget: float) -> tuple[list[dict], dict]:
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 224, 224)
    models, report, info = build(ratio, x)
    def to_bf16_cl(t):
        return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def to_cl(t):
        return t.contiguous(memory_format=torch.channels_last)

    # the conversion of the input is part of each timed call
    convert = {"dense_bf16_cl": to_bf16_cl, "shrunk_bf16_cl": to_bf16_cl, "shrunk+int8": to_cl,
               "shrunk_bf16+int8": to_bf16_cl}
    with torch.no_grad():
        res = compare({k: (lambda k=k: models[k](convert.get(k, lambda t: t)(x))) for k in models}, "dense_fp32",
                      budget_s=budget)
        ref = models["shrunk"](x)
        sqnr = accel.quant.sqnr(ref, models["shrunk+int8"](x))
        sqnr_bf16 = accel.quant.sqnr(ref, models["shrunk_bf16+int8"](to_bf16_cl(x)).float())
    n_int8 = sum(d["decision"].startswith("int8") for d in info["int8_decisions"])
    n_int8_bf16 = sum(d["decision"].startswith("int8") for d in info["int8_decisions_bf16"])
    notes = {"dense_fp32": "baseline", "dense_bf16_cl": "reference (no pruning)",
             "shrunk": f"{ratio:.0%} of channels removed", "shrunk_bf16_cl": "reference: shrunk, whole model bf16",
             "shrunk+int8": f"{n_int8}/{len(info['int8_decisions'])} layers int8, SQNR {sqnr:.1f} dB vs shrunk; "
                            "channels_last input",
             "shrunk+int8_nchw": "the same model fed NCHW",
             "shrunk_bf16+int8": f"{n_int8_bf16}/{len(info['int8_decisions_bf16'])} layers int8, SQNR "
                                 f"{sqnr_bf16:.1f} dB vs shrunk; the bf16 channels_last shrunk model quantized"}
    rows = []
    for k, t in res.items():
        rows.append({"batch": batch, "variant": k, "ms": t.median_s * 1e3, "speedup": t.speedup, "rounds": t.rounds,
                     "gmacs": (info["macs_shrunk"] if k.startswith("shrunk") else info["macs_dense"]) / 1e9,
                     "goal": GOALS.get(k), "met": (t.speedup >= GOALS[k]) if k in GOALS else None, "note": notes[k]})
    print(f"batch {batch}: " + " ".join(f"{k}={res[k].speedup:.2f}x" for k in res) +
          f" (shrink {info['shrink_s']:.1f}s, quantize_ {info['quantize_s']:.1f}s)", flush=True)
    extra = dict(info)  # int8_decisions and int8_decisions_bf16 included
    extra.update(report=report, sqnr_int8_vs_shrunk=sqnr, sqnr_int8_bf16_vs_shrunk=sqnr_bf16)
    return rows, extra


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8; --quick: 1)")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of channels removed per layer")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per batch (default 12; --quick 3)")
    ap.add_argument("--quick", action="store_true", help="batch 1 and a short timing budget (a smoke run)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    batches = args.batches or ([1] if args.quick else [1, 8])
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 12.0)
    rows, details = [], {}
    for b in batches:
        r, extra = bench_batch(b, args.ratio, budget)
        rows += r
        details[f"batch={b}"] = extra
    cols = [("batch", "batch", "d"), ("variant", "variant", "s"), ("ms", "ms", ".1f"), ("speedup", "x fp32", ".2f"),
            ("goal", "goal", ".1f"), ("gmacs", "GMACs", ".2f"), ("note", "note", "s")]
    print()
    print(format_table(rows, cols))
    path = save_results("shrink_bench", rows, extra={"ratio": args.ratio, "quick": args.quick, "details": details},
                        path=args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
