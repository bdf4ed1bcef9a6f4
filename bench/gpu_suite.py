"""GPU benchmark suite: accel's Triton paths against cuBLAS / cuDNN / torch on one CUDA device, in one command.

Sections (``--sections`` picks some; ``--quick`` shrinks every sweep):

* ``bsr``: SparseLinear (mode "sparse", bf16) vs dense bf16 ``F.linear`` vs torch's
  ``torch.sparse._triton_ops.bsr_dense_mm``: 4096x4096, block 64/32, block density
  0.5/0.25/0.1/0.05, M = 1, 16, 256, 4096 (``bsr_dense_mm`` takes at least 16 dense columns and
  ``torch._int_mm`` more than 16 rows: at smaller M they get the input padded, as a user would).
* ``int8``: QuantLinear (modes dynamic and weight_only) and the int8 GEMM alone
  (``accel.kernels.int8_matmul.int8_mm`` on pre-quantized operands; on sm_90 also forced onto the
  pointer kernel) vs cuBLAS bf16, ``torch._int_mm`` and fp8 ``torch._scaled_mm``: 4096^2 and 8192^2,
  M = 1, 16, 256, 4096.
* ``conv``: QuantConv2d and the int8 conv kernel alone (channels_last int8 weight) vs cuDNN bf16
  channels_last on ResNet-50 3x3 and 1x1 layers, batch 1 and 32.
* ``sparse_int8``: SparseQuantLinear (int8 blocks, per-token int8 activations) at 90% block sparsity vs
  SparseLinear bf16, dense QuantLinear (dynamic) and cuBLAS bf16: 4096x4096, M = 16, 256.
* ``sparse_conv``: SparseConv2d at 90% block sparsity (block 32) on the ResNet-18 3x3 layers, batch 8, bf16
  and fp32, vs cuDNN dense bf16 and fp32 channels_last.
* ``train``: one training step (forward + backward) of SparseLinear at 90% block sparsity vs dense bf16.
* ``host``: CPU wall time of one launch at M = 1, without synchronizing (host overhead per call).

Timing (``/work/.library/device/METHOD.md``): CUDA events around each call, median of many calls,
after warm-up (which includes Triton autotuning); a 256 MB buffer is written before every timed call
so no operand is served from L2 (``us``); the same call captured in a CUDA graph and replayed, also
after an L2 flush (``graph_us``), takes the launch gaps out. All providers of a case are timed in the
same run, so the ``speedup`` column (baseline time / provider time, by eager times) compares like with
like. Inputs are random, never zeros.

Robustness: every case runs guarded; an exception becomes an error row and the suite goes on.
``bench/results/gpu_suite-cuda.json`` is rewritten after every case (environment, driver, rows),
progress goes to stdout, and a table ends the run. ``--budget-s`` (default 420 s) skips the cases
that remain when it is spent, recorded as skipped rows, so a run fits an 8-minute slot; each section
gets an equal share of what is left when it starts (block 64 first in ``bsr``: the figures name it).

Prepared command for a GPU session (repository root, one shell command; installs without
touching torch/triton, runs the Triton kernel tests on the device, then this suite, and copies the
JSON to ``$OUT``; at most 5 + 8 minutes)::

    pip install --no-deps --no-build-isolation -e . && \\
      ACCEL_TEST_NO_INTERPRET=1 timeout 300 python -m pytest -x -q tests/test_int8_triton.py tests/test_bsr_triton.py ; \\
      timeout 480 python -m bench.gpu_suite --budget-s 400 ; cp bench/results/gpu_suite-cuda.json "${OUT:-/tmp}/" ; true

(With less device time: ``--quick`` for the suite, and ``-k "not every"`` for the tests skips the
per-config sweeps, which the AOT check already compiles.)

Without a GPU, ``--help`` works and ``--dry-run`` runs every case on the CPU with tiny shapes and a
wall-clock timer (a smoke test of the suite's own code paths; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

SECTIONS = ("bsr", "int8", "conv", "sparse_int8", "sparse_conv", "train", "host")
#: where the cases run: "cuda", or "cpu" for ``--dry-run`` (tiny shapes, wall-clock timer: a smoke test
#: of the suite's own code paths on a machine without a GPU)
DEVICE = "cuda"
RESULTS_PATH = os.path.join(os.path.dirname(__file__), "results", "gpu_suite-cuda.json")
FLUSH_BYTES = 256 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Rows, table, JSON (pure Python: tested on CPU by tests/test_kernels_gpu_suite.py)
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One provider in one case. ``us``: median microseconds per call, eager, L2 flushed before each
    call; ``graph_us``: the same as a CUDA graph replay; ``speedup``: baseline ``us`` / this ``us``
    (same case, same run); ``error``: why there is no number (exception text, or "skipped: ...")."""

    section: str
    case: str
    provider: str
    baseline: str = ""
    us: float | None = None
    graph_us: float | None = None
    speedup: float | None = None
    error: str = ""
    extra: dict = field(default_factory=dict)


def add_speedups(rows: list[Row]) -> None:
    """Fill ``speedup`` of each row from the ``us`` of its case's baseline row (None when either is missing)."""
    base = {(r.section, r.case): r.us for r in rows if r.provider == r.baseline}
    for r in rows:
        b = base.get((r.section, r.case))
        r.speedup = (b / r.us) if (b and r.us) else None


def format_table(rows: list[Row]) -> str:
    """Fixed-width text table of the rows (errors shortened)."""
    head = ["section", "case", "provider", "us", "graph_us", "speedup", "note"]
    body = []
    for r in rows:
        body.append([r.section, r.case, r.provider,
                     f"{r.us:.1f}" if r.us is not None else "-",
                     f"{r.graph_us:.1f}" if r.graph_us is not None else "-",
                     f"{r.speedup:.2f}x" if r.speedup is not None else "-",
                     (r.error.splitlines()[0][:60] if r.error else ("baseline" if r.provider == r.baseline else ""))])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], env: dict, args: dict) -> None:
    """Rewrite ``path`` atomically with the environment, the arguments and every row so far."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"benchmark": "gpu_suite", "environment": env, "args": args, "rows": [asdict(r) for r in rows]}, f,
                  indent=1)
    os.replace(tmp, path)


class Budget:
    """Wall-clock budget: ``spent()`` once ``seconds`` have passed since creation (``clock`` injectable for tests)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.clock, self.start, self.seconds = clock, clock(), seconds

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def spent(self) -> bool:
        return self.left() <= 0


@dataclass
class Case:
    """A benchmark case: ``run()`` returns its rows (it times every provider side by side)."""

    section: str
    name: str
    run: Callable[[], list[Row]]


def run_cases(cases: list[Case], budget: Budget, on_rows: Callable[[list[Row]], None],
              log: Callable[[str], None] = print) -> list[Row]:
    """Run ``cases`` in order, each guarded: an exception becomes an error row; once the budget is spent
    the remaining cases become "skipped" rows. Each section gets an equal share of the budget left when it
    starts (a section that ends early passes the rest on), so one slow section cannot starve the later ones.
    ``on_rows`` sees the rows after every case."""
    rows: list[Row] = []
    sections = list(dict.fromkeys(c.section for c in cases))
    section, section_end = None, 0.0
    for i, case in enumerate(cases):
        prefix = f"[{i + 1}/{len(cases)}] {case.section} {case.name}"
        if case.section != section:  # a section gets an equal share of what is left, unused shares pass on
            section = case.section
            left = budget.left()
            section_end = left - left / (len(sections) - sections.index(section))
        if budget.spent() or budget.left() <= section_end:
            why = "time budget spent" if budget.spent() else "the section's share of the time budget spent"
            rows.append(Row(case.section, case.name, "-", error=f"skipped: {why}"))
            on_rows(rows)
            continue
        t0 = time.monotonic()
        try:
            new = case.run()
        except Exception as e:  # noqa: BLE001 - one failing case must not stop the suite
            new = [Row(case.section, case.name, "-", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")]
        add_speedups(new)
        rows.extend(new)
        on_rows(rows)
        done = ", ".join(f"{r.provider}={r.us:.1f}us" if r.us is not None else f"{r.provider}=ERR" for r in new)
        log(f"{prefix}: {done} ({time.monotonic() - t0:.1f}s, {budget.left():.0f}s left)")
    return rows


def select_sections(requested: list[str] | None) -> list[str]:
    """The sections to run, in suite order; unknown names raise."""
    if not requested:
        return list(SECTIONS)
    unknown = sorted(set(requested) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {SECTIONS}")
    return [s for s in SECTIONS if s in requested]


def sweeps(quick: bool, tiny: bool = False) -> dict:
    """The shapes each section sweeps (``quick``: a subset that still covers each regime; ``tiny``: the
    dry run's CPU-sized shapes)."""
    if tiny:
        return dict(n=256, bsr_blocks=(32,), bsr_densities=(0.5,), ms=(1, 32), int8_sizes=(256,),
                    conv_layers=[("3x3_16_8", 16, 16, 8, 3, 1, 1), ("1x1_16to32_8", 16, 32, 8, 1, 1, 0)],
                    conv_batches=(2,), train_m=64, reps=2, sparse_ms=(16,), sparse_conv_layers=((32, 32, 8, 1),),
                    sparse_conv_batch=2)
    if quick:
        return dict(n=4096, bsr_blocks=(32,), bsr_densities=(0.5, 0.1), ms=(1, 4096), int8_sizes=(4096,),
                    conv_layers=CONV_LAYERS[:1] + CONV_LAYERS[-1:], conv_batches=(32,), train_m=2048, reps=10,
                    sparse_ms=(256,), sparse_conv_layers=SPARSE_CONV_LAYERS[:1], sparse_conv_batch=8)
    return dict(n=4096, bsr_blocks=(64, 32), bsr_densities=(0.5, 0.25, 0.1, 0.05), ms=(1, 16, 256, 4096),
                int8_sizes=(4096, 8192), conv_layers=CONV_LAYERS, conv_batches=(1, 32), train_m=4096, reps=30,
                sparse_ms=(16, 256), sparse_conv_layers=SPARSE_CONV_LAYERS, sparse_conv_batch=8)


#: ResNet-18 3x3 layers (C_in, C_out, H=W, stride), padding 1: the CPU sparse-conv benchmark's
SPARSE_CONV_LAYERS = ((64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1))

#: ResNet-50 layers: (name, C_in, C_out, H=W, kernel, stride, padding)
CONV_LAYERS = [
    ("3x3_64_56", 64, 64, 56, 3, 1, 1),
    ("3x3_128_28", 128, 128, 28, 3, 1, 1),
    ("3x3_256_14", 256, 256, 14, 3, 1, 1),
    ("3x3_512_7", 512, 512, 7, 3, 1, 1),
    ("1x1_256to64_56", 256, 64, 56, 1, 1, 0),
    ("1x1_64to256_56", 64, 256, 56, 1, 1, 0),
    ("1x1_1024to256_14", 1024, 256, 14, 1, 1, 0),
    ("1x1s2_256to512_56", 256, 512, 56, 1, 2, 0),
]


# ---------------------------------------------------------------------------------------------
# Timing (needs CUDA)
# ---------------------------------------------------------------------------------------------
class Timer:
    """CUDA-event timing with an L2 flush before every timed call, eager and as a CUDA graph replay."""

    def __init__(self, reps: int):
        import torch

        self.torch = torch
        self.reps = reps
        self.flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=DEVICE)

    def _flush(self):
        self.flush_buf.fill_(1)

    def eager(self, fn: Callable[[], object]) -> float:
        torch = self.torch
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for i in range(self.reps):
            self._flush()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1000.0

    def graph(self, fn: Callable[[], object]) -> float:
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm the allocator on the side stream, as capture requires
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            self._flush()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            g.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1000.0)
        return statistics.median(times)

    def providers(self, section: str, case: str, baseline: str, providers: dict[str, Callable[[], object]],
                  warmup: int = 3, graph: bool = True) -> list[Row]:
        """Warm every provider (autotuning happens here), then time each; a failing provider is an error row."""
        torch = self.torch
        rows = []
        for name, fn in providers.items():
            row = Row(section, case, name, baseline)
            try:
                for _ in range(warmup):
                    fn()
                torch.cuda.synchronize()
                row.us = self.eager(fn)
            except Exception as e:  # noqa: BLE001
                row.error = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize()
                rows.append(row)
                continue
            if graph:
                try:
                    row.graph_us = self.graph(fn)
                except Exception as e:  # noqa: BLE001
                    row.extra["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                    torch.cuda.synchronize()
            rows.append(row)
        return rows


class WallTimer(Timer):
    """The dry run's timer: wall clock around each call on the CPU, no L2 flush, no CUDA graph."""

    def __init__(self, reps: int):
        import torch

        self.torch = torch
        self.reps = reps

    def eager(self, fn: Callable[[], object]) -> float:
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)

    def providers(self, section, case, baseline, providers, warmup: int = 1, graph: bool = True) -> list[Row]:
        rows = []
        for name, fn in providers.items():
            row = Row(section, case, name, baseline)
            try:
                for _ in range(warmup):
                    fn()
                row.us = self.eager(fn)
            except Exception as e:  # noqa: BLE001
                row.error = f"{type(e).__name__}: {e}"
            rows.append(row)
        return rows


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import torch

        v = torch._C._cuda_getDriverVersion()  # e.g. 13000 for CUDA 13.0
        return f"cuda-driver-api {v // 1000}.{(v % 1000) // 10}"
    except Exception:  # noqa: BLE001
        return None


def gpu_environment() -> dict:
    import torch

    from bench.common import environment

    env = environment()
    env["driver"] = driver_version()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2**30, 1))
    return env


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
def _bsr_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch
    import torch.nn.functional as F

    from accel import SparseLinear
    from accel.formats import topk_block_mask

    cases = []
    n = k = cfg["n"]
    for block in cfg["bsr_blocks"]:
        for density in cfg["bsr_densities"]:
            def build(block=block, density=density):
                torch.manual_seed(0)
                lin = torch.nn.Linear(k, n, bias=False, device=DEVICE, dtype=torch.bfloat16)
                mask = topk_block_mask(torch.rand(n // block, k // block, device=DEVICE), 1.0 - density)
                sparse = SparseLinear.from_dense(lin, mask=mask, block=block, mode="sparse")
                w = sparse.dense_weight().to(torch.bfloat16).contiguous()
                w_bsr = w.to_sparse_bsr((block, block))
                return sparse, w, w_bsr

            state = {}  # the layer of this (block, density), built by its first case and shared by the rest
            for m in cfg["ms"]:
                def run(m=m, block=block, density=density, build=build, state=state):
                    if "layer" not in state or state["key"] != (block, density):
                        state["layer"], state["w"], state["w_bsr"] = build()
                        state["key"] = (block, density)
                    from torch.sparse._triton_ops import bsr_dense_mm as torch_bsr_dense_mm

                    sparse, w, w_bsr = state["layer"], state["w"], state["w_bsr"]
                    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                    # bsr_dense_mm takes a dense operand of at least 16 columns: a user at M < 16 pads to 16
                    xt = F.pad(x.t(), (0, max(0, 16 - m))).contiguous()
                    with torch.no_grad():
                        return timer.providers("bsr", f"B{block}_d{density}_M{m}", "dense_bf16", {
                            "dense_bf16": lambda: F.linear(x, w),
                            "accel_sparse": lambda: sparse(x),
                            "torch_bsr_dense_mm": lambda: torch_bsr_dense_mm(w_bsr, xt),
                        })
                cases.append(Case("bsr", f"B{block}_d{density}_M{m}", run))
    return cases


def _int8_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch
    import torch.nn.functional as F
    from accel.kernels.int8_matmul import int8_mm, quantize_rows

    from accel import QuantLinear
    from accel.quant import quantize_weight

    cases = []
    cap = torch.cuda.get_device_capability() if DEVICE == "cuda" else (0, 0)
    for size in cfg["int8_sizes"]:
        state = {}

        def setup(size=size, state=state):
            if state.get("size") != size:
                torch.manual_seed(0)
                lin = torch.nn.Linear(size, size, bias=True, device=DEVICE, dtype=torch.bfloat16)
                w_q, w_s = quantize_weight(lin.weight.float())
                state.update(size=size, lin=lin, w_q=w_q.to(DEVICE), w_s=w_s.to(DEVICE),
                             dyn=QuantLinear.from_float(lin, mode="dynamic"),
                             wo=QuantLinear.from_float(lin, mode="weight_only"),
                             w_fp8=lin.weight.to(torch.float8_e4m3fn).t())  # column-major [K, N]
            return state

        for m in cfg["ms"]:
            def run(m=m, size=size, setup=setup):
                st = setup()
                x = torch.randn(m, size, device=DEVICE, dtype=torch.bfloat16)
                x_q, x_s = quantize_rows(x)
                # torch._int_mm takes more than 16 rows: a user at M <= 16 pads to 17
                x_i8 = F.pad(x_q, (0, 0, 0, max(0, 17 - m))).contiguous()
                w_t = st["w_q"].t()  # [K, N] column-major view for torch._int_mm
                x_fp8 = x.to(torch.float8_e4m3fn)
                one = torch.ones((), device=DEVICE)
                bias, lin = st["lin"].bias, st["lin"]
                providers = {
                    "cublas_bf16": lambda: F.linear(x, lin.weight, bias),
                    "accel_dynamic": lambda: st["dyn"](x),
                    "accel_weight_only": lambda: st["wo"](x),
                    "accel_int8_mm": lambda: int8_mm(x_q, st["w_q"], x_s, st["w_s"], bias, out_dtype=torch.bfloat16),
                    "torch_int_mm": lambda: torch._int_mm(x_i8, w_t),
                    "torch_scaled_mm_fp8": lambda: torch._scaled_mm(x_fp8, st["w_fp8"], one, one, out_dtype=torch.bfloat16),
                }
                if cap >= (9, 0):
                    providers["accel_int8_mm_ptr"] = lambda: int8_mm(x_q, st["w_q"], x_s, st["w_s"], bias,
                                                                     out_dtype=torch.bfloat16, impl="ptr")
                with torch.no_grad():
                    return timer.providers("int8", f"{size}^2_M{m}", "cublas_bf16", providers)
            cases.append(Case("int8", f"{size}^2_M{m}", run))
    return cases


def _conv_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch
    import torch.nn.functional as F
    from accel.kernels.int8_conv import int8_conv2d

    from accel import QuantConv2d
    from accel.quant import quantize_per_image_ref, quantize_weight

    cases = []
    for name, cin, cout, hw, ksz, stride, pad in cfg["conv_layers"]:
        for batch in cfg["conv_batches"]:
            def run(cin=cin, cout=cout, hw=hw, ksz=ksz, stride=stride, pad=pad, batch=batch, name=name):
                torch.manual_seed(0)
                conv = torch.nn.Conv2d(cin, cout, ksz, stride, pad, bias=True, device=DEVICE, dtype=torch.bfloat16)
                conv = conv.to(memory_format=torch.channels_last)
                x = torch.randn(batch, cin, hw, hw, device=DEVICE, dtype=torch.bfloat16).contiguous(
                    memory_format=torch.channels_last)
                q = QuantConv2d.from_float(conv)
                w_q, w_s = quantize_weight(conv.weight.float())
                w_q = w_q.to(DEVICE).contiguous(memory_format=torch.channels_last)
                x_q, x_s = quantize_per_image_ref(x.float())
                x_q = x_q.to(DEVICE).contiguous(memory_format=torch.channels_last)
                x_s, w_s = x_s.to(DEVICE), w_s.to(DEVICE)
                with torch.no_grad():
                    return timer.providers("conv", f"{name}_B{batch}", "cudnn_bf16_cl", {
                        "cudnn_bf16_cl": lambda: F.conv2d(x, conv.weight, conv.bias, stride, pad),
                        "accel_quant_conv": lambda: q(x),
                        "accel_int8_conv_kernel": lambda: int8_conv2d(x_q, w_q, x_s, w_s, conv.bias, stride, pad,
                                                                      out_dtype=torch.bfloat16),
                    })
            cases.append(Case("conv", f"{name}_B{batch}", run))
    return cases


def _sparse_int8_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch
    import torch.nn.functional as F

    from accel import QuantLinear, SparseLinear, SparseQuantLinear
    from accel.formats import topk_block_mask

    cases = []
    n = k = cfg["n"]
    for block in cfg["bsr_blocks"]:
        state = {}

        def setup(block=block, state=state):
            if not state:
                torch.manual_seed(0)
                lin = torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16)
                mask = topk_block_mask(torch.rand(n // block, k // block, device=DEVICE), 0.9)
                sparse = SparseLinear.from_dense(lin, mask=mask, block=block, mode="sparse")
                state.update(lin=lin, sparse=sparse, int8_sparse=SparseQuantLinear.from_sparse(sparse),
                             quant=QuantLinear.from_float(lin, mode="dynamic"))
            return state

        for m in cfg["sparse_ms"]:
            def run(m=m, block=block, setup=setup):
                st = setup()
                x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
                lin = st["lin"]
                with torch.no_grad():
                    return timer.providers("sparse_int8", f"B{block}_s0.9_M{m}", "cublas_bf16", {
                        "cublas_bf16": lambda: F.linear(x, lin.weight, lin.bias),
                        "accel_sparse_bf16": lambda: st["sparse"](x),
                        "accel_quant_dense": lambda: st["quant"](x),
                        "accel_sparse_int8": lambda: st["int8_sparse"](x),
                    })
            cases.append(Case("sparse_int8", f"B{block}_s0.9_M{m}", run))
    return cases


def _sparse_conv_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch
    import torch.nn.functional as F

    from bench.sparse_conv_bench import random_sparse_conv

    cases = []
    batch = cfg["sparse_conv_batch"]
    for c, o, hw, stride in cfg["sparse_conv_layers"]:
        def run(c=c, o=o, hw=hw, stride=stride):
            sc = random_sparse_conv(c, o, stride, 0.1, 32).to(DEVICE)
            dense = torch.nn.Conv2d(c, o, 3, stride, 1, device=DEVICE)
            with torch.no_grad():
                dense.weight.copy_(sc.dense_weight())
                dense.bias.copy_(sc.bias)
            cl = torch.channels_last
            x = torch.randn(batch, c, hw, hw, device=DEVICE).contiguous(memory_format=cl)
            x16, sc16 = x.bfloat16(), random_sparse_conv(c, o, stride, 0.1, 32).to(DEVICE, torch.bfloat16)
            w, w16 = dense.weight.contiguous(memory_format=cl), dense.weight.bfloat16().contiguous(memory_format=cl)
            b, b16 = dense.bias, dense.bias.bfloat16()
            with torch.no_grad():
                return timer.providers("sparse_conv", f"{c}to{o}_{hw}_s{stride}_B{batch}", "cudnn_bf16_cl", {
                    "cudnn_bf16_cl": lambda: F.conv2d(x16, w16, b16, stride, 1),
                    "cudnn_fp32_cl": lambda: F.conv2d(x, w, b, stride, 1),
                    "accel_sparse_bf16": lambda: sc16(x16),
                    "accel_sparse_fp32": lambda: sc(x),
                })
        cases.append(Case("sparse_conv", f"{c}to{o}_{hw}_s{stride}_B{batch}", run))
    return cases


def _train_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch

    from accel import SparseLinear

    cases = []
    for block in cfg["bsr_blocks"]:
        def run(block=block):
            torch.manual_seed(0)
            n = k = cfg["n"]
            m = cfg["train_m"]
            dense = torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16)
            sparse = SparseLinear.from_dense(dense, sparsity=0.9, block=block, mode="sparse")
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16)

            def step(layer):
                def fn():
                    for p in list(layer.parameters()) + [x]:
                        p.grad = None
                    layer(x).backward(g)
                return fn

            return timer.providers("train", f"fwd+bwd_B{block}_s0.9_M{m}", "dense_bf16",
                                   {"dense_bf16": step(dense), "accel_sparse": step(sparse)}, graph=False)
        cases.append(Case("train", f"fwd+bwd_B{block}_s0.9", run))
    return cases


def _host_cases(cfg: dict, timer: Timer) -> list[Case]:
    import torch
    import torch.nn.functional as F
    from accel.kernels.int8_matmul import int8_mm, quantize_rows

    from accel import QuantLinear, SparseLinear

    def run():
        torch.manual_seed(0)
        k = n = cfg["n"]
        lin = torch.nn.Linear(k, n, device=DEVICE, dtype=torch.bfloat16)
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        sparse = SparseLinear.from_dense(lin, sparsity=0.5, block=32, mode="sparse")
        dyn, wo = QuantLinear.from_float(lin, mode="dynamic"), QuantLinear.from_float(lin, mode="weight_only")
        x_q, x_s = quantize_rows(x)
        w_q = dyn.weight_q
        w_s = dyn.weight_scale
        providers = {
            "F.linear_bf16": lambda: F.linear(x, lin.weight, lin.bias),
            "accel_sparse": lambda: sparse(x),
            "accel_dynamic": lambda: dyn(x),
            "accel_weight_only": lambda: wo(x),
            "int8_mm_launch": lambda: int8_mm(x_q, w_q, x_s, w_s, out_dtype=torch.bfloat16),
            "quantize_rows_launch": lambda: quantize_rows(x),
        }
        rows = []
        calls = 200 if DEVICE == "cuda" else 2  # few enough that the launch queue never fills: host time
        with torch.no_grad():
            for name, fn in providers.items():
                row = Row("host", f"M1_{n}^2_launch", name, "F.linear_bf16")
                try:
                    for _ in range(5):
                        fn()
                    _sync()
                    samples = []
                    for _ in range(5 if DEVICE == "cuda" else 1):
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        samples.append((time.perf_counter() - t0) / calls * 1e6)
                        _sync()
                    row.us = statistics.median(samples)
                    row.extra["what"] = "CPU wall microseconds per call, no synchronization"
                except Exception as e:  # noqa: BLE001
                    row.error = f"{type(e).__name__}: {e}"
                rows.append(row)
        return rows

    return [Case("host", f"M1_{cfg['n']}^2_launch", run)]


BUILDERS = {"bsr": _bsr_cases, "int8": _int8_cases, "conv": _conv_cases, "sparse_int8": _sparse_int8_cases,
            "sparse_conv": _sparse_conv_cases, "train": _train_cases, "host": _host_cases}


def build_cases(sections: list[str], quick: bool, timer, tiny: bool = False, **overrides) -> list[Case]:
    """The cases of ``sections``; ``overrides`` (``ms``, ``bsr_blocks``; None: keep) replace sweep entries."""
    cfg = sweeps(quick, tiny)
    cfg.update({k: tuple(v) for k, v in overrides.items() if v})
    cases = []
    for s in sections:
        try:
            cases += BUILDERS[s](cfg, timer)
        except Exception as e:  # noqa: BLE001 - an import failure in one section must not stop the others
            msg = f"{type(e).__name__}: {e}"

            def failed(msg=msg):
                raise RuntimeError(f"section setup failed: {msg}")
            cases.append(Case(s, "setup", failed))
    return cases


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, metavar="SECTION",
                    help=f"run only these sections (any of {', '.join(SECTIONS)}); default: all")
    ap.add_argument("--quick", action="store_true", help="smaller sweeps and fewer repetitions (about 2 minutes)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip the remaining cases once this many seconds have passed (default 420)")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="token counts M of the bsr and int8 sweeps "
                    "(default 1 16 256 4096)")
    ap.add_argument("--blocks", type=int, nargs="+", default=None, help="block sizes of the bsr and train sections "
                    "(default 64 32)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 30, quick 10)")
    ap.add_argument("--json", default=RESULTS_PATH, help=f"results file, rewritten after every case (default {RESULTS_PATH})")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every case on the CPU with tiny shapes and a wall-clock timer (checks the suite's code "
                         "paths without a GPU; the numbers mean nothing)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(argv)
    sections = select_sections(args.sections)
    import torch

    if args.dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench.gpu_suite: no CUDA device here; run it on a GPU machine (see the module docstring), or use "
              "--dry-run", file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    cfg_reps = args.reps or sweeps(args.quick, args.dry_run)["reps"]
    timer = WallTimer(cfg_reps) if args.dry_run else Timer(cfg_reps)
    if args.dry_run:
        from bench.common import environment

        env = {**environment(), "dry_run": True}
    else:
        env = gpu_environment()
    meta = {"sections": sections, "quick": args.quick, "ms": args.ms, "blocks": args.blocks,
            "dry_run": args.dry_run, "budget_s": args.budget_s,
            "reps": cfg_reps, "flush_bytes": 0 if args.dry_run else FLUSH_BYTES}
    print(f"gpu_suite on {env.get('device')} (sm_{env.get('capability')}, driver {env.get('driver')}, torch "
          f"{env.get('torch')}, triton {env.get('triton')}); sections {sections}; budget {args.budget_s:.0f}s", flush=True)
    cases = build_cases(sections, args.quick, timer, tiny=args.dry_run, ms=args.ms, bsr_blocks=args.blocks)
    rows = run_cases(cases, budget, lambda rows: write_json(args.json, rows, env, meta),
                     log=lambda s: print(s, flush=True))
    print()
    print(format_table(rows))
    n_err = sum(1 for r in rows if r.error)
    print(f"\n{len(rows)} rows, {n_err} errors or skips; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

