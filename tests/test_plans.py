"""A layer's resolved call (``accel.ops.int8._planned``): an ``auto`` or int8 layer remembers, per kind of
input, the form, engine and derived weight it runs, so a settled call skips the dispatch chain. The plan
must give exactly what the dispatch path gives, and must never outlive what it was made from: the
layer's tensors (replaced or changed in place), its settings, and the engine decisions."""

import copy
import io

import pytest
import torch
import torch.nn as nn

from accel import QuantConv2d, QuantLinear, engines
from accel.cpu import int8 as cpu_int8
from accel.ops import int8 as ops
from accel.quant import sqnr as accel_sqnr

LINEAR_FORMS = ("dynamic", "weight_only", "float", "float_bf16")
CONV_FORMS = ("onednn", "im2col", "float", "float_nchw", "float_bf16")


def _unplanned_linear(q, x):
    b = q._buffers
    return ops.module_linear(x, b["weight_q"], b["weight_scale"], b["bias"],
                             q.act_scale if q.mode == "static" else None, q.activation, q.mode, q.act_qmax, None)


def _unplanned_conv(q, x):
    b = q._buffers
    return ops.module_conv2d(x, b["weight_q"], b["weight_scale"], b["bias"], q.stride, q.padding, q.dilation,
                             q.act_scale if q.mode == "static" else None, q.activation,
                             "auto" if q.mode == "auto" else "int8", q.act_qmax, None)


@pytest.mark.parametrize("form, dtype", [(f, d) for f in LINEAR_FORMS for d in (torch.float32, torch.bfloat16)
                                         if f != "float_bf16" or d == torch.float32])  # float_bf16: fp32 inputs
def test_planned_linear_equals_the_dispatch_path(form, dtype):
    q = QuantLinear.from_float(nn.Linear(40, 24), "auto", activation="relu")
    with engines.force(quant_linear_form=form), torch.no_grad():
        for m in (1, 5, 33):
            x = torch.randn(3, m, 40, dtype=dtype)
            for _ in range(2):  # the second call runs the plan made by the first
                y = q(x)
                assert y.dtype == dtype and y.shape == (3, m, 24)
                assert torch.equal(y, _unplanned_linear(q, x))
        assert q.resolved_mode(x) == form


@pytest.mark.parametrize("form", CONV_FORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_planned_conv_equals_the_dispatch_path(form, channels_last):
    q = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "auto")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with engines.force(int8_conv2d=form), torch.no_grad():
        for b, hw in ((1, 9), (3, 9), (2, 6)):
            x = torch.randn(b, 8, hw, hw).contiguous(memory_format=fmt)
            for _ in range(2):
                y = q(x)
                assert y.is_contiguous(memory_format=fmt)
                assert torch.equal(y, _unplanned_conv(q, x))


def test_a_plan_follows_every_change_of_the_layer():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(16, 8), "auto")
    x = torch.randn(4, 16)
    with torch.no_grad(), engines.force(quant_linear_form="float"):
        q(x)
        q.weight_q.copy_(torch.randint(-127, 128, q.weight_q.shape, dtype=torch.int8))  # in place
        assert torch.equal(q(x), _unplanned_linear(q, x))
        q.weight_scale.mul_(2)
        assert torch.equal(q(x), _unplanned_linear(q, x))
        q.bias.add_(1)
        assert torch.equal(q(x), _unplanned_linear(q, x))
        other = QuantLinear.from_float(nn.Linear(16, 8), "auto")
        q.load_state_dict(other.state_dict())  # a load
        assert torch.equal(q(x), other(x))
        q._buffers["weight_q"] = other.weight_q.clone().neg_()  # a replaced buffer
        assert torch.equal(q(x), _unplanned_linear(q, x))
        q.activation = "relu"  # a setting
        assert torch.equal(q(x), _unplanned_linear(q, x)) and (q(x) >= 0).all()
    with torch.no_grad(), engines.force(quant_linear_form="dynamic"):  # a decision changed
        y = q(x)
        assert torch.equal(y, _unplanned_linear(q, x))
    with torch.no_grad(), engines.force(quant_linear_form="float"):
        assert not torch.equal(q(x), y)  # float and int8 differ: the plan did not stay on int8


def test_a_plan_follows_writes_through_data():
    """``t.data = other`` keeps the object and its version (the plan checks the storage too); a bias edited
    through ``.data`` shows at once (it is cast per call, as the dispatch path does); weights edited through
    ``.data`` in place show after ``accel.cpu.int8.clear_cache()``, as documented, for plans too."""
    from accel.cpu import int8 as cpu_int8

    q = QuantLinear.from_float(nn.Linear(16, 8), "auto")
    c = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), "auto")
    x, img = torch.randn(2, 16), torch.randn(1, 3, 8, 8)
    with torch.no_grad(), engines.force(quant_linear_form="float", int8_conv2d="float"):
        q(x), q(x.bfloat16()), c(img)
        q.weight_q.data = torch.randint(-127, 128, q.weight_q.shape, dtype=torch.int8)
        assert torch.equal(q(x), _unplanned_linear(q, x))
        q.bias.data.add_(10)
        assert torch.equal(q(x.bfloat16()), _unplanned_linear(q, x.bfloat16()))
        c.bias.data.add_(10)
        assert torch.equal(c(img), _unplanned_conv(c, img))
        q.weight_q.data.neg_()
        c.weight_q.data.neg_()
        cpu_int8.clear_cache()
        assert torch.equal(q(x), _unplanned_linear(q, x)) and torch.equal(c(img), _unplanned_conv(c, img))


def test_a_planned_call_returns_the_input_dtype_under_autocast():
    q = QuantLinear.from_float(nn.Linear(16, 8), "auto")
    x = torch.randn(4, 16)
    with torch.no_grad(), engines.force(quant_linear_form="float"), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            y = q(x)
            assert y.dtype == torch.float32 and torch.equal(y, _unplanned_linear(q, x))


def test_plans_are_not_saved_copied_or_kept_by_a_move():
    q = QuantLinear.from_float(nn.Linear(16, 8), "auto")
    c = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), "auto")
    x, img = torch.randn(2, 16), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        ya, yc = q(x), c(img)
        assert q in ops._PLANS and c in ops._PLANS
        buf = io.BytesIO()
        torch.save(nn.Sequential(q, c), buf)  # a plan holds functions: it must not be pickled
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.equal(loaded[0](x), ya) and torch.equal(loaded[1](img), yc)
        twin = copy.deepcopy(q)
        assert twin not in ops._PLANS and torch.equal(twin(x), ya)
        q.bfloat16()  # _apply: the plan holds the tensors being replaced
        assert q not in ops._PLANS
        assert q(x.bfloat16()).dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16


def test_settled_fast_path_still_refuses_other_inputs():
    """A settled layer skips its checks only for the kind of input its plan was made for: another channel
    or feature count, dtype, rank or an empty batch goes through the checked path (accel's own errors)."""
    q = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "auto")
    lin = QuantLinear.from_float(nn.Linear(40, 24), "auto")
    with torch.no_grad():
        for _ in range(2):
            assert q(torch.randn(2, 8, 9, 9)).shape == (2, 16, 9, 9)
            assert lin(torch.randn(5, 40)).shape == (5, 24)
        with pytest.raises(ValueError, match=r"x must be \[B, 8, H, W\]"):
            q(torch.randn(2, 4, 9, 9))
        with pytest.raises(TypeError, match="float64"):
            q(torch.randn(2, 8, 9, 9, dtype=torch.float64))
        assert q(torch.randn(0, 8, 9, 9)).shape == (0, 16, 9, 9)
        with pytest.raises(ValueError, match="40"):
            lin(torch.randn(5, 20))
        assert lin(torch.randn(40)).shape == (24,)  # unbatched: its own kind
        assert lin(torch.randn(0, 40)).shape == (0, 24)
        y = lin(torch.randn(2, 3, 40))
        assert y.shape == (2, 3, 24)
        x = torch.randn(5, 40, requires_grad=True)
    y = lin(x)  # autograd records the call: the checked op path
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_random_sequences_of_inputs_match_the_dispatch_path():
    """A layer fed a random sequence of kinds of input (dtypes, layouts, batch sizes, ranks, sizes) gives, call
    after call, exactly what the checked dispatch path gives: a settled plan never serves the wrong kind."""
    g = torch.Generator().manual_seed(0)
    q = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "auto")
    lin = QuantLinear.from_float(nn.Linear(40, 24), "auto", activation="gelu")
    with torch.no_grad():
        for _ in range(60):
            b = int(torch.randint(1, 5, (), generator=g))
            dt = (torch.float32, torch.bfloat16)[int(torch.randint(0, 2, (), generator=g))]
            hw = (5, 9)[int(torch.randint(0, 2, (), generator=g))]
            x = torch.randn(b, 8, hw, hw, generator=g).to(dt)
            if torch.randint(0, 2, (), generator=g):
                x = x.contiguous(memory_format=torch.channels_last)
            y = q(x)
            assert torch.equal(y, _unplanned_conv(q, x)) and y.is_contiguous(memory_format=torch.channels_last) == \
                (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
            shape = [(b, 40), (b, 3, 40), (40,), (b, 2, 2, 40)][int(torch.randint(0, 4, (), generator=g))]
            xl = torch.randn(*shape, generator=g).to(dt)
            yl = lin(xl)
            assert yl.shape == (*shape[:-1], 24) and torch.equal(yl, _unplanned_linear(lin, xl))


def test_the_settled_check_finds_the_plan_each_kind_of_input_made():
    """``_settled`` computes the plan key inline (the fast path of a settled call): for every kind of input it
    must find the plan the first call made under ``_plan_key`` — and no plan for another bucket of rows."""
    lin = QuantLinear.from_float(nn.Linear(12, 6), "auto")
    conv = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), "auto")
    lb, cb = lin._buffers, conv._buffers
    lt = (lb["weight_q"], lb["weight_scale"], lb["bias"], None)
    ct = (cb["weight_q"], cb["weight_scale"], cb["bias"], None)
    ls = (lin.activation, lin.mode, lin.act_qmax)
    cs = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.activation, conv.mode, conv.act_qmax)
    with torch.no_grad():
        seen = set()
        for shape in [(1, 12), (3, 12), (12,), (2, 5, 12), (1, 1, 1, 12), (9, 12), (300, 12)]:
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(*shape).to(dt)
                other = torch.randn(x.numel() // 12 * 2 + 1, 12).to(dt)  # another bucket of rows
                if (dt, engines.m_bucket(other.shape[0])) not in seen:
                    assert ops._settled(lin, other, other.shape, lt, ls) is None
                lin(x), lin(x)  # (a first call's decisions may make its plan stale at once)
                assert ops._settled(lin, x, x.shape, lt, ls) is not None, (shape, dt)
                if len(shape) == 2:
                    seen.add((dt, engines.m_bucket(shape[0])))
        for b, hw, cl in [(1, 5, False), (2, 5, True), (3, 7, False), (1, 1, True)]:
            x = torch.randn(b, 3, hw, hw)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            conv(x), conv(x)
            assert ops._settled(conv, x, x.shape, ct, cs, image=True) is not None, (b, hw, cl)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert ops._settled(conv, x, x.shape, ct, cs, image=True) is None  # autocast: its own kind


def test_strided_and_autocast_inputs_of_a_float_plan_match_the_dispatch_path():
    """A float plan calls F.linear / F.conv2d directly; on a strided N-D half-precision input F.linear rounds
    differently from the 2-D view the dispatch path takes, and under autocast it computes in bf16: both must
    still give what the dispatch path gives (the input's dtype, the same values)."""
    lin = QuantLinear.from_float(nn.Linear(40, 24), "auto")
    conv = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), "auto")
    with torch.no_grad(), engines.force(quant_linear_form="float", int8_conv2d="float"):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            base = torch.randn(5, 3, 80).to(dt)
            for x in (base[..., ::2], base.transpose(0, 1)[..., :40], base[..., :40].contiguous()):
                for _ in range(2):
                    assert torch.equal(lin(x), _unplanned_linear(lin, x))
        img = torch.randn(2, 8, 9, 9)
        for x in (img, img.contiguous(memory_format=torch.channels_last), img[:, :, 1:, 1:]):
            for _ in range(2):
                assert torch.equal(conv(x), _unplanned_conv(conv, x))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for _ in range(2):
                    y = conv(x)
                    assert y.dtype == torch.float32 and torch.equal(y, _unplanned_conv(conv, x))


def test_a_threads_forced_engine_stays_in_that_thread():
    """engines.force pins engines in its thread only: the memoized choices and the layers' resolved calls are
    shared between threads, so neither may carry one thread's pins to another (it did, in most calls)."""
    import threading

    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 64), "auto")
    x = torch.randn(8, 64)
    with torch.no_grad():
        want_free = q(x).clone()  # the suite's unmeasured default form
        with engines.force(quant_linear_form="float" if q.resolved_mode(x) != "float" else "dynamic"):
            want_forced = q(x).clone()
            pins = {"quant_linear_form": q.resolved_mode(x)}
    assert not torch.equal(want_free, want_forced)
    wrong = {"free": 0, "forced": 0}
    barrier = threading.Barrier(2)

    def run(name, pins, want):
        barrier.wait()
        with torch.no_grad(), engines.force(**pins):
            for _ in range(300):
                if not torch.equal(q(x), want):
                    wrong[name] += 1

    threads = [threading.Thread(target=run, args=("free", {}, want_free)),
               threading.Thread(target=run, args=("forced", pins, want_forced))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == {"free": 0, "forced": 0}
    with torch.no_grad():
        q(x), q(x)  # outside force a layer still settles (its plans kept)
        assert ops._settled(q, x, x.shape, (q.weight_q, q.weight_scale, q.bias, None),
                            (q.activation, q.mode, q.act_qmax)) is not None


@pytest.mark.skipif(not cpu_int8.fused_dynamic_ok(64), reason="FBGEMM is not exact for full-range uint8 here (no VNNI)")
def test_the_fused_one_row_form():
    """``dynamic_fused`` (FBGEMM's dynamic linear in one call) serves one fp32 row: as accurate as the per-token
    int8 form there, NaN rows as the float layer gives them, the same through a plan; other inputs cannot force it."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    for bias, act in ((True, "none"), (False, "relu"), (True, "gelu")):
        q = QuantLinear.from_float(nn.Linear(64, 48, bias=bias), "auto", activation=act)
        ref_layer = QuantLinear.from_float(lin, "auto", activation=act)
        q.load_state_dict(ref_layer.state_dict()) if bias else None
        x = torch.randn(1, 64)
        with engines.force(quant_linear_form="dynamic_fused"), torch.no_grad():
            y = q(x)
            assert q.resolved_mode(x) == "dynamic_fused" and y.shape == (1, 48) and y.dtype == torch.float32
            assert torch.equal(y, _unplanned_linear(q, x)) and torch.equal(q(x[0]), y[0])  # 1-D input: one row
            with engines.force(quant_linear_form="float"):
                ref = q(x)
            with engines.force(quant_linear_form="dynamic"):
                per_token = q(x)
            assert accel_sqnr(ref, y) > min(35.0, accel_sqnr(ref, per_token) - 1.0)
            bad = x.clone()
            bad[0, 3] = float("nan")
            assert torch.isnan(q(bad)).all()
            for other in (torch.randn(2, 64), x.bfloat16()):
                with pytest.raises(engines.ForcedEngineError, match="dynamic_fused"):
                    q(other)


@pytest.mark.skipif(not cpu_int8.fused_dynamic_ok(64), reason="FBGEMM is not exact for full-range uint8 here (no VNNI)")
def test_the_fused_form_never_loses_to_the_per_token_form():
    """Rows FBGEMM's dynamic quantization would serve worse (a range under its smallest scale) take the per-token
    path; K past what uint8 x int8 sums hold in int32 is never offered the form."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    q = QuantLinear.from_float(lin, "auto")
    d = QuantLinear.from_float(lin, "dynamic")
    x0 = torch.randn(1, 256)
    with torch.no_grad():
        for scale in (1.0, 1e-2, 1e-3, 1e-4, 1e-8, 1e-20):
            x = x0 * scale
            with engines.force(quant_linear_form="dynamic_fused"):
                fused = q(x)
            assert accel_sqnr(lin(x), fused) > accel_sqnr(lin(x), d(x)) - 1.0, scale
    assert cpu_int8.FUSED_MAX_K * 255 * 128 <= 2**31 - 1 and not cpu_int8.fused_dynamic_ok(cpu_int8.FUSED_MAX_K + 1)
    wide = QuantLinear.from_float(nn.Linear(cpu_int8.FUSED_MAX_K + 1, 2), "auto")
    assert "dynamic_fused" not in ops._auto_forms(torch.ones(1, cpu_int8.FUSED_MAX_K + 1), wide.in_features)



@pytest.mark.parametrize("engine", [e for e in engines.known_ops()["int8_linear"]
                                    if e in cpu_int8.exact_engines(cpu_int8.act_qmax())])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_planned_int8_engines_equal_the_dispatch_path(engine, activation):
    """Each exact dense int8 engine (the amx_tiles plan binds its operands once) gives the dispatch path's bits,
    fp32 and bf16, through the plan and after the weight changes in place."""
    q = QuantLinear.from_float(nn.Linear(200, 70), "dynamic", activation=activation)
    with engines.force(int8_linear=engine), torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 17):
                x = torch.randn(m, 200, dtype=dtype)
                for _ in range(2):
                    assert torch.equal(q(x), _unplanned_linear(q, x)), (dtype, m)
        q.weight_q.neg_()
        x = torch.randn(5, 200)
        assert torch.equal(q(x), _unplanned_linear(q, x))


@pytest.mark.parametrize("engine", [e for e in engines.known_ops()["int8_conv2d"]
                                    if e in cpu_int8.conv_engines(cpu_int8.act_qmax())])
@pytest.mark.parametrize("mode, activation", [("dynamic", "none"), ("dynamic", "relu"), ("static", "gelu")])
def test_planned_int8_conv_engines_equal_the_dispatch_path(engine, mode, activation, accel_env, monkeypatch):
    """Each exact int8 conv engine (the amx_tiles plan binds its operands once) gives the dispatch path's bits: fp32
    and bf16, NCHW, channels_last and strided inputs, a NaN pixel, and after the weight and the static scale change
    in place. (The engine pinned through the environment: plans are kept, as in use; a thread's engines.force makes
    none.)"""
    resolved = []
    real = ops._resolve_conv
    monkeypatch.setattr(ops, "_resolve_conv", lambda *a: resolved.append(1) or real(*a))
    accel_env(ACCEL_ENGINE=f"int8_conv2d={engine}")
    conv = nn.Conv2d(32, 24, 3, stride=(1, 2), padding=(1, 2))
    q = QuantConv2d.from_float(conv, mode, act_scale=torch.tensor(0.03) if mode == "static" else None,
                               activation=activation)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(3, 32, 7, 9, dtype=dtype)
            for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, 1:]):
                for call in range(2):  # the second call runs the plan the first made
                    n = len(resolved)
                    y = q(inp)
                    assert y.dtype == dtype and (call == 0 or len(resolved) == n)
                    want = _unplanned_conv(q, inp)
                    assert torch.equal(y, want) and y.stride() == want.stride(), (dtype, inp.stride())
        x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
        q(x)
        x[1, 4, 2, 3] = float("nan")
        torch.testing.assert_close(q(x), _unplanned_conv(q, x), rtol=0, atol=0, equal_nan=True)
        assert q(x)[1].isnan().any() and not q(x)[0].isnan().any()
        y = q(x[:1])
        q.weight_q.neg_()
        assert torch.equal(q(x[:1]), _unplanned_conv(q, x[:1])) and not torch.equal(q(x[:1]), y)
        if mode == "static":
            q.act_scale.mul_(4)
            assert torch.equal(q(x[:1]), _unplanned_conv(q, x[:1]))
