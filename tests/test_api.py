import pytest
import torch
import torch.nn as nn

import accel
from accel import QuantConv2d, QuantLinear, SparseLinear
from accel.models import SeedCNN, TransformerMLP


def test_sparsify_one_shot_without_measurement():
    torch.manual_seed(0)
    model = TransformerMLP(256, 512)
    x = torch.randn(8, 256)
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75, scope="layer"))
    assert [r["layer"] for r in rows] == ["fc1", "fc2"]
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in ("fc1", "fc2"))
    assert all(r["decision"] == "sparse" and "not measured" in r["reason"] for r in rows)
    assert model.fc1.density == pytest.approx(0.25)
    assert model(x).shape == (8, 256)


def test_sparsify_measures_and_reports():
    model = TransformerMLP(256, 512)
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.9, budget_s=0.05), example_inputs=(torch.randn(4, 256),))
    for r in rows:
        assert r["decision"] in ("sparse", "dense") and r["ms_before"] > 0 and r["ms_after"] > 0
        assert r["input_shape"] == [4, r["layer"] == "fc1" and 256 or 512]
        assert (r["decision"] == "sparse") == (r["speedup"] >= 1.0)
        assert model.get_submodule(r["layer"]).mode == r["decision"]


def test_quantize_skips_unsupported_and_reports():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    rows = accel.quantize_(model)
    by = {r["layer"]: r for r in rows}
    assert by["0"]["decision"] == "float" and "groups=2" in by["0"]["reason"]
    assert isinstance(model[1], QuantConv2d) and isinstance(model[3], QuantLinear)
    assert model(torch.randn(2, 4, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="needs act_scales"):
        accel.quantize_(nn.Sequential(nn.Linear(4, 4)), accel.QuantConfig(linear_mode="static"))


def test_quantize_measured_keeps_float_where_slower():
    model = nn.Sequential(nn.Linear(16, 4))  # tiny: int8's fixed costs dominate
    rows = accel.quantize_(model, accel.QuantConfig(budget_s=0.05), example_inputs=(torch.randn(1, 16),))
    r = rows[0]
    assert r["ms_before"] > 0 and (r["decision"] == "float") == (r["speedup"] < 1.0)
    assert isinstance(model[0], nn.Linear if r["decision"] == "float" else QuantLinear)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SeedCNN()
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75), filter_fn=lambda m, n: m.out_features > 32)
    accel.quantize_(model, accel.QuantConfig(linear_mode="static", act_scales={"classifier.3": 0.05}),
                    filter_fn=lambda m, n: n != "features.0")
    x = torch.randn(3, 3, 32, 32)
    path = str(tmp_path / "m.safetensors")
    accel.save(model, path)
    loaded = accel.load(SeedCNN(), path)
    assert isinstance(loaded.classifier[1], SparseLinear) and isinstance(loaded.features[3], QuantConv2d)
    assert loaded.classifier[3].mode == "static" and type(loaded.features[0]) is nn.Conv2d
    assert torch.equal(loaded(x), model(x))
    torch.save(SeedCNN().state_dict(), tmp_path / "plain.pt")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not written by accel.save"):
        accel.load(SeedCNN(), str(tmp_path / "other.safetensors"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compressed_model_compiles(backend):
    torch.compiler.reset()
    torch.manual_seed(0)
    model = SeedCNN().eval()
    accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75), filter_fn=lambda m, n: m.out_features > 32)
    accel.quantize_(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
