"""Every Triton kernel and autotune config compiles ahead of time for sm_80 and sm_90 (no GPU needed),
uses tensor-core instructions and does not spill registers to local memory.

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


def _expected_jobs():
    """(kernel, config, dtype, block, capability) for every table entry, built independently of aot.py."""
    from accel.kernels import bsr_matmul as K

    want = set()
    for cap in (80, 90):
        for dt in ("fp16", "bf16", "fp32"):
            for bs in K.SUPPORTED_BLOCK_SIZES:
                for bm, bk, w, s in K.FWD_CONFIG_TABLE:
                    want.add(("bsr_dense_mm", f"M{bm}_K{min(bk, bs)}_w{w}_s{s}", dt, bs, cap))
                for bm, w, s in K.SDDMM_CONFIG_TABLE:
                    want.add(("bsr_sddmm", f"M{bm}_w{w}_s{s}", dt, bs, cap))
    return want


def _key(r):
    return (r["kernel"], r["config"], r["dtype"], r["block_size"], r["capability"])


def test_covers_every_config(aot_results):
    assert {_key(r) for r in aot_results} == _expected_jobs()


def test_all_compile(aot_results):
    failed = [(_key(r), r["error"][:300]) for r in aot_results if not r["ok"]]
    assert not failed, failed


def test_tensor_cores(aot_results):
    """mma.sync on sm_80; on sm_90 wgmma wherever the dot tile has >= 64 rows (the Hopper warpgroup MMA)."""
    for r in aot_results:
        ops = r["mma_instructions"]
        assert r["tensor_core"], (_key(r), "no mma/wgmma in PTX")
        if r["capability"] == 80:
            assert "mma.sync" in ops and "wgmma" not in ops, (_key(r), ops)
        elif r["dot_m"] >= 64:
            assert "wgmma.mma_async" in ops, (_key(r), ops)


def test_no_spills(aot_results):
    spills = [(_key(r), r["spill_bytes"], r["registers"]) for r in aot_results if r["spill_bytes"] != 0]
    assert not spills, spills
