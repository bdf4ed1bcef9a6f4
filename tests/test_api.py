import pytest
import torch
import torch.nn as nn

import accel
from accel import QuantConv2d, QuantLinear, SparseLinear
from accel.cpu import bsr as cpu_bsr
from accel.models import SeedCNN, TransformerMLP


def test_sparsify_one_shot_without_measurement():
    torch.manual_seed(0)
    model = TransformerMLP(256, 512)
    x = torch.randn(8, 256)
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.75, scope="layer"))
    assert [r["layer"] for r in rows] == ["fc1", "fc2"]
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in ("fc1", "fc2"))
    assert all(r["decision"] == "auto" and "not measured" in r["reason"] for r in rows)
    assert model.fc1.density == pytest.approx(0.25)
    assert model(x).shape == (8, 256)


def test_sparsify_measures_and_reports_per_batch(measuring):
    model = TransformerMLP(256, 512)
    rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.9, budget_s=0.02, batch_sizes=(1, 8)),
                           example_inputs=(torch.randn(4, 256),))
    assert [(r["layer"], r["batch"]) for r in rows] == [("fc1", 1), ("fc1", 8), ("fc2", 1), ("fc2", 8)]
    for r in rows:
        assert r["ms_before"] > 0 and r["ms_after"] > 0
        assert r["input_shape"] == [r["batch"], 256 if r["layer"] == "fc1" else 512]
        if r["decision"] == "kept dense":  # the in-model check found sparse slower inside the model
            assert "slower inside the model" in r["reason"] and type(model.get_submodule(r["layer"])) is nn.Linear
            continue
        engine = r["decision"].split(": ")[1]
        assert engine in cpu_bsr.STRATEGIES + ("dense", "native", "native_amx")
    assert "fc1" in accel.format_report(rows) and "batch" in accel.format_report(rows).splitlines()[0]


def test_example_inputs_as_kwargs_and_args_kwargs():
    class KwModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 8)

        def forward(self, x, *, scale=None):
            return self.b(self.a(x) * (1 if scale is None else scale))

    x = torch.randn(3, 64)
    for example in ({"x": x}, ((x,), {"scale": 2.0}), (x,)):
        model = KwModel()
        rows = accel.quantize_(model, accel.QuantConfig(budget_s=0.01), example_inputs=example)
        assert {r["layer"] for r in rows} == {"a", "b"} and all(r["input_shape"] == [3, 64] for r in rows
                                                                if r["layer"] == "a")
    with pytest.raises(TypeError, match="example_inputs must be"):
        accel.quantize_(KwModel(), example_inputs=42)


def test_quantize_skips_unsupported_and_reports():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
    rows = accel.quantize_(model)
    by = {r["layer"]: r for r in rows}
    assert by["0"]["decision"] == "float" and "groups=2" in by["0"]["reason"]
    assert isinstance(model[1], QuantConv2d) and isinstance(model[3], QuantLinear)
    assert model(torch.randn(2, 4, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="needs act_scales"):
        accel.quantize_(nn.Sequential(nn.Linear(4, 4)), accel.QuantConfig(linear_mode="static"))


def test_quantize_auto_decides_per_bucket_on_this_machine(measuring):
    model = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16))  # tiny: int8's fixed costs dominate
    rows = accel.quantize_(model, accel.QuantConfig(budget_s=0.02, batch_sizes=(1, 64), keep_float=False),
                           example_inputs=(torch.randn(2, 16),))
    assert isinstance(model[0], QuantLinear) and model[0].mode == "auto"
    for r in rows:
        form = r["decision"].split(": ")[1]
        assert form in ("dynamic", "weight_only", "float")
        assert model.get_submodule(r["layer"]).resolved_mode(torch.randn(r["batch"], r["input_shape"][1])) == form
    # one decision per (shape, bucket): another layer of the same shape reuses it, measured once
    twin = QuantLinear.from_float(nn.Linear(16, 4), "auto")
    assert twin.resolved_mode(torch.randn(1, 16)) == model[0].resolved_mode(torch.randn(1, 16))


def test_quantize_keeps_float_where_int8_is_slower(measuring, monkeypatch):
    import accel.api as api

    model = nn.Sequential(nn.Linear(16, 4))
    monkeypatch.setattr(api, "_measure", lambda old, new, x, budget: (1.0, 2.0, 0.5))  # int8 twice as slow
    cfg = accel.QuantConfig(batch_sizes=(1, 8), in_model=False)  # the rule on the layer alone (in-model: below)
    rows = accel.quantize_(model, cfg, example_inputs=(torch.randn(2, 16),))
    assert type(model[0]) is nn.Linear and all(r["decision"] == "float" and "kept float" in r["reason"] for r in rows)
    calls = iter([(1.0, 2.0, 0.5), (2.0, 1.0, 2.0)])  # slower at batch 1, faster at 8: int8 it is
    monkeypatch.setattr(api, "_measure", lambda old, new, x, budget: next(calls))
    accel.quantize_(model, cfg, example_inputs=(torch.randn(2, 16),))
    assert isinstance(model[0], QuantLinear)


def test_quantize_embeddings_weight_only():
    emb = nn.Embedding(100, 32)
    model = nn.Sequential(emb, nn.Linear(32, 4))
    ids = torch.randint(0, 100, (2, 7))
    ref = model(ids).detach()
    accel.quantize_(model)
    assert isinstance(model[0], accel.QuantEmbedding)
    assert accel.quant.sqnr(ref, model(ids)) > 30
    with pytest.raises(IndexError, match=r"out of range \[0, 100\)"):
        model[0](torch.tensor([100]))


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


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_load_checks_the_target_and_changes_nothing_on_failure(tmp_path):
    src = nn.Sequential(nn.Linear(256, 64))
    accel.sparsify_(src, accel.SparsityConfig(sparsity=0.5))
    path = str(tmp_path / "m.safetensors")
    accel.save(src, path)
    other = nn.Sequential(nn.Linear(7, 7))  # a different architecture
    before = _state(other)
    with pytest.raises(ValueError, match=r"does not fit this model:\n  0: the file's SparseLinear is \(in, out\) = "
                                         r"\(256, 64\), the model's layer is \(7, 7\)"):
        accel.load(other, path)
    assert type(other[0]) is nn.Linear and _same(before, _state(other))
    # a file whose other layers do not fit: checked on a copy, the model is untouched
    src2 = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 7))
    accel.sparsify_(src2, accel.SparsityConfig(sparsity=0.5), filter_fn=lambda m, n: n == "0")
    accel.save(src2, path)
    wrong = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 9), nn.Linear(9, 2))
    before = _state(wrong)
    with pytest.raises(ValueError, match="does not load into this model"):
        accel.load(wrong, path)
    assert type(wrong[0]) is nn.Linear and _same(before, _state(wrong))


def test_load_keeps_the_models_dtype(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).to(torch.bfloat16)
    accel.sparsify_(src, accel.SparsityConfig(sparsity=0.5))
    accel.quantize_(src, filter_fn=lambda m, n: type(m) is nn.Linear)
    path = str(tmp_path / "bf16.safetensors")
    accel.save(src, path)
    dst = accel.load(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)).to(torch.bfloat16), path)
    assert dst[0].values.dtype == torch.bfloat16
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert dst(x).dtype == torch.bfloat16 and torch.equal(dst(x), src(x))


def test_load_rejects_corrupt_files(tmp_path):
    src = nn.Sequential(nn.Linear(256, 64))
    accel.sparsify_(src, accel.SparsityConfig(sparsity=0.5))
    path = tmp_path / "m.safetensors"
    accel.save(src, str(path))
    data = bytearray(path.read_bytes())
    # corrupt crow_indices: find it through the header and write a huge row pointer
    import json
    import struct
    hlen = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + hlen])
    start = 8 + hlen + header["0.crow_indices"]["data_offsets"][0]
    data[start + 8:start + 16] = struct.pack("<q", 10 ** 9)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    target = nn.Sequential(nn.Linear(256, 64))
    before = _state(target)
    with pytest.raises(ValueError, match="crow_indices"):
        accel.load(target, str(bad))
    assert type(target[0]) is nn.Linear and _same(before, _state(target))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        accel.load(target, str(garbage))


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


class _Slow(nn.Module):
    """A converted layer that computes the right thing, slowly."""

    def __init__(self, inner: nn.Module, delay_s: float):
        super().__init__()
        self.inner, self.delay_s = inner, delay_s

    def forward(self, x):
        import time

        time.sleep(self.delay_s)
        return self.inner(x)


def test_in_model_check_reverts_only_layers_slower_inside_the_model(accel_env, monkeypatch):
    """Each converted layer is timed where it sits in the whole model against its fallback; a layer
    slower there at every batch size is put back (and reported), one that is not keeps its conversion."""
    from accel.api import _in_model_check

    accel_env(ACCEL_ENGINE_MEASURE="1")
    monkeypatch.setattr(accel.engines, "_contended", lambda mark=None: False)  # the suite may share the machine
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    orig0, orig2 = model[0], model[2]
    model[0] = _Slow(orig0, 0.003)                  # converted, but slower than its fallback by far
    fallback2 = _Slow(orig2, 0.003)                 # converted layer 2 is the faster one
    rows = [{"layer": "0", "decision": "int8 auto: dynamic", "reason": "1.50x float"},
            {"layer": "2", "decision": "int8 auto: dynamic", "reason": "1.20x float"}]
    x = torch.randn(4, 16)
    reverted = _in_model_check(model, {"0": orig0, "2": fallback2}, [(4, (x,), {})], 0.5, rows, "kept float")
    assert set(reverted) == {"0"} and model[0] is orig0 and model[2] is orig2
    assert rows[0]["decision"] == "kept float" and "slower inside the model" in rows[0]["reason"]
    assert rows[1]["decision"] == "int8 auto: dynamic"
    torch.testing.assert_close(model(x), nn.Sequential(orig0, nn.ReLU(), orig2)(x))


def test_in_model_check_changes_nothing_when_the_machine_got_busy(accel_env, monkeypatch):
    """Quiet when the check starts, busy by its end (accel's threads waited for a CPU): nothing is reverted."""
    from accel.api import _in_model_check

    accel_env(ACCEL_ENGINE_MEASURE="1")
    looks = []
    monkeypatch.setattr(accel.engines, "_contended", lambda mark=None: looks.append(mark) or mark is not None)
    model = nn.Sequential(_Slow(nn.Linear(4, 4), 0.003))
    slow = model[0]
    assert _in_model_check(model, {"0": nn.Linear(4, 4)}, [(1, (torch.randn(1, 4),), {})], 0.2, [], "kept float") == {}
    assert model[0] is slow and len(looks) == 2


def test_in_model_check_is_off_without_measuring(accel_env):
    from accel.api import _in_model_check

    accel_env(ACCEL_ENGINE_MEASURE="0")
    model = nn.Sequential(_Slow(nn.Linear(4, 4), 0.002))
    slow = model[0]
    assert _in_model_check(model, {"0": nn.Linear(4, 4)}, [(1, (torch.randn(1, 4),), {})], 0.5, [], "kept float") == {}
    assert model[0] is slow
