"""Block-sparse Conv2d benchmark: SparseConv2d on the ResNet-18-shaped 3x3 layers.

Layers: 64->64 at 56x56 (stride 1), 64->128 at 56x56 (stride 2), 128->128 at 28x28, 256->256 at
14x14, 512->512 at 7x7 (padding 1); batch sizes 1 and 8; block densities 0.1 (90% block sparsity)
and 0.5. In each (layer, density, batch) cell these run side by side in the same rounds
(``bench.common.compare``; medians of per-round ratios):

* ``dense_fp32`` ``F.conv2d`` fp32 NCHW (the baseline), ``dense_fp32_cl`` fp32 channels_last,
  ``dense_bf16_cl`` bf16 channels_last (what a user can already get);
* ``accel_fp32`` / ``accel_bf16``: ``SparseConv2d`` (mode "sparse": block-sparse engines only) on
  channels_last inputs in fp32 / bf16 (``accel_fp32_nchw``: the fp32 layer fed the NCHW input, as most models
  do), each running the engine ``accel.engines`` measured fastest
  on this machine (decided before timing starts); ``accel_auto_bf16``: mode "auto" (may run the
  dense conv of the densified weight where the sparse engines do not pay).

On CUDA the accel providers run the Triton kernels and the dense ones cuDNN. The figure of issue
11: at density 0.1, batch 8, ``accel_bf16`` >= 1.5x ``dense_bf16_cl`` and ``accel_fp32`` >= 3x
``dense_fp32``.

    python -m bench.sparse_conv_bench                      # the grid above, JSON in bench/results/
    python -m bench.sparse_conv_bench --batches 8 --densities 0.1 --budget 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from accel import SparseConv2d, engines

from .common import compare, format_table, ratio, save_results

#: (in, out, input size, stride) of the ResNet-18 3x3 convs
LAYERS = ((64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1))


def random_sparse_conv(c: int, o: int, stride: int, density: float, block: int, seed: int = 0) -> SparseConv2d:
    """A 3x3 conv (padding 1) keeping a random ``density`` fraction of its blocks (random scores, so the
    kept blocks are spread as pruning spreads them, not the largest of a random init)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, o, 3, stride, 1)
    nbr, nbc = -(-o // block), -(-9 * c // block)
    scores = torch.rand(nbr, nbc)
    keep = max(1, round(density * nbr * nbc))
    mask = torch.zeros(nbr * nbc, dtype=torch.bool)
    mask[torch.argsort(scores.flatten(), descending=True)[:keep]] = True
    return SparseConv2d.from_dense(conv, block=block, mask=mask.view(nbr, nbc), mode="sparse")


def providers(sc: SparseConv2d, x: torch.Tensor) -> dict:
    dense = sc.to_dense()
    w32, b32 = dense.weight.detach(), dense.bias.detach()
    w32_cl = w32.contiguous(memory_format=torch.channels_last)
    w16_cl, b16 = w32_cl.bfloat16(), b32.bfloat16()
    x32, x32_cl = x.contiguous(), x.contiguous(memory_format=torch.channels_last)
    x16_cl = x32_cl.bfloat16()
    s, p = sc.stride, sc.padding
    s32 = sc
    s16 = SparseConv2d.from_dense(dense, block=sc.block_size, mask=sc.bsr().block_mask(), mode="sparse").to(torch.bfloat16)
    a16 = SparseConv2d.from_dense(dense, block=sc.block_size, mask=sc.bsr().block_mask(), mode="auto").to(torch.bfloat16)
    return {
        "dense_fp32": lambda: F.conv2d(x32, w32, b32, s, p),
        "dense_fp32_cl": lambda: F.conv2d(x32_cl, w32_cl, b32, s, p),
        "dense_bf16_cl": lambda: F.conv2d(x16_cl, w16_cl, b16, s, p),
        "accel_fp32": lambda: s32(x32_cl),
        "accel_fp32_nchw": lambda: s32(x32),
        "accel_bf16": lambda: s16(x16_cl),
        "accel_auto_bf16": lambda: a16(x16_cl),
    }


def _engine(sc_call) -> str:
    sc_call()
    key = engines.last_key("bsr_conv2d")
    dec = engines.decision(key) if key else None
    return dec.engine if dec is not None else "default"


def run(layers, batches, densities, block, budget_s, device) -> list[dict]:
    rows = []
    for c, o, hw, stride in layers:
        for density in densities:
            sc = random_sparse_conv(c, o, stride, density, block).to(device)
            for n in batches:
                x = torch.randn(n, c, hw, hw, device=device)
                p = providers(sc, x)
                with torch.no_grad():
                    ref = p["dense_fp32"]()
                    used = {}
                    for name in ("accel_fp32", "accel_fp32_nchw", "accel_bf16", "accel_auto_bf16"):  # decided, checked
                        used[name] = _engine(p[name])
                        err = (p[name]().float() - ref).norm() / ref.norm().clamp_min(1e-30)
                        assert err < (1e-4 if name.startswith("accel_fp32") else 3e-2), (name, float(err))
                    res = compare(p, "dense_fp32", device=device, budget_s=budget_s)
                row = {"layer": f"{c}->{o} {hw}x{hw} s{stride}", "in": c, "out": o, "hw": hw, "stride": stride,
                       "block": block, "density": density, "batch": n,
                       **{f"ms_{k}": t.median_s * 1e3 for k, t in res.items()},
                       "engine_fp32": used["accel_fp32"], "engine_fp32_nchw": used["accel_fp32_nchw"],
                       "engine_bf16": used["accel_bf16"],
                       "engine_auto_bf16": used["accel_auto_bf16"],
                       "fp32_vs_dense_fp32": ratio(res, "dense_fp32", "accel_fp32"),
                       "fp32_vs_dense_fp32_cl": ratio(res, "dense_fp32_cl", "accel_fp32"),
                       "fp32_nchw_vs_dense_fp32": ratio(res, "dense_fp32", "accel_fp32_nchw"),
                       "bf16_vs_dense_fp32": ratio(res, "dense_fp32", "accel_bf16"),
                       "bf16_vs_dense_bf16_cl": ratio(res, "dense_bf16_cl", "accel_bf16"),
                       "auto_bf16_vs_dense_bf16_cl": ratio(res, "dense_bf16_cl", "accel_auto_bf16"),
                       "dense_bf16_cl_vs_dense_fp32": ratio(res, "dense_fp32", "dense_bf16_cl"),
                       "rounds": res["dense_fp32"].rounds}
                rows.append(row)
                print(f"{row['layer']:<18} density {density:<4} batch {n:<2}: accel fp32 {row['fp32_vs_dense_fp32']:.2f}x "
                      f"dense fp32 ({used['accel_fp32']}), accel bf16 {row['bf16_vs_dense_bf16_cl']:.2f}x dense bf16 "
                      f"channels_last ({used['accel_bf16']}), auto {row['auto_bf16_vs_dense_bf16_cl']:.2f}x "
                      f"({res['dense_fp32'].rounds} rounds)", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="output path (default bench/results/sparse_conv_bench-<device>.json)")
    args = ap.parse_args(argv)
    rows = run(LAYERS, args.batches, args.densities, args.block, args.budget, args.device)
    cols = [("layer", "layer", "s"), ("density", "density", ".2f"), ("batch", "N", "d"),
            ("ms_dense_fp32", "fp32 ms", ".3f"), ("ms_dense_bf16_cl", "bf16 CL ms", ".3f"),
            ("ms_accel_fp32", "accel fp32 ms", ".3f"), ("ms_accel_bf16", "accel bf16 ms", ".3f"),
            ("fp32_vs_dense_fp32", "accel fp32 x fp32", ".2f"), ("fp32_vs_dense_fp32_cl", "x fp32 CL", ".2f"),
            ("fp32_nchw_vs_dense_fp32", "fed NCHW x fp32", ".2f"), ("engine_fp32_nchw", "NCHW engine", "s"),
            ("bf16_vs_dense_bf16_cl", "accel bf16 x bf16 CL", ".2f"), ("bf16_vs_dense_fp32", "accel bf16 x fp32", ".2f"),
            ("auto_bf16_vs_dense_bf16_cl", "auto bf16 x bf16 CL", ".2f"), ("engine_bf16", "bf16 engine", "s")]
    print()
    print(format_table(rows, cols))
    path = save_results("sparse_conv_bench", rows, extra={"layers": [list(v) for v in LAYERS]}, path=args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
