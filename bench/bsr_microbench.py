"""Block-sparse linear microbenchmark: ``y = x @ W^T`` with a block-sparse ``W``.

Prints a table of the speedup of accel's block-sparse path over dense fp32 (``F.linear``), dense
bf16 and torch's own BSR matmul, over block densities, batch sizes M and input dtypes (fp32 and
bf16: each compared first with the dense layer in its own dtype), and saves it as JSON under
``bench/results/``. ``accel`` is a SparseLinear in mode "sparse" (block-sparse strategies only),
``accel_auto`` in mode "auto" (may run the densified weight where that is faster here); both
use the engines ``accel.engines`` measures on this machine (decided before timing starts). All
providers of one (density, M) cell run side by side in the same
rounds (``bench.common.compare``). On CUDA the providers are cuBLAS fp16/bf16, torch's Triton
``bsr_dense_mm`` and accel's Triton kernel; on CPU dense fp32/bf16, torch BSR and accel's CPU path.

    python -m bench.bsr_microbench                       # 4096x4096, block 32, the issue's grid
    python -m bench.bsr_microbench --strategies          # also each CPU strategy (crossover tuning)
    python -m bench.bsr_microbench --warm 5                # each provider 5 calls in a row (warm caches)
    python -m bench.bsr_microbench --densities 0.3 0.4 --ms 1 16 256 --json /tmp/x.json

"Cold" (the default) is the layer-inside-a-model case: between two calls of one provider the others
stream their weights through the caches. "Warm" is the layer-in-a-loop case.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from accel.cpu import bsr as cpu_bsr
from accel.formats import BSRMatrix, topk_block_mask
from accel.ops import bsr_linear

from .common import compare, format_table, ratio, save_results

warnings.filterwarnings("ignore", "Sparse BSR tensor support is in beta state")


def random_bsr(n: int, k: int, block: int, density: float, dtype: torch.dtype, device: str, seed: int = 0) -> BSRMatrix:
    """A ``[n, k]`` Gaussian weight keeping a random ``density`` fraction of its blocks."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scores = torch.rand((n + block - 1) // block, (k + block - 1) // block, generator=g)
    bsr = BSRMatrix.from_dense(w, block, topk_block_mask(scores, 1.0 - density))
    return BSRMatrix(bsr.values.to(device, dtype), bsr.crow_indices.to(device), bsr.col_indices.to(device),
                     bsr.shape, block)


def cpu_providers(bsr: BSRMatrix, x: torch.Tensor, strategies: bool) -> dict:
    """``x`` and ``bsr`` in the input dtype (fp32 or bf16); the dense baselines in fp32 and bf16."""
    w = bsr.to_dense()
    w32, x32, w16, x16 = w.float(), x.float(), w.bfloat16(), x.bfloat16()
    # torch's CPU BSR matmul has no bf16 kernel: it runs in fp32 (the best a bf16 user has there)
    tw = BSRMatrix(bsr.values.float(), bsr.crow_indices, bsr.col_indices, bsr.shape, bsr.block_size).to_torch_sparse()
    k = bsr.shape[1]
    x_pad = F.pad(x32, (0, tw.shape[1] - k)) if tw.shape[1] != k else x32
    args = (bsr.values, bsr.crow_indices, bsr.col_indices, bsr.shape)
    p = {
        "dense_fp32": lambda: F.linear(x32, w32),
        "dense_bf16": lambda: F.linear(x16, w16),
        "torch_bsr": lambda: (tw @ x_pad.t()).t(),  # what a user writes: y = (W @ x^T)^T
        "accel": lambda: bsr_linear(x, *args),
        "accel_auto": lambda: bsr_linear(x, *args, allow_dense=True),
    }
    if strategies:
        for s in cpu_bsr.STRATEGIES:
            p[s] = (lambda s=s: cpu_bsr.bsr_dense_mm_cpu(x, bsr.values, bsr.crow_indices, bsr.col_indices,
                                                          bsr.shape[0], strategy=s))
    return p


def cuda_providers(bsr: BSRMatrix, x: torch.Tensor) -> dict:
    from torch.sparse._triton_ops import bsr_dense_mm

    w = bsr.to_dense()
    w16, x16 = w.bfloat16(), x.bfloat16()
    tw = bsr.to_torch_sparse()
    k = bsr.shape[1]
    xt = F.pad(x, (0, tw.shape[1] - k)).t().contiguous()
    args = (bsr.values, bsr.crow_indices, bsr.col_indices, bsr.shape)
    return {
        "dense_fp16": lambda: F.linear(x, w),  # cuBLAS, x is fp16 on CUDA
        "dense_bf16": lambda: F.linear(x16, w16),
        "torch_bsr": lambda: bsr_dense_mm(tw, xt),
        "accel": lambda: bsr_linear(x, *args),
    }


def run(n, k, block, densities, ms, device, budget_s, strategies, inner=1, dtypes=("float32",)) -> list[dict]:
    rows = []
    for dtype_name in dtypes if device == "cpu" else ("float16",):
        dtype = getattr(torch, dtype_name)
        base = "dense_fp16" if device == "cuda" else "dense_fp32"
        same = {torch.float32: "dense_fp32", torch.bfloat16: "dense_bf16"}.get(dtype, base)
        rows += _run_dtype(n, k, block, densities, ms, device, budget_s, strategies, inner, dtype, base, same)
    return rows


def _run_dtype(n, k, block, densities, ms, device, budget_s, strategies, inner, dtype, base, same) -> list[dict]:
    rows = []
    for density in densities:
        bsr = random_bsr(n, k, block, density, dtype, device)
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device=device)
            providers = cuda_providers(bsr, x) if device == "cuda" else cpu_providers(bsr, x, strategies)
            with torch.no_grad():
                for name in ("accel", "accel_auto"):  # decide this machine's engines before timing
                    if name in providers:
                        torch.testing.assert_close(providers[name]().float(), providers[same]().float(),
                                                   rtol=2e-2, atol=2e-2 * (k ** 0.5))
                res = compare(providers, base, device=device, budget_s=budget_s, inner=inner)
            row = {"n": n, "k": k, "block": block, "density": density, "m": m, "dtype": str(dtype),
                   "cache": "cold" if inner == 1 else "warm"}
            row.update({f"ms_{name}": t.median_s * 1e3 for name, t in res.items()})
            row["vs_dense"] = ratio(res, base, "accel")
            row["vs_same_dtype_dense"] = ratio(res, same, "accel")
            row["vs_bf16"] = ratio(res, "dense_bf16", "accel")
            row["vs_torch_bsr"] = ratio(res, "torch_bsr", "accel")
            if "accel_auto" in res:
                row["auto_vs_same_dtype_dense"] = ratio(res, same, "accel_auto")
                row["auto_vs_best_dense"] = min(ratio(res, "dense_fp32", "accel_auto"),
                                                ratio(res, "dense_bf16", "accel_auto"))
            row["vs_best_dense"] = min(ratio(res, "dense_bf16", "accel"), ratio(res, base, "accel"))
            for s in cpu_bsr.STRATEGIES if strategies and device == "cpu" else ():
                row[f"vs_dense_{s}"] = res[s].speedup
            row["rounds"] = res[base].rounds
            rows.append(row)
            print(f"{str(dtype)[6:]:<8} density {density:<5} M {m:<5} accel {row['vs_same_dtype_dense']:.2f}x dense "
                  f"{str(dtype)[6:]}, {row['vs_dense']:.2f}x fp32, {row['vs_bf16']:.2f}x bf16, "
                  f"{row['vs_torch_bsr']:.2f}x torch BSR ({row['rounds']} rounds)", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="out_features")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.05])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timing per cell")
    ap.add_argument("--strategies", action="store_true", help="also time every CPU strategy")
    ap.add_argument("--warm", type=int, default=1, metavar="N",
                    help="N back-to-back calls per turn, timing the last N-1 (default 1: one cold call per turn)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="input dtypes (CPU)")
    ap.add_argument("--proportional", action="store_true",
                    help="also: a 1536->384 layer keeping 1 of its 576 blocks at M=4096 (cost must follow the blocks)")
    ap.add_argument("--json", help="output path (default bench/results/bsr_microbench-<device>.json)")
    args = ap.parse_args(argv)
    rows = run(args.n, args.k, args.block, args.densities, args.ms, args.device, args.budget, args.strategies,
               args.warm, args.dtypes)
    if args.proportional:
        rows += proportional(args.device, args.budget)
    base = "dense_fp16" if args.device == "cuda" else "dense_fp32"
    cols = [("dtype", "x dtype", "s"), ("density", "density", ".3f"), ("m", "M", "d"), (f"ms_{base}", f"{base} ms", ".3f"),
            ("ms_accel", "accel ms", ".3f"), ("vs_same_dtype_dense", "x dense same dtype", ".2f"),
            ("vs_dense", f"x {base}", ".2f"), ("vs_bf16", "x dense_bf16", ".2f"), ("vs_torch_bsr", "x torch_bsr", ".2f"),
            ("auto_vs_same_dtype_dense", "auto x dense same dtype", ".2f")]
    if args.strategies and args.device == "cpu":
        cols += [(f"vs_dense_{s}", s, ".2f") for s in cpu_bsr.STRATEGIES]
    print()
    print(format_table(rows, cols))
    path = save_results("bsr_microbench", rows, path=args.json)
    print(f"\nsaved {path}")


def proportional(device: str, budget_s: float) -> list[dict]:
    """Cost follows the stored blocks: a 1536->384 layer keeping 1 of its 576 blocks at M=4096, against
    the same layer keeping all blocks and against dense (the output must still be written)."""
    rows = []
    x = torch.randn(4096, 1536, device=device)
    for keep in (1, 58, 576):
        bsr = random_bsr(384, 1536, 32, keep / 576, torch.float32, device, seed=1)
        w = bsr.to_dense()
        args = (bsr.values, bsr.crow_indices, bsr.col_indices, bsr.shape)
        p = {"dense_fp32": lambda: F.linear(x, w), "accel": lambda: bsr_linear(x, *args)}
        with torch.no_grad():
            p["accel"]()
            res = compare(p, "dense_fp32", device=device, budget_s=budget_s)
        rows.append({"n": 384, "k": 1536, "block": 32, "density": keep / 576, "m": 4096, "dtype": "torch.float32",
                     "cache": "cold", "ms_dense_fp32": res["dense_fp32"].median_s * 1e3,
                     "ms_accel": res["accel"].median_s * 1e3, "vs_dense": res["accel"].speedup,
                     "vs_same_dtype_dense": res["accel"].speedup, "kept_blocks": keep})
        print(f"proportional: {keep}/576 blocks at M=4096: accel {rows[-1]['ms_accel']:.3f} ms, dense "
              f"{rows[-1]['ms_dense_fp32']:.3f} ms ({rows[-1]['vs_dense']:.2f}x)", flush=True)
    return rows


if __name__ == "__main__":
    main()
