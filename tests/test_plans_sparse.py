"""Resolved calls of the block-sparse layers (``accel.ops._plans``): a ``SparseLinear`` / ``SparseConv2d`` in
sparse storage remembers, per kind of input, the strategy it runs (or the densified weight of an ``auto``
layer), so a settled inference call skips the dispatch chain. The settled call must give exactly what the
dispatch path gives, and the plan must never outlive the layer's tensors, settings or engine decisions."""

import copy
import importlib

import pytest
import torch
import torch.nn as nn

from accel import SparseConv2d, SparseLinear, bsr_conv2d, bsr_linear, engines
from accel.ops import _plans

LINEAR_ENGINES = engines.known_ops()["bsr_linear"]
CONV_ENGINES = ("gather", "im2col_gather_bmm", "im2col_rows", "im2col_panels", "dense", "native", "native_nchw",
                "native_amx", "native_amx_padded")


def _skip_unavailable(engine, dtype):
    """The native engines run where their kernels build (AVX-512; AMX for bf16 only; native_nchw: fp32)."""
    ops = importlib.import_module("accel.ops.bsr_linear")
    base = "native" if engine == "native_nchw" else engine.removesuffix("_padded")
    if engine.startswith("native") and (base not in ops.native_strategies(torch.zeros(1, 32, dtype=dtype), 16) or
                                        engine == "native_nchw" and dtype != torch.float32):
        pytest.skip(f"{engine} does not run {dtype} here")


def _linear(dtype=torch.float32, mode="auto"):
    torch.manual_seed(0)
    return SparseLinear.from_dense(nn.Linear(96, 64), sparsity=0.5, block=16, mode=mode).to(dtype)


def _conv(dtype=torch.float32, mode="auto"):
    torch.manual_seed(0)
    return SparseConv2d.from_dense(nn.Conv2d(32, 32, 3, padding=1), sparsity=0.5, block=16, mode=mode).to(dtype)


def _op_linear(s, x):
    return bsr_linear(x, s.values, s.crow_indices, s.col_indices, (s.out_features, s.in_features), s.bias,
                      allow_dense=s.mode == "auto")


def _op_conv(s, x):
    return bsr_conv2d(x, s.values, s.crow_indices, s.col_indices, s.weight_shape, s.bias, s.stride, s.padding,
                      s.dilation, allow_dense=s.mode == "auto")


@pytest.mark.parametrize("engine, dtype", [(e, d) for e in LINEAR_ENGINES for d in (torch.float32, torch.bfloat16)
                                           if e != "mkl" or d == torch.float32])  # (MKL's BSR matmul: fp32/fp64)
def test_settled_sparse_linear_equals_the_op(engine, dtype, accel_env):
    _skip_unavailable(engine, dtype)
    accel_env(ACCEL_ENGINE=f"bsr_linear={engine}")
    s = _linear(dtype)
    with torch.no_grad():
        for shape in ((5, 96), (2, 7, 96), (1, 96), (3, 4, 96)):
            x = torch.randn(shape, dtype=dtype)
            xs = torch.randn(shape[0], 96, *shape[1:-1], dtype=dtype).movedim(1, -1)  # strided N-D
            for inp in (x, xs) if len(shape) == 3 else (x,):
                for _ in range(2):  # the second call runs the plan the first made
                    y = s(inp)
                    assert y.dtype == dtype and y.shape == (*shape[:-1], 64)
                    assert torch.equal(y, _op_linear(s, inp)), (engine, shape)
        assert s in _plans._PLANS


@pytest.mark.parametrize("engine", CONV_ENGINES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_settled_sparse_conv_equals_the_op(engine, channels_last, dtype, accel_env):
    _skip_unavailable(engine, dtype)
    accel_env(ACCEL_ENGINE=f"bsr_conv2d={engine}")
    s = _conv(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for b, hw in ((1, 9), (3, 9), (2, 5), (2, 1)):
            x = torch.randn(b, 32, hw, hw, dtype=dtype).contiguous(memory_format=fmt)
            for _ in range(2):
                y = s(x)
                assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
                assert torch.equal(y, _op_conv(s, x)), (engine, b, hw)
        x = torch.randn(2, 32, 9, 9, dtype=dtype).contiguous(memory_format=fmt)
        s(x)
        x[1, 3, 4, 0] = float("nan")  # the settled call: the windows reading it NaN in every output, as the op's
        y = s(x)
        assert y[1, :, 3:6, :2].isnan().all() and not y[0].isnan().any()
        torch.testing.assert_close(y, _op_conv(s, x), rtol=0, atol=0, equal_nan=True)


def test_a_plan_follows_the_layer_and_the_decisions(accel_env, monkeypatch):
    """A settled call resolves nothing; in-place edits, an in-place load, a mode change, a move and a changed
    engine decision each make the next call resolve again; training calls (autograd) never take a plan; a copy
    has none."""
    linear_ops = importlib.import_module("accel.ops.bsr_linear")  # (accel.ops.bsr_linear is also the op)
    resolved = []
    real = linear_ops._resolve_cpu
    monkeypatch.setattr(linear_ops, "_resolve_cpu", lambda *a: resolved.append(1) or real(*a))
    accel_env(ACCEL_ENGINE="bsr_linear=dense")
    s = _linear()
    x = torch.randn(4, 96)
    with torch.no_grad():
        y0 = s(x)
        s(x)
        s(x.view(2, 2, 96))  # another rank: its own kind of input
        s(x.view(2, 2, 96))
        assert len(resolved) == 2
        s.values.mul_(2)  # in place: the densified weight the plan holds is stale
        assert torch.allclose(s(x) - s.bias, 2 * (y0 - s.bias), rtol=1e-5, atol=1e-5)
        assert torch.equal(s(x), _op_linear(s, x))
        other = _linear()
        other.values.mul_(-1)
        s.load_state_dict(other.state_dict())  # in place (same structure)
        assert torch.equal(s(x), _op_linear(other, x))
        twin = copy.deepcopy(s)
        assert twin not in _plans._PLANS and torch.equal(twin(x), s(x))
    accel_env(ACCEL_ENGINE="bsr_linear=gather_bmm")  # a decision changed: the plan is stale
    with torch.no_grad():
        n = len(resolved)
        assert torch.equal(s(x), _op_linear(s, x)) and len(resolved) == n + 1
        s.mode = "sparse"
        assert torch.equal(s(x), _op_linear(s, x)) and len(resolved) == n + 2
        s(x)
        assert len(resolved) == n + 2
    y = s(x.requires_grad_())  # autograd: the op path, gradients reach the stored blocks
    y.sum().backward()
    assert s.values.grad is not None and x.grad is not None
    with torch.no_grad():
        s(x)
        assert s in _plans._PLANS
        s.bfloat16()  # _apply: the plan holds the tensors being replaced
        assert s not in _plans._PLANS
        assert s(x.detach().bfloat16()).dtype == torch.bfloat16


def test_conv_plan_is_dropped_by_a_move_and_refuses_other_inputs(accel_env):
    accel_env(ACCEL_ENGINE="bsr_conv2d=dense")
    s = _conv()
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        s(x)
        s(x)
        with pytest.raises(ValueError, match="32"):
            s(torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last))
        with pytest.raises((TypeError, ValueError), match="dtype|Half|float16"):
            s(x.half())
        s.double()
        assert s not in _plans._PLANS
        assert s(x.double()).dtype == torch.float64


INT8_BSR_STRATEGIES = engines.known_ops()["int8_bsr_linear"]


@pytest.mark.parametrize("strategy", INT8_BSR_STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_settled_sparse_quant_linear_follows_the_layer(strategy, dtype, accel_env, monkeypatch):
    """A ``SparseQuantLinear`` settles per kind of input like the float layers: the settled call equals the op bit for
    bit (every strategy, ranks, bf16 in and out), resolves nothing, and in-place edits, a replaced bias, a changed
    activation, an in-place load and a move each make the next call resolve again."""
    from accel import SparseQuantLinear, int8_bsr_linear

    cpu_int8_bsr = importlib.import_module("accel.cpu.int8_bsr")
    if strategy not in cpu_int8_bsr.strategies(127):
        pytest.skip(f"{strategy} does not run here")
    ops = importlib.import_module("accel.ops.int8_bsr_linear")
    resolved = []
    real = ops._resolve_cpu
    monkeypatch.setattr(ops, "_resolve_cpu", lambda *a: resolved.append(1) or real(*a))
    accel_env(ACCEL_ENGINE=f"int8_bsr_linear={strategy}")
    torch.manual_seed(0)
    q = SparseQuantLinear.from_sparse(SparseLinear.from_dense(nn.Linear(96, 64), sparsity=0.5, block=16))
    q.act_qmax = 127

    def op(x):
        return int8_bsr_linear(x, q.values_q, q.weight_scale, q.crow_indices, q.col_indices, (64, 96), q.bias,
                               activation=q.activation, act_qmax=q.act_qmax)
    with torch.no_grad():
        for shape in ((5, 96), (2, 7, 96), (1, 96)):
            x = torch.randn(shape).to(dtype)
            for _ in range(2):
                y = q(x)
                assert y.dtype == dtype and y.shape == (*shape[:-1], 64)
                assert torch.equal(y, op(x)), (strategy, shape)
        assert len(resolved) == 3 and q in _plans._PLANS
        x = torch.randn(5, 96).to(dtype)
        q(x)
        assert len(resolved) == 3
        q.values_q.neg_()  # in place
        assert torch.equal(q(x), op(x)) and len(resolved) == 4
        q.bias = torch.randn(64)  # a new tensor
        assert torch.equal(q(x), op(x)) and len(resolved) == 5
        q.activation = "relu"
        assert torch.equal(q(x), op(x)) and bool((q(x) >= 0).all()) and len(resolved) == 6
        other = copy.deepcopy(q)
        other.weight_scale.mul_(3)
        q.load_state_dict(other.state_dict())
        assert torch.equal(q(x), op(x)) and len(resolved) == 7
        q.to(torch.float64)  # _apply drops the plans (float buffers follow; the scales stay fp32)
        assert q not in _plans._PLANS
