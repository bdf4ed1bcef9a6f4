"""Ahead-of-time compilation of every kernel config for NVIDIA targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole Triton and
ptxas pipeline on a CPU-only machine. For each (kernel, config, dtype, block size, capability)
this module records whether it compiled, whether the PTX uses tensor-core instructions (``mma``
on sm_80, ``wgmma`` or ``mma`` on sm_90), and the register and local-memory (spill) use that
``cuobjdump -res-usage`` reports for the cubin.

Run as ``python -m accel.kernels.aot [--json PATH]``. It must run with ``TRITON_INTERPRET`` unset:
under the interpreter ``@triton.jit`` yields interpreted functions that cannot be compiled, so the
test suite calls this module in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

CAPABILITIES = (80, 90)

# Integer arguments that equal 1 or are multiples of 16 are specialised by Triton at launch; the
# AOT signature mirrors the common launch: unit inner strides are constexpr 1 and pointers aligned.
_DIV16 = [["tt.divisibility", 16]]


@dataclass
class AotResult:
    kernel: str
    config: str
    dtype: str
    block_size: int
    capability: int
    dot_m: int  # rows of the tl.dot tile: sm_90 uses wgmma when this is >= 64
    ok: bool
    tensor_core: bool = False
    mma_instructions: str = ""
    registers: int = -1
    spill_bytes: int = -1
    error: str = ""


def _tools_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local-memory bytes per thread) of the single kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [os.path.join(_tools_dir(), "cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(path)
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    if regs is None or local is None:
        raise RuntimeError(f"could not parse cuobjdump -res-usage output:\n{out}")
    return int(regs.group(1)), int(local.group(1))


def tensor_core_ops(ptx: str) -> list[str]:
    """The distinct tensor-core instructions (``mma.sync`` on sm_80+, ``wgmma.mma_async`` on sm_90) in ``ptx``."""
    return sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)))


def _compile_one(job: dict) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = AotResult(
        kernel=job["kernel"], config=job["config_name"], dtype=job["dtype"], block_size=job["bs"],
        capability=job["cap"], dot_m=job["dot_m"], ok=False,
    )
    try:
        fn = _KERNELS[job["kernel"]]()
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        k = triton.compile(
            src, target=GPUTarget("cuda", job["cap"], 32),
            options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        )
        ptx = k.asm["ptx"]
        ops = tensor_core_ops(ptx)
        res.mma_instructions = " ".join(ops)
        res.tensor_core = bool(ops)
        res.registers, res.spill_bytes = resource_usage(k.asm["cubin"])
        res.ok = True
    except Exception as e:  # recorded, reported and asserted on by the tests
        res.error = f"{type(e).__name__}: {e}"[:2000]
    return res


# ---------------------------------------------------------------------------------------------
# What to compile. Each builder returns jobs for one kernel over its whole config table.
# ---------------------------------------------------------------------------------------------
def _bsr_fwd_fn():
    from .bsr_matmul import _bsr_dense_mm_kernel

    return _bsr_dense_mm_kernel.fn


def _bsr_sddmm_fn():
    from .bsr_matmul import _bsr_sddmm_kernel

    return _bsr_sddmm_kernel.fn


_KERNELS = {"bsr_dense_mm": _bsr_fwd_fn, "bsr_sddmm": _bsr_sddmm_fn}

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _bsr_jobs(dtypes, block_sizes, caps) -> list[dict]:
    from .bsr_matmul import fwd_configs_for_block, gpu_fwd_configs, gpu_sddmm_configs

    jobs = []
    for cap in caps:
        for dt in dtypes:
            ptr = _PTR[dt]
            precision = "tf32" if dt == "fp32" else "ieee"
            for bs in block_sizes:
                for c in fwd_configs_for_block(bs, gpu_fwd_configs()):
                    bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
                    sig = {
                        "x_ptr": ptr, "v_ptr": ptr, "crow_ptr": "*i64", "col_ptr": "*i64", "bidx_ptr": "*i64",
                        "bias_ptr": ptr, "y_ptr": ptr, "M": "i32", "N": "i32", "K": "i32",
                        "stride_xm": "i32", "stride_xk": "constexpr",
                        "stride_vb": "i32", "stride_vo": "i32", "stride_vi": "constexpr",
                        "stride_ym": "i32", "stride_yn": "constexpr",
                        "BS": "constexpr", "HAS_BIAS": "constexpr", "HAS_BIDX": "constexpr", "UPCAST": "constexpr",
                        "PRECISION": "constexpr", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
                    }
                    const = {
                        "stride_xk": 1, "stride_vi": 1, "stride_yn": 1, "BS": bs, "HAS_BIAS": True,
                        "HAS_BIDX": False, "UPCAST": False, "PRECISION": precision, "BLOCK_M": bm, "BLOCK_K": bk,
                    }
                    attrs = {(i,): _DIV16 for i in range(7)}
                    attrs.update({(i,): _DIV16 for i in (10, 12, 13, 15)})  # K, stride_xm, stride_vb, stride_ym
                    jobs.append(_job("bsr_dense_mm", f"M{bm}_K{bk}", c, dt, bs, cap, bm, sig, const, attrs))
                for c in gpu_sddmm_configs():
                    bm = c.kwargs["BLOCK_M"]
                    sig = {
                        "dy_ptr": ptr, "x_ptr": ptr, "row_ptr": "*i64", "col_ptr": "*i64", "dv_ptr": ptr,
                        "M": "i32", "N": "i32", "K": "i32",
                        "stride_dym": "i32", "stride_dyn": "constexpr", "stride_xm": "i32", "stride_xk": "constexpr",
                        "stride_db": "i32", "stride_do": "i32", "stride_di": "constexpr",
                        "BS": "constexpr", "UPCAST": "constexpr", "PRECISION": "constexpr", "BLOCK_M": "constexpr",
                    }
                    const = {"stride_dyn": 1, "stride_xk": 1, "stride_di": 1, "BS": bs, "UPCAST": False,
                             "PRECISION": precision, "BLOCK_M": bm}
                    attrs = {(i,): _DIV16 for i in range(5)}
                    attrs.update({(i,): _DIV16 for i in (8, 10, 12, 13)})
                    jobs.append(_job("bsr_sddmm", f"M{bm}", c, dt, bs, cap, bs, sig, const, attrs))
    return jobs


def _job(kernel, name, config, dtype, bs, cap, dot_m, signature, constexprs, attrs) -> dict:
    return dict(kernel=kernel, config_name=f"{name}_w{config.num_warps}_s{config.num_stages}", dtype=dtype, bs=bs,
                cap=cap, dot_m=dot_m, signature=signature, constexprs=constexprs, attrs=attrs,
                num_warps=config.num_warps, num_stages=config.num_stages)


def all_jobs(kernels=None, dtypes=("fp16", "bf16", "fp32"), block_sizes=(16, 32, 64, 128), caps=CAPABILITIES):
    jobs = _bsr_jobs(dtypes, block_sizes, caps)
    if kernels:
        jobs = [j for j in jobs if j["kernel"] in kernels]
    return jobs


def run(jobs: list[dict], workers: int | None = None) -> list[AotResult]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    workers = workers or max(1, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(_compile_one, jobs, chunksize=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    ap.add_argument("--dtype", action="append", choices=sorted(_PTR), help="only this dtype (repeatable)")
    ap.add_argument("--block-size", type=int, action="append", help="only this block size (repeatable)")
    ap.add_argument("--cap", type=int, action="append", help="only this capability, e.g. 80 or 90")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    jobs = all_jobs(
        kernels=args.kernel,
        dtypes=tuple(args.dtype or ("fp16", "bf16", "fp32")),
        block_sizes=tuple(args.block_size or (16, 32, 64, 128)),
        caps=tuple(args.cap or CAPABILITIES),
    )
    results = run(jobs, args.workers)
    print(f"{'kernel':<14} {'config':<16} {'dtype':<5} {'BS':>4} {'sm':>3} {'ok':<3} {'regs':>4} {'spill':>5}  tensor-core")
    for r in results:
        print(f"{r.kernel:<14} {r.config:<16} {r.dtype:<5} {r.block_size:>4} {r.capability:>3} {'yes' if r.ok else 'NO':<3} "
              f"{r.registers:>4} {r.spill_bytes:>5}  {r.mma_instructions.split(' ')[0] if r.ok else r.error[:80]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
