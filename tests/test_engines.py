"""accel.engines: measured, cached, forced engine decisions, and every ISA-dependent branch run on this
machine through the ISA caps (``ACCEL_CPU_ISA``, ``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from accel import engines
from accel.cpu import int8 as C
from accel.quant import int8_linear_ref, quantize_rows_ref, quantize_weight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sleeper(seconds, value=1.0):
    def fn():
        time.sleep(seconds)
        return torch.full((4,), value)
    return fn


@pytest.fixture
def quiet(monkeypatch):
    """The machine counts as quiet: the suite may share it, and busy-machine measurements keep the default."""
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)


@pytest.fixture
def cache(tmp_path, monkeypatch, accel_env):
    accel_env(ACCEL_CACHE_DIR=str(tmp_path), ACCEL_ENGINE_MEASURE="1")
    monkeypatch.setattr(engines, "BUDGET_S", 0.05)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)  # the suite may share the machine
    engines.clear()
    yield tmp_path
    engines.clear()


def test_measure_picks_the_fastest_and_keeps_the_incumbent_on_close_calls(quiet):
    d = engines.measure({"slow": _sleeper(0.004), "fast": _sleeper(0.001)}, incumbent="slow", budget_s=0.05)
    assert d.engine == "fast" and d.times_ms["slow"] > 2 * d.times_ms["fast"] and d.rounds >= engines.MIN_ROUNDS
    assert d.ratio("slow") > 2
    # within the margin the incumbent stays: the same answer whichever wins a noisy round
    # (8 ms sleeps: a VM's ~0.1 ms sleep jitter is ~1% of them, well inside the margin; at 2 ms it was not)
    d = engines.measure({"a": _sleeper(0.008), "b": _sleeper(0.008)}, incumbent="b", budget_s=0.1)
    assert d.engine == "b"


def test_measure_rejects_wrong_raising_and_far_too_slow_candidates(monkeypatch, quiet):
    monkeypatch.setattr(engines, "TOO_SLOW_ABS_S", 0.01)

    def boom():
        raise RuntimeError("no kernel for this shape")

    d = engines.measure({"ref": _sleeper(0.001), "wrong": _sleeper(0.0, value=2.0), "boom": boom,
                         "crawl": _sleeper(0.05)}, incumbent="ref", reference=lambda: torch.ones(4), min_sqnr=60,
                        budget_s=0.02)
    assert d.engine == "ref"
    assert d.rejected["wrong"].startswith("inaccurate") and "no kernel for this shape" in d.rejected["boom"]
    assert d.rejected["crawl"].startswith("too slow")
    with pytest.raises(RuntimeError, match="no kernel for this shape"):  # every candidate raises: the default's error,
        engines.measure({"boom": boom}, incumbent="boom")                 # as when nothing is measured
    with pytest.raises(RuntimeError, match="no kernel for this shape"):  # the default raises: its error
        engines.measure({"boom": boom, "wrong": _sleeper(0.0, value=2.0)}, incumbent="boom",
                        reference=lambda: torch.ones(4), min_sqnr=60)
    with pytest.raises(RuntimeError, match="no engine could run this call"):  # the default is wrong: accel says so
        engines.measure({"boom": boom, "wrong": _sleeper(0.0, value=2.0)}, incumbent="wrong",
                        reference=lambda: torch.ones(4), min_sqnr=60)


def test_choose_caches_on_disk_for_the_next_process(cache):
    calls = []

    def cands():
        calls.append(1)
        return {"a": _sleeper(0.003), "b": _sleeper(0.0005)}

    key = engines.make_key("toy", n=1)
    assert engines.choose("toy", key, cands, default="a") == "b"
    assert engines.choose("toy", key, cands, default="a") == "b" and len(calls) == 1  # memory
    files = list(cache.glob("engines-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["decisions"][key]["engine"] == "b" and data["machine"]["cpu"]
    code = ("from accel import engines\n"
            f"print(engines.choose('toy', {key!r}, lambda: 1/0, default='a'))")  # measuring would raise
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "ACCEL_CACHE_DIR": str(cache), "ACCEL_ENGINE_MEASURE": "1"})
    assert out.stdout.strip() == "b", out.stderr


def test_contended_decisions_are_measured_again_by_the_next_process(cache, monkeypatch):
    monkeypatch.setattr(engines, "_contended", lambda mark=None: True)
    key = engines.make_key("toy", n=2)
    assert engines.choose("toy", key, {"a": _sleeper(0.003), "b": _sleeper(0.0005)}, default="a") == "a"
    assert engines.decision(key).contended  # busy: the default, whatever the timings said
    engines.clear()  # a new process: the contended entry is not trusted
    calls = []
    engines.choose("toy", key, lambda: calls.append(1) or {"a": _sleeper(0.0), "b": _sleeper(0.002)}, default="a")
    assert calls == [1]


_CONTENTION_PROBE = r"""
import os, subprocess, sys, time
cpu = sorted(os.sched_getaffinity(0))[0]
os.sched_setaffinity(0, {cpu})  # this process and its competitors share one CPU, whatever the machine has
import torch
torch.set_num_threads(1)
from accel import engines
os.getloadavg = lambda: (0.0, 0.0, 0.0)  # only the scheduler statistics decide
if engines.wait_mark() is None:
    print("no-schedstat")
    sys.exit(0)
mark = engines.wait_mark()
time.sleep(0.2)
quiet = engines._contended(mark)
hog = "import os, time\nos.sched_setaffinity(0, {%d})\nt = time.time()\nwhile time.time() - t < 4: pass" % cpu
hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(2)]
try:
    time.sleep(0.3)
    mark = engines.wait_mark()
    a = torch.randn(128, 128)
    t = time.perf_counter()
    while time.perf_counter() - t < 1.0:
        a @ a
    busy = engines._contended(mark)
finally:
    for h in hogs:
        h.kill()
        h.wait()
print(f"quiet={quiet} busy={busy}")
"""


def test_time_taken_by_other_processes_is_seen_at_once():
    """Contention shows in accel's own threads waiting for a CPU (scheduler statistics) during the window,
    without waiting for the 1-minute load average; a window spent asleep is not contended. Run in a child
    process pinned, with two busy competitors, to one CPU (so it holds on a machine of any size)."""
    out = subprocess.run([sys.executable, "-c", _CONTENTION_PROBE], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no-schedstat":
        pytest.skip("no scheduler statistics (/proc/self/task/*/schedstat) here")
    assert out.stdout.strip() == "quiet=False busy=True", out.stdout + out.stderr


def test_a_measurement_that_waited_for_the_cpu_keeps_the_incumbent(monkeypatch):
    """Waiting for a CPU during the measurement flags the decision contended and keeps the incumbent, however
    the timings came out (under load they move by tens of percent, up to 100x); an incumbent that cannot
    run the call gives way to the fastest first call of the others, and a far too slow one (a reference
    loop) is never taken."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    clock = iter(range(10**6))
    monkeypatch.setattr(engines, "_run_delay_s", lambda: float(next(clock)))  # a second of waiting per look

    def boom():
        raise RuntimeError("not this shape")

    d = engines.measure({"a": _sleeper(0.006), "b": _sleeper(0.001)}, incumbent="a", budget_s=0.05)
    assert d.contended and d.engine == "a" and not d.measured and d.times_ms["a"] > d.times_ms["b"]
    d = engines.measure({"a": boom, "b": _sleeper(0.004), "c": _sleeper(0.001)}, incumbent="a", budget_s=0.05)
    assert d.contended and d.engine == "c" and "not this shape" in d.rejected["a"]
    monkeypatch.setattr(engines, "TOO_SLOW_ABS_S", 0.01)
    d = engines.measure({"loop": _sleeper(0.06), "a": _sleeper(0.001)}, incumbent="loop", budget_s=0.05)
    assert d.contended and d.engine == "a" and d.rejected["loop"].startswith("too slow")
    monkeypatch.setattr(engines, "_run_delay_s", lambda: 0.0)  # nobody else wants the CPU
    d = engines.measure({"a": _sleeper(0.006), "b": _sleeper(0.001)}, incumbent="a", budget_s=0.05)
    assert not d.contended and d.engine == "b" and d.measured


def test_a_busy_decision_is_measured_again_in_this_process_once_quiet(cache, monkeypatch):
    """A long-lived process that decided while the machine was busy does not keep the default for ever: the
    first call at least RETRY_S later measures again if the machine is quiet then (else it waits again),
    and memoized choices (and the layers' resolved calls, through the stamp) ask again."""
    monkeypatch.setattr(engines, "RETRY_S", 0.05)
    busy = [True]
    monkeypatch.setattr(engines, "_contended", lambda mark=None: busy[0])
    key = engines.make_key("toy", n=11)
    cands = {"a": _sleeper(0.003), "b": _sleeper(0.0005)}
    decide = lambda: engines.choose("toy", key, cands, default="a")  # noqa: E731
    assert engines.memo("toy", (11,), decide) == "a" and engines.decision(key).contended
    time.sleep(0.06)
    assert engines.memo("toy", (11,), decide) == "a"  # due, but still busy: postponed
    assert engines.decision(key).contended
    busy[0] = False
    assert engines.memo("toy", (11,), decide) == "a"  # not due yet again
    time.sleep(0.06)
    assert engines.memo("toy", (11,), decide) == "b"  # due and quiet: measured again
    d = engines.decision(key)
    assert not d.contended and d.measured
    time.sleep(0.06)
    assert engines.memo("toy", (11,), lambda: 1 / 0) == "b"  # a quiet decision is final


def test_a_busy_default_does_not_replace_a_quiet_decision_on_disk(cache, monkeypatch):
    """Two processes: one measured a key on a quiet machine and saved it; another, which read the file
    before that and then measured the same key while busy, must not overwrite the quiet decision."""
    key = engines.make_key("toy", n=9)
    assert engines.choose("toy", key, {"a": _sleeper(0.003), "b": _sleeper(0.0005)}, default="a") == "b"
    engines._CACHE.memory.pop(key)  # this process never saw it
    monkeypatch.setattr(engines, "_contended", lambda mark=None: True)
    assert engines.choose("toy", key, {"a": _sleeper(0.003), "b": _sleeper(0.0005)}, default="a") == "a"
    engines.clear()  # the next process reads the file
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)
    assert engines.choose("toy", key, lambda: 1 / 0, default="a") == "b"  # the quiet decision, not measured again


def test_threads_waiting_for_each_other_are_not_contention(monkeypatch):
    """More torch threads than CPUs this process may use: its threads wait for each other (a fraction
    1 - cpus/threads of the time), which is not other work taking the CPUs."""
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(engines, "_usable_cpus", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    delay = [0.0]
    monkeypatch.setattr(engines, "_run_delay_s", lambda: delay[0])
    mark = engines.wait_mark()
    time.sleep(0.05)
    wall = time.perf_counter() - mark[0]
    delay[0] = 0.74 * wall * 4  # 4 threads on 1 CPU: 75% self-inflicted waiting, nothing else running
    assert not engines._contended(mark)
    delay[0] = 0.85 * wall * 4  # and 10% more: someone else wants the CPU
    assert engines._contended(mark)


def test_cache_off_and_measuring_off(cache, accel_env):
    accel_env(ACCEL_ENGINE_CACHE="0")
    engines.choose("toy", engines.make_key("toy", n=3), {"a": _sleeper(0.002), "b": _sleeper(0.0)}, default="a")
    assert not list(cache.glob("engines-*.json"))
    accel_env(ACCEL_ENGINE_MEASURE="0")
    assert engines.choose("toy", engines.make_key("toy", n=4), lambda: 1 / 0, default="a") == "a"


def test_concurrent_processes_merge_their_decisions(cache):
    code = ("import sys, torch\nfrom accel import engines\n"
            "i = int(sys.argv[1])\n"
            "for j in range(5):\n"
            "    engines.choose('toy', engines.make_key('toy', p=i, j=j), {'a': lambda: torch.ones(1), "
            "'b': lambda: torch.ones(1)}, default='a')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT,
                              env={**os.environ, "ACCEL_CACHE_DIR": str(cache), "ACCEL_ENGINE_MEASURE": "1"})
             for i in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    (f,) = list(cache.glob("engines-*.json"))
    decisions = json.loads(f.read_text())["decisions"]
    assert {k for k in decisions if k.startswith("toy")} == {engines.make_key("toy", p=i, j=j) for i in range(4)
                                                             for j in range(5)}


@pytest.fixture
def toy_ops(monkeypatch):
    """Ops "toy" (engines a, b, c) and "other" (x) known for the test (``engines.register_op``), forgotten after."""
    monkeypatch.setattr(engines, "_OPS", dict(engines._OPS))
    engines.register_op("toy", ("a", "b", "c"))
    engines.register_op("other", ["x"])
    yield
    engines._parse_forced.cache_clear()


def test_force_by_context_and_env(accel_env, toy_ops):
    key = engines.make_key("toy", n=5)
    with engines.force(toy="b"):
        assert engines.choose("toy", key, lambda: 1 / 0, default="a", allowed=("a", "b")) == "b"
        with pytest.raises(ValueError, match="engine 'c' forced for toy cannot run this call"), engines.force(toy="c"):
            engines.choose("toy", key, lambda: 1 / 0, default="a", allowed=("a", "b"))
    accel_env(ACCEL_ENGINE="toy=a,other=x")
    assert engines.forced("toy") == "a" and engines.forced("other") == "x"
    accel_env(ACCEL_ENGINE="toy")
    with pytest.raises(ValueError, match="entries must be op=engine"):
        engines.forced("toy")


def test_m_buckets_and_fingerprint(accel_env):
    assert [engines.m_bucket(m) for m in (0, 1, 2, 3, 5, 16, 17, 256, 257, 10 ** 6)] == \
        [0, 1, 2, 4, 8, 16, 32, 256, 512, 8192]
    base = engines.fingerprint()
    accel_env(ACCEL_CPU_ISA="avx2")
    assert engines.fingerprint() != base and engines.machine()["accel_isa"] == "avx2"


def test_native_kernel_sources_are_part_of_the_machine(monkeypatch):
    """A changed native kernel runs at another speed: its decisions live in another cache file."""
    digest = engines.machine()["native_kernels"]
    assert len(digest) == 12 and int(digest, 16) >= 0
    before = engines._fingerprint(("test", 1))
    engines._fingerprint.cache_clear()
    monkeypatch.setattr(engines, "_native_sources", lambda: "0" * 12)
    try:
        assert engines._fingerprint(("test", 1)) != before
    finally:
        engines._fingerprint.cache_clear()


def test_int8_engines_agree_exactly_where_chosen(cache):
    """A measured int8 linear picks one of the exact engines, and its output is the reference's."""
    x, w = torch.randn(33, 256), torch.randn(96, 256)
    wq, ws = quantize_weight(w)
    from accel.ops.int8 import int8_linear

    y = int8_linear(x, wq, ws, mode="dynamic")
    dec = engines.decision(engines.last_key("int8_linear"))
    assert dec.measured and dec.engine in C.exact_engines(C.act_qmax())
    xq, xs = quantize_rows_ref(x, C.act_qmax())
    torch.testing.assert_close(y, int8_linear_ref(xq, xs, wq, ws), atol=1e-4, rtol=1e-5)


def test_accel_engines_cli(cache):
    from accel.cli import main

    engines.choose("toy", engines.make_key("toy", n=6), {"a": _sleeper(0.002), "b": _sleeper(0.0)}, default="a")
    out = subprocess.run([sys.executable, "-m", "accel.cli", "engines"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "ACCEL_CACHE_DIR": str(cache)})
    assert out.returncode == 0 and "machine" in out.stdout and "toy|n=6" in out.stdout, out.stderr
    assert main is not None


ISA_RUNS = [
    {"ACCEL_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    {"ACCEL_CPU_ISA": "avx512_vnni", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
]


@pytest.mark.parametrize("caps", ISA_RUNS, ids=lambda c: c["ACCEL_CPU_ISA"])
def test_int8_suites_under_isa_caps(caps):
    """The CPU int8 tests on this machine as an AVX2-only (no VNNI: 7-bit activations natively, 8-bit
    through the split engines) and an AVX-512 VNNI CPU; the AMX run is the normal suite."""
    have = engines.ISA_LEVELS.index(engines._hardware_isa())
    if have < engines.ISA_LEVELS.index(caps["ACCEL_CPU_ISA"]):
        pytest.skip(f"this CPU lacks {caps['ACCEL_CPU_ISA']}")
    env = {**os.environ, **caps}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_int8_cpu.py", "tests/test_quant_modules.py", "tests/test_qat.py",
                          "-k", "not compile and not triton"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.skipif(not engines.has_vnni(engines._hardware_isa()), reason="needs a VNNI CPU to cap down from")
def test_onednn_isa_cap_really_saturates_without_vnni():
    """Why the split engines exist: oneDNN capped to AVX2 gets full 8-bit activations wrong (int16
    saturation), accel's split engine gets them right, in the same process."""
    code = """
import torch
from accel.cpu import int8 as C
from accel.quant import quantize_weight, quantize_rows_ref, int8_linear_ref
torch.manual_seed(0)
x, w = torch.randn(8, 512) , torch.randn(64, 512)
wq, ws = quantize_weight(w)
xq, xs = quantize_rows_ref(x, 127)
ref = int8_linear_ref(xq, xs, wq, ws)
v = (xq.float())
raw = C._gemm_onednn(C._to_uint8(v.clone(), 128), wq, ws, 128) * xs[:, None]
split = C.linear_int8_cpu(x, wq, ws, qmax=127, engine="onednn_split")
print(float((raw - ref).abs().max()), float((split - ref).abs().max()))
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ACCEL_CPU_ISA": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    raw_err, split_err = map(float, out.stdout.split())
    assert raw_err > 1e-2 and split_err < 1e-4, (raw_err, split_err)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_measured_sparse_strategy_for_every_dtype(cache, dtype):
    """A measured decision exists for every supported dtype (the reference is computed at the input's
    precision: an fp32 reference once made every fp64 strategy miss its 150 dB bar)."""
    from accel import SparseLinear

    torch.manual_seed(0)
    s = SparseLinear.from_dense(torch.nn.Linear(96, 64), 0.5, 32, mode="sparse").to(dtype)
    x = torch.randn(5, 96, dtype=dtype)
    with torch.no_grad():
        y = s(x)
    ref = x.double() @ s.dense_weight().double().t() + s.bias.double()
    assert (y.double() - ref).abs().max() < {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 0.1}[dtype]
    assert any(k.startswith("bsr_linear|") and f"dt={str(dtype)[6:]}" in k for k in engines.decisions())


def test_a_cache_write_that_cannot_land_leaves_no_temp_file(tmp_path, accel_env):
    """The final rename failing (the cache path is a directory) must not leave a temp file per decision."""
    from accel import engines

    accel_env(ACCEL_CACHE_DIR=str(tmp_path), ACCEL_ENGINE_CACHE="1", ACCEL_ENGINE_MEASURE="1")
    engines.clear()
    os.makedirs(engines._CACHE.path())  # where the file should go: a directory
    for i in range(3):
        engines.choose("bsr_linear", f"bsr_linear|probe={i}", {"dense": lambda: None, "rows": lambda: None},
                       default="dense")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".engines-")]
    engines.clear()


def test_engine_version_follows_the_candidate_table():
    """A cache file from an accel offering other candidates must not decide here (a cached 'dynamic' would hide a
    new, faster form for good): a change to the built-in candidate table needs an ENGINE_VERSION bump, and
    this record of the table updated with it."""
    import hashlib

    names = ("int8_linear", "int8_weight_only_linear", "quant_linear_form", "int8_conv2d", "bsr_linear", "bsr_conv2d",
             "int8_bsr_linear", "replace")
    table = json.dumps({k: engines._OPS[k] for k in names}, sort_keys=True)
    assert (engines.ENGINE_VERSION, hashlib.sha1(table.encode()).hexdigest()[:12]) == (9, "7489b580d2aa")
