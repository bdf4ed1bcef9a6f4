"""The pure-Python parts of ``bench.gpu_suite`` (rows, speedups, table, JSON, budget, guarded cases,
section selection, CLI), which run on this CPU machine; the timing itself needs a GPU."""

import json
import os
import re
import subprocess
import sys

import pytest

from bench import gpu_suite as G


def _rows():
    return [
        G.Row("int8", "4096^2_M1", "cublas_bf16", "cublas_bf16", us=20.0, graph_us=12.0),
        G.Row("int8", "4096^2_M1", "accel_int8_mm", "cublas_bf16", us=10.0),
        G.Row("int8", "4096^2_M1", "torch_int_mm", "cublas_bf16", error="RuntimeError: self.size(0) needs to be > 16"),
        G.Row("int8", "4096^2_M16", "accel_int8_mm", "cublas_bf16", us=8.0),  # its baseline failed
    ]


def test_speedups_compare_within_a_case():
    rows = _rows()
    G.add_speedups(rows)
    assert [r.speedup for r in rows] == [1.0, 2.0, None, None]


def test_table_lists_every_row_with_errors_shortened():
    rows = _rows()
    G.add_speedups(rows)
    table = G.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert "2.00x" in lines[3] and "baseline" in lines[2]
    assert "RuntimeError: self.size(0) needs to be > 16" in lines[4]
    assert lines[5].split()[3] == "8.0" and lines[5].split()[5] == "-"


def test_json_is_rewritten_whole(tmp_path):
    path = str(tmp_path / "sub" / "gpu_suite-cuda.json")
    env = {"device": "NVIDIA H100", "driver": "580.0"}
    G.write_json(path, _rows()[:1], env, {"quick": True})
    G.write_json(path, _rows(), env, {"quick": True})
    data = json.loads(open(path).read())
    assert data["environment"] == env and data["args"] == {"quick": True}
    assert [r["provider"] for r in data["rows"]] == ["cublas_bf16", "accel_int8_mm", "torch_int_mm", "accel_int8_mm"]
    assert data["rows"][2]["us"] is None and data["rows"][2]["error"].startswith("RuntimeError")


def test_cases_are_guarded_and_budgeted():
    """A raising case becomes an error row and the next case still runs; after the budget every case is
    a skipped row; the JSON callback sees the rows after each case."""
    now = [0.0]
    budget = G.Budget(10.0, clock=lambda: now[0])
    seen = []

    def ok(case):
        def run():
            now[0] += 4.0
            return [G.Row("host", case, "p", "p", us=5.0)]
        return run

    def boom():
        now[0] += 4.0
        raise ZeroDivisionError("bad shape")

    cases = [G.Case("host", "a", ok("a")), G.Case("host", "b", boom), G.Case("host", "c", ok("c")),
             G.Case("host", "d", ok("d"))]
    rows = G.run_cases(cases, budget, lambda rs: seen.append(len(rs)), log=lambda s: None)
    assert [r.case for r in rows] == ["a", "b", "c", "d"]
    assert rows[0].us == 5.0 and rows[0].speedup == 1.0
    assert rows[1].error.startswith("ZeroDivisionError: bad shape")
    assert rows[2].us == 5.0  # 8 s spent < 10: still runs
    assert rows[3].error == "skipped: time budget spent"
    assert seen == [1, 2, 3, 4]


def test_sections_share_the_budget():
    """A section may spend only its share of what is left when it starts (budget left / sections left), and
    passes on what it does not use: a slow first section cannot starve the later ones."""
    now = [0.0]
    budget = G.Budget(30.0, clock=lambda: now[0])

    def case(section, name, cost):
        def run():
            now[0] += cost
            return [G.Row(section, name, "p", "p", us=1.0)]
        return G.Case(section, name, run)

    cases = [case("bsr", "a", 8.0), case("bsr", "b", 8.0), case("bsr", "c", 8.0),  # share 10: c skipped
             case("int8", "d", 1.0), case("int8", "e", 1.0),  # share (30-16)/2 = 7: both run, 12 left
             case("host", "f", 12.0), case("host", "g", 1.0)]  # share 12: f runs, g skipped (budget spent)
    rows = G.run_cases(cases, budget, lambda rs: None, log=lambda s: None)
    assert [r.case for r in rows if not r.error] == ["a", "b", "d", "e", "f"]
    assert rows[2].error == "skipped: the section's share of the time budget spent"
    assert rows[6].error == "skipped: time budget spent"


def test_sections_and_sweeps():
    assert G.select_sections(None) == list(G.SECTIONS)
    assert G.select_sections(["host", "bsr"]) == ["bsr", "host"]
    with pytest.raises(ValueError, match="unknown sections"):
        G.select_sections(["bsr", "fp4"])
    full, quick = G.sweeps(False), G.sweeps(True)
    assert full["ms"] == (1, 16, 256, 4096) and full["bsr_densities"] == (0.5, 0.25, 0.1, 0.05)
    assert full["bsr_blocks"] == (64, 32) and full["int8_sizes"] == (4096, 8192) and full["conv_batches"] == (1, 32)
    assert set(quick["ms"]) < set(full["ms"]) and quick["reps"] < full["reps"]
    assert {name.split("_")[0] for name, *_ in G.CONV_LAYERS} == {"3x3", "1x1", "1x1s2"}


def test_cli_help_and_section_filter():
    args = G.parse_args(["--sections", "int8", "conv", "--quick", "--budget-s", "60"])
    assert args.sections == ["int8", "conv"] and args.quick and args.budget_s == 60.0
    args = G.parse_args(["--sections", "bsr", "--ms", "1", "16", "--blocks", "64"])
    cases = G.build_cases(args.sections, False, None, ms=args.ms, bsr_blocks=args.blocks)
    assert [c.name for c in cases][:3] == ["B64_d0.5_M1", "B64_d0.5_M16", "B64_d0.25_M1"] and len(cases) == 8
    out = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--sections" in out.stdout and "--quick" in out.stdout


def test_prepared_command_is_in_the_docstring():
    doc = G.__doc__
    assert "pip install --no-deps --no-build-isolation -e ." in doc
    assert "ACCEL_TEST_NO_INTERPRET=1" in doc and "python -m bench.gpu_suite" in doc and "timeout" in doc


def test_dry_run_exercises_every_section(tmp_path):
    """``--dry-run`` runs every case's code on the CPU with tiny shapes (the Triton launchers through the
    interpreter): accel's providers and the dense baselines all produce numbers; only providers that
    need CUDA may fail, as error rows, without stopping the suite."""
    out = tmp_path / "dry.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["args"]["dry_run"] and {r["section"] for r in rows} == set(G.SECTIONS)
    mine = [r for r in rows
            if r["provider"].startswith(("accel", "int8_mm", "quantize_rows")) or r["provider"] == r["baseline"]]
    assert mine and all(r["error"] == "" and r["us"] > 0 for r in mine), [(r["case"], r["provider"], r["error"]) for r in mine]
    assert re.search(r"section +case +provider", proc.stdout)  # the closing table


def test_host_profile_dry_run():
    """``bench.gpu_host_profile --dry-run`` times and profiles every provider (interpreter, CPU tensors)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_host_profile", "--dry-run", "--top", "2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("F.linear", "triton_bare_launch", "quantize_rows", "int8_mm", "SparseLinear", "QuantLinear_dynamic",
                 "QuantLinear_weight_only"):
        assert f"===== {name}:" in proc.stdout and f"\n{name} " in proc.stdout


def test_host_profile_stand_in():
    """``--stand-in``: the layers' Triton paths on CPU tensors with no-op binaries after the first
    (interpreted) launch: every provider gets a time, and the direct launches carried the calls."""
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_host_profile", "--stand-in", "--calls", "3", "--top", "2"],
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("quantize_rows", "int8_mm", "SparseLinear", "QuantLinear_dynamic", "QuantLinear_weight_only"):
        assert f"\n{name} " in proc.stdout
    assert "triton_bare_launch" not in proc.stdout and "_launch_key" in proc.stdout
