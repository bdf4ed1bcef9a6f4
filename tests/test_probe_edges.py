"""Edge cases a fuzzer of the public API found: no input channels, fp16 outputs that overflow while engines are
measured, a layer with every block pruned fed NaN, the functional ops' validation of scales, shapes and
non-tensor arguments, and errors that must not depend on whether engines are measured."""

import pytest
import torch
import torch.nn as nn

from accel import QuantConv2d, QuantLinear, SparseConv2d, SparseLinear, bsr_linear, engines, int8_bsr_linear
from accel.formats import BSRMatrix


@pytest.fixture(params=["0", "1"], ids=["defaults", "measured"])
def measure(request, monkeypatch, accel_env):
    accel_env(ACCEL_ENGINE_MEASURE=request.param)
    monkeypatch.setattr(engines, "BUDGET_S", 0.01)
    monkeypatch.setattr(engines, "MIN_ROUNDS", 2)
    monkeypatch.setattr(engines, "_contended", lambda mark=None: False)
    return request.param


@pytest.mark.parametrize("mode", ["dynamic", "auto"])
def test_quant_conv_without_input_channels_gives_the_bias(mode, measure):
    conv = nn.Conv2d(0, 3, 3)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    q = QuantConv2d.from_float(conv, mode, activation="relu")
    y = q(torch.ones(2, 0, 5, 5))  # (oneDNN with K = 0 killed the process)
    assert y.shape == (2, 3, 3, 3) and torch.equal(y[:, :, 1, 2], torch.tensor([[1.0, 0.0, 3.0]] * 2))


def test_fp16_outputs_that_overflow_are_inf_when_measuring_too(measure):
    torch.manual_seed(0)
    lin = nn.Linear(128, 3).half()
    conv = nn.Conv2d(16, 4, 3).half()
    with torch.no_grad():
        lin.weight.uniform_(0, 1)
        conv.weight.uniform_(0, 1)
    x = torch.full((5, 128), 3e4, dtype=torch.float16)
    xc = torch.full((2, 16, 6, 6), 3e4, dtype=torch.float16)
    with torch.no_grad():
        for mode in ("auto", "sparse"):
            y = SparseLinear.from_dense(lin, sparsity=0.25, block=16, mode=mode)(x)
            assert torch.isinf(y).any() and y.dtype == torch.float16
            yc = SparseConv2d.from_dense(conv, sparsity=0.25, block=16, mode=mode)(xc)
            assert torch.isinf(yc).any()
        assert torch.isinf(QuantLinear.from_float(lin, "auto")(x)).any()
        assert torch.isinf(QuantConv2d.from_float(conv, "auto")(xc)).any()


@pytest.mark.parametrize("mode", ["auto", "sparse", "dense"])
def test_every_block_pruned_still_gives_nan_rows_for_nan_inputs(mode, measure):
    s = SparseLinear.from_dense(nn.Linear(64, 32), sparsity=1.0, block=16, mode=mode)
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    x[2, 0] = float("inf")
    with torch.no_grad():
        y = s(x)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.equal(y[0], s.bias.detach())


def _int8_bsr_args():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    bsr = BSRMatrix.from_dense(w, 16)
    ws = torch.rand(32) + 0.01
    vq = torch.randint(-127, 128, bsr.values.shape, dtype=torch.int8)
    return vq, ws, bsr.crow_indices, bsr.col_indices


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_int8_bsr_linear_refuses_bad_weight_scales(bad):
    vq, ws, crow, col = _int8_bsr_args()
    ws = ws.clone()
    ws[3] = bad
    with pytest.raises(ValueError, match="weight scales must be finite and >= 0"):
        int8_bsr_linear(torch.randn(2, 64), vq, ws, crow, col, (32, 64))


@pytest.mark.parametrize("shape", [(32.9, 64), (32, "64"), (32,), (True, 64), (-32, 64)])
def test_functional_ops_refuse_shapes_that_are_not_ints(shape):
    vq, ws, crow, col = _int8_bsr_args()
    with pytest.raises(ValueError, match="shape must be"):
        int8_bsr_linear(torch.randn(2, 64), vq, ws, crow, col, shape)
    bsr = BSRMatrix.from_dense(torch.randn(32, 64), 16)
    with pytest.raises(ValueError, match="shape must be"):
        bsr_linear(torch.randn(2, 64), bsr.values, bsr.crow_indices, bsr.col_indices, shape)


def test_functional_ops_name_non_tensor_arguments():
    bsr = BSRMatrix.from_dense(torch.randn(32, 64), 16)
    with pytest.raises(TypeError, match="x must be a tensor"):
        bsr_linear([[1.0] * 64], bsr.values, bsr.crow_indices, bsr.col_indices, (32, 64))
    with pytest.raises(TypeError, match="crow_indices must be a tensor"):
        bsr_linear(torch.randn(2, 64), bsr.values, None, bsr.col_indices, (32, 64))
    vq, ws, crow, col = _int8_bsr_args()
    with pytest.raises(TypeError, match="w_scale must be a tensor"):
        int8_bsr_linear(torch.randn(2, 64), vq, [1.0] * 32, crow, col, (32, 64))


def test_integer_inputs_give_the_same_error_measured_or_not(measure):
    bsr = BSRMatrix.from_dense(torch.randn(32, 64), 16)
    with pytest.raises(TypeError, match="dtype"):
        bsr_linear(torch.ones(2, 64, dtype=torch.long), bsr.values.long(), bsr.crow_indices, bsr.col_indices, (32, 64))


def test_dense_storage_layers_give_accels_errors():
    s = SparseLinear.from_dense(nn.Linear(16, 16), sparsity=0.5, block=16, mode="dense")
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        s(torch.randn(2, 8))
    with pytest.raises(TypeError, match="float64"):
        s(torch.randn(2, 16, dtype=torch.float64))
    c = SparseConv2d.from_dense(nn.Conv2d(16, 16, 3), sparsity=0.5, block=16, mode="dense")
    with pytest.raises(ValueError, match="16"):
        c(torch.randn(1, 8, 5, 5))
    with pytest.raises(TypeError, match="float64"):
        c(torch.randn(1, 16, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        c(torch.randn(1, 16, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: a different input dtype is what it is for
        assert c(torch.randn(1, 16, 5, 5)).dtype == torch.bfloat16
