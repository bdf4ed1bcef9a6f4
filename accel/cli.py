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
import math
import os
import sys
import time

import torch
import torch.nn as nn


class UserError(Exception):
    """A bad argument or input of the user's: one line on stderr, exit code 2."""


def _load_factory(spec: str, what: str):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise UserError(f"{what} must be module:function, got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure of the user's module is their error to see
        raise UserError(f"{what} {spec!r}: cannot import {module!r} ({type(e).__name__}: {e})") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise UserError(f"{what} {spec!r}: {module!r} has no function {attr!r}")
    return fn


def _call_factory(fn, spec: str, what: str):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} {spec!r} raised {type(e).__name__}: {e}") from None


def _validate(args) -> None:
    """Every check that needs no model, before anything runs."""
    from .formats import BLOCK_SIZES

    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    from .engines import check_env

    # every float flag: NaN passes no comparison below, but inf passes "> 0" (and would fail after training)
    for name, value in vars(args).items():
        if isinstance(value, float):
            need(math.isfinite(value), f"--{name.replace('_', '-')} must be a finite number, got {value}")
    need(0.0 <= args.sparsity < 1.0, f"--sparsity must be in [0, 1), got {args.sparsity}")
    need(0.0 <= args.channel_ratio < 1.0, f"--channel-ratio must be in [0, 1), got {args.channel_ratio}")
    need(0.0 <= args.min_density <= 1.0, f"--min-density must be in [0, 1], got {args.min_density}")
    for flag in ("epochs", "kd_epochs", "qat_epochs"):
        need(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    need(args.kd_epochs >= 1 or args.prune == "channels",
         f"--prune {args.prune} prunes blocks gradually during the distillation epochs: --kd-epochs must be >= 1, "
         f"got {args.kd_epochs} (or use --prune channels)")
    need(args.block in BLOCK_SIZES, f"--block must be one of {BLOCK_SIZES}, got {args.block}")
    need(all(b >= 1 for b in args.batches), f"--batches must all be >= 1, got {args.batches}")
    need(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.temperature > 0, f"--temperature must be > 0, got {args.temperature}")
    need(0.0 <= args.alpha <= 1.0, f"--alpha must be in [0, 1], got {args.alpha}")
    need(args.budget > 0, f"--budget must be > 0, got {args.budget}")
    try:  # ACCEL_ENGINE, ACCEL_CPU_ISA, ACCEL_CPU_ACT_QMAX: a bad value fails now, not after training
        check_env()
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.pretrained is not None:
        need(os.path.isfile(args.pretrained), f"--pretrained {args.pretrained!r}: no such file")
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".accel-write-test")
        with open(probe, "w") as f:
            f.write("")
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"--out {args.out!r} is not writable ({e.strerror or e})") from None


def _setup(args):
    """Model, data and a first batch, each checked: the user's factories run here, before training."""
    from .data import digits_loaders
    from .models import SeedCNN

    if args.data:
        loaders = _call_factory(_load_factory(args.data, "--data"), args.data, "--data")
        if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
            raise UserError(f"--data {args.data!r} must return (train_loader, test_loader), got {type(loaders).__name__}")
        train_loader, test_loader = loaders
    else:
        train_loader, test_loader = digits_loaders(args.batch_size, seed=args.seed)
    dense = _call_factory(_load_factory(args.model, "--model"), args.model, "--model") if args.model else SeedCNN()
    if not isinstance(dense, nn.Module):
        raise UserError(f"--model {args.model!r} must return an nn.Module, got {type(dense).__name__}")
    if args.data:  # a user's loaders (the built-in one is known good: not drawn from, so a seed's run stays as it was)
        _first_batch(train_loader, "training")
    example = _first_batch(test_loader, "test")[0]
    if args.pretrained:
        try:
            dense.load_state_dict(torch.load(args.pretrained, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - a garbage or mismatched file is the user's error
            raise UserError(f"--pretrained {args.pretrained!r} does not load into the model "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    try:
        with torch.no_grad():
            out = dense.eval()(example[:2])
    except Exception as e:  # noqa: BLE001
        raise UserError(f"the model cannot run on a batch of the data ({type(e).__name__}: {e}); accel compress "
                        f"calls the model with each batch's input tensor as its one positional argument") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(example[:2]) or \
            not out.is_floating_point():
        got = f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else \
            f"a {out.dtype} tensor of shape {tuple(out.shape)}"
        raise UserError(f"--model must return class logits [batch, classes] (trained with cross-entropy against the "
                        f"labels), got {got} for a batch of {len(example[:2])}")
    return dense, train_loader, test_loader, example


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _first_batch(loader, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's first batch, checked to be what training and evaluation unpack: ``(inputs, labels)`` with a
    batched tensor input and integer class labels ``[batch]`` (cross-entropy's targets)."""
    try:
        batch = next(iter(loader))
    except StopIteration:
        raise UserError(f"--data: the {which} loader is empty") from None
    except TypeError as e:
        raise UserError(f"--data: the {which} loader cannot be iterated ({e})") from None
    what = f"--data: {which} batches must be (inputs, labels) with a batched tensor input and integer class labels " \
           "[batch]"
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise UserError(f"{what}, got {got}")
    x, y = batch
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise UserError(f"{what}, got inputs {type(x).__name__}" + (f" of shape {tuple(x.shape)}"
                                                                     if isinstance(x, torch.Tensor) else ""))
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point() or y.is_complex() or \
            y.dtype == torch.bool or y.shape[0] != x.shape[0]:
        got = f"{y.dtype} labels of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise UserError(f"{what}, got {got} for {x.shape[0]} inputs")
    return x, y


def _check_trained(model: nn.Module, phase: str, lr: float) -> None:
    """A training phase that blew up (a learning rate too large for the model) is the user's error to
    see in one line, not a traceback from the conversion that follows."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise UserError(f"{phase} diverged at learning rate {lr:g}: {len(bad)} parameter(s) hold NaN/inf "
                        f"(first {bad[0]!r}); try a smaller --lr")


def _count_params(model: nn.Module) -> dict:
    """Stored weight and bias values (a block-sparse layer stores only its blocks; int8 counts as one
    each) and the bytes of every tensor of the state, block indices included."""
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    values = sum(t.numel() for t in tensors if t.is_floating_point() or t.dtype == torch.int8)
    return {"elements": values, "bytes": sum(t.numel() * t.element_size() for t in tensors)}


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """Images in channels_last: the layout accel's CPU conv engines compute in (a converted conv returns
    its input's layout, as nn.Conv2d does, so channels_last images stay channels_last through the model)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _latency(dense: nn.Module, compressed: nn.Module, example: torch.Tensor, batch: int, budget_s: float) -> dict:
    """Both models timed side by side on ``batch`` inputs taken from the data (its dtype and values: token
    ids stay ids), repeated when the example batch is smaller."""
    from .timing import compare

    x = example[torch.arange(batch) % len(example)].contiguous()
    with torch.no_grad():  # the compressed model is fed channels_last images, the conversion timed with it
        res = compare({"dense": lambda: dense(x), "compressed": lambda: compressed(_fast_layout(x))}, "dense",
                      budget_s=budget_s)
    d, c = res["dense"].median_s, res["compressed"].median_s
    # the speedup shown is the ratio of the two medians shown (the per-round paired median is kept too)
    return {"batch": batch, "dense_ms": d * 1e3, "compressed_ms": c * 1e3, "speedup": d / c,
            "speedup_paired_median": res["compressed"].speedup, "rounds": res["dense"].rounds}


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
    from .distill import evaluate, train
    from .engines import native_act_qmax
    from .prune import GradualPruner, sparsity_of
    from .shrink import format_report as shrink_report
    from .shrink import shrink_

    _validate(args)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    log = print
    dense, train_loader, test_loader, example = _setup(args)

    t0 = time.time()
    if args.pretrained:
        log(f"[1/5] dense model loaded from {args.pretrained}")
    else:
        train(dense, train_loader, args.epochs, args.lr, progress=progress, desc="dense")
        _check_trained(dense, "dense training", args.lr)
    dense.eval()
    acc_dense = evaluate(dense, test_loader)
    log(f"[1/5] dense accuracy {acc_dense:.2f}%  ({time.time() - t0:.0f}s)")

    # 2. pruning, distilled from the dense teacher: channels removed (a smaller dense model of stock
    #    layers) and/or gradual block sparsity of the Linear layers
    student = copy.deepcopy(dense)
    shrunk = []
    if args.prune in ("channels", "both"):
        shrunk = shrink_(student, (example[: max(2, min(8, len(example)))],), args.channel_ratio)
        log("      " + shrink_report(shrunk).replace("\n", "\n      "))

    def prunable(m, name):  # layers wide enough to hold more than one block row
        return type(m) is nn.Linear and m.out_features >= 2 * args.block and m.in_features >= 2 * args.block

    steps = max(1, args.kd_epochs * len(train_loader))
    pruner = None
    if args.prune in ("blocks", "both") and any(prunable(m, n) for n, m in student.named_modules()):
        pruner = GradualPruner(student, args.sparsity, begin=0, end=max(1, int(0.7 * steps)),
                               frequency=max(1, len(train_loader) // 4), block=args.block, filter_fn=prunable,
                               min_density=args.min_density)
    train(student, train_loader, args.kd_epochs, args.lr / 2, teacher=dense, temperature=args.temperature,
          alpha=args.alpha, after_step=pruner.step if pruner else None, progress=progress, desc="prune+distill")
    _check_trained(student, "pruning + distillation", args.lr / 2)
    acc_pruned = evaluate(student, test_loader)
    masks = pruner.masks if pruner else {}
    what = []
    if shrunk:
        kept = sum(r["channels_after"] for r in shrunk if r["status"] == "pruned")
        before = sum(r["channels_before"] for r in shrunk if r["status"] == "pruned")
        what.append(f"channels {before} -> {kept}")
    if masks:
        what.append(f"{args.sparsity:.0%} block sparsity (block {args.block}) on {sorted(masks)} "
                    f"(weights zero: {sparsity_of(student, prunable):.1%})")
    log(f"[2/5] pruned ({'; '.join(what) or 'nothing prunable'}), distilled: accuracy {acc_pruned:.2f}%")

    # 3. quantization-aware fine-tuning of the layers that will run in int8 (the non-block-pruned ones)
    qmax = native_act_qmax()
    qat_layers = qat.prepare_qat(student, filter_fn=lambda m, n: n not in masks, act_qmax=qmax)
    if args.qat_epochs:
        train(student, train_loader, args.qat_epochs, args.lr / 10, teacher=dense, temperature=args.temperature,
              alpha=args.alpha, after_step=pruner.step if pruner else None, progress=progress, desc="qat")
        _check_trained(student, "quantization-aware training", args.lr / 10)
    acc_qat = evaluate(student, test_loader)
    log(f"[3/5] fake-quantized {qat_layers} (activation qmax {qmax}), {args.qat_epochs} QAT epoch(s): "
        f"accuracy {acc_qat:.2f}%")

    # 4. convert: block-sparse Linear and int8 elsewhere, in "auto" modes that pick their form per batch
    #    bucket on the machine that runs them; the decisions for --batches are made (and reported) now
    compressed = copy.deepcopy(student).eval()
    qat.strip(compressed)
    measure_x = (_fast_layout(example[:1]),)  # decided for the channels_last images the latency step feeds
    batches = tuple(sorted(set(args.batches)))
    decisions = api.sparsify_(compressed, api.SparsityConfig(block=args.block, batch_sizes=batches,
                                                             budget_s=min(0.5, args.budget / 4)),
                              masks=masks, example_inputs=measure_x) if masks else []
    # a pruned layer that runs dense at every batch size goes int8 instead (its zeros stay zero)
    by_layer: dict[str, list[str]] = {}
    for r in decisions:
        by_layer.setdefault(r["layer"], []).append(r["decision"])
    always_dense = [{"layer": n, "decision": "dense"} for n, ds in by_layer.items() if all(d.endswith("dense") for d in ds)]
    kept_dense = api.linearize_kept_dense_(compressed, always_dense)
    # (layers the in-model check put back dense are plain nn.Linear already: int8 candidates too)
    int8_candidates = set(qat_layers) | set(kept_dense) | {d["layer"] for d in always_dense}
    decisions += api.quantize_(compressed, api.QuantConfig(act_qmax=qmax, batch_sizes=batches,
                                                           budget_s=min(0.5, args.budget / 4)),
                               filter_fn=lambda m, n: n in int8_candidates, example_inputs=measure_x)
    acc_final = evaluate(compressed, test_loader)
    log(f"[4/5] converted (forms decided on this machine at batch {', '.join(map(str, batches))}): "
        f"accuracy {acc_final:.2f}%")
    log("      " + api.format_report(decisions).replace("\n", "\n      "))

    # 5. report
    dense_path, comp_path = os.path.join(args.out, "dense.safetensors"), os.path.join(args.out, "compressed.safetensors")
    api.save(dense, dense_path)
    api.save(compressed, comp_path)
    latency = [_latency(dense, compressed, example, b, args.budget) for b in args.batches]
    applied = _title(args, any(r["status"] == "pruned" for r in shrunk), bool(masks))
    report = {
        "title": f"{type(dense).__name__}: {applied} + int8 vs dense "
                 f"{_DTYPE_NAMES.get(next((p.dtype for p in dense.parameters()), torch.float32), 'float')} (CPU)",
        "accuracy": {"dense": acc_dense, "pruned_distilled": acc_pruned, "qat": acc_qat, "compressed": acc_final,
                     "drop_points": acc_dense - acc_final},
        "parameters": {"dense": _count_params(dense), "compressed": _count_params(compressed)},
        "size_on_disk_bytes": {"dense": os.path.getsize(dense_path), "compressed": os.path.getsize(comp_path)},
        "latency": latency,
        "layers": decisions,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "environment": _environment(),
        "channel_pruning": shrunk,
    }
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _plot(report, os.path.join(args.out, "report.png"))
    print(render(report))
    print(f"\nsaved {args.out}/report.json, report.png, dense.safetensors, compressed.safetensors")
    return report


def _title(args, channels: bool, blocks: bool) -> str:
    """What was applied (not only asked for: a model with no layer wide enough for a block is not sparse)."""
    parts = []
    if channels:
        parts.append(f"{args.channel_ratio:.0%} channels removed")
    if blocks:
        parts.append(f"{args.sparsity:.0%} block sparsity")
    return " + ".join(parts) or "nothing pruned"


def _environment() -> dict:
    """The machine (CPU model, flags, ISA levels, threads; the GPU where there is one) and the versions."""
    import datetime
    import platform

    from . import __version__
    from .engines import machine

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {**machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version(),
            "triton": triton_version, "accel": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


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
    busy = [r for r in report.get("layers", []) if "not timed" in str(r.get("reason", ""))]
    if busy:
        lines.append(f"note: {len(busy)} layer decision(s) were not timed (the machine was busy while measuring): they "
                     "kept the defaults, which can be slower than dense; run again on a quiet machine")
    return "\n".join(lines)


def engines_cmd(args) -> int:
    from . import engines

    if args.clear:
        engines.clear(disk=True)
        print(f"cleared {engines._CACHE.path()}")
    if args.measure:
        _measure_standard_shapes()
    print(engines.report())
    return 0


def _measure_standard_shapes() -> None:
    """Decide the engines of a few common layer shapes now (QuantLinear auto, SparseLinear at 90%)."""
    from .modules import QuantLinear, SparseLinear

    torch.manual_seed(0)
    lin = nn.Linear(1024, 1024)
    q = QuantLinear.from_float(lin, "auto")
    s = SparseLinear.from_dense(lin, sparsity=0.9)
    with torch.no_grad():
        for m in (1, 16, 256):
            x = torch.randn(m, 1024)
            q(x)
            s(x)


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
    c.add_argument("--prune", choices=["blocks", "channels", "both"], default="blocks",
                   help="blocks: gradual block sparsity of the Linear layers; channels: remove channels "
                        "(accel.shrink_, a smaller dense model); both")
    c.add_argument("--sparsity", type=float, default=0.75, help="final block sparsity of the Linear layers")
    c.add_argument("--min-density", type=float, default=0.05, help="per-layer floor of kept blocks")
    c.add_argument("--channel-ratio", type=float, default=0.5, help="fraction of channels removed (--prune channels/both)")
    c.add_argument("--block", type=int, default=32)
    c.add_argument("--temperature", type=float, default=4.0)
    c.add_argument("--alpha", type=float, default=0.7, help="weight of the soft (teacher) loss")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--batches", type=int, nargs="+", default=[1, 256],
                   help="batch sizes: each layer's form is decided at each, and latency is reported at each")
    c.add_argument("--budget", type=float, default=3.0, help="seconds of latency timing per batch size")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--no-progress", action="store_true")
    e = sub.add_parser("engines", help="print this machine's engine decisions and their measured times")
    e.add_argument("--measure", action="store_true", help="decide a few common layer shapes now")
    e.add_argument("--clear", action="store_true", help="forget this machine's decisions first")
    args = ap.parse_args(argv)
    from .engines import ConfigError

    try:
        if args.cmd == "compress":
            compress(args)
            return 0
        return engines_cmd(args)
    except (UserError, ConfigError) as err:  # ConfigError: a bad accel environment variable (ACCEL_ENGINE, ...)
        print(f"accel {args.cmd}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
