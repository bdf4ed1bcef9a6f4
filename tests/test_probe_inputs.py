"""Regressions for defects an input prober found (each test failed before its fix): half-done loads, the
grad-mode dependence of dense storage, NaN/inf inputs and the engines, autocast around a first call, int32
structures, int32 overflow at large K, and values the checks let through."""

import importlib

import pytest
import torch
import torch.nn as nn

import accel
from accel import QuantConv2d, QuantEmbedding, QuantLinear, SparseConv2d, SparseLinear, engines
from accel.quant import INT32_MAX_K

ops_bsr_conv = importlib.import_module("accel.ops.bsr_conv")
ops_bsr_linear = importlib.import_module("accel.ops.bsr_linear")  # (accel.ops.bsr_linear is also the function)


def _snapshot(m: nn.Module) -> dict:
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)} | \
        {"mode": getattr(m, "mode", None), "activation": getattr(m, "activation", None),
         "padding_idx": getattr(m, "padding_idx", None)}


def _same(a: dict, b: dict) -> bool:
    def eq(u, v):
        if not isinstance(u, torch.Tensor):
            return u == v
        return torch.equal(u, v) or (u.is_floating_point() and torch.allclose(u, v, rtol=0, atol=0, equal_nan=True))
    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_a_failed_load_leaves_the_layer_as_it_was(kind):
    torch.manual_seed(0)
    if kind == "linear":
        m = QuantLinear.from_float(nn.Linear(32, 16), "dynamic")
        bad = {"weight_q": torch.randint(-127, 128, (16, 32), dtype=torch.int8), "weight_scale": torch.rand(16),
               "_extra_state": {"mode": "weight_only", "activation": "relu", "act_qmax": 0},
               "act_scale": torch.ones(2)}  # the wrong shape comes last
    elif kind == "conv":
        m = QuantConv2d.from_float(nn.Conv2d(4, 8, 3))
        bad = {"weight_q": torch.randint(-127, 128, (8, 4, 3, 3), dtype=torch.int8), "bias": torch.ones(9)}
    else:
        m = QuantEmbedding.from_float(nn.Embedding(10, 8))
        bad = {"weight_q": torch.randint(-127, 128, (10, 8), dtype=torch.int8),
               "weight_scale": torch.full((10,), float("nan"))}
    before = _snapshot(m)
    sd = m.state_dict()
    sd.update(bad)
    with pytest.raises(RuntimeError, match="nothing of this layer was loaded"):
        m.load_state_dict(sd)
    assert _same(_snapshot(m), before)
    if kind == "embedding":  # a float table is refused, not truncated to int8
        sd = m.state_dict()
        sd["weight_q"] = torch.randn(10, 8) * 100
        with pytest.raises(RuntimeError, match="weight_q must be int8"):
            m.load_state_dict(sd)
        assert _same(_snapshot(m), before)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_storage_gives_the_pruned_layer_in_every_grad_mode(kind):
    """A dense-storage layer whose weight holds values in pruned blocks (loaded, or edited in place) computes
    with those blocks zero whether or not autograd records the call, as dense_weight() says."""
    torch.manual_seed(0)
    if kind == "linear":
        m = SparseLinear.from_dense(nn.Linear(32, 32), sparsity=0.5, block=16, mode="dense")
        x = torch.randn(3, 32)
    else:
        m = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), sparsity=0.5, block=16, mode="dense")
        x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        m.weight.add_(1.0)  # values in the pruned blocks too
    y_grad = m(x)
    with torch.no_grad():
        y_nograd = m(x)
        ref = (nn.functional.linear(x, m.dense_weight(), m.bias) if kind == "linear" else
               nn.functional.conv2d(x, m.dense_weight(), m.bias, padding=1))
    assert torch.allclose(y_nograd, y_grad.detach(), atol=1e-5) and torch.allclose(y_nograd, ref, atol=1e-5)
    with torch.no_grad():
        m.weight.sub_(1.0)  # clean again: the layer follows the edit
        assert torch.allclose(m(x), nn.functional.linear(x, m.dense_weight(), m.bias) if kind == "linear" else
                              nn.functional.conv2d(x, m.dense_weight(), m.bias, padding=1), atol=1e-5)


def test_a_nan_or_inf_in_pruned_columns_gives_the_same_finite_outputs_in_every_engine():
    """The sparse strategies skip pruned blocks; the dense layer multiplies the NaN/inf by their zeros. Every
    engine (and so every auto decision) must give the same non-finite outputs as the dense one."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 1] = False  # block column 1 pruned everywhere
    s = SparseLinear.from_dense(lin, block=16, mask=mask, mode="sparse")
    for bad in (float("nan"), float("inf")):
        x = torch.randn(5, 64)
        x[2, 20] = bad  # in the pruned block column
        x[4, 3] = -bad if bad == float("inf") else bad  # in a stored one
        finite = {}
        with torch.no_grad():
            for e in ("dense",) + tuple(accel.cpu.bsr.strategies_for(x.dtype)) + \
                    ops_bsr_linear.native_strategies(x, 16):
                with engines.force(bsr_linear=e):
                    y = ops_bsr_linear.module_bsr_linear(x, s.values, s.crow_indices, s.col_indices, (64, 64),
                                                         s.bias, allow_dense=True)
                finite[e] = torch.isfinite(y)
        for e, f in finite.items():
            assert torch.equal(f, finite["dense"]), e
        assert not finite["dense"][2].any() and finite["dense"][[0, 1, 3]].all()
    sc = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=2, dilation=2), sparsity=0.7, block=16, mode="sparse")
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=torch.channels_last)
    x[0, 3, 4, 4], x[1, 5, 0, 8] = float("nan"), float("inf")
    outs = {e: ops_bsr_conv.run_cpu(e, x, sc.values.detach(), sc.crow_indices, sc.col_indices, sc.weight_shape,
                                    sc.bias.detach(), (1, 1), (2, 2), (2, 2))
            for e in ops_bsr_conv.cpu_engines(16, 16, x.dtype, True)}
    for e, y in outs.items():
        assert torch.equal(torch.isfinite(y), torch.isfinite(outs["dense"])), e


@pytest.mark.parametrize("kind", ["linear_sparse", "linear_auto", "conv_sparse", "conv_auto"])
def test_a_nan_in_the_first_call_decides_nothing(measuring, kind):
    """The first call measures against a dense reference; a NaN/inf in its input must neither fail the call nor
    fix the decision for good: the call runs the default, the next finite call measures."""
    torch.manual_seed(0)
    mode = kind.split("_")[1]
    if kind.startswith("linear"):
        m = SparseLinear.from_dense(nn.Linear(64, 64), sparsity=0.5, block=16, mode=mode)
        x = torch.randn(8, 64)
        bad = x.clone()
        bad[3, 5] = float("nan")
        op = "bsr_linear"
    else:
        m = SparseConv2d.from_dense(nn.Conv2d(16, 32, 3, padding=1), sparsity=0.5, block=16, mode=mode)
        x = torch.randn(2, 16, 8, 8)
        bad = x.clone()
        bad[1, 0, 2, 2] = float("inf")
        op = "bsr_conv2d"
    with torch.no_grad():
        y = m(bad)
        assert not torch.isfinite(y).all()
        assert engines.decision(engines.last_key(op)) is None  # nothing decided from it
        m(x)
        assert engines.decision(engines.last_key(op)) is not None and engines.decision(engines.last_key(op)).measured


def test_int8_layers_decide_their_engines_under_autocast(measuring):
    """Under torch.autocast the measurement's fp32 reference must not turn into bf16 (every exact engine was
    rejected: 'no engine could run this call')."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(32, 16), nn.Conv2d(16, 16, 3)
    cases = [(QuantLinear.from_float(lin, "dynamic"), torch.randn(3, 32)),
             (QuantLinear.from_float(lin, "static", act_scale=0.02), torch.randn(3, 32)),
             (QuantConv2d.from_float(conv), torch.randn(2, 16, 6, 6)),
             (QuantConv2d.from_float(conv, "auto"), torch.randn(2, 16, 6, 6))]
    for m, x in cases:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("strategy", ["panels", "rows", "gather_bmm", "gather_bmm_t", "mkl"])
def test_int32_block_indices_run_every_strategy(strategy):
    torch.manual_seed(0)
    s = SparseLinear.from_dense(nn.Linear(64, 48), sparsity=0.5, block=16, mode="sparse")
    crow, col = s.crow_indices.int(), s.col_indices.int()
    x = torch.randn(70, 64)
    with torch.no_grad(), engines.force(bsr_linear=strategy):
        y = accel.bsr_linear(x, s.values, crow, col, (48, 64), s.bias)
        ref = nn.functional.linear(x, s.dense_weight(), s.bias)
    assert torch.allclose(y, ref, atol=1e-4)


def test_fp64_sparse_layers_stay_fp64_under_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16).double()
    conv = nn.Conv2d(16, 16, 3).double()
    s = SparseLinear.from_dense(lin, sparsity=0.5, block=16)
    sc = SparseConv2d.from_dense(conv, sparsity=0.5, block=16)
    x, img = torch.randn(3, 32, dtype=torch.float64), torch.randn(1, 16, 6, 6, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, yc = s(x), sc(img)
        assert lin(x).dtype == torch.float64  # what torch does
    assert y.dtype == yc.dtype == torch.float64
    assert torch.allclose(y, nn.functional.linear(x, s.dense_weight(), s.bias), atol=1e-12)


def test_on_off_variables_accept_any_case_and_refuse_other_values(accel_env):
    for v, on in (("OFF", False), ("No", False), ("0", False), ("TRUE", True), ("yes", True), ("1", True)):
        accel_env(ACCEL_ENGINE_MEASURE=v)
        assert engines.measuring_enabled() is on
    accel_env(ACCEL_ENGINE_MEASURE="maybe")
    with pytest.raises(engines.ConfigError, match="ACCEL_ENGINE_MEASURE='maybe'"):
        engines.measuring_enabled()


def test_int8_activations_refuse_a_k_that_could_overflow_int32():
    k = INT32_MAX_K + 1
    with pytest.raises(ValueError, match=f"K={k}.*exceeds {INT32_MAX_K}.*overflow"):
        QuantLinear(k, 2, mode="dynamic")
    w_q, w_s = torch.ones(2, k, dtype=torch.int8), torch.ones(2)
    with pytest.raises(ValueError, match="exceeds"):
        accel.int8_linear(torch.ones(1, k), w_q, w_s)
    lin = nn.Linear(k, 2, bias=False)
    with torch.no_grad():
        lin.weight[0], lin.weight[1] = 1.0, -1.0
        q = QuantLinear.from_float(lin, "auto")  # auto: float or weight-only forms only
        y = q(torch.ones(4, k))
    assert torch.allclose(y[0], torch.tensor([k, -k], dtype=torch.float32), rtol=1e-3)
    assert q.resolved_mode(torch.ones(4, k)) in ("weight_only", "float", "float_bf16")


def test_the_functional_int8_ops_refuse_bad_scales():
    torch.manual_seed(0)
    x, w_q = torch.randn(2, 16), torch.randint(-127, 128, (4, 16), dtype=torch.int8)
    for a in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="act_scale must be finite and > 0"):
            accel.int8_linear(x, w_q, torch.rand(4), act_scale=torch.tensor([a]))
    for bad in (float("nan"), -0.5):
        w_s = torch.rand(4)
        w_s[1] = bad
        with pytest.raises(ValueError, match="weight scales must be finite and >= 0"):
            accel.int8_linear(x, w_q, w_s)
        with pytest.raises(ValueError, match="weight scales must be finite and >= 0"):
            accel.int8_conv2d(torch.randn(1, 2, 5, 5), torch.ones(4, 2, 3, 3, dtype=torch.int8), w_s)


def test_a_dense_storage_conv_names_a_wrong_input_rank():
    m = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3), sparsity=0.5, block=16, mode="dense")
    for x in (torch.randn(3, 32), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"expected a \[B, 16, H, W\] or \[16, H, W\] input, got shape"):
            with torch.no_grad():
                m(x)
