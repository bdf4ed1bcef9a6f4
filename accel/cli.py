"""``accel compress``: the main job.

Trains the seed CNN (``accel.models.SeedCNN``) on scikit-learn's digits (shipped with the package,
upsampled to 3x32x32), then: gradual block pruning of the Linear layers with knowledge
distillation from the dense teacher, quantization-aware fine-tuning of the other layers, and
conversion. Every layer gets the fastest form measured at its real input (``--decide-batch``):
block-sparse or dense for a pruned Linear (a pruned layer kept dense may still go int8, its
zeros staying zero), int8 or float for the rest. Prints and saves a report: accuracy, parameters, size on disk, CPU latency and
speedup against the dense model at batch 1 and 256, the per-layer decisions, and a PNG plot.

    accel compress                                  # the embedded default, report in runs/compress/
    accel compress --model mypkg.nets:build --data mypkg.data:loaders --pretrained dense.pt
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import sys
import time

import torch
import torch.nn as nn


def _load_factory(spec: str):
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected module:function, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def _count_params(model: nn.Module) -> dict:
    """Stored weight and bias values (a block-sparse layer stores only its blocks; int8 counts as one
    each) and the bytes of every tensor of the state, block indices included."""
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    values = sum(t.numel() for t in tensors if t.is_floating_point() or t.dtype == torch.int8)
    return {"elements": values, "bytes": sum(t.numel() * t.element_size() for t in tensors)}


def _latency(dense: nn.Module, compressed: nn.Module, shape: tuple, budget_s: float) -> dict:
    from .timing import compare

    x = torch.randn(shape)
    with torch.no_grad():
        res = compare({"dense": lambda: dense(x), "compressed": lambda: compressed(x)}, "dense", budget_s=budget_s)
    return {"batch": shape[0], "dense_ms": res["dense"].median_s * 1e3, "compressed_ms": res["compressed"].median_s * 1e3,
            "speedup": res["compressed"].speedup, "rounds": res["dense"].rounds}


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    acc = report["accuracy"]
    axes[0].bar(["dense", "compressed"], [acc["dense"], acc["compressed"]], color=["grey", "tab:blue"])
    axes[0].set_ylim(max(0.0, min(acc["dense"], acc["compressed"]) - 10), 100)
    axes[0].set_title("test accuracy (%)")
    size = report["size_on_disk_bytes"]
    axes[1].bar(["dense", "compressed"], [size["dense"] / 1024, size["compressed"] / 1024], color=["grey", "tab:blue"])
    axes[1].set_title("size on disk (KiB)")
    lat = report["latency"]
    labels = [f"batch {r['batch']}" for r in lat]
    xs = range(len(lat))
    axes[2].bar([i - 0.2 for i in xs], [r["dense_ms"] for r in lat], 0.4, label="dense", color="grey")
    axes[2].bar([i + 0.2 for i in xs], [r["compressed_ms"] for r in lat], 0.4, label="compressed", color="tab:blue")
    for i, r in enumerate(lat):
        axes[2].text(i + 0.2, r["compressed_ms"], f"{r['speedup']:.2f}x", ha="center", va="bottom")
    axes[2].set_xticks(list(xs), labels)
    axes[2].set_yscale("log")
    axes[2].set_title("CPU latency (ms, log)")
    axes[2].legend()
    fig.suptitle(report["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compress(args) -> dict:
    from . import api, qat
    from .data import digits_loaders
    from .distill import evaluate, train
    from .models import SeedCNN
    from .prune import GradualPruner, sparsity_of

    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    log = print

    train_loader, test_loader = (_load_factory(args.data)() if args.data else digits_loaders(args.batch_size,
                                                                                            seed=args.seed))
    dense = _load_factory(args.model)() if args.model else SeedCNN()
    example = next(iter(test_loader))[0]
    input_shape = tuple(example.shape[1:])

    t0 = time.time()
    if args.pretrained:
        dense.load_state_dict(torch.load(args.pretrained, map_location="cpu", weights_only=True))
        log(f"[1/5] dense model loaded from {args.pretrained}")
    else:
        train(dense, train_loader, args.epochs, args.lr, progress=progress, desc="dense")
    dense.eval()
    acc_dense = evaluate(dense, test_loader)
    log(f"[1/5] dense accuracy {acc_dense:.2f}%  ({time.time() - t0:.0f}s)")

    # 2. gradual block pruning of the Linear layers, distilled from the dense teacher
    student = copy.deepcopy(dense)

    def prunable(m, name):  # layers wide enough to hold more than one block row
        return type(m) is nn.Linear and m.out_features >= 2 * args.block and m.in_features >= 2 * args.block

    steps = args.kd_epochs * len(train_loader)
    pruner = GradualPruner(student, args.sparsity, begin=0, end=max(1, int(0.7 * steps)),
                           frequency=max(1, len(train_loader) // 4), block=args.block, filter_fn=prunable)
    train(student, train_loader, args.kd_epochs, args.lr / 2, teacher=dense, temperature=args.temperature,
          alpha=args.alpha, after_step=pruner.step, progress=progress, desc="prune+distill")
    acc_pruned = evaluate(student, test_loader)
    log(f"[2/5] {args.sparsity:.0%} block sparsity (block {args.block}) on {sorted(pruner.masks)}, "
        f"distilled: accuracy {acc_pruned:.2f}%  (weights zero: {sparsity_of(student, prunable):.1%})")

    # 3. quantization-aware fine-tuning of the layers that will run in int8 (the non-pruned ones)
    qat_layers = qat.prepare_qat(student, filter_fn=lambda m, n: n not in pruner.masks)
    if args.qat_epochs:
        train(student, train_loader, args.qat_epochs, args.lr / 10, teacher=dense, temperature=args.temperature,
              alpha=args.alpha, after_step=pruner.step, progress=progress, desc="qat")
    acc_qat = evaluate(student, test_loader)
    log(f"[3/5] fake-quantized {qat_layers}, {args.qat_epochs} QAT epoch(s): accuracy {acc_qat:.2f}%")

    # 4. convert: block-sparse Linear, int8 elsewhere, each kept only where faster at the real shape
    compressed = copy.deepcopy(student).eval()
    qat.strip(compressed)
    measure_x = (torch.randn(args.decide_batch, *input_shape),)
    decisions = api.sparsify_(compressed, api.SparsityConfig(block=args.block), masks=pruner.masks,
                              example_inputs=measure_x)
    # a pruned layer whose sparse form lost to dense gets the int8 candidate too (its zeros stay zero)
    kept_dense = api.linearize_kept_dense_(compressed, decisions)
    int8_candidates = set(qat_layers) | set(kept_dense)
    decisions += api.quantize_(compressed, filter_fn=lambda m, n: n in int8_candidates, example_inputs=measure_x)
    acc_final = evaluate(compressed, test_loader)
    log(f"[4/5] converted (each layer's form measured at batch {args.decide_batch}): accuracy {acc_final:.2f}%")
    log("      " + api.format_report(decisions).replace("\n", "\n      "))

    # 5. report
    dense_path, comp_path = os.path.join(args.out, "dense.safetensors"), os.path.join(args.out, "compressed.safetensors")
    api.save(dense, dense_path)
    api.save(compressed, comp_path)
    latency = [_latency(dense, compressed, (b, *input_shape), args.budget) for b in args.batches]
    report = {
        "title": f"{type(dense).__name__}: {args.sparsity:.0%} block sparsity + int8 vs dense fp32 (CPU)",
        "accuracy": {"dense": acc_dense, "pruned_distilled": acc_pruned, "qat": acc_qat, "compressed": acc_final,
                     "drop_points": acc_dense - acc_final},
        "parameters": {"dense": _count_params(dense), "compressed": _count_params(compressed)},
        "size_on_disk_bytes": {"dense": os.path.getsize(dense_path), "compressed": os.path.getsize(comp_path)},
        "latency": latency,
        "layers": decisions,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability()},
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _plot(report, os.path.join(args.out, "report.png"))
    print(render(report))
    print(f"\nsaved {args.out}/report.json, report.png, dense.safetensors, compressed.safetensors")
    return report


def render(report: dict) -> str:
    acc, size, par = report["accuracy"], report["size_on_disk_bytes"], report["parameters"]
    lines = [report["title"], "",
             f"accuracy      dense {acc['dense']:.2f}%   compressed {acc['compressed']:.2f}%   "
             f"drop {acc['drop_points']:+.2f} points",
             f"parameters    dense {par['dense']['elements']:,}   compressed {par['compressed']['elements']:,} stored "
             f"({par['compressed']['bytes'] / 1024:.0f} KiB vs {par['dense']['bytes'] / 1024:.0f} KiB)",
             f"size on disk  dense {size['dense'] / 1024:.0f} KiB   compressed {size['compressed'] / 1024:.0f} KiB   "
             f"({size['dense'] / size['compressed']:.2f}x smaller)",
             "latency (CPU, side by side):"]
    for r in report["latency"]:
        lines.append(f"  batch {r['batch']:<4} dense {r['dense_ms']:8.3f} ms   compressed {r['compressed_ms']:8.3f} ms   "
                     f"speedup {r['speedup']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="accel", description="accel: compress networks so they actually run faster")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="train, prune + distill, quantize, convert and report (the main job)")
    c.add_argument("--out", default="runs/compress", help="output directory")
    c.add_argument("--model", help="module:function returning your nn.Module (default: the seed CNN)")
    c.add_argument("--data", help="module:function returning (train_loader, test_loader) (default: digits)")
    c.add_argument("--pretrained", help="state_dict file for the dense model (skips dense training)")
    c.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    c.add_argument("--kd-epochs", type=int, default=8, help="pruning + distillation epochs")
    c.add_argument("--qat-epochs", type=int, default=1)
    c.add_argument("--sparsity", type=float, default=0.75, help="final block sparsity of the Linear layers")
    c.add_argument("--block", type=int, default=32)
    c.add_argument("--temperature", type=float, default=4.0)
    c.add_argument("--alpha", type=float, default=0.7, help="weight of the soft (teacher) loss")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="latency batch sizes")
    c.add_argument("--decide-batch", type=int, default=256, help="batch at which each layer's form is chosen")
    c.add_argument("--budget", type=float, default=3.0, help="seconds of latency timing per batch size")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "compress":
        compress(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
