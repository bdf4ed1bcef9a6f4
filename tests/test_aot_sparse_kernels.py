"""The int8 block-sparse matmul and the block-sparse conv kernels compile ahead of time for sm_80 and
sm_90 (no GPU needed) in every runtime config, the way a launch specialises them, and the generated
code is what we want: tensor-core MMAs (int8 ``mma.sync ... .s8.s8`` / ``wgmma`` on sm_90 where the
dot tile has >= 64 rows and a warpgroup), no register spills (``ptxas -v``), shared memory within the
device limit, both dot operands copied global -> shared with 16-byte ``cp.async``, and no byte-wise
global loads of int8 data.

Run as a script (``python tests/test_aot_sparse_kernels.py --json out.json``) it compiles the jobs
and writes the results; the tests run it once in a subprocess with TRITON_INTERPRET removed
(interpreted kernels cannot be compiled) and read the JSON.

A job mirrors the common launch: NHWC/row-major activations and contiguous BSR values, so unit
strides are the constexpr 1 that Triton specialises and the other strides, the reduction sizes and
the pointers are divisible by 16 (``tt.divisibility``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.aot

ROOT = Path(__file__).resolve().parents[1]
CAPS = (80, 90)
#: largest dynamic shared memory a block may opt into: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB
SMEM_LIMIT = {80: 166912, 90: 232448}
_DIV16 = [["tt.divisibility", 16]]
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "i32": "*i32"}


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------
def _kernels():
    from accel.kernels import bsr_conv, int8_bsr_matmul

    return {
        "int8_bsr_mm": int8_bsr_matmul._int8_bsr_mm_kernel,
        "bsr_conv2d": bsr_conv._bsr_conv2d_fwd_kernel,
        "bsr_conv2d_dx": bsr_conv._bsr_conv2d_dx_kernel,
        "bsr_conv2d_dw": bsr_conv._bsr_conv2d_dw_kernel,
    }


def _jit_fn(kernel: str):
    from triton.runtime.jit import JITFunction

    fn = _kernels()[kernel]
    while not isinstance(fn, JITFunction):  # unwrap Autotuner / Heuristics
        fn = fn.fn
    return fn


def config_name(c) -> str:
    return "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c.kwargs.items()) + \
        f"_w{c.num_warps}_s{c.num_stages}"


def _job(kernel, config, variant, cap, bs, dot_m, types, constexprs, div16, vector_operands=True) -> dict:
    """ASTSource inputs: ``types`` by argument name (other integers i32), ``constexprs`` (the config is
    added), ``div16`` the integer arguments a launch sees divisible by 16 (pointers always are).
    ``vector_operands``: whether this specialisation is expected to copy both dot operands with 16-byte
    cp.async (False for gathers whose channel runs Triton cannot prove, e.g. C not a multiple of 16)."""
    fn = _jit_fn(kernel)
    const = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        ty = types.get(name, "i32")
        signature[name] = ty
        if ty.startswith("*") or name in div16:
            attrs[f"{i}"] = _DIV16
    return dict(kernel=kernel, config=config_name(config), variant=variant, cap=cap, block_size=bs, dot_m=dot_m,
                num_warps=config.num_warps, num_stages=config.num_stages, block_k=config.kwargs.get("BLOCK_K", 0),
                signature=signature, constexprs=const, attrs=attrs, vector_operands=vector_operands)


#: int8_bsr_mm specialisations: (name, output pointer, fused epilogue)
INT8_VARIANTS = [("fp16_scaled_bias_gelu", "*fp16", True), ("int32_raw", "*i32", False)]


def int8_jobs(caps=CAPS) -> list[dict]:
    from accel.kernels import int8_bsr_matmul as I

    jobs = []
    for cap in caps:
        for bs in I.SUPPORTED_BLOCK_SIZES:
            for name, y_ty, fused in INT8_VARIANTS:
                types = {"x_ptr": "*i8", "xs_ptr": "*fp32", "v_ptr": "*i8", "ws_ptr": "*fp32", "crow_ptr": "*i64",
                         "col_ptr": "*i64", "bias_ptr": "*fp32", "y_ptr": y_ty}
                const = {"stride_xk": 1, "stride_vi": 1, "stride_yn": 1, "BS": bs, "HAS_X_SCALE": fused,
                         "HAS_W_SCALE": fused, "HAS_BIAS": fused, "ACTIVATION": 2 if fused else 0, "OUT_INT32": not fused}
                for c in I.configs_for_block(bs):
                    dot_m = c.kwargs["BLOCK_N"] if c.kwargs["SWAP"] else c.kwargs["BLOCK_M"]
                    jobs.append(_job("int8_bsr_mm", c, name, cap, bs, dot_m, types, const,
                                     div16=("K", "stride_xm", "stride_vb", "stride_vo", "stride_ym")))
    return jobs


#: conv dtypes: (name, pointer type, PRECISION); fp32 is compiled with tf32 (allow_tf32=True), the
#: tensor-core path; IEEE fp32 runs on FMA units by design.
CONV_DTYPES = [("fp16", "*fp16", "ieee"), ("bf16", "*bf16", "ieee"), ("fp32_tf32", "*fp32", "tf32")]


def conv_jobs(caps=CAPS) -> list[dict]:
    """Aligned launches (C and O multiples of 16, NHWC) in fp16, bf16 and tf32 over the aligned tables,
    plus fp16 worst cases over the ragged tables: nothing but the BSR value strides divisible by 16
    (e.g. a C = 3 first layer, VEC 1), and for dX also C % B != 0 with C % 16 == 0 (aligned table)."""
    from accel.kernels import bsr_conv as BC

    jobs = []
    x_div = ("stride_xb", "stride_xh", "stride_xw")
    dy_div = ("stride_dyb", "stride_dyh", "stride_dyw")
    v_div = ("stride_vb", "stride_vo")
    idx = {n: "*i64" for n in ("crow_ptr", "col_ptr", "crowt_ptr", "colt_ptr", "bidx_ptr", "row_ptr")}
    for cap in caps:
        for bs in BC.SUPPORTED_BLOCK_SIZES:
            for dt, ptr, precision in CONV_DTYPES:
                # tf32 dW/dX operands that are M/N-major in NHWC: the sm_90 tf32 wgmma cannot read them
                mn_major_tf32 = cap == 90 and dt == "fp32_tf32"
                # forward
                types = {"x_ptr": ptr, "v_ptr": ptr, "bias_ptr": ptr, "y_ptr": ptr, **idx}
                const = {"stride_xc": 1, "stride_vi": 1, "stride_yn": 1, "BS": bs, "VEC": 16, "HAS_BIAS": True,
                         "UPCAST": False, "PRECISION": precision}
                for c in BC.fwd_configs_for_block(bs, aligned=True):
                    jobs.append(_job("bsr_conv2d", c, f"{dt}_nhwc", cap, bs, c.kwargs["BLOCK_M"], types, const,
                                     div16=("C", "K", "OC", "stride_ym") + v_div + x_div))
                if dt == "fp16":
                    for c in BC.fwd_configs_for_block(bs, aligned=False):
                        jobs.append(_job("bsr_conv2d", c, "fp16_ragged", cap, bs, c.kwargs["BLOCK_M"], types,
                                         {**const, "VEC": 1}, div16=v_div, vector_operands=False))
                # dX
                types = {"dy_ptr": ptr, "v_ptr": ptr, "dx_ptr": ptr, **idx}
                const = {"stride_dyc": 1, "stride_vi": 1, "stride_xn": 1, "BS": bs, "C_ALIGNED": True, "UPCAST": False,
                         "PRECISION": precision}
                div16 = ("C", "OC", "stride_xm") + v_div + dy_div
                for c in BC.dx_configs_for_block(bs, aligned=True):
                    jobs.append(_job("bsr_conv2d_dx", c, f"{dt}_nhwc", cap, bs, c.kwargs["BLOCK_M"], types, const, div16,
                                     vector_operands=not mn_major_tf32))
                    if dt == "fp16":  # e.g. C = 48, B = 32: (tap, channel block) straddles two K blocks
                        jobs.append(_job("bsr_conv2d_dx", c, "fp16_nhwc_c_unaligned", cap, bs, c.kwargs["BLOCK_M"], types,
                                         {**const, "C_ALIGNED": False}, div16, vector_operands=False))
                if dt == "fp16":
                    for c in BC.dx_configs_for_block(bs, aligned=False):
                        jobs.append(_job("bsr_conv2d_dx", c, "fp16_ragged", cap, bs, c.kwargs["BLOCK_M"], types,
                                         {**const, "C_ALIGNED": False}, div16=v_div, vector_operands=False))
                # dW
                types = {"dy_ptr": ptr, "x_ptr": ptr, "dv_ptr": ptr, **idx}
                const = {"stride_dyc": 1, "stride_xc": 1, "stride_di": 1, "BS": bs, "VEC": 16, "UPCAST": False,
                         "PRECISION": precision}
                dv_div = ("CHUNK", "stride_ds", "stride_db", "stride_do")
                for c in BC.dw_configs_for_block(bs, aligned=True):
                    jobs.append(_job("bsr_conv2d_dw", c, f"{dt}_nhwc", cap, bs, bs, types, const,
                                     div16=("C", "K", "OC") + dv_div + x_div + dy_div, vector_operands=not mn_major_tf32))
                if dt == "fp16":
                    for c in BC.dw_configs_for_block(bs, aligned=False):
                        jobs.append(_job("bsr_conv2d_dw", c, "fp16_ragged", cap, bs, bs, types, {**const, "VEC": 1},
                                         div16=dv_div, vector_operands=False))
    return jobs


def all_jobs(caps=CAPS) -> list[dict]:
    return int8_jobs(caps) + conv_jobs(caps)


# ---------------------------------------------------------------------------------------------
# Compile and inspect
# ---------------------------------------------------------------------------------------------
_LOAD_2D = re.compile(r"= tt\.load [^\n]*: tensor<\d+x\d+x!tt\.ptr<\w+>")
_LOC = re.compile(r"\.loc\s+\d+\s+\d+\s+\d+[^\n/]*//\s*([\w.]+):(\d+):")  # also inlined_at forms
_CP_ASYNC = re.compile(r"cp\.async\.\w+\.shared\.global(?:\.L2::\w+)?\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)")
_BYTE_LOAD = re.compile(r"\bld\.global[\w.]*\.[bsu]8\b")
_INDEX_ARRAYS = ("crow_ptr", "col_ptr", "crowt_ptr", "colt_ptr", "bidx_ptr", "row_ptr")


def _source_lines(file_name: str) -> list[str]:
    return (ROOT / "kernels" / file_name).read_text().splitlines()


def cp_async_copies(ptx: str) -> tuple[list, list]:
    """The cp.async copies of ``ptx`` as sorted ``[source line, size]`` pairs, split into (operand tiles,
    index arrays) by the kernel source line that ``-lineinfo`` attaches to each (``.loc ... // file:line:col``):
    a copy is an index copy when its line loads one of the BSR index arrays (the last ``.loc`` before a
    copy is its load's: inside the inline-asm block, or the load's address computation)."""
    operands, indices, where, sources = set(), set(), None, {}
    for line in ptx.splitlines():
        m = _LOC.search(line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = _CP_ASYNC.search(line)
        if m:
            assert where is not None, "cp.async without a .loc line (lineinfo off?)"
            src = sources.setdefault(where[0], _source_lines(where[0]))[where[1] - 1]
            is_index = "tl.load(" in src and any(f"tl.load({a}" in src for a in _INDEX_ARRAYS)
            (indices if is_index else operands).add((where[1], m.group(1)))
    return sorted(operands), sorted(indices)


def _compile_one(job: dict) -> dict:
    import triton
    from accel.kernels.aot import resource_usage, tensor_core_ops
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = {k: job[k] for k in ("kernel", "config", "variant", "cap", "block_size", "dot_m", "num_warps", "num_stages",
                               "block_k", "vector_operands")}
    res.update(ok=False, error="")
    try:
        attrs = {(int(k),): v for k, v in job["attrs"].items()}
        src = ASTSource(fn=_jit_fn(job["kernel"]), signature=job["signature"], constexprs=job["constexprs"], attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", job["cap"], 32),
                           options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})
        ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
        res["mma"] = tensor_core_ops(ptx)
        res["registers"], res["spill_bytes"] = resource_usage(ptx, job["cap"])
        res["shared_bytes"] = int(k.metadata.shared)
        res["plain_2d_loads"] = len(_LOAD_2D.findall(ttgir))
        res["operand_copies"], res["index_copies"] = cp_async_copies(ptx)
        res["cp_async_sizes"] = sorted({size for _, size in res["operand_copies"]})
        res["byte_global_loads"] = len(_BYTE_LOAD.findall(ptx))
        res["ok"] = True
    except Exception as e:  # recorded and asserted on by the tests
        res["error"] = f"{type(e).__name__}: {e}"[:2000]
    return res


def run(jobs: list[dict], workers: int) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(_compile_one, jobs, chunksize=4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="AOT-compile the sparse kernels for sm_80/sm_90")
    ap.add_argument("--json", required=True)
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    ap.add_argument("--cap", type=int, action="append")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    jobs = [j for j in all_jobs(tuple(args.cap or CAPS)) if not args.kernel or j["kernel"] in args.kernel]
    results = run(jobs, args.workers)
    print(f"{'kernel':<14} {'config':<34} {'variant':<22} {'B':>3} {'sm':>3} {'regs':>4} {'spill':>5} {'smem':>6}  "
          "tensor-core / cp.async")
    for r in results:
        if r["ok"]:
            tail = f"{(r['mma'] or ['-'])[0]} / {','.join(r['cp_async_sizes']) or '-'}"
            print(f"{r['kernel']:<14} {r['config']:<34} {r['variant']:<22} {r['block_size']:>3} {r['cap']:>3} "
                  f"{r['registers']:>4} {r['spill_bytes']:>5} {r['shared_bytes']:>6}  {tail}")
        else:
            print(f"{r['kernel']:<14} {r['config']:<34} {r['variant']:<22} {r['block_size']:>3} {r['cap']:>3} FAILED "
                  f"{r['error'][:100]}")
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot_sparse") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, "--json", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"AOT run produced no results (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _key(r):
    return (r["kernel"], r["config"], r["variant"], r["block_size"], r["cap"])


def _runtime_configs() -> set:
    """(kernel, config name, block size) of every config a GPU autotuner can pick."""
    from accel.kernels import bsr_conv as BC
    from accel.kernels import int8_bsr_matmul as I

    want = set()
    for bs in I.SUPPORTED_BLOCK_SIZES:
        want |= {("int8_bsr_mm", config_name(c), bs) for c in I.configs_for_block(bs)}
    for bs in BC.SUPPORTED_BLOCK_SIZES:
        for aligned in (True, False):
            want |= {("bsr_conv2d", config_name(c), bs) for c in BC.fwd_configs_for_block(bs, aligned)}
            want |= {("bsr_conv2d_dx", config_name(c), bs) for c in BC.dx_configs_for_block(bs, aligned)}
            want |= {("bsr_conv2d_dw", config_name(c), bs) for c in BC.dw_configs_for_block(bs, aligned)}
    return want


def test_covers_every_runtime_config_on_both_targets(aot_results):
    for cap in CAPS:
        got = {(r["kernel"], r["config"], r["block_size"]) for r in aot_results if r["cap"] == cap}
        assert got == _runtime_configs(), cap
    assert {r["variant"] for r in aot_results if r["kernel"] == "int8_bsr_mm"} == {v[0] for v in INT8_VARIANTS}


def test_all_compile(aot_results):
    failed = [(_key(r), r["error"][:300]) for r in aot_results if not r["ok"]]
    assert not failed, failed


def _ok(results):
    return [r for r in results if r["ok"]]


def test_tensor_cores(aot_results):
    """mma.sync on sm_80; on sm_90 wgmma wherever the dot tile has >= 64 rows and the program is a
    warpgroup (>= 4 warps), mma.sync otherwise."""
    for r in _ok(aot_results):
        ops = " ".join(r["mma"])
        assert ops, (_key(r), "no mma/wgmma in PTX")
        if r["cap"] == 80:
            assert "mma.sync" in ops and "wgmma" not in ops, (_key(r), ops)
        elif r["dot_m"] >= 64 and r["num_warps"] >= 4:
            assert "wgmma.mma_async" in ops, (_key(r), ops)


def test_int8_uses_int8_tensor_cores(aot_results):
    int8 = [r for r in _ok(aot_results) if r["kernel"] == "int8_bsr_mm"]
    assert int8
    for r in int8:
        assert all(".s8.s8" in op for op in r["mma"]), (_key(r), r["mma"])
        assert r["block_k"] >= 32, _key(r)


def test_no_spills(aot_results):
    spills = [(_key(r), r["spill_bytes"], r["registers"]) for r in _ok(aot_results) if r["spill_bytes"] != 0]
    assert not spills, spills


def test_shared_memory_fits(aot_results):
    over = [(_key(r), r["shared_bytes"]) for r in _ok(aot_results) if r["shared_bytes"] > SMEM_LIMIT[r["cap"]]]
    assert not over, over


def test_dot_operands_use_16_byte_async_copies(aot_results):
    """Both operand tiles of the dot are software-pipelined global -> shared copies (no plain 2-D
    tt.load left) from two load sites, and every cp.async of an operand moves 16 bytes.

    Not checked (``vector_operands`` False): element-wise gathers (C not a multiple of 8/4, or the dX
    column window of C % B != 0), and tf32 dW/dX on sm_90, whose NHWC operands are M/N-major, which
    the tf32 wgmma cannot read (Triton copies them 4 bytes at a time there)."""
    checked = [r for r in _ok(aot_results) if r["vector_operands"]]
    assert len(checked) > len(aot_results) // 2
    for r in checked:
        assert r["plain_2d_loads"] == 0, (_key(r), r["plain_2d_loads"])
        assert len({line for line, _ in r["operand_copies"]}) >= 2, (_key(r), r["operand_copies"])
        assert all(size in ("0x10", "16") for _, size in r["operand_copies"]), (_key(r), r["operand_copies"])


def test_int8_no_bytewise_global_loads(aot_results):
    int8 = [r for r in _ok(aot_results) if r["kernel"] == "int8_bsr_mm"]
    bad = [(_key(r), r["byte_global_loads"]) for r in int8 if r["byte_global_loads"]]
    assert not bad, bad


def test_int8_tables_are_legal_for_nvidia():
    """Checked on the tables themselves (the interpreter would accept what NVIDIA rejects): int8 K tile
    >= 32, N tile within the block, and >= 16 bytes per thread in both operand tiles."""
    from accel.kernels import int8_bsr_matmul as I

    for bs in I.SUPPORTED_BLOCK_SIZES:
        for c in I.configs_for_block(bs):
            kw = c.kwargs
            assert kw["BLOCK_K"] >= 32 and kw["BLOCK_N"] <= bs, (bs, c)
            assert min(kw["BLOCK_M"], kw["BLOCK_N"]) * kw["BLOCK_K"] >= 16 * 32 * c.num_warps, (bs, c)
            I.check_config(c, bs)


if __name__ == "__main__":
    sys.exit(main())
