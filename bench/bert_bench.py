"""A BERT-base-shaped encoder end to end on the CPU (12 layers, hidden 768, 128 tokens, random init):
accel int8 (``accel.quantize_``: every Linear ``auto``, int8 embeddings) against the options a user
already has: fp32 eager, bf16, and torch's dynamic int8 (``quantize_dynamic``). Latency side by side
at batch 1 and 32, embedding cosine against fp32, file size, and decision stability.

accel int8 is measured twice: with fp32 activations (the fp32 model quantized) and with bf16
activations (the bf16 model quantized: the int8 layers take and return bf16, attention and norms
run in bf16 like the bf16 baseline).

    python -m bench.bert_bench                      # JSON in bench/results/bert_bench-cpu.json
    python -m bench.bert_bench --layers 2 --quick    # a small smoke run
    python -m bench.bert_bench --stability           # also: quantize_ 3 times while another process loads the CPU

Uses ``transformers.BertModel`` when installed (``pip install transformers``), else a minimal encoder
with the same layer shapes.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import os
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import accel
from accel import engines

from .common import compare, format_table, ratio, save_results

warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")


class _Layer(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        h = self.heads
        q, k, v = (f(x).view(b, t, h, d // h).transpose(1, 2) for f in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.ln1(x + self.out(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class MiniBert(nn.Module):
    """BERT's layer shapes without transformers: embeddings, N post-norm encoder layers."""

    def __init__(self, layers=12, d=768, heads=12, ff=3072, vocab=30522, max_pos=512):
        super().__init__()
        self.word_embeddings, self.position_embeddings = nn.Embedding(vocab, d), nn.Embedding(max_pos, d)
        self.token_type_embeddings, self.ln = nn.Embedding(2, d), nn.LayerNorm(d)
        self.layers = nn.ModuleList(_Layer(d, heads, ff) for _ in range(layers))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = self.ln(x + self.token_type_embeddings(torch.zeros_like(input_ids) if token_type_ids is None
                                                   else token_type_ids))
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, mask)
        return x


def build(layers: int) -> tuple[nn.Module, str]:
    try:
        from transformers import BertConfig, BertModel

        cfg = BertConfig(num_hidden_layers=layers, hidden_size=768, num_attention_heads=12, intermediate_size=3072)
        return BertModel(cfg, add_pooling_layer=False).eval(), "transformers.BertModel"
    except ImportError:
        return MiniBert(layers).eval(), "MiniBert"


def hidden(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def inputs(batch: int, tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, tokens), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def torch_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def file_size(model: nn.Module, accel_file: bool) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        if accel_file:
            accel.save(model, path)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return os.path.getsize(path)


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean over sentences of the cosine between mean-pooled token embeddings (a sentence encoder's output)."""
    a, b = ref.float().mean(1), out.float().mean(1)
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def _load(stop):
    x = torch.randn(512, 512)
    while not stop.is_set():
        x = (x @ x).tanh_()


def stability(model: nn.Module, batches: list[int], tokens: int, runs: int = 3) -> dict:
    """quantize_ ``runs`` times, each with no cached decisions (memory or disk), while another process loads
    the CPU."""
    saved = os.environ.get("ACCEL_ENGINE_CACHE")
    os.environ["ACCEL_ENGINE_CACHE"] = "0"  # every run measures: nothing is read from (or left in) the cache file
    engines.reload_env()
    stop = mp.get_context("spawn").Event()
    loader = mp.get_context("spawn").Process(target=_load, args=(stop,), daemon=True)
    loader.start()
    try:
        seen, busy, total = [], [], []
        for _ in range(runs):
            engines.clear()
            q = copy.deepcopy(model)
            rows = accel.quantize_(q, accel.QuantConfig(batch_sizes=tuple(batches), budget_s=0.05),
                                   example_inputs=inputs(1, tokens))
            seen.append({(r["layer"], r["batch"]): r["decision"] for r in rows if r["batch"] is not None})
            busy.append(sum(d.contended for d in engines.decisions().values()))
            total.append(len(engines.decisions()))
    finally:
        stop.set()
        loader.join(timeout=10)
        if saved is None:
            os.environ.pop("ACCEL_ENGINE_CACHE", None)
        else:
            os.environ["ACCEL_ENGINE_CACHE"] = saved
        engines.reload_env()
    keys = seen[0].keys()
    differ = [k for k in keys if len({s[k] for s in seen}) > 1]
    return {"runs": runs, "decisions": len(keys), "differ": len(differ), "engine_keys_per_run": total,
            "engine_keys_measured_busy_per_run": busy,
            "differing": [[*k, sorted({s[k] for s in seen})] for k in differ[:24]]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of timing per batch size")
    ap.add_argument("--quick", action="store_true", help="small budget, for a smoke run")
    ap.add_argument("--stability", action="store_true")
    ap.add_argument("--stability-only", action="store_true", help="only the stability run (no latency table)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, kind = build(args.layers)
    if args.stability_only:
        st = stability(model, args.batches, args.tokens)
        print(f"stability: {st}")
        path = args.json or os.path.join(os.path.dirname(__file__), "results", "bert_stability-cpu.json")
        print(f"saved {save_results('bert_stability', [st], extra={'layers': args.layers, 'model': kind}, path=path)}")
        return
    budget = 1.0 if args.quick else args.budget
    t0 = time.time()
    variants = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16), "torch_dynamic_int8": torch_dynamic(model)}
    decisions = {}
    for name, base in (("accel_int8", model), ("accel_int8_bf16", variants["bf16"])):
        q = copy.deepcopy(base)
        example = inputs(1, args.tokens)
        decisions[name] = accel.quantize_(q, accel.QuantConfig(batch_sizes=tuple(args.batches)), example_inputs=example)
        variants[name] = q
    print(f"{kind}, {args.layers} layers: variants built and decided in {time.time() - t0:.0f} s", flush=True)
    sizes = {"fp32": file_size(model, False), "accel_int8": file_size(variants["accel_int8"], True)}
    rows = []
    with torch.no_grad():
        for b in args.batches:
            x = inputs(b, args.tokens, seed=b)
            ref = hidden(model(**x))
            cos = {n: cosine(ref, hidden(m(**x))) for n, m in variants.items() if n != "fp32"}
            res = compare({n: (lambda m=m: m(**x)) for n, m in variants.items()}, "fp32", budget_s=budget,
                          min_rounds=3 if b > 1 else 5, max_rounds=30)
            row = {"model": kind, "layers": args.layers, "batch": b, "tokens": args.tokens,
                   "rounds": res["fp32"].rounds}
            for n, t in res.items():
                row[f"ms_{n}"] = t.median_s * 1e3
                row[f"x_{n}"] = t.speedup
                row[f"cos_{n}"] = cos.get(n)
            best = min(("fp32", "bf16", "torch_dynamic_int8"), key=lambda n: row[f"ms_{n}"])
            for n in ("accel_int8", "accel_int8_bf16"):
                row[f"{n}_vs_best"] = ratio(res, best, n)  # median of per-round ratios, as the x columns
            row["best_baseline"] = best
            rows.append(row)
            print(f"batch {b}: " + "  ".join(f"{n} {row[f'ms_{n}']:.1f} ms ({row[f'x_{n}']:.2f}x)" for n in res)
                  + f"  | best baseline {best}; cosine {cos}", flush=True)
    extra = {"file_bytes": sizes, "file_ratio": sizes["fp32"] / sizes["accel_int8"],
             "decisions": decisions, "engine_decisions": {k: vars(d) for k, d in engines.decisions().items()}}
    if args.stability:
        extra["stability"] = stability(model, args.batches, args.tokens)
        print(f"stability: {extra['stability']}", flush=True)
    cols = [("batch", "batch", "d"), ("ms_fp32", "fp32 ms", ".1f"), ("x_bf16", "x bf16", ".2f"),
            ("x_torch_dynamic_int8", "x torch dyn int8", ".2f"), ("x_accel_int8", "x accel int8", ".2f"),
            ("x_accel_int8_bf16", "x accel int8 (bf16 act)", ".2f"), ("best_baseline", "best baseline", "s"),
            ("accel_int8_vs_best", "accel vs best", ".2f"), ("accel_int8_bf16_vs_best", "accel bf16-act vs best", ".2f"),
            ("cos_accel_int8", "cos accel", ".4f"), ("cos_accel_int8_bf16", "cos accel bf16", ".4f"),
            ("cos_torch_dynamic_int8", "cos torch dyn", ".4f"), ("cos_bf16", "cos bf16", ".4f")]
    print()
    print(format_table(rows, cols))
    print(f"file: fp32 {sizes['fp32'] / 2**20:.1f} MiB, accel int8 {sizes['accel_int8'] / 2**20:.1f} MiB "
          f"({extra['file_ratio']:.2f}x smaller)")
    print(f"\nsaved {save_results('bert_bench', rows, extra=extra, path=args.json)}")


if __name__ == "__main__":
    main()
