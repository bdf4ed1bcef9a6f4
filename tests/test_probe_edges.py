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


def test_fp16_quant_embedding_scales_rows_of_tiny_values_in_fp32():
    from accel.modules import QuantEmbedding

    emb = nn.Embedding(3, 8)
    with torch.no_grad():
        emb.weight[1] *= 1e-5
        emb.weight[2] *= 1e-6  # its scale underflows in fp16
    q = QuantEmbedding.from_float(emb.half())
    idx = torch.tensor([0, 1, 2])
    want = (q.weight_q[idx].float() * q.weight_scale[idx, None]).half()
    out = q(idx)
    assert torch.equal(out, want) and out[2].abs().max() > 0


@pytest.mark.parametrize("engine", [None, "fbgemm", "onednn", "int_mm"])
def test_activations_whose_inverse_scale_overflows_follow_the_per_row_rule(engine):
    """absmax ~1e-38: qmax / absmax is past fp32's range; one row and two rows give the same outputs (the
    per-row rule: inverse 0, so zeros), and no numpy overflow warning reaches the user."""
    import warnings

    from accel.cpu import int8 as C
    from accel.quant import quantize_weight

    if engine is not None and engine not in C.exact_engines(127, 8):
        pytest.skip(f"{engine} is not exact here")
    wq, ws = quantize_weight(torch.randn(4, 8))
    x = torch.randn(1, 8) * 1e-38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = C.linear_int8_cpu(x, wq, ws, None, qmax=127, engine=engine)
        two = C.linear_int8_cpu(x.repeat(2, 1), wq, ws, None, qmax=127, engine=engine)
    ref = C.linear_int8_reference(x, wq, ws, None, qmax=127)
    assert torch.equal(one, ref) and torch.equal(two[:1], ref) and torch.equal(two[1:], ref)


def test_static_scale_whose_inverse_overflows_is_refused():
    layer = QuantLinear(8, 4)
    with pytest.raises(ValueError, match="inverse is finite in fp32, got 1e-39"):
        layer.set_act_scale(1e-39)
    with pytest.raises(TypeError, match="act_scale must be a number or a one-element float tensor, got str '0.1'"):
        layer.set_act_scale("0.1")
    layer.set_act_scale(torch.tensor([0.25]))
    assert layer.act_scale.item() == 0.25


@pytest.mark.parametrize("measure", ["1", "0"])
def test_quant_conv_without_output_channels(accel_env, measure):
    accel_env(ACCEL_ENGINE_MEASURE=measure)
    layer = QuantConv2d(3, 0, 3, padding=1)
    assert layer(torch.randn(2, 3, 5, 5)).shape == (2, 0, 5, 5)


def test_functional_int8_ops_name_bad_arguments():
    from accel.ops.int8 import int8_conv2d, int8_linear

    wq, ws = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(TypeError, match="x must be a tensor, got list"):
        int8_linear([[1.0] * 8], wq, ws)
    with pytest.raises(TypeError, match="bias must be a tensor or None, got list"):
        int8_linear(torch.randn(2, 8), wq, ws, [0.0] * 4)
    with pytest.raises(ValueError, match="act_qmax must be 63, 127 or 0 .*got 63.0"):
        int8_linear(torch.randn(2, 8), wq, ws, act_qmax=63.0)
    with pytest.raises(TypeError, match="weight must be a tensor, got NoneType"):
        int8_conv2d(torch.randn(1, 2, 4, 4), None, ws)
    for bad in ({"stride": True}, {"padding": 1.5}, {"dilation": (1, 2.0)}):
        with pytest.raises(ValueError, match="must be ints or pairs of ints"):
            QuantConv2d(3, 4, 3, **bad)


def test_empty_batches_get_nn_conv2d_strides():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(0, 16, 9, 9)
    for layer in (SparseConv2d.from_dense(conv, sparsity=0.5, block=16), QuantConv2d.from_float(conv)):
        assert layer(x).shape == conv(x).shape and layer(x).stride() == conv(x).stride()
