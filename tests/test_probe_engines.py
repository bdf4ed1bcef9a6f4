"""accel.engines under bad input: a malformed engine cache file (D11) and bad ``ACCEL_ENGINE`` /
``engines.force`` entries (D12). Found by probing; each test failed before its fix."""

import json
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import accel
from accel import engines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cache(tmp_path, monkeypatch, accel_env):
    accel_env(ACCEL_CACHE_DIR=str(tmp_path), ACCEL_ENGINE_MEASURE="1", ACCEL_ENGINE=None)
    monkeypatch.setattr(engines, "BUDGET_S", 0.02)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)
    engines.clear()
    yield tmp_path
    engines.clear()


def _cands():
    return {"a": lambda: torch.ones(2), "b": lambda: torch.ones(2)}


def _good(engine="b", **extra):
    return {"engine": engine, "measured": True, "times_ms": {"a": 0.5, "b": 0.25}, "rejected": {}, "rounds": 5,
            "contended": False, "when": "2025-01-01T00:00:00+00:00", "note": "", **extra}


def _cache_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in rec if issubclass(w.category, engines.EngineCacheWarning)]


# ------------------------------------------------------------------------------------------------ D11: the cache file
def _machine():
    return engines.machine()


BAD_FILES = {
    "machine is a string": lambda: {"machine": "x", "decisions": {}},
    "machine is a list": lambda: {"machine": [3], "decisions": {}},
    "machine has no engine_version": lambda: {"machine": {"cpu": "x"}, "decisions": {}},
    "decisions is a list": lambda: {"machine": {"engine_version": engines.ENGINE_VERSION}, "decisions": [1]},
    "decisions is a string": lambda: {"machine": _machine(), "decisions": "abc"},
    "decisions missing": lambda: {"machine": _machine()},
    "machine missing": lambda: {"decisions": {}},
    "top level is a list": lambda: [1, 2, 3],
    "top level is a number": lambda: 3,
    "top level is null": lambda: None,
}
GARBAGE = {
    "truncated": '{"machine": {"engine_version": 3}, "decis',
    "empty": "",
    "binary": "\x00\x01garbage\xff",
    "deeply nested": "[" * 200000,
}


def _check_ignored_and_rewritten(cache, write):
    path = engines._CACHE.path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path)
    engines.clear()
    key = engines.make_key("toy", case=1)
    # absent: the decision is measured (not read from the file), one warning names the file
    chosen, ws = _cache_warnings(lambda: engines.choose("toy", key, _cands(), default="a"))
    assert chosen in ("a", "b")
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert path in str(ws[0].message) and "malformed engine cache" in str(ws[0].message)
    report, ws = _cache_warnings(engines.report)  # `accel engines` works (and does not warn again)
    assert key in report and not ws
    data = json.loads(open(path).read())  # rewritten well-formed by the save
    assert data["machine"]["engine_version"] == engines.ENGINE_VERSION and set(data["decisions"]) == {key}
    engines.clear()  # a new process reads the rewritten file without a warning
    again, ws = _cache_warnings(lambda: engines.choose("toy", key, lambda: 1 / 0, default="a"))
    assert again == chosen and not ws


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_wrong_structure_cache_file_is_ignored_with_one_warning_and_rewritten(cache, name):
    def write(path):
        with open(path, "w") as f:
            json.dump(BAD_FILES[name](), f)

    _check_ignored_and_rewritten(cache, write)


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_cache_file_is_ignored_with_one_warning_and_rewritten(cache, name):
    def write(path):
        with open(path, "w", encoding="latin-1") as f:
            f.write(GARBAGE[name])

    _check_ignored_and_rewritten(cache, write)


BAD_ENTRIES = {
    "a string": "abc",
    "a list": [1],
    "no engine": {"measured": True},
    "no measured": {"engine": "b"},
    "engine not a string": _good(engine=5),
    "engine empty": _good(engine=""),
    "measured not a bool": {**_good(), "measured": "yes"},
    "times_ms a string": {**_good(), "times_ms": "abc"},
    "times_ms a list": {**_good(), "times_ms": [1.0]},
    "a NaN time": {**_good(), "times_ms": {"a": math.nan, "b": 0.1}},
    "an inf time": {**_good(), "times_ms": {"b": math.inf}},
    "a negative time": {**_good(), "times_ms": {"b": -1.0}},
    "a string time": {**_good(), "times_ms": {"b": "0.1"}},
    "a bool time": {**_good(), "times_ms": {"b": True}},
    "rejected a list": {**_good(), "rejected": ["a"]},
    "rejected reason not a string": {**_good(), "rejected": {"a": 3}},
    "rounds a string": {**_good(), "rounds": "5"},
    "rounds a bool": {**_good(), "rounds": True},
    "rounds negative": {**_good(), "rounds": -1},
    "contended not a bool": {**_good(), "contended": 1},
    "when not a string": {**_good(), "when": 5},
    "an unknown field": _good(colour="red"),
}


def test_malformed_entries_are_dropped_one_by_one(cache):
    path = engines._CACHE.path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    good = {"toy|ok=1": _good(), "toy|ok=2": _good(engine="a", times_ms={"a": 0.0, "b": 1.5}),  # a 0 ms time is fine
            "toy|ok=3": {"engine": "b", "measured": False}}  # optional fields may be missing
    bad = {f"toy|bad={i}": d for i, d in enumerate(BAD_ENTRIES.values())}
    with open(path, "w") as f:  # json writes NaN / Infinity, which json.load reads back
        json.dump({"machine": _machine(), "decisions": {**good, **bad}}, f)
    engines.clear()
    chosen, ws = _cache_warnings(lambda: engines.choose("toy", "toy|ok=1", lambda: 1 / 0, default="a"))
    assert chosen == "b"  # the well-formed entries are used: nothing is measured
    assert engines.choose("toy", "toy|ok=2", lambda: 1 / 0, default="b") == "a"
    assert engines.choose("toy", "toy|ok=3", lambda: 1 / 0, default="a") == "b"
    assert len(ws) == 1 and path in str(ws[0].message)
    assert f"{len(bad)} malformed decision(s) dropped" in str(ws[0].message)
    assert set(engines.decisions()) == set(good)
    report = engines.report()
    assert all(k in report for k in good) and not any(k in report for k in bad)
    for i, d in enumerate(BAD_ENTRIES.values()):  # each is dropped: measured afresh when met
        assert engines.decision(f"toy|bad={i}") is None, d
    # the next save rewrites the file without them (and without a second warning)
    _, ws = _cache_warnings(lambda: engines.choose("toy", "toy|new=1", _cands(), default="a"))
    assert not ws
    on_disk = json.loads(open(path).read())["decisions"]
    assert set(on_disk) == set(good) | {"toy|new=1"}


def test_accel_engines_cli_with_a_malformed_cache_file(cache):
    engines.choose("toy", engines.make_key("toy", n=9), _cands(), default="a")
    path = engines._CACHE.path()
    data = json.loads(open(path).read())
    data["decisions"]["toy|bad=1"] = {**_good(), "times_ms": "abc"}  # crashed engines.report() before
    with open(path, "w") as f:
        json.dump(data, f)
    out = subprocess.run([sys.executable, "-m", "accel.cli", "engines"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "ACCEL_CACHE_DIR": str(cache)})
    assert out.returncode == 0, out.stderr
    assert "toy|n=9" in out.stdout and "toy|bad=1" not in out.stdout
    assert path in out.stderr and "EngineCacheWarning" in out.stderr
    with open(path, "w") as f:
        json.dump({"machine": "x", "decisions": {}}, f)
    out = subprocess.run([sys.executable, "-m", "accel.cli", "engines"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "ACCEL_CACHE_DIR": str(cache)})
    assert out.returncode == 0 and "no decisions yet" in out.stdout and path in out.stderr, out.stderr


def test_a_layer_runs_with_a_wrong_structure_cache_file(cache):
    """The probe's repro: every accel call crashed (AttributeError) on such a file."""
    layer = accel.QuantLinear.from_float(torch.nn.Linear(8, 8))
    path = engines._CACHE.path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for content in ({"machine": "x", "decisions": {}},
                    {"machine": {"engine_version": engines.ENGINE_VERSION}, "decisions": [1]}):
        with open(path, "w") as f:
            json.dump(content, f)
        engines.clear()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert layer(torch.randn(2, 8)).shape == (2, 8)


# ------------------------------------------------------------------------------------------------ D12: forcing
def test_every_op_in_the_source_is_known_with_the_engines_its_modules_define():
    """The table engines.py checks ``ACCEL_ENGINE`` against cannot drift from the op modules."""
    pat = re.compile(r"engines\.(?:choose|memo|make_key|forced|force)\(\s*([^,)]*)")
    key_pat = re.compile(r"""key\s*=\s*\(?\s*f["']([a-z0-9_]+)\|""")
    used, non_literal = set(), []
    for base, _, files in os.walk(os.path.join(ROOT, "accel")):
        for name in files:
            if not name.endswith(".py") or name == "engines.py":
                continue
            src = open(os.path.join(base, name)).read()
            for arg in pat.findall(src):
                m = re.fullmatch(r"""\s*["']([A-Za-z0-9_]+)["']\s*""", arg)
                (used.add(m.group(1)) if m else non_literal.append((name, arg)))
            used.update(key_pat.findall(src))
    assert not non_literal, f"op names must be literals so this test sees them: {non_literal}"
    known = engines.known_ops()
    assert used and used <= set(known), sorted(used - set(known))
    assert {"int8_linear", "int8_weight_only_linear", "quant_linear_form", "int8_conv2d", "bsr_linear", "bsr_conv2d",
            "int8_bsr_linear", "replace"} <= used

    from accel import api
    from accel.cpu import bsr, int8, int8_bsr
    from accel.ops import bsr_conv
    from accel.ops import int8 as ops_int8

    assert set(known["int8_linear"]) == set(int8.LINEAR_ENGINES)
    assert set(known["int8_weight_only_linear"]) == set(int8.WEIGHT_ONLY_ENGINES)
    assert set(known["int8_conv2d"]) == set(int8.CONV_ENGINES) | set(ops_int8.FLOAT_CONV_FORMS)
    assert set(known["quant_linear_form"]) == set(ops_int8._auto_forms(torch.zeros(1, 4), 4))
    assert set(known["bsr_linear"]) == set(bsr.STRATEGIES) | {"dense", "native", "native_amx"}
    assert set(known["bsr_conv2d"]) == set(bsr_conv.cpu_engines(32, 16, torch.float32, True)) | {
        "native", "native_nchw", "native_amx", "native_amx_padded"}
    assert set(known["int8_bsr_linear"]) == set(int8_bsr.STRATEGIES)
    assert set(known["replace"]) == {"old", "new"} | set(api.SPARSE_FORMS)


@pytest.mark.parametrize("value, message", [
    ("int8_linaer=fbgemm", r"ACCEL_ENGINE entry 'int8_linaer=fbgemm': unknown op 'int8_linaer' "
                           r"\(did you mean 'int8_linear'\?\); known ops: .*int8_conv2d.*quant_linear_form"),
    ("bogus_op=x", r"unknown op 'bogus_op'; known ops: bsr_conv2d, bsr_linear"),
    ("int8_linear=bogus", r"ACCEL_ENGINE entry 'int8_linear=bogus': unknown engine 'bogus' for int8_linear; "
                          r"engines of int8_linear: fbgemm, onednn, int_mm"),
    ("bsr_linear=dense, int8_linear=onedn", r"unknown engine 'onedn' for int8_linear \(did you mean 'onednn'\?\)"),
    ("int8_linear=onednn,int8_linear=fbgemm", r"forces int8_linear twice"),
    ("int8_linear", r"entries must be op=engine"),
])
def test_bad_accel_engine_raises_at_the_first_call(accel_env, value, message):
    layer = accel.QuantLinear.from_float(torch.nn.Linear(16, 8))  # dynamic: runs int8_linear on the CPU
    auto = accel.QuantLinear.from_float(torch.nn.Linear(16, 8), "auto")
    accel_env(ACCEL_ENGINE=value, ACCEL_ENGINE_MEASURE="0")
    for _ in range(2):  # and at every later call: it is never silently dropped
        for m in (layer, auto):
            with torch.no_grad(), pytest.raises(ValueError, match=message):
                m(torch.randn(3, 16))
    with pytest.raises(ValueError, match=message):  # ConfigError is a ValueError
        engines.forced("int8_linear")
    with pytest.raises(engines.ConfigError, match=message):
        engines.check_env()
    accel_env(ACCEL_ENGINE="int8_linear=onednn, bsr_linear = dense")  # good entries still work
    assert engines.forced("int8_linear") == "onednn" and engines.forced("bsr_linear") == "dense"
    assert engines.forced("int8_conv2d") is None


def test_force_checks_its_entries_like_the_environment():
    with pytest.raises(engines.ConfigError, match=r"force\(int8_linaer='fbgemm'\): unknown op 'int8_linaer' "
                                                  r"\(did you mean 'int8_linear'\?\); known ops:"):
        with engines.force(int8_linaer="fbgemm"):
            pass
    with pytest.raises(engines.ConfigError, match=r"unknown engine 'bogus' for int8_conv2d; engines of int8_conv2d: "
                                                  r"onednn, im2col"):
        with engines.force(int8_conv2d="bogus"):
            pass
    with pytest.raises(engines.ConfigError, match="must be a name"):
        with engines.force(int8_linear=None):
            pass
    with engines.force(int8_linear="onednn", replace="int8 dense"):  # known: accepted
        assert engines.forced("int8_linear") == "onednn" and engines.forced("replace") == "int8 dense"
    assert engines.forced("int8_linear") is None


def test_register_op(monkeypatch, accel_env):
    monkeypatch.setattr(engines, "_OPS", dict(engines._OPS))
    accel_env(ACCEL_ENGINE="my_op=fast")
    with pytest.raises(engines.ConfigError, match="unknown op 'my_op'"):
        engines.forced("my_op")
    engines.register_op("my_op", ("slow", "fast"))
    assert engines.forced("my_op") == "fast" and engines.known_ops()["my_op"] == ("slow", "fast")
    engines.register_op("my_op", ("fast", "faster"))  # adds to the list
    assert engines.known_ops()["my_op"] == ("slow", "fast", "faster")
    for bad in ((), ("a,b",), ("",), (3,)):
        with pytest.raises(ValueError, match="engines must be"):
            engines.register_op("my_op", bad)
    with pytest.raises(ValueError, match="op must be"):
        engines.register_op("a=b", ("x",))
    engines._parse_forced.cache_clear()


def test_auto_layer_does_not_drop_a_forced_engine_it_cannot_run(cache):
    """Forcing a known int8_linear engine that cannot run here made ``auto`` layers quietly pick another form."""
    from accel.cpu import int8 as C

    k = 64
    qmax = engines.native_act_qmax()
    unusable = [e for e in C.LINEAR_ENGINES if e not in C.exact_engines(qmax, k)]
    assert unusable  # every machine lacks one (the *_split engines exist only without VNNI)
    auto = accel.QuantLinear.from_float(torch.nn.Linear(k, 32), "auto")
    with torch.no_grad(), engines.force(int8_linear=unusable[0]):
        with pytest.raises(ValueError, match=f"engine '{unusable[0]}' forced for int8_linear cannot run"):
            auto(torch.randn(4, k))
    with torch.no_grad():  # unforced, the same layer measures its forms as before
        assert auto(torch.randn(4, k)).shape == (4, 32)


def test_accel_engines_cli_with_a_bad_accel_engine(cache):
    env = {**os.environ, "ACCEL_CACHE_DIR": str(cache), "ACCEL_ENGINE": "int8_linaer=fbgemm"}
    out = subprocess.run([sys.executable, "-m", "accel.cli", "engines"], capture_output=True, text=True, cwd=ROOT,
                         env=env)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and "unknown op 'int8_linaer'" in err and err.startswith("accel engines: error:")
    out = subprocess.run([sys.executable, "-m", "accel.cli", "engines"], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "ACCEL_ENGINE": "int8_linear=onednn"})
    assert out.returncode == 0 and "forced      int8_linear=onednn (ACCEL_ENGINE)" in out.stdout, out.stderr
