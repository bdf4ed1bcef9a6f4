"""The ``onednn_cq`` int8 linear engine: accel's activation quantization as compiled loops (accel.cpu.compiled).
It must give exactly the integers, and the outputs, of the eager ``onednn`` engine; without a compiler it is not
offered, and a compiler failure falls back to the same eager steps with one warning."""

import pytest
import torch

from accel.cpu import compiled
from accel.cpu import int8 as C
from accel.quant import quantize_weight

pytestmark = pytest.mark.skipif(not compiled.available() or "onednn_cq" not in C.exact_engines(127),
                                reason="no C++ compiler for torch.compile, or no exact oneDNN engine here")


def _layer(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    wq, ws = quantize_weight(torch.randn(n, k, generator=g))
    return wq, ws, torch.randn(n, generator=g) * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(2, 33, 70), (17, 64, 9), (300, 130, 260)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_same_outputs_as_the_eager_onednn_engine(dtype, m, k, n, with_bias):
    wq, ws, bias = _layer(n, k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    x[1] = 0  # an all-zero row: scale 0, outputs = bias
    b = bias if with_bias else None
    for activation in ("none", "gelu"):
        ref = C.linear_int8_cpu(x, wq, ws, b, activation, qmax=127, engine="onednn")
        out = C.linear_int8_cpu(x, wq, ws, b, activation, qmax=127, engine="onednn_cq")
        assert out.dtype == dtype and torch.equal(out, ref)


def test_poisoned_rows_and_strided_inputs():
    wq, ws, bias = _layer(40, 96)
    x = torch.randn(12, 192)[:, ::2]  # not contiguous
    x[3, 5] = float("nan")
    x[4, 0] = float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)[:, :96] if dtype != torch.float32 else x
        ref = C.linear_int8_cpu(xd, wq, ws, bias, qmax=127, engine="onednn")
        out = C.linear_int8_cpu(xd, wq, ws, bias, qmax=127, engine="onednn_cq")
        assert out[3].isnan().all() and out[4].isnan().all()
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)


def test_ties_round_half_to_even_like_the_reference():
    """Values whose scaled product lands on .5 exactly: the compiled pass must round them as accel's rule does
    (the scale's inverse comes from a correctly rounded division, not a reciprocal)."""
    wq, ws, _ = _layer(8, 254)
    x = torch.arange(-127, 127, dtype=torch.float32).repeat(3, 1) / 2  # halves; row max 63.5 -> inv 2
    x[1] *= 0.37
    x[2] = x[2] * 3 + 0.25
    xc = x.contiguous()
    absmax = compiled.row_absmax(xc)
    scale, inv = C.scale_inv(absmax, 127)
    u8 = compiled.quantize(xc, inv, 128)
    want = torch.round(x * inv[:, None]) + 128
    assert torch.equal(u8, want.to(torch.uint8))
    assert torch.equal(absmax, x.abs().amax(1))


def test_compile_failure_falls_back_with_one_warning(monkeypatch, accel_log):
    wq, ws, bias = _layer(20, 48)
    x = torch.randn(6, 48).bfloat16()
    ref = C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn")

    def broken(*_a, **_k):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(compiled, "_compiled", {name: broken for name in ("absmax", "quantize", "scale_bias", "scale")})
    monkeypatch.setattr(compiled, "_failed", [])
    monkeypatch.setattr(compiled, "_verified", set())
    monkeypatch.setattr(compiled, "_compiled_ok", set())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a log line, never a warning raised into the user's forward under -W error
        out = C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn_cq")
        assert torch.equal(out, ref) and compiled.failure() == "compiling failed: RuntimeError: no compiler today"
        assert torch.equal(C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn_cq"), ref)
    assert len(accel_log) == 1 and "compiling failed: RuntimeError: no compiler today" in accel_log[0]


def test_not_offered_when_compiling_is_off(monkeypatch):
    from accel import engines

    monkeypatch.setenv("ACCEL_COMPILE", "0")
    engines.reload_env()
    try:
        assert not compiled.available()
        assert "onednn_cq" not in C.exact_engines(127) and "onednn" in C.exact_engines(127)
        assert not any(e.endswith("_cq") for e in C.conv_engines(127))
        wq, ws, bias = _layer(4, 16)
        with pytest.raises(ValueError, match="'onednn_cq' is not exact"):
            C.linear_int8_cpu(torch.randn(3, 16), wq, ws, bias, qmax=127, engine="onednn_cq")
    finally:
        monkeypatch.delenv("ACCEL_COMPILE")
        engines.reload_env()
    assert compiled.available()


def test_one_graph_per_dtype_in_every_grad_mode():
    """Calls with grad enabled, under no_grad and on inputs requiring grad share the compiled code (no recompile
    per mode); inference tensors get their own graphs once."""
    import torch._dynamo

    wq, ws, bias = _layer(10, 32)

    def graphs():
        return torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)

    C.linear_int8_cpu(torch.randn(5, 32), wq, ws, bias, qmax=127, engine="onednn_cq")
    with torch.inference_mode():
        C.linear_int8_cpu(torch.randn(7, 32), wq, ws, bias, qmax=127, engine="onednn_cq")
    start = graphs()
    with torch.inference_mode():
        C.linear_int8_cpu(torch.randn(300, 32), wq, ws, bias, qmax=127, engine="onednn_cq")
    with torch.no_grad():
        C.linear_int8_cpu(torch.randn(9, 32), wq, ws, bias, qmax=127, engine="onednn_cq")
    C.linear_int8_cpu(torch.randn(11, 32, requires_grad=True), wq, ws, bias, qmax=127, engine="onednn_cq")
    C.linear_int8_cpu(torch.randn(11, 64)[:, :32], wq, ws, bias, qmax=127, engine="onednn_cq")
    assert graphs() == start


def test_wrong_compiled_code_is_caught_before_use(monkeypatch, accel_log):
    """Compiled code that computes something else (as Inductor's AVX2 reduction did under ATEN_CPU_CAPABILITY=avx2)
    never produces an output: the check before first use finds it, and the eager steps run."""
    wq, ws, bias = _layer(20, 48)
    x = torch.randn(6, 48)
    ref = C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn")
    wrong = {"absmax": lambda t: compiled._row_absmax_eager(t) * (1 + (t.shape[1] == 16)),
             "quantize": compiled._quantize_eager, "scale_bias": compiled._scale_bias_eager,
             "scale": compiled._scale_eager}
    monkeypatch.setattr(compiled, "_compiled", wrong)
    monkeypatch.setattr(compiled, "_failed", [])
    monkeypatch.setattr(compiled, "_verified", set())
    monkeypatch.setattr(compiled, "_compiled_ok", set())
    out = C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn_cq")
    assert torch.equal(out, ref) and "wrong row maxima of torch.float32 rows of 16" in accel_log[0]


@pytest.mark.parametrize("engine", ["onednn", "im2col"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_same_outputs_as_the_eager_engines(engine, layout, dtype):
    g = torch.Generator().manual_seed(2)
    wq, ws = quantize_weight(torch.randn(12, 8, 3, 3, generator=g))
    bias = torch.randn(12, generator=g)
    x = torch.randn(3, 8, 10, 9, generator=g) * 2
    x[1] = 0
    x[2, 3, 4, 4] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(3, 8, 10, 18, generator=g)[..., ::2]
    x = x.to(dtype)
    for stride, padding in (((1, 1), (1, 1)), ((2, 1), (0, 2))):
        ref = C.conv2d_int8_cpu(x, wq, ws, bias, stride, padding, (1, 1), "relu", qmax=127, engine=engine)
        out = C.conv2d_int8_cpu(x, wq, ws, bias, stride, padding, (1, 1), "relu", qmax=127, engine=engine + "_cq")
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=0, atol=0)


def test_quantize_picks_compiled_engines_only_by_measuring():
    """The compiled variants are candidates of the measured choice, never the unmeasured default."""
    from accel import engines

    assert C.default_linear_engine(127, 4096, 4096) != "onednn_cq"
    assert not C.conv_engines(127)[0].endswith("_cq")
    assert {"onednn_cq"} <= set(engines.known_ops()["int8_linear"])
    assert {"onednn_cq", "im2col_cq"} <= set(engines.known_ops()["int8_conv2d"])


def test_contexts_the_compiled_code_cannot_serve_take_the_eager_steps(accel_log):
    """Autocast, a dispatch mode (FLOP counting), the profiler and thread-count changes: the same outputs, and the
    compiled path stays on for the calls after."""
    from torch.utils.flop_counter import FlopCounterMode

    wq, ws, bias = _layer(24, 40)
    x = torch.randn(9, 40)
    ref = C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn")
    contexts = [lambda: torch.autocast("cpu", dtype=torch.bfloat16), lambda: FlopCounterMode(display=False),
                lambda: torch.profiler.profile(), lambda: torch.device("cpu")]
    for make in contexts:
        with make():
            out = C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn_cq")
        assert torch.equal(out, ref)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 4, 5):
            torch.set_num_threads(n)
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                with torch.inference_mode():
                    C.linear_int8_cpu(x.to(dt), wq, ws, bias, qmax=127, engine="onednn_cq")
                C.linear_int8_cpu(x.to(dt), wq, ws, bias, qmax=127, engine="onednn_cq")
    finally:
        torch.set_num_threads(threads)
    assert compiled.failure() is None and not accel_log
    assert torch.equal(C.linear_int8_cpu(x, wq, ws, bias, qmax=127, engine="onednn_cq"), ref)
