"""Block-sparse linear microbenchmark: ``y = x @ W^T`` with a block-sparse ``W``.

Prints a table of the speedup of accel's block-sparse path over dense fp32 (``F.linear``), dense
bf16 and torch's own BSR matmul, over block densities and batch sizes M, and saves it as JSON
under ``bench/results/``. All providers of one (density, M) cell run side by side in the same
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
    w = bsr.to_dense()
    w16, x16 = w.bfloat16(), x.bfloat16()
    tw = bsr.to_torch_sparse()
    k = bsr.shape[1]
    xt_pad = F.pad(x, (0, tw.shape[1] - k)).t().contiguous() if tw.shape[1] != k else x.t().contiguous()
    args = (bsr.values, bsr.crow_indices, bsr.col_indices, bsr.shape)
    p = {
        "dense_fp32": lambda: F.linear(x, w),
        "dense_bf16": lambda: F.linear(x16, w16),
        "torch_bsr": lambda: (tw @ xt_pad).t(),
        "accel": lambda: bsr_linear(x, *args),
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


def run(n, k, block, densities, ms, device, budget_s, strategies, inner=1) -> list[dict]:
    dtype = torch.float16 if device == "cuda" else torch.float32
    base = "dense_fp16" if device == "cuda" else "dense_fp32"
    rows = []
    for density in densities:
        bsr = random_bsr(n, k, block, density, dtype, device)
        for m in ms:
            x = torch.randn(m, k, dtype=dtype, device=device)
            providers = cuda_providers(bsr, x) if device == "cuda" else cpu_providers(bsr, x, strategies)
            with torch.no_grad():
                torch.testing.assert_close(providers["accel"]().float(), providers[base]().float(),
                                           rtol=2e-2, atol=2e-2 * (k ** 0.5))
                res = compare(providers, base, device=device, budget_s=budget_s, inner=inner)
            row = {"n": n, "k": k, "block": block, "density": density, "m": m, "dtype": str(dtype),
                   "cache": "cold" if inner == 1 else "warm"}
            row.update({f"ms_{name}": t.median_s * 1e3 for name, t in res.items()})
            row["vs_dense"] = res["accel"].speedup
            row["vs_bf16"] = ratio(res, "dense_bf16", "accel")
            row["vs_torch_bsr"] = ratio(res, "torch_bsr", "accel")
            for s in cpu_bsr.STRATEGIES if strategies and device == "cpu" else ():
                row[f"vs_dense_{s}"] = res[s].speedup
            row["rounds"] = res[base].rounds
            rows.append(row)
            print(f"density {density:<5} M {m:<5} accel {row['vs_dense']:.2f}x dense, {row['vs_bf16']:.2f}x bf16, "
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
    ap.add_argument("--json", help="output path (default bench/results/bsr_microbench-<device>.json)")
    args = ap.parse_args(argv)
    rows = run(args.n, args.k, args.block, args.densities, args.ms, args.device, args.budget, args.strategies,
               args.warm)
    base = "dense_fp16" if args.device == "cuda" else "dense_fp32"
    cols = [("density", "density", ".2f"), ("m", "M", "d"), (f"ms_{base}", f"{base} ms", ".3f"),
            ("ms_accel", "accel ms", ".3f"), ("vs_dense", f"x {base}", ".2f"), ("vs_bf16", "x dense_bf16", ".2f"),
            ("vs_torch_bsr", "x torch_bsr", ".2f")]
    if args.strategies and args.device == "cpu":
        cols += [(f"vs_dense_{s}", s, ".2f") for s in cpu_bsr.STRATEGIES]
    print()
    print(format_table(rows, cols))
    path = save_results("bsr_microbench", rows, path=args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
