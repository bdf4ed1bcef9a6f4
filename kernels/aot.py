"""Ahead-of-time compilation of every kernel config for NVIDIA targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole Triton and
ptxas pipeline on a CPU-only machine. For each (kernel, config, dtype, block size, capability)
this module records whether it compiled, whether the PTX uses tensor-core instructions (``mma``
on sm_80, ``wgmma`` or ``mma`` on sm_90), and the registers and spilled bytes
that ``ptxas -v`` reports.

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
    variant: str  # dtypes and flags of the compiled specialisation
    block_size: int  # BSR block size (0 for other kernels)
    block_k: int  # K tile of the dot (0 when the kernel has no dot)
    capability: int
    dot_m: int  # rows of the tl.dot tile (0: no dot); sm_90 uses wgmma when this is >= 64
    ok: bool
    tensor_core: bool = False
    mma_instructions: str = ""
    registers: int = -1
    spill_bytes: int = -1
    error: str = ""


def resource_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spilled bytes) of the single kernel in ``ptx``, from ``ptxas -v`` run the way
    Triton runs it (its own ptxas for the capability, ``-lineinfo --regAllocOptLevel=2``).

    Spilled bytes are ptxas's "bytes spill stores" plus "bytes spill loads". (``cuobjdump
    -res-usage`` is not enough: current ptxas reports large spills as a ``STACK`` frame with
    ``LOCAL:0``, e.g. ``REG:32 STACK:3024``.)
    """
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.NamedTemporaryFile(suffix=".ptx", delete=False, mode="w") as f:
        f.write(ptx)
        path = f.name
    try:
        cmd = [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", path, "-o", os.devnull]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(path)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{out}")
    return int(regs.group(1)), int(spill.group(1)) + int(spill.group(2))


def tensor_core_ops(ptx: str) -> list[str]:
    """The distinct tensor-core instructions (``mma.sync`` on sm_80+, ``wgmma.mma_async`` on sm_90) in ``ptx``."""
    return sorted(set(re.findall(r"\b(wgmma\.mma_async[\w.]*|mma\.sync[\w.]*)", ptx)))


def _compile_one(job: dict) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = AotResult(kernel=job["kernel"], config=job["config_name"], variant=job["variant"], block_size=job["bs"],
                    block_k=job["block_k"], capability=job["cap"], dot_m=job["dot_m"], ok=False)
    try:
        fn = _kernel_fn(job["kernel"])
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        k = triton.compile(
            src, target=GPUTarget("cuda", job["cap"], 32),
            options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        )
        ops = tensor_core_ops(k.asm["ptx"])
        res.mma_instructions = " ".join(ops)
        res.tensor_core = bool(ops)
        res.registers, res.spill_bytes = resource_usage(k.asm["ptx"], job["cap"])
        res.ok = True
    except Exception as e:  # recorded, reported and asserted on by the tests
        res.error = f"{type(e).__name__}: {e}"[:2000]
    return res


# ---------------------------------------------------------------------------------------------
# What to compile. A job is one (kernel, config, specialisation, capability).
# ---------------------------------------------------------------------------------------------
def _kernel_fn(name: str):
    """The plain JITFunction behind an autotuned kernel."""
    from . import bsr_matmul, int8_conv, int8_matmul

    kernels = {
        "bsr_dense_mm": bsr_matmul._bsr_dense_mm_kernel,
        "bsr_sddmm": bsr_matmul._bsr_sddmm_kernel,
        "int8_mm": int8_matmul._int8_mm_kernel,
        "quantize_rows": int8_matmul._quantize_rows_kernel,
        "int8_conv2d": int8_conv._int8_conv2d_kernel,
    }
    from triton.runtime.jit import JITFunction

    fn = kernels[name]
    while not isinstance(fn, JITFunction):  # unwrap Autotuner / Heuristics
        fn = fn.fn
    return fn


def _job(kernel: str, config, variant: str, cap: int, types: dict, constexprs: dict, div16: tuple = (),
         bs: int = 0, dot_m: int = 0, block_k: int = 0) -> dict:
    """Build the ASTSource inputs. ``types`` gives pointer and integer types by argument name (integers
    default to i32); ``constexprs`` the compile-time values (config values are added); ``div16`` the
    integer arguments assumed divisible by 16 (pointers always are), as Triton specialises at launch."""
    fn = _kernel_fn(kernel)
    const = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        ty = types.get(name, "i32")
        signature[name] = ty
        if ty.startswith("*") or name in div16:
            attrs[(i,)] = _DIV16
    name = "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in config.kwargs.items())
    return dict(kernel=kernel, config_name=f"{name}_w{config.num_warps}_s{config.num_stages}", variant=variant, bs=bs,
                cap=cap, dot_m=dot_m, block_k=block_k, signature=signature, constexprs=const, attrs=attrs,
                num_warps=config.num_warps, num_stages=config.num_stages)


_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _bsr_jobs(caps, dtypes=("fp16", "bf16", "fp32"), block_sizes=(16, 32, 64, 128)) -> list[dict]:
    from .bsr_matmul import fwd_configs_for_block, gpu_fwd_configs, gpu_sddmm_configs, sddmm_configs_for_block

    jobs = []
    for cap in caps:
        for dt in dtypes:
            ptr = _PTR[dt]
            precision = "tf32" if dt == "fp32" else "ieee"
            for bs in block_sizes:
                types = {n: ptr for n in ("x_ptr", "v_ptr", "bias_ptr", "y_ptr", "dy_ptr", "dv_ptr")}
                types.update({n: "*i64" for n in ("crow_ptr", "col_ptr", "bidx_ptr", "row_ptr")})
                for c in fwd_configs_for_block(bs, gpu_fwd_configs()):
                    const = {"stride_xk": 1, "stride_vi": 1, "stride_yn": 1, "BS": bs, "HAS_BIAS": True,
                             "HAS_BIDX": False, "UPCAST": False, "PRECISION": precision}
                    jobs.append(_job("bsr_dense_mm", c, f"{dt}_B{bs}", cap, types, const,
                                     div16=("K", "stride_xm", "stride_vb", "stride_ym"), bs=bs,
                                     dot_m=c.kwargs["BLOCK_M"], block_k=c.kwargs["BLOCK_K"]))
                for c in sddmm_configs_for_block(bs, gpu_sddmm_configs()):
                    const = {"stride_dyn": 1, "stride_xk": 1, "stride_di": 1, "BS": bs, "UPCAST": False,
                             "PRECISION": precision}
                    jobs.append(_job("bsr_sddmm", c, f"{dt}_B{bs}", cap, types, const,
                                     div16=("stride_dym", "stride_xm", "stride_db", "stride_do"), bs=bs, dot_m=bs,
                                     block_k=c.kwargs["BLOCK_M"]))
    return jobs


#: int8_mm specialisations: (name, a type, c type, A_INT8, OUT_INT32, EVEN_K, PRECISION, ACTIVATION)
INT8_MM_VARIANTS = [
    ("w8a8_fp16_gelu", "*i8", "*fp16", True, False, True, "ieee", 2),
    ("w8a8_bf16_relu_ragged_k", "*i8", "*bf16", True, False, False, "ieee", 1),
    ("w8a8_int32", "*i8", "*i32", True, True, True, "ieee", 0),
    ("w8_only_fp16", "*fp16", "*fp16", False, False, True, "ieee", 0),
    ("w8_only_bf16", "*bf16", "*bf16", False, False, True, "ieee", 0),
    ("w8_only_fp32_tf32", "*fp32", "*fp32", False, False, True, "tf32", 0),
]


def _int8_jobs(caps) -> list[dict]:
    from .int8_conv import gpu_conv_configs
    from .int8_matmul import gpu_mm_configs, gpu_quant_configs

    jobs = []
    for cap in caps:
        for name, a_ty, c_ty, a_int8, out_int32, even_k, precision, act in INT8_MM_VARIANTS:
            types = {"a_ptr": a_ty, "b_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
                     "bias_ptr": "*fp32", "c_ptr": c_ty}
            scaled = not out_int32
            const = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "A_INT8": a_int8, "HAS_A_SCALE": scaled and a_int8,
                     "HAS_B_SCALE": scaled, "HAS_BIAS": scaled, "ACTIVATION": act, "OUT_INT32": out_int32,
                     "UPCAST": False, "PRECISION": precision, "EVEN_K": even_k}
            for c in gpu_mm_configs():
                jobs.append(_job("int8_mm", c, name, cap, types, const, div16=("K", "stride_am", "stride_bn", "stride_cm"),
                                 dot_m=c.kwargs["BLOCK_M"], block_k=c.kwargs["BLOCK_K"]))
        for dt in ("fp16", "bf16", "fp32"):
            types = {"x_ptr": _PTR[dt], "q_ptr": "*i8", "s_ptr": "*fp32", "static_ptr": "*fp32"}
            for static in (False, True):
                const = {"stride_xk": 1, "QMAX": 127, "STATIC": static}
                for c in gpu_quant_configs():
                    jobs.append(_job("quantize_rows", c, f"{dt}{'_static' if static else ''}", cap, types, const,
                                     div16=("stride_xm", "stride_qm")))
        for name, y_ty, out_int32 in (("w8a8_fp16_relu", "*fp16", False), ("w8a8_int32", "*i32", True)):
            types = {"x_ptr": "*i8", "w_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": "*fp32",
                     "y_ptr": y_ty}
            const = {"stride_xc": 1, "stride_ww": 1, "stride_yn": 1, "HAS_A_SCALE": not out_int32,
                     "HAS_B_SCALE": not out_int32, "HAS_BIAS": not out_int32, "ACTIVATION": 0 if out_int32 else 1,
                     "OUT_INT32": out_int32}
            for c in gpu_conv_configs():
                jobs.append(_job("int8_conv2d", c, f"{name}_nhwc", cap, types, const,
                                 div16=("C", "stride_xb", "stride_xh", "stride_xw", "stride_ym"),
                                 dot_m=c.kwargs["BLOCK_M"], block_k=c.kwargs["BLOCK_K"]))
    return jobs


KERNELS = ("bsr_dense_mm", "bsr_sddmm", "int8_mm", "quantize_rows", "int8_conv2d")


def all_jobs(kernels=None, caps=CAPABILITIES) -> list[dict]:
    jobs = _bsr_jobs(caps) + _int8_jobs(caps)
    if kernels:
        unknown = set(kernels) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}, expected some of {KERNELS}")
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
    ap.add_argument("--kernel", action="append", choices=KERNELS, help="only this kernel (repeatable)")
    ap.add_argument("--cap", type=int, action="append", help="only this capability, e.g. 80 or 90")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    results = run(all_jobs(kernels=args.kernel, caps=tuple(args.cap or CAPABILITIES)), args.workers)
    print(f"{'kernel':<14} {'config':<22} {'variant':<24} {'sm':>3} {'ok':<3} {'regs':>4} {'spill':>5}  tensor-core")
    for r in results:
        tc = r.mma_instructions.split(" ")[0] if r.ok else r.error[:80]
        print(f"{r.kernel:<14} {r.config:<22} {r.variant:<24} {r.capability:>3} {'yes' if r.ok else 'NO':<3} "
              f"{r.registers:>4} {r.spill_bytes:>5}  {tc or '-'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
