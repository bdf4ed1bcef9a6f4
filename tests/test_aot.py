"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed) as it is launched,
and the PTX shows what the kernels were restructured for.

``accel.kernels.aot`` compiles each config the autotuners can pick, specialised the way a real
4096-class launch is (Triton's own launch-time rule on the launchers' own arguments), in a
subprocess with TRITON_INTERPRET removed: interpreted kernels cannot be compiled. One run covers the
whole table; the tests read its JSON. Per (kernel, config, scenario, capability) they assert:

* it compiles, uses no more shared memory than the capability has, and spills no registers;
* tensor cores: ``mma.sync`` on sm_80, ``wgmma`` on sm_90 wherever the dot tile has >= 64 rows;
  int8 dots on int8 tensor cores with a K tile >= 32;
* in 16-byte aligned launches of the GEMM-like kernels: no byte-wise global loads; both operands
  streamed asynchronously (16-byte ``cp.async``, or TMA) into rings of >= 2 shared-memory buffers;
  on sm_90 every fp32-accumulator wgmma kept in flight across iterations (Triton never does this
  for an int32 accumulator, see ``accel.kernels.int8_matmul``).

Negative controls (launches known to defeat the vectorisation: K not a multiple of 16, a 3-channel
stem) must show byte loads, so the detectors are seen to fire.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.aot

GEMM_KERNELS = ("bsr_dense_mm", "bsr_sddmm", "int8_mm", "int8_mm_tma", "int8_conv2d")
SHARED_LIMIT = {80: 166912, 90: 232448}


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "accel.kernels.aot", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"AOT run produced no results (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _name(c):
    return "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c.kwargs.items()) + \
        f"_w{c.num_warps}_s{c.num_stages}"


def _runtime_configs(cap):
    """(kernel, config name) of every config a GPU autotuner of capability ``cap`` can pick at run time."""
    from accel.kernels import bsr_matmul as B
    from accel.kernels import int8_conv as C
    from accel.kernels import int8_matmul as Q

    want = set()
    for shape in [(b, b) for b in B.SUPPORTED_BLOCK_SIZES] + [(128, 32)]:
        for elem in (2, 4) if shape in ((32, 32), (64, 64)) else (2,):  # fp16/bf16; fp32 (tf32) where compiled
            for m_bucket in (1, 4096):
                want |= {("bsr_dense_mm", _name(c)) for c in B.fwd_configs_for_block(shape, m_bucket=m_bucket,
                                                                                      elem_bytes=elem)}
        want |= {("bsr_sddmm", _name(c)) for c in B.sddmm_configs_for_block(shape)}
    for m_bucket in (1, 4096):
        for a_int8 in (True, False):
            for aligned in (True, False):
                want |= {("int8_mm", _name(c)) for c in Q.mm_configs_for("ptr", m_bucket, a_int8, cap, aligned)}
            want |= {("int8_mm_tma", _name(c)) for c in Q.mm_configs_for("tma", m_bucket, a_int8, cap)}
    want |= {("quantize_chunks", _name(c)) for c in Q.gpu_quant_configs()}
    for channels in (3, 256):
        want |= {("int8_conv2d", _name(c)) for c in C.conv_configs_for(channels, cap)}
    return want


def _key(r):
    return (r["kernel"], r["config"], r["variant"], r["capability"])


def test_covers_every_runtime_config_on_both_targets(aot_results):
    for cap in (80, 90):
        got = {(r["kernel"], r["config"]) for r in aot_results if r["capability"] == cap}
        missing = _runtime_configs(cap) - got
        assert not missing, (cap, sorted(missing))
    variants = {r["variant"] for r in aot_results if r["kernel"] in ("int8_mm", "int8_mm_tma")}
    assert {"w8a8_M4096_int32", "w8a8_M4096_fp16_gelu", "w8a8_M1_bf16", "w8_only_M1_bf16", "w8_only_M4096_bf16",
            "w8_only_M4096_fp32_tf32"} <= variants
    assert any(r["kernel"] == "int8_mm_tma" for r in aot_results if r["capability"] == 90)
    assert not any(r["kernel"] == "int8_mm_tma" for r in aot_results if r["capability"] == 80)


def test_all_compile(aot_results):
    failed = [(_key(r), r["error"][:300]) for r in aot_results if not r["ok"]]
    assert not failed, failed


def test_no_spills(aot_results):
    spills = [(_key(r), r["spill_bytes"], r["registers"]) for r in aot_results if r["spill_bytes"] != 0]
    assert not spills, spills


def test_shared_memory_fits(aot_results):
    over = [(_key(r), r["shared_bytes"]) for r in aot_results if r["shared_bytes"] > SHARED_LIMIT[r["capability"]]]
    assert not over, over


def test_tensor_cores(aot_results):
    """mma.sync on sm_80; on sm_90 wgmma wherever the dot tile has >= 64 rows (the Hopper warpgroup MMA)."""
    for r in aot_results:
        if r["dot_m"] == 0:  # no tl.dot (quantizer, split-K reductions)
            continue
        ops = r["mma_instructions"]
        assert r["tensor_core"], (_key(r), "no mma/wgmma in PTX")
        if r["capability"] == 80:
            assert "mma.sync" in ops and "wgmma" not in ops, (_key(r), ops)
        elif r["dot_m"] >= 64:
            assert "wgmma.mma_async" in ops, (_key(r), ops)


def test_int8_uses_int8_tensor_cores_with_k_tile_at_least_32(aot_results):
    int8 = [r for r in aot_results if r["acc"] == "int32"]
    assert int8
    for r in int8:
        assert ".s32.s8.s8" in r["mma_instructions"], (_key(r), r["mma_instructions"])
        assert r["block_k"] >= 32, _key(r)


def test_int8_config_tables_have_k_tile_at_least_32():
    """NVIDIA's int8 mma needs K >= 32; the interpreter would accept less, so check the tables themselves."""
    from accel.kernels import int8_conv, int8_matmul

    for c in int8_matmul.gpu_mm_configs() + int8_matmul.gpu_mm_tma_configs() + int8_conv.gpu_conv_configs():
        assert c.kwargs["BLOCK_K"] >= 32, c


def _aligned_gemms(results):
    out = [r for r in results if r["kernel"] in GEMM_KERNELS and r["aligned"] and r["ok"]]
    assert out
    return out


def test_no_bytewise_global_loads(aot_results):
    """A 16-byte aligned launch streams its operands in vectors: the int8 conv's OHWI weight walk and
    the K-contiguous int8 GEMM operands never fall back to ld.global.b8."""
    bad = [(_key(r), r["byte_loads"]) for r in _aligned_gemms(aot_results) if r["byte_loads"] != 0]
    assert not bad, bad


def vector_floor(r) -> int:
    """The cp.async width a launch must reach: 16 bytes, or what the smaller operand tile allows its
    threads when it has less than 16 bytes per thread (a 16x16 bf16 BSR block over 128 threads: 4)."""
    floor = min(16, max(4, r["tile_bytes"] // (32 * r["num_warps"])))
    if r["capability"] == 90 and r["kernel"] == "int8_mm" and r["acc"] == "fp32":
        floor = min(floor, 8)  # register A operand of the weight-only wgmma, see below
    return floor


def test_both_operands_streamed_asynchronously(aot_results):
    """Both dot operands reach shared memory by cp.async of 16 bytes (or TMA) through rings of at least
    two buffers, so the loads of the next K tiles overlap the MMA of this one. A tile with fewer than
    16 bytes per thread gets the widest copy it allows (``vector_floor``).

    One documented exception: on sm_90 the pointer kernel's weight-only path keeps the converted
    weight in registers as the wgmma A operand (so the MMA stays in flight), and Triton streams that
    int8 operand with 8-byte cp.async (8 weights per register row). It runs only for operands a TMA
    descriptor cannot address or with impl="ptr"; the default sm_90 path is the TMA kernel.
    """
    bad = []
    for r in _aligned_gemms(aot_results):
        problems = []
        if r["async_operands"] < 2:
            problems.append(f"{r['async_operands']} async operand rings")
        if r["pipeline_buffers"] < 2:
            problems.append(f"{r['pipeline_buffers']} buffers")
        if r["kernel"] == "int8_mm_tma":
            if r["tma_loads"] < 2 or r["cp_async_16"] + r["cp_async_small"] != 0:
                problems.append(f"tma {r['tma_loads']}, cp.async {r['cp_async_16'] + r['cp_async_small']}")
        else:
            floor = vector_floor(r)
            if r["cp_async_min"] < floor:
                problems.append(f"smallest cp.async {r['cp_async_min']} B (< {floor})")
        if problems:
            bad.append((_key(r), problems))
    assert not bad, bad


def test_fp32_accumulator_wgmma_in_flight(aot_results):
    """sm_90: every wgmma with an fp32 accumulator in an aligned launch is issued while the previous
    one still runs (a wgmma.wait_group with a non-zero count): BSR fp16/bf16/tf32 and weight-only int8
    (the converted weight as the register A operand)."""
    fp32 = [r for r in _aligned_gemms(aot_results)
            if r["capability"] == 90 and r["acc"] == "fp32" and "wgmma" in r["mma_instructions"]]
    assert fp32
    bad = [_key(r) for r in fp32 if not r["wgmma_in_flight"]]
    assert not bad, bad


def test_negative_controls_trip_the_detectors(aot_results):
    """Launches that cannot be vectorised (K = 4100, C = 3) do show byte loads and no async operand
    rings: the checks above would catch a kernel that regressed to them."""
    controls = [r for r in aot_results if not r["aligned"] and r["kernel"] in ("int8_mm", "int8_conv2d")]
    assert {r["kernel"] for r in controls} == {"int8_mm", "int8_conv2d"}
    for r in controls:
        if r["acc"] == "int32":  # int8 operands: byte loads
            assert r["byte_loads"] > 0, _key(r)
        assert r["async_operands"] < 2 or r["cp_async_min"] < 16, _key(r)


def test_every_dot_names_its_accumulator_dtype():
    """Every ``tl.dot`` in the kernels passes ``out_dtype``. Triton 3.6 (the GPU machines' version; the
    package allows >= 3.4) asserts that an explicit accumulator's dtype equals ``out_dtype``, whose
    default is fp32, so an int32 accumulator without it fails to compile there while 3.9 accepts it:
    every int8 block-sparse test failed on an H200 that way. A source rule, since these tests compile
    with the one Triton installed."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "kernels"
    missing, seen = [], 0
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tl"):
                seen += 1
                if "out_dtype" not in {k.arg for k in node.keywords}:
                    missing.append(f"{path.name}:{node.lineno}")
    assert seen >= 20, seen  # the scan finds the kernels' dots
    assert not missing, f"tl.dot without out_dtype: {missing}"
