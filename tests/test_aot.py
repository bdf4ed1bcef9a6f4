"""Every Triton kernel and autotune config compiles ahead of time for sm_80 and sm_90 (no GPU needed),
uses tensor-core instructions and does not spill registers.

``accel.kernels.aot`` runs in a subprocess with TRITON_INTERPRET removed: interpreted kernels
cannot be compiled. One run covers the whole table; the tests read its JSON.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "accel.kernels.aot", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"AOT run produced no results (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _name(c):
    return "_".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in c.kwargs.items()) + \
        f"_w{c.num_warps}_s{c.num_stages}"


def _runtime_configs():
    """(kernel, config name, block size) of every config a GPU autotuner can pick at run time."""
    from accel.kernels import bsr_matmul as B
    from accel.kernels import int8_conv as C
    from accel.kernels import int8_matmul as Q

    want = set()
    for bs in B.SUPPORTED_BLOCK_SIZES:
        want |= {("bsr_dense_mm", _name(c), bs) for c in B.fwd_configs_for_block(bs, B.gpu_fwd_configs())}
        want |= {("bsr_sddmm", _name(c), bs) for c in B.sddmm_configs_for_block(bs, B.gpu_sddmm_configs())}
    want |= {("int8_mm", _name(c), 0) for c in Q.gpu_mm_configs()}
    want |= {("quantize_rows", _name(c), 0) for c in Q.gpu_quant_configs()}
    want |= {("int8_conv2d", _name(c), 0) for c in C.gpu_conv_configs()}
    return want


def _key(r):
    return (r["kernel"], r["config"], r["variant"], r["block_size"], r["capability"])


def test_covers_every_runtime_config_on_both_targets(aot_results):
    for cap in (80, 90):
        got = {(r["kernel"], r["config"], r["block_size"]) for r in aot_results if r["capability"] == cap}
        assert got == _runtime_configs(), cap
    variants = {r["variant"] for r in aot_results if r["kernel"] == "int8_mm"}
    assert {"w8a8_int32", "w8a8_fp16_gelu", "w8_only_fp16", "w8_only_bf16", "w8_only_fp32_tf32"} <= variants


def test_all_compile(aot_results):
    failed = [(_key(r), r["error"][:300]) for r in aot_results if not r["ok"]]
    assert not failed, failed


def test_tensor_cores(aot_results):
    """mma.sync on sm_80; on sm_90 wgmma wherever the dot tile has >= 64 rows (the Hopper warpgroup MMA)."""
    for r in aot_results:
        if r["dot_m"] == 0:  # no tl.dot (the row quantizer)
            continue
        ops = r["mma_instructions"]
        assert r["tensor_core"], (_key(r), "no mma/wgmma in PTX")
        if r["capability"] == 80:
            assert "mma.sync" in ops and "wgmma" not in ops, (_key(r), ops)
        elif r["dot_m"] >= 64:
            assert "wgmma.mma_async" in ops, (_key(r), ops)


def test_int8_uses_int8_tensor_cores_with_k_tile_at_least_32(aot_results):
    int8 = [r for r in aot_results if r["kernel"] in ("int8_mm", "int8_conv2d") and r["variant"].startswith("w8a8")]
    assert int8
    for r in int8:
        assert ".s32.s8.s8" in r["mma_instructions"], (_key(r), r["mma_instructions"])
        assert r["block_k"] >= 32, _key(r)


def test_int8_config_tables_have_k_tile_at_least_32():
    """NVIDIA's int8 mma needs K >= 32; the interpreter would accept less, so check the tables themselves."""
    from accel.kernels import int8_conv, int8_matmul

    for c in int8_matmul.gpu_mm_configs() + int8_conv.gpu_conv_configs():
        assert c.kwargs["BLOCK_K"] >= 32, c


def test_no_spills(aot_results):
    spills = [(_key(r), r["spill_bytes"], r["registers"]) for r in aot_results if r["spill_bytes"] != 0]
    assert not spills, spills
