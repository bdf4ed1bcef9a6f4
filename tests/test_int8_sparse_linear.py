"""int8 block-sparse Linear: the CPU strategies against an fp64 reference of the same integers, the op's
validation, NaN tokens and backward, ``SparseQuantLinear`` (conversion, state, ``.to``, deepcopy, compile),
``quantize_`` after ``sparsify_``, save / load, and the Triton path of the op under the interpreter."""

import copy
import io
import math

import pytest
import torch
import torch.nn as nn

import accel
from accel import QuantConv2d, SparseConv2d, SparseLinear, SparseQuantLinear, engines
from accel.cpu import int8_bsr as cpu_int8_bsr
from accel.formats import expand_block_mask
from accel.ops.int8_bsr_linear import int8_bsr_linear
from accel.quant import quantize_rows_ref, quantize_weight
from tests.helpers import interpret_mode
from tests.sparse_refs import bsr_dense, bsr_from_mask, int8_bsr_mm_ref, random_block_mask


def make(n, k, block, density, empty_rows=(), seed=0):
    """``(values_q, w_scale, crow, col, bias)``: random int8 blocks, positive channel scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    mask = random_block_mask(math.ceil(n / block), math.ceil(k / block), density, empty_rows, seed)
    v, crow, col = bsr_from_mask(w, block, mask)
    return v, torch.rand(n, generator=g) * 0.01 + 1e-4, crow, col, torch.randn(n, generator=g)


def reference(x, v, ws, crow, col, n, bias, activation, qmax):
    """fp64-exact integer products (int64 here) of accel's quantized activation, then the fp32 epilogue."""
    xq, xs = quantize_rows_ref(x.float(), qmax)
    return int8_bsr_mm_ref(xq, xs, v, ws, crow, col, n, bias, activation)


def close(y, ref, **kw):
    """~1e-6 of the output's scale: the strategies and the reference differ only in fp32 rounding of the
    epilogue (and of fp32 sums for "float")."""
    finite = ref[torch.isfinite(ref)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-6, atol=1e-6 * max(scale, 1.0), **kw)


def int8_strategies(qmax):
    return [s for s in cpu_int8_bsr.strategies(qmax) if s != "float"]


CASES = [  # (M, N, K, block, density, empty block rows)
    (1, 100, 70, 16, 0.5, (1,)),
    (7, 130, 200, 32, 0.5, (0, 2)),
    (300, 96, 130, 32, 0.7, (1,)),
    (7, 130, 200, 64, 0.6, (1,)),
    (0, 64, 64, 32, 0.5, ()),
    (16, 40, 33, 16, 1.0, ()),
    (5, 64, 96, 32, 0.0, ()),  # every block pruned: the bias
]


def _id(c):
    return "M{}-N{}-K{}-B{}-d{}-e{}".format(*c[:5], len(c[5]))


@pytest.mark.parametrize("qmax", [63, 127])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_cpu_strategies_match_exact_reference(case, qmax):
    m, n, k, block, density, empty = case
    v, ws, crow, col, bias = make(n, k, block, density, empty)
    x = torch.randn(m, k) * 3
    for activation in ("none", "relu", "gelu"):
        ref = reference(x, v, ws, crow, col, n, bias, activation, qmax)
        close(cpu_int8_bsr.int8_bsr_linear_reference(x, v, ws, crow, col, n, bias, activation, qmax),
                                   ref)
        for s in cpu_int8_bsr.strategies(qmax):
            y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, n, bias, activation, qmax, s)
            assert y.shape == (m, n) and y.dtype == torch.float32
            close(y, ref, msg=f"{s} {activation}")


@pytest.mark.parametrize("m", [1, 3, 33])
def test_int8_strategies_are_exact_at_the_extremes(m):
    """-127 activations times -127/-128 weights at K = 4096: sums near 2**26, beyond fp32's exact integers;
    the int8 strategies accumulate in int32 and match the exact integers to fp32 rounding."""
    n, k, bs = 64, 4096, 32
    v, ws, crow, col, bias = make(n, k, bs, 0.5)
    v.fill_(-128)
    x = -torch.ones(m, k)
    ref = reference(x, v, ws, crow, col, n, None, "none", 127)
    for s in int8_strategies(127):
        y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, n, None, "none", 127, s)
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_return_their_dtype(dtype):
    v, ws, crow, col, bias = make(96, 160, 32, 0.5, (1,))
    x = torch.randn(9, 160).to(dtype)
    ref = reference(x, v, ws, crow, col, 96, bias.to(dtype), "relu", 127)
    for s in cpu_int8_bsr.strategies(127):
        y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, 96, bias.to(dtype), "relu", 127, s)
        assert y.dtype == dtype
        # the fp32 result rounded once to the input dtype: at most an ulp of it apart
        torch.testing.assert_close(y.float(), ref.to(dtype).float(), rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.skipif("rows" not in cpu_int8_bsr.strategies(127),
                    reason="torch._int_mm is not exact here (it needs VNNI in oneDNN): no rows/stacked strategies")
def test_strategies_across_token_counts_and_layers():
    """A strategy's per-call plans (bound to the token count and to buffers shared by every layer) stay right
    when token counts change and two layers take turns, including the stack sizes of both stacked strategies;
    the stacked ones are candidates only while they stack rows."""
    assert "stacked" in cpu_int8_bsr.strategies(127, 16) and "stacked" not in cpu_int8_bsr.strategies(127, 4096)
    assert cpu_int8_bsr.strategies(127, 4096)[0] == "rows"
    a = make(200, 130, 32, 0.3, (0, 3))
    b = make(96, 70, 16, 0.5, (2,))
    for s in cpu_int8_bsr.strategies(127):
        for m in (1, 5, 1, 33, 16, 5, 2):
            for (v, ws, crow, col, bias), n, k in ((a, 200, 130), (b, 96, 70)):
                x = torch.randn(m, k)
                y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, n, bias, "none", 127, s)
                close(y, reference(x, v, ws, crow, col, n, bias, "none", 127), msg=f"{s} m={m} n={n}")
    assert cpu_int8_bsr.stack_size(1, wide=True) == 2 * cpu_int8_bsr.stack_size(1)


def test_nan_tokens_give_nan_rows():
    v, ws, crow, col, bias = make(70, 90, 16, 0.5)
    x = torch.randn(6, 90)
    x[1, 3], x[4, 0] = float("nan"), float("inf")
    for s in cpu_int8_bsr.strategies(127):
        y = cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, 70, bias, "relu", 127, s)
        assert torch.isnan(y[[1, 4]]).all(), s
        keep = [0, 2, 3, 5]
        close(y[keep], reference(x[keep], v, ws, crow, col, 70, bias, "relu", 127))
    # every block pruned: 0 * NaN scale is still NaN for the poisoned tokens
    v0, ws0, crow0, col0, _ = make(70, 90, 16, 0.0)
    y = int8_bsr_linear(x, v0, ws0, crow0, col0, (70, 90), bias)
    assert torch.isnan(y[[1, 4]]).all() and torch.equal(y[0], bias)


def test_engines_not_exact_for_a_qmax_are_excluded(accel_env):
    """Without VNNI (ACCEL_CPU_ISA=avx2) torch._int_mm is not an exact engine: only "float" remains, the op
    runs it, and forcing an int8 strategy raises instead of running it."""
    v, ws, crow, col, bias = make(64, 96, 32, 0.5)
    x = torch.randn(5, 96)
    accel_env(ACCEL_CPU_ISA="avx2")
    assert cpu_int8_bsr.strategies(127) == ("float",) == cpu_int8_bsr.strategies(63)
    assert cpu_int8_bsr.default_strategy(127, 5) == "float"
    with pytest.raises(ValueError, match="not available for activation qmax 127"):
        cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, 64, bias, "none", 127, "rows")
    with engines.force(int8_bsr_linear="rows"), pytest.raises(ValueError, match="cannot run this call"):
        int8_bsr_linear(x, v, ws, crow, col, (64, 96), bias)
    y = int8_bsr_linear(x, v, ws, crow, col, (64, 96), bias, act_qmax=127)
    close(y, reference(x, v, ws, crow, col, 64, bias, "none", 127))


@pytest.mark.parametrize("strategy", cpu_int8_bsr.STRATEGIES)
def test_forced_strategy_through_the_op(strategy):
    if strategy not in cpu_int8_bsr.strategies(127):
        pytest.skip(f"{strategy} is not exact on this CPU")
    v, ws, crow, col, bias = make(130, 200, 32, 0.4, (2,))
    x = torch.randn(2, 3, 200)
    with engines.force(int8_bsr_linear=strategy):
        y = int8_bsr_linear(x, v, ws, crow, col, (130, 200), bias, activation="gelu", act_qmax=127)
    assert y.shape == (2, 3, 130)
    ref = reference(x.reshape(6, 200), v, ws, crow, col, 130, bias, "gelu", 127)
    close(y.reshape(6, 130), ref)


def test_measured_choice_is_exact(accel_env, monkeypatch):
    if len(cpu_int8_bsr.strategies(127)) < 2:
        pytest.skip("one strategy here (an ISA cap): nothing to measure")
    accel_env(ACCEL_ENGINE_MEASURE="1")
    monkeypatch.setattr(engines, "BUDGET_S", 0.01)
    monkeypatch.setattr(engines, "MIN_ROUNDS", 2)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)  # a busy machine would decide nothing
    engines.clear(disk=True)
    v, ws, crow, col, bias = make(256, 256, 32, 0.25)
    x = torch.randn(4, 256)
    y = int8_bsr_linear(x, v, ws, crow, col, (256, 256), bias, act_qmax=127)
    key = engines.last_key("int8_bsr_linear")
    dec = engines.decision(key)
    assert dec is not None and dec.measured and dec.engine in cpu_int8_bsr.strategies(127)
    assert not [r for r in dec.rejected.values() if not r.startswith("too slow")]  # (timing rejections: load)
    close(y, reference(x, v, ws, crow, col, 256, bias, "none", 127))
    engines.clear(disk=True)


def test_bad_inputs_raise_clear_errors():
    v, ws, crow, col, bias = make(64, 96, 32, 0.5)
    x = torch.randn(3, 96)
    shape = (64, 96)
    with pytest.raises(TypeError, match="x dtype"):
        int8_bsr_linear(x.double(), v, ws, crow, col, shape)
    with pytest.raises(ValueError, match=r"x must have shape \[..., 96\]"):
        int8_bsr_linear(torch.randn(3, 95), v, ws, crow, col, shape)
    with pytest.raises(TypeError, match="values_q must be int8"):
        int8_bsr_linear(x, v.float(), ws, crow, col, shape)
    with pytest.raises(ValueError, match=r"values_q must be \[nnz, B, B\]"):
        int8_bsr_linear(x, v[:, :, :16], ws, crow, col, shape)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        int8_bsr_linear(x, v, ws[:10], crow, col, shape)
    with pytest.raises(ValueError, match="w_scale must be float32"):
        int8_bsr_linear(x, v, ws.double(), crow, col, shape)
    with pytest.raises(ValueError, match="bias must be a float"):
        int8_bsr_linear(x, v, ws, crow, col, shape, bias[:3])
    with pytest.raises(ValueError, match="activation"):
        int8_bsr_linear(x, v, ws, crow, col, shape, activation="tanh")
    with pytest.raises(ValueError, match="act_qmax"):
        int8_bsr_linear(x, v, ws, crow, col, shape, act_qmax=100)
    bad_col = col.clone()
    bad_col[0] = 99
    with pytest.raises(ValueError, match="col_indices must lie in"):
        int8_bsr_linear(x, v, ws, crow, bad_col, shape)
    with pytest.raises(ValueError, match="crow_indices"):
        int8_bsr_linear(x, v, ws, crow[:-1], col, shape)
    with pytest.raises(ValueError, match="there are"):
        int8_bsr_linear(x, v[1:], ws, crow, col, shape)
    if torch.device("meta") != x.device:
        with pytest.raises(ValueError, match="different devices"):
            int8_bsr_linear(x, v, ws.to("meta"), crow, col, shape)
    with pytest.raises(ValueError, match="unknown CPU int8 block-sparse strategy"):
        cpu_int8_bsr.int8_bsr_linear_cpu(x, v, ws, crow, col, 64, None, "none", 127, "magic")


def test_straight_through_backward():
    v, ws, crow, col, bias = make(64, 96, 32, 0.5, (1,))
    w = bsr_dense(v.float(), crow, col, (64, 96)) * ws[:, None]
    x = torch.randn(5, 96, requires_grad=True)
    y = int8_bsr_linear(x, v, ws, crow, col, (64, 96), bias, activation="relu")
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(x.grad, (dy * (y > 0)) @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no backward through a fused GELU"):
        int8_bsr_linear(x, v, ws, crow, col, (64, 96), bias, activation="gelu")


def test_opcheck():
    v, ws, crow, col, bias = make(64, 96, 32, 0.5)
    torch.library.opcheck(torch.ops.accel.int8_bsr_linear.default,
                          (torch.randn(4, 96), v, ws, crow, col, 64, bias, "relu", 127))


# ------------------------------------------------------------------------------------------------ module
def _sparse(n=130, k=200, block=32, sparsity=0.6, bias=True, seed=0):
    torch.manual_seed(seed)
    return SparseLinear.from_dense(nn.Linear(k, n, bias=bias), sparsity=sparsity, block=block, mode="sparse")


def test_from_sparse_quantizes_like_the_dense_weight():
    sl = _sparse()
    q = SparseQuantLinear.from_sparse(sl)
    w_q, w_s = quantize_weight(sl.dense_weight())
    torch.testing.assert_close(q.weight_scale, w_s, rtol=0, atol=0)
    assert torch.equal(bsr_dense(q.values_q, q.crow_indices, q.col_indices, (130, 200)), w_q)
    x = torch.randn(7, 200)
    with torch.no_grad():
        ref = accel.QuantLinear.from_float(sl.to_linear(), "dynamic", act_qmax=127)(x)
        y = SparseQuantLinear.from_sparse(sl, act_qmax=127)(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)  # the same integers as dense int8
        assert accel.quant.sqnr(sl(x), y) > 35
    lin = nn.Linear(200, 130)
    mask = random_block_mask(5, 7, 0.5)
    q2 = SparseQuantLinear.from_float(lin, mask=mask, block=32, activation="relu")
    assert q2.nnz == int(mask.sum()) and q2.activation == "relu"
    kept = expand_block_mask(mask, 32, (130, 200))
    dense = q2.dequantized_weight()
    assert (dense[~kept] == 0).all() and (dense[kept] != 0).float().mean() > 0.95
    with pytest.raises(TypeError, match="expects SparseLinear"):
        SparseQuantLinear.from_sparse(lin)


def test_module_state_dict_round_trip_and_atomic_failures():
    q = SparseQuantLinear.from_sparse(_sparse(), activation="relu", act_qmax=63)
    other = SparseQuantLinear(200, 130, block_size=32)  # nnz 0: resized by the load
    other.load_state_dict(q.state_dict())
    assert other.nnz == q.nnz and other.activation == "relu" and other.act_qmax == 63
    x = torch.randn(4, 200)
    with torch.no_grad():
        assert torch.equal(other(x), q(x))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    third = SparseQuantLinear(200, 130, block_size=32)
    third.load_state_dict(loaded)
    with torch.no_grad():
        assert torch.equal(third(x), q(x))
    before = {k: v.clone() for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
    for mutate, match in [
        (lambda s: s.__setitem__("col_indices", s["col_indices"] + 100), "col_indices must lie in"),
        (lambda s: s.__setitem__("values_q", s["values_q"].float()), "values_q must be int8"),
        (lambda s: s.__setitem__("weight_scale", s["weight_scale"] * float("nan")), "weight_scale must be finite"),
        (lambda s: s.__setitem__("_extra_state", {**s["_extra_state"], "block_size": 16}), "state is for"),
        (lambda s: s.__setitem__("_extra_state", {**s["_extra_state"], "act_qmax": 5}), "act_qmax"),
        (lambda s: s.pop("bias"), "bias missing"),
    ]:
        bad = dict(q.state_dict())
        mutate(bad)
        with pytest.raises(RuntimeError, match=match):
            other.load_state_dict(bad)
        after = {k: v for k, v in other.state_dict().items() if isinstance(v, torch.Tensor)}
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert other.activation == "relu" and other.act_qmax == 63


def test_to_keeps_scales_fp32_and_deepcopy():
    q = SparseQuantLinear.from_sparse(_sparse())
    h = copy.deepcopy(q).to(torch.bfloat16)
    assert h.weight_scale.dtype == torch.float32 and h.bias.dtype == torch.bfloat16 and h.values_q.dtype == torch.int8
    x = torch.randn(3, 200)
    with torch.no_grad():
        y = h(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), q(x), rtol=2e-2, atol=2e-2)
        d = copy.deepcopy(q)
        d.values_q.zero_()  # the copy owns its buffers; the original's packed panels stay valid
        assert not torch.equal(d(x), q(x))
        torch.testing.assert_close(q(x), SparseQuantLinear.from_sparse(_sparse())(x), rtol=0, atol=0)
    assert "density=" in repr(q) and "block_size=32" in repr(q)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch.compiler.reset()
    model = nn.Sequential(SparseQuantLinear.from_sparse(_sparse(), activation="relu"), nn.Linear(130, 10)).eval()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for b in (2, 5):
            x = torch.randn(b, 200)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ api


#: the delay that makes a form "artificially slow" (below accel.engines.TOO_SLOW_ABS_S: a form past it would be
#: rejected, not timed and reported)
SLOW_S = 0.02


@pytest.fixture
def one_thread():
    """One thread for the tests that time forms against a slowed one: on a loaded machine a 2-thread call whose threads
    lose their CPU takes 10-25 ms (0.3 ms quiet), as slow as the slowed form, and the measuring fixture does not let
    that count as contention."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    engines.clear(disk=True)  # (the decisions are per thread count: none left from another test)
    yield
    engines.clear(disk=True)
    torch.set_num_threads(old)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))


def test_quantize_after_sparsify_makes_int8_block_sparse_layers(tmp_path):
    model = _mlp()
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75, scope="layer", mode="sparse"),
                    filter_fn=lambda m, n: m.out_features > 10)
    x = torch.randn(6, 256)
    with torch.no_grad():
        sparse_out = model(x)
    rows = accel.quantize_(model, accel.QuantConfig(act_qmax=127))
    assert isinstance(model[0], SparseQuantLinear) and isinstance(model[2], SparseQuantLinear)
    assert isinstance(model[4], accel.QuantLinear)
    assert {r["layer"]: r["decision"] for r in rows}["0"] == "int8 block-sparse"
    with torch.no_grad():
        out = model(x)
    assert accel.quant.sqnr(sparse_out, out) > 30
    path = str(tmp_path / "m.safetensors")
    accel.save(model, path)
    loaded = accel.load(_mlp(), path)
    assert isinstance(loaded[0], SparseQuantLinear) and loaded[0].act_qmax == 127
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_quantize_keeps_the_fastest_sparse_form(measuring, one_thread, monkeypatch):
    """With example inputs each SparseLinear becomes the fastest of {sparse float, dense int8, int8 block-sparse}
    here; the rows report all three times. A form made artificially slow is never chosen."""
    model = _mlp()
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.9, scope="layer", mode="sparse"),
                    filter_fn=lambda m, n: m.out_features > 10)
    x = torch.randn(8, 256)
    real = SparseQuantLinear.forward

    def slow(self, inp):
        import time

        time.sleep(SLOW_S)
        return real(self, inp)

    monkeypatch.setattr(SparseQuantLinear, "forward", slow)
    rows = accel.quantize_(model, accel.QuantConfig(budget_s=0.02), example_inputs=(x,))
    by = {r["layer"]: r for r in rows}
    assert not isinstance(model[0], SparseQuantLinear) and not isinstance(model[2], SparseQuantLinear)
    assert "int8 block-sparse" in by["0"]["reason"] and "sparse float" in by["0"]["reason"]
    assert not by["0"]["decision"].startswith("int8 block-sparse") and by["0"]["ms_after"] > 0
    monkeypatch.setattr(SparseQuantLinear, "forward", real)
    engines.clear(disk=True)
    model2 = _mlp()
    accel.sparsify_(model2, accel.SparsityConfig(sparsity=0.9, scope="layer", mode="sparse"),
                    filter_fn=lambda m, n: m.out_features > 10)
    slow_sparse = SparseLinear.forward

    def slow2(self, inp):
        import time

        time.sleep(SLOW_S)
        return slow_sparse(self, inp)

    monkeypatch.setattr(SparseLinear, "forward", slow2)
    accel.quantize_(model2, accel.QuantConfig(budget_s=0.02), example_inputs=(x,))
    assert not isinstance(model2[0], SparseLinear) and not isinstance(model2[2], SparseLinear)


def test_quantize_keeps_the_faster_form_of_a_sparse_conv(measuring, one_thread, monkeypatch, tmp_path):
    """With example inputs a SparseConv2d becomes the dense int8 QuantConv2d of its masked weight where that is faster
    than the sparse float layer, else stays; the rows report both times; a saved and loaded model computes the
    same. Each direction forced by making the other form artificially slow."""
    import time

    def model_():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
        accel.sparsify_(m, accel.SparsityConfig(sparsity=0.75, block=16, scope="layer", convs=True, mode="sparse"))
        assert isinstance(m[0], SparseConv2d) and isinstance(m[2], SparseConv2d)
        return m

    x = torch.randn(2, 32, 8, 8)
    for slow_cls, kept in ((SparseConv2d, QuantConv2d), (QuantConv2d, SparseConv2d)):
        engines.clear(disk=True)
        model = model_()
        with torch.no_grad():
            want = model(x)
        real = slow_cls.forward
        monkeypatch.setattr(slow_cls, "forward", lambda self, inp, real=real: time.sleep(SLOW_S) or real(self, inp))
        # (the per-layer decision only: the in-model check times whole models, which a loaded machine can upset)
        rows = accel.quantize_(model, accel.QuantConfig(budget_s=0.02, in_model=False), example_inputs=(x,))
        monkeypatch.setattr(slow_cls, "forward", real)
        by = {r["layer"]: r for r in rows}
        assert isinstance(model[0], kept) and isinstance(model[2], kept), rows
        assert "sparse float" in by["0"]["reason"] and "int8 dense" in by["0"]["reason"] and by["0"]["ms_after"] > 0
        assert by["0"]["decision"].startswith("int8" if kept is QuantConv2d else "sparse float")
        with torch.no_grad():
            y = model(x)
            assert accel.quant.sqnr(want, y) > 30  # (the pruned zeros stay zeros in the int8 weight)
            accel.save(model, str(tmp_path / "m.safetensors"))
            torch.manual_seed(1)
            fresh = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
            assert torch.equal(accel.load(fresh, str(tmp_path / "m.safetensors"))(x), y)


def test_static_int8_form_of_a_calibrated_sparse_conv(measuring, one_thread, monkeypatch):
    """calibrate covers SparseConv2d layers, so quantize_ in static mode gives their int8 form the calibrated scale
    (no warning about missing scales); the form is decided per input layout (NCHW and channels_last run at other
    speeds)."""
    import time
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1))
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75, block=16, scope="layer", convs=True, mode="sparse"))
    x = torch.randn(2, 32, 8, 8)
    scales = accel.calibrate(model, [x])
    assert set(scales) == {"0", "2"}
    real = SparseConv2d.forward
    monkeypatch.setattr(SparseConv2d, "forward", lambda self, inp: time.sleep(SLOW_S) or real(self, inp))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "act_scales has no scale for ..." warning)
        accel.quantize_(model, accel.QuantConfig(conv_mode="static", act_scales=scales, budget_s=0.02, in_model=False),
                        example_inputs=(x.contiguous(memory_format=torch.channels_last),))
    assert isinstance(model[0], QuantConv2d) and model[0].mode == "static" and model[2].mode == "static"
    assert float(model[0].act_scale) == pytest.approx(scales["0"])
    keys = [k for k in engines.decisions() if k.startswith("replace|") and "old=SparseConv2d" in k]
    assert len(keys) == 2 and all("cl=1" in k for k in keys)


def test_quantize_static_mode_leaves_sparse_layers():
    model = _mlp()
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75, scope="layer", mode="sparse"),
                    filter_fn=lambda m, n: n == "0")
    rows = accel.quantize_(model, accel.QuantConfig(linear_mode="weight_only"))
    assert isinstance(model[0], SparseLinear)
    assert {r["layer"]: r["decision"] for r in rows}["0"] == "sparse float"


# ------------------------------------------------------------------------------------------------ triton
@pytest.mark.interpreter
@pytest.mark.skipif(not interpret_mode(), reason="routes CPU tensors through the interpreted Triton kernels")
def test_triton_path_of_the_op(accel_env):
    """The op through quantize_rows + the interpreted int8 BSR kernel: the same integers as the CPU path."""
    v, ws, crow, col, bias = make(100, 70, 16, 0.5, (1,))
    x = torch.randn(9, 70)
    x[3, 2] = float("nan")
    cpu = int8_bsr_linear(x, v, ws, crow, col, (100, 70), bias, activation="relu", act_qmax=127)
    accel_env(ACCEL_FORCE_TRITON="1")
    y = int8_bsr_linear(x, v, ws, crow, col, (100, 70), bias, activation="relu", act_qmax=127)
    assert torch.isnan(y[3]).all() and torch.isnan(cpu[3]).all()
    close(y, reference(x, v, ws, crow, col, 100, bias, "relu", 127), equal_nan=True)
    close(y, cpu, equal_nan=True)
    q = SparseQuantLinear.from_sparse(_sparse(64, 96, 32))
    with torch.no_grad():
        xq = torch.randn(5, 96)
        assert accel.quant.sqnr(q.to_sparse()(xq), q(xq)) > 30
