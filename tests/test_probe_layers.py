"""Regressions for defects a prober found in the block-sparse conv, int8 block-sparse Linear, the
``.weight`` of converted layers and the conversion API (each test failed before its fix)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import accel
from accel.formats import BSRMatrix
from accel.ops.bsr_conv import run_cpu


def test_quantize_failing_on_a_later_layer_restores_the_model_and_names_it(monkeypatch):
    """An error while measuring a later layer must not leave the model half converted."""
    import accel.api as api

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    before = [model[0], model[2]]
    calls = {"n": 0}

    def measure(old, new, x, budget):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return 1.0, 0.5, 2.0
    monkeypatch.setattr(api, "_measure", measure)
    with pytest.raises(RuntimeError, match=r"quantize_: layer '2'.*boom.*restored"):
        accel.quantize_(model, example_inputs=(torch.randn(2, 16),))
    assert [model[0], model[2]] == before


def test_float64_layers_are_reported_and_kept():
    model = nn.Sequential(nn.Linear(8, 8).double())
    rows = accel.quantize_(model)
    assert type(model[0]) is nn.Linear and rows[0]["decision"] == "float" and "float64" in rows[0]["reason"]
    assert model(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


def test_quantize_reports_the_sparse_layers_it_leaves_as_they_are():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32))
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.5, block=16, convs=True, mode="sparse"))
    dense_sl = accel.SparseLinear.from_dense(nn.Linear(32, 32), 0.5, 16, mode="dense")
    model.append(dense_sl)
    rows = accel.quantize_(model)
    by_layer = {r["layer"]: r for r in rows}
    assert isinstance(model[0], accel.SparseConv2d)  # (no example inputs: the dense int8 conv is not timed against it)
    assert by_layer["0"]["decision"] == "sparse float" and "not measured" in by_layer["0"]["reason"]
    assert by_layer["3"]["decision"] == "sparse float" and "stored dense" in by_layer["3"]["reason"]


def test_gather_engine_index_is_keyed_on_the_whole_geometry():
    """The same structure tensors under two geometries with the same output size (kernel (1,3) vs (3,1),
    dilation 1 vs 2) must not reuse each other's gather index."""
    torch.manual_seed(0)
    c = o = bs = 16
    w = torch.randn(o, c, 3, 3)
    b = BSRMatrix.from_dense(w.permute(0, 2, 3, 1).reshape(o, -1), bs)
    x = torch.randn(1, c, 8, 8)
    for dil in ((1, 1), (2, 2)):
        y = run_cpu("gather", x, b.values, b.crow_indices, b.col_indices, (o, c, 3, 3), None, (3, 3), (0, 0), dil)
        torch.testing.assert_close(y, F.conv2d(x, w, None, (3, 3), (0, 0), dil), atol=1e-4, rtol=1e-4)


def test_dense_sparse_conv_keeps_fp64_and_the_input_layout_on_routed_geometries():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=2, dilation=2).double()
    sc = accel.SparseConv2d.from_dense(conv, 0.5, 16, mode="dense")
    x = torch.randn(1, 16, 6, 6, dtype=torch.float64)
    ref = F.conv2d(x, sc.dense_weight(), sc.bias, 1, 2, 2)
    y = sc(x)
    assert y.dtype == torch.float64 and (y - ref).abs().max() < 1e-12
    y_cl = sc(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and not y_cl.is_contiguous()


def test_compiled_sparse_quant_linear_backward_to_x():
    torch.manual_seed(0)
    layer = accel.SparseQuantLinear.from_float(nn.Linear(64, 48), sparsity=0.5, block=16)
    torch._dynamo.reset()
    g = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 64, requires_grad=True)
    g(x).sum().backward()
    xe = x.detach().clone().requires_grad_()
    layer(xe).sum().backward()
    torch.testing.assert_close(x.grad, xe.grad)


@pytest.mark.parametrize("make", [
    lambda: accel.SparseConv2d.from_dense(nn.Conv2d(16, 16, 3), 0.5, 16),
    lambda: accel.SparseQuantLinear.from_float(nn.Linear(32, 32), sparsity=0.5, block=16),
    lambda: accel.SparseLinear.from_dense(nn.Linear(32, 32), 0.5, 16),
], ids=["SparseConv2d", "SparseQuantLinear", "SparseLinear"])
def test_partial_state_dict_with_strict_false_leaves_sparse_layers_untouched(make):
    model = nn.Sequential(make(), nn.LayerNorm(4))
    keep = {k: v.clone() for k, v in model[0].state_dict().items() if isinstance(v, torch.Tensor)}
    res = model.load_state_dict({"1.weight": torch.ones(4), "1.bias": torch.zeros(4)}, strict=False)
    assert "0._extra_state" in res.missing_keys and all(k.startswith("0.") for k in res.missing_keys)
    for k, v in model[0].state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, keep[k])
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({"1.weight": torch.ones(4), "1.bias": torch.zeros(4)})


@pytest.mark.parametrize("make", [
    lambda: accel.QuantLinear.from_float(nn.Linear(8, 8)),
    lambda: accel.QuantEmbedding.from_float(nn.Embedding(10, 8)),
    lambda: accel.SparseLinear.from_dense(nn.Linear(32, 32), 0.5, 16),
    lambda: accel.SparseQuantLinear.from_float(nn.Linear(32, 32), sparsity=0.5, block=16),
], ids=["QuantLinear", "QuantEmbedding", "SparseLinear", "SparseQuantLinear"])
def test_assigning_weight_of_a_converted_layer_is_a_clear_error(make):
    """Hugging Face ``tie_weights`` assigns ``lm_head.weight``: a converted layer would ignore it."""
    layer = make()
    with pytest.raises(AttributeError, match="derived from the layer's int8 / block-sparse weights"):
        layer.weight = nn.Parameter(torch.zeros_like(layer.weight))
