"""Ahead-of-time compilation of every kernel config for NVIDIA targets, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole Triton and
ptxas pipeline on a CPU-only machine. This module compiles *what runs*: for each launch scenario
(a 4096-class shape per kernel and regime, plus a few ragged ones) it builds the kernel arguments
with the launchers' own argument builders on meta tensors, specialises them with Triton's own
launch-time rule (``native_specialize_impl``: integers equal to 1 become constexpr, multiples of
16 and 16-byte aligned pointers get ``tt.divisibility = 16``), applies the kernels' heuristics,
and compiles every config the launcher's autotuner may pick in that scenario on that capability.

Per (kernel, config, scenario, capability) it records, from ``ptxas -v``, the PTX and the TTGIR:

* ``registers``, ``spill_bytes`` and ``shared_bytes`` (against the capability's shared-memory limit);
* ``tensor_core`` / ``mma_instructions`` (``mma.sync`` on sm_80, ``wgmma`` on sm_90);
* ``byte_loads``: byte-wise global loads (``ld.global.{b,u,s}8``), which a vectorised operand
  stream never needs;
* ``cp_async_16`` / ``cp_async_small``: 16-byte and narrower ``cp.async`` copies; ``tma_loads``:
  ``cp.async.bulk.tensor`` copies;
* ``async_operands`` and ``pipeline_buffers``: the multi-buffered shared-memory rings the software
  pipeliner allocated (one per operand it streams asynchronously) and the depth of the shallowest;
* ``wgmma_in_flight``: a ``wgmma.wait_group`` with a non-zero count (the next wgmma is issued while
  the previous one runs).

Run as ``python -m accel.kernels.aot [--json PATH] [--kernel K] [--cap 90]``. It must run with
``TRITON_INTERPRET`` unset: under the interpreter ``@triton.jit`` yields interpreted functions that
cannot be compiled, so the test suite calls this module in a subprocess.
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
#: largest dynamic shared memory per block (bytes): A100 163 KB, H100 227 KB
SHARED_LIMIT = {80: 166912, 90: 232448}
KERNELS = ("bsr_dense_mm", "bsr_split_reduce", "bsr_sddmm", "int8_mm", "int8_mm_tma", "int8_splitk_epilogue",
           "quantize_rows_1pass", "quantize_chunk_absmax", "quantize_chunks", "int8_conv2d")
#: kernels whose main loop is a tl.dot over two streamed operands (held to the operand checks)
GEMM_KERNELS = ("bsr_dense_mm", "bsr_sddmm", "int8_mm", "int8_mm_tma", "int8_conv2d")


@dataclass
class AotResult:
    kernel: str
    config: str
    variant: str  # the launch scenario: shape, dtypes and flags of the compiled specialisation
    capability: int
    block: str  # BSR block shape "BS_NxBS_K" ("" for other kernels)
    block_k: int  # K tile of the dot (0 when the kernel has no dot)
    dot_m: int  # rows of the tl.dot tile (0: no dot); sm_90 uses wgmma when this is >= 64
    acc: str  # accumulator dtype of the dot: "fp32", "int32" or ""
    aligned: bool  # a 16-aligned launch (sizes/strides multiples of 16): held to the vectorisation checks
    num_warps: int
    tile_bytes: int  # bytes of the smaller dot operand tile (0: no dot operand tiles streamed by pointers)
    ok: bool
    tensor_core: bool = False
    mma_instructions: str = ""
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    byte_loads: int = -1
    cp_async_16: int = -1
    cp_async_small: int = -1
    cp_async_min: int = -1  # smallest cp.async in bytes (0: none)
    tma_loads: int = -1
    async_operands: int = -1
    pipeline_buffers: int = -1
    wgmma_in_flight: bool = False
    error: str = ""


# ---------------------------------------------------------------------------------------------
# What the PTX / TTGIR say
# ---------------------------------------------------------------------------------------------
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


def byte_loads(ptx: str) -> int:
    """Byte-wise global loads: ``ld.global[.qualifiers].b8/.u8/.s8`` (vector or not)."""
    return len(re.findall(r"\bld\.global(?:\.[\w:]+)*\.[bsu]8\b", ptx))


def cp_async_sizes(ptx: str) -> list[int]:
    """Byte size of every ``cp.async`` (non-bulk) copy from global to shared memory."""
    sizes = re.findall(r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.[\w:]+)*\s*\[[^\]]*\],\s*\[[^\]]*\],\s*"
                       r"(0x[0-9a-fA-F]+|\d+)", ptx)
    return [int(s, 0) for s in sizes]


def tma_load_count(ptx: str) -> int:
    return len(re.findall(r"\bcp\.async\.bulk\.tensor\.\d+d\.shared(?:::\w+)*\.global", ptx))


def wgmma_in_flight(ptx: str) -> bool:
    """True when some ``wgmma.wait_group`` leaves wgmma groups pending (count >= 1)."""
    return any(int(n) >= 1 for n in re.findall(r"\bwgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))


def pipeline_rings(ttgir: str) -> list[int]:
    """Depth of every multi-buffered shared-memory ring (``ttg.local_alloc : () -> memdesc<D x tile>``
    of rank >= 3, mbarrier arrays excluded): one per operand the pipeliner streams asynchronously."""
    depths = []
    for m in re.finditer(r"ttg\.local_alloc\s*(?:\{[^}]*\})?\s*:\s*\(\)\s*->\s*!ttg\.memdesc<([0-9x]+)x([a-z]\w*)", ttgir):
        dims, elem = m.group(1).split("x"), m.group(2)
        if len(dims) >= 3 and elem != "i64":
            depths.append(int(dims[0]))
    return depths


# ---------------------------------------------------------------------------------------------
# Compiling one job
# ---------------------------------------------------------------------------------------------
def _compile_one(job: dict) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = AotResult(kernel=job["kernel"], config=job["config_name"], variant=job["variant"], capability=job["cap"],
                    block=job["block"], block_k=job["block_k"], dot_m=job["dot_m"], acc=job["acc"],
                    aligned=job["aligned"], num_warps=job["num_warps"], tile_bytes=job["tile_bytes"], ok=False)
    try:
        fn = _jit_fn(_kernel_obj(job["kernel"]))
        src = ASTSource(fn=fn, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
        k = triton.compile(
            src, target=GPUTarget("cuda", job["cap"], 32),
            options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
        )
        ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
        ops = tensor_core_ops(ptx)
        res.mma_instructions = " ".join(ops)
        res.tensor_core = bool(ops)
        res.registers, res.spill_bytes = resource_usage(ptx, job["cap"])
        res.shared_bytes = int(getattr(k.metadata, "shared", 0))
        res.byte_loads = byte_loads(ptx)
        sizes = cp_async_sizes(ptx)
        res.cp_async_16 = sum(1 for s in sizes if s == 16)
        res.cp_async_small = sum(1 for s in sizes if s < 16)
        res.cp_async_min = min(sizes) if sizes else 0
        res.tma_loads = tma_load_count(ptx)
        rings = pipeline_rings(ttgir)
        res.async_operands = len(rings)
        res.pipeline_buffers = min(rings) if rings else 0
        res.wgmma_in_flight = wgmma_in_flight(ptx)
        res.ok = True
    except Exception as e:  # recorded, reported and asserted on by the tests
        res.error = f"{type(e).__name__}: {e}"[:2000]
    return res


# ---------------------------------------------------------------------------------------------
# What to compile: the launchers' own arguments on meta tensors, specialised as Triton does
# ---------------------------------------------------------------------------------------------
def _kernel_obj(name: str):
    """The launch object (Autotuner / Heuristics / JITFunction) of kernel ``name``."""
    from . import bsr_matmul, int8_conv, int8_matmul

    return {
        "bsr_dense_mm": bsr_matmul._bsr_dense_mm_kernel,
        "bsr_split_reduce": bsr_matmul._bsr_split_reduce_kernel,
        "bsr_sddmm": bsr_matmul._bsr_sddmm_kernel,
        "int8_mm": int8_matmul._int8_mm_kernel,
        "int8_mm_tma": int8_matmul._int8_mm_tma_kernel,
        "int8_splitk_epilogue": int8_matmul._splitk_epilogue_kernel,
        "quantize_chunk_absmax": int8_matmul._row_chunk_absmax_kernel,
        "quantize_chunks": int8_matmul._quantize_row_chunks_kernel,
        "quantize_rows_1pass": int8_matmul._quantize_rows_1pass_kernel,
        "int8_conv2d": int8_conv._int8_conv2d_kernel,
    }[name]


def _jit_fn(obj):
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, JITFunction):  # unwrap Autotuner / Heuristics
        obj = obj.fn
    return obj


def _heuristics(obj) -> dict:
    from triton.runtime.autotuner import Heuristics

    out = {}
    while hasattr(obj, "fn"):
        if isinstance(obj, Heuristics):
            out.update(obj.values)
        obj = obj.fn
    return out


def specialise(kernel: str, args: dict, config) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch of ``kernel`` with keyword ``args`` and ``config``,
    by Triton's launch-time specialisation rule."""
    from triton.backends.compiler import BaseBackend
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    obj = _kernel_obj(kernel)
    fn = _jit_fn(obj)
    full = {**args, **(config.kwargs if config is not None else {})}
    for name, rule in _heuristics(obj).items():
        full[name] = rule(full)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = full[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            continue
        ty, key = native_specialize_impl(BaseBackend, v, False, not p.do_not_specialize,
                                         not p.do_not_specialize_on_alignment)
        if ty == "constexpr":
            signature[p.name] = "constexpr"
            constexprs[p.name] = key
            continue
        signature[p.name] = ty
        if key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    return signature, constexprs, attrs


def config_name(c) -> str:
    name = "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c.kwargs.items())
    return f"{name}_w{c.num_warps}_s{c.num_stages}"


def _job(kernel: str, variant: str, cap: int, args: dict, config, *, block: str = "", dot_m: int = 0,
         block_k: int = 0, acc: str = "", aligned: bool = True, num_warps: int | None = None, tile_bytes: int = 0) -> dict:
    signature, constexprs, attrs = specialise(kernel, args, config)
    return dict(kernel=kernel, config_name=config_name(config) if config is not None else "fixed", variant=variant,
                cap=cap, block=block, dot_m=dot_m, block_k=block_k, acc=acc, aligned=aligned, tile_bytes=tile_bytes,
                signature=signature,
                constexprs=constexprs, attrs=attrs,
                num_warps=config.num_warps if config is not None else (num_warps or 4),
                num_stages=config.num_stages if config is not None else 1)


def _meta(*shape, dtype):
    import torch

    return torch.empty(*shape, dtype=dtype, device="meta")


_DT = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _dtype(name: str):
    import torch

    return getattr(torch, _DT[name])


# ---- int8 GEMM --------------------------------------------------------------------------------
#: (name, M, N, K, a dtype ("int8" or float), out dtype, activation, impl)
INT8_MM_SCENARIOS = [
    ("w8a8_M4096_fp16_gelu", 4096, 4096, 4096, "int8", "fp16", "gelu", "auto"),
    ("w8a8_M4096_int32", 4096, 4096, 4096, "int8", "int32", "none", "auto"),
    ("w8a8_M4096_bf16_gelu_ptr", 4096, 4096, 4096, "int8", "bf16", "gelu", "ptr"),
    ("w8a8_M16_bf16", 16, 4096, 4096, "int8", "bf16", "none", "auto"),
    ("w8a8_M1_bf16_ptr", 1, 4096, 4096, "int8", "bf16", "none", "ptr"),
    ("w8a8_M1_bf16", 1, 4096, 4096, "int8", "bf16", "none", "auto"),
    ("w8_only_M4096_bf16", 4096, 4096, 4096, "bf16", "bf16", "none", "auto"),
    ("w8_only_M4096_fp16_ptr", 4096, 4096, 4096, "fp16", "fp16", "gelu", "ptr"),
    ("w8_only_M4096_fp32_tf32", 4096, 4096, 4096, "fp32", "fp32", "none", "auto"),
    ("w8_only_M16_fp16", 16, 4096, 4096, "fp16", "fp16", "none", "auto"),
    ("w8_only_M1_bf16", 1, 4096, 4096, "bf16", "bf16", "none", "auto"),
    ("w8_only_M1_bf16_ptr", 1, 4096, 4096, "bf16", "bf16", "none", "ptr"),
    # ResNet-50 1x1 stride-1 conv as a GEMM (batch 32, 56x56, 256 -> 64): per-image scale rows
    ("conv1x1_B32_56x56_256to64", 32 * 56 * 56, 64, 256, "int8", "bf16", "relu", "auto"),
    # K not a multiple of 16: no 16-byte vectors possible (held to compile / spill / tensor-core checks)
    ("w8a8_M2048_ragged_k", 2048, 4096, 4100, "int8", "fp16", "gelu", "auto"),
    ("w8a8_M1_ragged_k", 1, 4096, 4100, "int8", "bf16", "none", "auto"),
    ("w8_only_M2048_ragged_k_bf16", 2048, 4096, 4100, "bf16", "bf16", "none", "auto"),
]


def _int8_mm_jobs(caps) -> list[dict]:
    import torch

    from . import int8_matmul as Q

    jobs = []
    for cap in caps:
        for name, M, N, K, a_dt, c_dt, act, impl in INT8_MM_SCENARIOS:
            a_int8 = a_dt == "int8"
            a = _meta(M, K, dtype=torch.int8 if a_int8 else _dtype(a_dt))
            b = _meta(N, K, dtype=torch.int8)
            c = _meta(M, N, dtype=torch.int32 if c_dt == "int32" else _dtype(c_dt))
            scaled = c_dt != "int32"
            a_scale = _meta(M, dtype=torch.float32) if (scaled and a_int8) else None
            b_scale = _meta(N, dtype=torch.float32) if scaled else None
            bias = _meta(N, dtype=torch.float32) if scaled else None
            rows = 56 * 56 if name.startswith("conv1x1") else 1
            plan = Q.plan_mm(M, K, a_int8, cap, impl, Q._aligned(a) and Q._aligned(b))
            cfgs = Q.mm_configs_for(plan.kernel, plan.m_bucket, a_int8, cap, plan.aligned)
            split_max = max(cfg.kwargs["SPLIT_K"] for cfg in cfgs)
            ws = _meta(split_max, M, N, dtype=torch.int32 if a_int8 else torch.float32) if split_max > 1 else c
            args = Q._mm_args(a, b, a_scale, b_scale, bias, c, ws, m_bucket=plan.m_bucket, activation=act,
                              allow_tf32=c_dt == "fp32", a_scale_rows=rows, aligned=plan.aligned,
                              tma=plan.kernel == "tma", num_programs=132)
            kernel = "int8_mm_tma" if plan.kernel == "tma" else "int8_mm"
            for cfg in cfgs:
                kw = cfg.kwargs
                tile = min(kw["BLOCK_M"] * a.element_size(), kw["BLOCK_N"]) * kw["BLOCK_K"]
                jobs.append(_job(kernel, name, cap, args, cfg, dot_m=kw["BLOCK_N"] if kw["SWAP_AB"] else kw["BLOCK_M"],
                                 block_k=kw["BLOCK_K"], acc="int32" if a_int8 else "fp32", aligned=plan.aligned,
                                 tile_bytes=tile))
            for split in sorted({cfg.kwargs["SPLIT_K"] for cfg in cfgs} - {1}):
                eargs = Q._splitk_epilogue_args(ws, c, args, split)
                jobs.append(_job("int8_splitk_epilogue", f"{name}_split{split}", cap, eargs, None))
        for dt in ("fp16", "bf16", "fp32"):
            for static in (False, True):
                for M, K in ((4096, 4096), (32, 56 * 56 * 64)):  # tokens; per-image rows of a conv input
                    x = _meta(M, K, dtype=_dtype(dt))
                    q = _meta(M, K, dtype=torch.int8)
                    s = _meta(M, dtype=torch.float32)
                    variant = f"{dt}_M{M}_K{K}{'_static' if static else ''}"
                    common = dict(x_ptr=x, K=K, stride_xm=x.stride(0), stride_xk=1)
                    if K <= Q.ONE_PASS_MAX_K:
                        args = dict(common, q_ptr=q, s_ptr=s, static_ptr=s, stride_qm=q.stride(0), QMAX=127, STATIC=static)
                        jobs.append(_job("quantize_rows_1pass", variant, cap, args, Q.one_pass_config(K)))
                        continue
                    for cfg in Q.gpu_quant_configs():
                        n_chunks = -(-K // cfg.kwargs["BLOCK_K"])
                        part = _meta(M, n_chunks, dtype=torch.float32)
                        jobs.append(_job("quantize_chunk_absmax", variant, cap, dict(common, part_ptr=part, N_CHUNKS=n_chunks),
                                         cfg))
                        args = dict(common, q_ptr=q, s_ptr=s, static_ptr=s, part_ptr=part, stride_qm=q.stride(0),
                                    N_CHUNKS=n_chunks, QMAX=127, STATIC=static,
                                    BLOCK_C=max(2, 1 << (n_chunks - 1).bit_length()))
                        jobs.append(_job("quantize_chunks", variant, cap, args, cfg))
    return jobs


# ---- int8 conv --------------------------------------------------------------------------------
#: ResNet-50 layers through the implicit-GEMM kernel: (name, B, C, H, W, OC, k, stride, padding)
CONV_SCENARIOS = [
    ("r50_3x3_64_56x56_B32", 32, 64, 56, 56, 64, 3, 1, 1),
    ("r50_3x3_256_14x14_B1", 1, 256, 14, 14, 256, 3, 1, 1),
    ("r50_1x1s2_256to512_56x56_B32", 32, 256, 56, 56, 512, 1, 2, 0),
    ("stem_7x7_C3_B1", 1, 3, 224, 224, 64, 7, 2, 3),  # 3 channels: rows not 16-byte aligned
]


def _conv_jobs(caps) -> list[dict]:
    import torch

    from . import int8_conv as C

    jobs = []
    for cap in caps:
        for name, B, Cin, H, W, OC, k, s, p in CONV_SCENARIOS:
            x = _meta(B, Cin, H, W, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
            w = _meta(OC, Cin, k, k, dtype=torch.int8).contiguous(memory_format=torch.channels_last)
            OH, OW = C.conv_output_size(H, W, k, k, (s, s), (p, p), (1, 1))
            for out in ("bf16", "int32"):
                y = _meta(B, OH, OW, OC, dtype=torch.int32 if out == "int32" else _dtype(out))
                scaled = out != "int32"
                f32 = (lambda n: _meta(n, dtype=torch.float32)) if scaled else (lambda n: None)
                args = C._conv_args(x, w, f32(B), f32(OC), f32(OC), y, (s, s), (p, p), (1, 1),
                                    "relu" if scaled else "none")
                for cfg in C.conv_configs_for(Cin, cap):
                    kw = cfg.kwargs
                    jobs.append(_job("int8_conv2d", f"{name}_{out}", cap, args, cfg, dot_m=kw["BLOCK_M"],
                                     block_k=kw["BLOCK_K"], acc="int32", aligned=Cin % 16 == 0,
                                     tile_bytes=min(kw["BLOCK_M"], kw["BLOCK_N"]) * kw["BLOCK_K"]))
    return jobs


# ---- block-sparse -----------------------------------------------------------------------------
#: (dtype, block shapes, token counts): square blocks, the dX launch (transposed blocks, "T") and the
#: 128x32 panels of bsr_to_panels; bf16 everywhere, fp16 and tf32 on fewer shapes (same code paths)
BSR_SCENARIOS = [
    ("bf16", ((16, 16), (32, 32), (64, 64), (128, 128), (32, 32, "T"), (128, 32)), (1, 16, 4096)),
    ("fp16", ((16, 16), (32, 32), (64, 64), (128, 128), (32, 32, "T"), (128, 32)), (4096,)),
    ("fp32", ((32, 32), (64, 64)), (1, 4096)),
]


def _bsr_jobs(caps) -> list[dict]:
    import torch

    from . import bsr_matmul as Bm

    jobs = []
    N = K = 4096
    for cap in caps:
        for dt, blocks, ms in BSR_SCENARIOS:
            torch_dt = _dtype(dt)
            for shape in blocks:
                bs_n, bs_k = shape[0], shape[1]
                transposed = len(shape) == 3
                nnz = (N // bs_n) * (K // bs_k) // 2  # half the blocks of a 4096x4096 weight
                values = _meta(nnz, bs_k, bs_n, dtype=torch_dt) if transposed else _meta(nnz, bs_n, bs_k, dtype=torch_dt)
                crow = _meta(N // bs_n + 1, dtype=torch.int64)
                col = _meta(nnz, dtype=torch.int64)
                bidx = _meta(nnz, dtype=torch.int64) if transposed else None
                bias = None if transposed else _meta(N, dtype=torch_dt)
                block = f"{bs_n}x{bs_k}{'T' if transposed else ''}"
                for M in ms:
                    x = _meta(M, K, dtype=torch_dt)
                    y = _meta(M, N, dtype=torch_dt)
                    cfgs = Bm.fwd_configs_for_block((bs_n, bs_k), m_bucket=M, elem_bytes=x.element_size())
                    split_max = max(c.kwargs["SPLIT"] for c in cfgs)
                    ws = _meta(split_max, M, N, dtype=torch.float32) if split_max > 1 else y
                    args = Bm._fwd_args(x, values, crow, col, bidx, bias, y, ws, blocks_transposed=transposed,
                                        allow_tf32=dt == "fp32", n_block_cols=K // bs_k)
                    variant = f"{dt}_B{block}_M{M}"
                    for cfg in cfgs:
                        kw = cfg.kwargs
                        tile = min(kw["BLOCK_M"], bs_n) * kw["BLOCK_K"] * x.element_size()
                        jobs.append(_job("bsr_dense_mm", variant, cap, args, cfg, block=block, tile_bytes=tile,
                                         dot_m=bs_n if kw["SWAP"] else kw["BLOCK_M"], block_k=kw["BLOCK_K"], acc="fp32"))
                    for split in sorted({c.kwargs["SPLIT"] for c in cfgs} - {1}):
                        jobs.append(_job("bsr_split_reduce", f"{variant}_split{split}", cap,
                                         Bm._reduce_args(ws, bias, y, split), None, block=block))
                if transposed or (dt != "bf16" and (bs_n, bs_k) != (32, 32)):
                    continue
                dy = _meta(4096, N, dtype=torch_dt)
                x = _meta(4096, K, dtype=torch_dt)
                dv = _meta(nnz, bs_n, bs_k, dtype=torch_dt)
                group = Bm.sddmm_group(bs_n, bs_k)
                size = nnz  # bsr_sddmm's work list for rows it cannot assume sorted
                groups = (_meta(size, dtype=torch.int64), _meta(size, dtype=torch.int64), _meta(size, dtype=torch.int32))
                args = Bm._sddmm_args(dy, x, groups, col, dv, allow_tf32=dt == "fp32", group=group)
                for cfg in Bm.sddmm_configs_for_block((bs_n, bs_k), elem_bytes=x.element_size()):
                    tile = cfg.kwargs["BLOCK_M"] * min(bs_n, bs_k) * x.element_size()
                    jobs.append(_job("bsr_sddmm", f"{dt}_B{block}_M4096", cap, args, cfg, block=block, dot_m=bs_n,
                                     block_k=cfg.kwargs["BLOCK_M"], acc="fp32", tile_bytes=tile))
    return jobs


def _dedupe(jobs: list[dict]) -> list[dict]:
    """One job per distinct compilation (scenarios that specialise identically compile once)."""
    seen, out = set(), []
    for j in jobs:
        key = (j["kernel"], j["cap"], j["num_warps"], j["num_stages"], repr(sorted(j["signature"].items())),
               repr(sorted(j["constexprs"].items())), repr(sorted(j["attrs"].items())))
        if key not in seen:
            seen.add(key)
            out.append(j)
    return out


def all_jobs(kernels=None, caps=CAPABILITIES) -> list[dict]:
    if kernels:
        unknown = set(kernels) - set(KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}, expected some of {KERNELS}")
    want = set(kernels or KERNELS)
    jobs = []
    if want & {"bsr_dense_mm", "bsr_split_reduce", "bsr_sddmm"}:
        jobs += _bsr_jobs(caps)
    if want & {"int8_mm", "int8_mm_tma", "int8_splitk_epilogue", "quantize_rows_1pass", "quantize_chunk_absmax",
               "quantize_chunks"}:
        jobs += _int8_mm_jobs(caps)
    if "int8_conv2d" in want:
        jobs += _conv_jobs(caps)
    return _dedupe([j for j in jobs if j["kernel"] in want])


def run(jobs: list[dict], workers: int | None = None) -> list[AotResult]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    workers = workers or max(1, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(_compile_one, jobs, chunksize=1))


def format_table(results: list[AotResult]) -> str:
    head = (f"{'kernel':<20} {'config':<40} {'variant':<28} {'sm':>3} {'ok':<3} {'regs':>4} {'spill':>5} {'smemKB':>6} "
            f"{'b8':>3} {'cp16':>4} {'cp<16':>5} {'tma':>3} {'ops':>3} {'bufs':>4} {'wgIF':>4}  tensor-core")
    lines = [head]
    for r in results:
        tc = r.mma_instructions.split(" ")[0] if r.ok else r.error[:80]
        lines.append(f"{r.kernel:<20} {r.config:<40} {r.variant:<28} {r.capability:>3} {'yes' if r.ok else 'NO':<3} "
                     f"{r.registers:>4} {r.spill_bytes:>5} {r.shared_bytes / 1024:>6.1f} {r.byte_loads:>3} "
                     f"{r.cp_async_16:>4} {r.cp_async_small:>5} {r.tma_loads:>3} {r.async_operands:>3} "
                     f"{r.pipeline_buffers:>4} {'yes' if r.wgmma_in_flight else '-':>4}  {tc or '-'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", action="append", choices=KERNELS, help="only this kernel (repeatable)")
    ap.add_argument("--cap", type=int, action="append", help="only this capability, e.g. 80 or 90")
    ap.add_argument("--variant", help="only scenarios whose name contains this")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    jobs = all_jobs(kernels=args.kernel, caps=tuple(args.cap or CAPABILITIES))
    if args.variant:
        jobs = [j for j in jobs if args.variant in j["variant"]]
    results = run(jobs, args.workers)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
