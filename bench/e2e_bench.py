"""End-to-end CPU latency of larger models defined in the project, randomly initialised: a
ResNet-18-shaped CNN and a transformer MLP block, dense fp32 (NCHW and channels_last) / bf16 against accel's sparse, int8
and sparse+int8 conversions (``accel.sparsify_`` / ``accel.quantize_`` with measurement, so each
layer keeps its faster form at the benchmarked shape; the per-layer decisions are saved too).

    python -m bench.e2e_bench                         # both models, JSON in bench/results/
    python -m bench.e2e_bench --only mlp --tokens 1 256
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

import accel
from accel.models import ResNet18Shaped, TransformerMLP

from .common import compare, format_table, save_results


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels_last (what a speed-aware CPU user feeds convs: oneDNN's layout); else ``x``."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def variants(model: nn.Module, x: torch.Tensor, sparsity: float, block: int, with_bf16: bool) -> tuple[dict, dict]:
    """``{name: model}`` for dense fp32, bf16, sparse, int8, sparse+int8, and the decisions of each.

    Images go to every model but the fp32 baseline in channels_last (the bf16 baseline too: its best
    form). Sparse variants prune every Linear and, for CNNs, every conv (``SparseConv2d``)."""
    model = model.eval()
    out = {"dense_fp32": model}
    decisions = {}
    xf = _fast_layout(x)
    convs = x.dim() == 4
    if convs:
        out["dense_fp32_cl"] = model
    if with_bf16:
        out["dense_bf16"] = copy.deepcopy(model).to(torch.bfloat16, memory_format=torch.channels_last) if convs else \
            copy.deepcopy(model).to(torch.bfloat16)
    cfg = accel.SparsityConfig(sparsity=sparsity, block=block, convs=convs)
    sparse = copy.deepcopy(model)
    decisions["sparse"] = accel.sparsify_(sparse, cfg, example_inputs=(xf,))
    out["sparse"] = sparse
    q = copy.deepcopy(model)
    decisions["int8"] = accel.quantize_(q, example_inputs=(xf,))
    out["int8"] = q
    both = copy.deepcopy(model)
    rows = accel.sparsify_(both, cfg, example_inputs=(xf,))
    accel.api.linearize_kept_dense_(both, rows)  # pruned layers kept dense may still go int8
    rows += accel.quantize_(both, example_inputs=(xf,))
    decisions["sparse+int8"] = rows
    out["sparse+int8"] = both
    return out, decisions


def bench_model(name: str, model: nn.Module, x: torch.Tensor, sparsity: float, block: int, budget: float,
                with_bf16: bool) -> tuple[dict, dict]:
    models, decisions = variants(model, x, sparsity, block, with_bf16)
    xf = _fast_layout(x)
    inputs = {k: x if k == "dense_fp32" else xf.bfloat16() if k == "dense_bf16" else xf for k in models}
    with torch.no_grad():
        ref = models["dense_fp32"](x)
        res = compare({k: (lambda k=k: models[k](inputs[k])) for k in models}, "dense_fp32", budget_s=budget)
        # quantization error only: int8 against dense, sparse+int8 against sparse (pruning random
        # weights changes the function, so SQNR against dense says nothing there)
        sparse_ref = models["sparse"](x)
        sq = {"int8": accel.quant.sqnr(ref, models["int8"](xf)),
              "sparse+int8": accel.quant.sqnr(sparse_ref, models["sparse+int8"](xf))}
        if "dense_bf16" in models:
            sq["dense_bf16"] = accel.quant.sqnr(ref, models["dense_bf16"](inputs["dense_bf16"]).float())
    row = {"model": name, "input": "x".join(map(str, x.shape)), "rounds": res["dense_fp32"].rounds}
    for k, t in res.items():
        row[f"ms_{k}"] = t.median_s * 1e3
        row[f"x_{k}"] = t.speedup
    row.update({f"sqnr_{k}": v for k, v in sq.items()})
    print(f"{name} {row['input']}: " + " ".join(f"{k}={res[k].speedup:.2f}x" for k in res), flush=True)
    return row, decisions


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["resnet", "mlp"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="ResNet batch sizes (224x224)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 256], help="MLP tokens per call")
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--budget", type=float, default=5.0)
    ap.add_argument("--no-bf16", action="store_true", help="skip bf16 (very slow on CPUs without AVX512-BF16)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows, all_decisions = [], {}
    if args.only in (None, "mlp"):
        mlp = TransformerMLP(1024, 4096)
        for t in args.tokens:
            row, dec = bench_model("TransformerMLP(1024, 4096)", mlp, torch.randn(t, 1024), args.sparsity, args.block,
                                   args.budget, not args.no_bf16)
            rows.append(row)
            all_decisions[f"mlp tokens={t}"] = dec
    if args.only in (None, "resnet"):
        net = ResNet18Shaped()
        for b in args.batches:
            row, dec = bench_model("ResNet18Shaped", net, torch.randn(b, 3, 224, 224), args.sparsity, args.block,
                                   args.budget, not args.no_bf16)
            rows.append(row)
            all_decisions[f"resnet batch={b}"] = dec
    cols = [("model", "model", "s"), ("input", "input", "s"), ("ms_dense_fp32", "fp32 ms", ".2f"),
            ("x_dense_fp32_cl", "x fp32 NHWC", ".2f"), ("x_dense_bf16", "x bf16", ".2f"), ("x_sparse", "x sparse", ".2f"),
            ("x_int8", "x int8", ".2f"),
            ("x_sparse+int8", "x sparse+int8", ".2f"), ("sqnr_int8", "SQNR int8", ".1f"),
            ("sqnr_sparse+int8", "SQNR sparse+int8 vs sparse", ".1f")]
    print()
    print(format_table(rows, cols))
    path = save_results("e2e_bench", rows, extra={"decisions": all_decisions, "sparsity": args.sparsity,
                                                 "block": args.block}, path=args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
