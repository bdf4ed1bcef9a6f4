"""Regressions for defects a workflow prober found on real architectures (each test failed before its fix):
tracing converted models (torch.jit.trace, torch.export of a forward reading ``layer.weight``), a weight read
inside a forward autograd records, Linear subclasses with their own forward, calls on already converted models,
and weights a model uses through its own code (fused mixture-of-experts tables)."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import accel
from accel import prune
from accel.formats import bsr_to_dense


def _models():
    torch.manual_seed(0)
    lin, conv = nn.Linear(64, 48), nn.Conv2d(16, 32, 3, padding=1)
    return {
        "QuantLinear dynamic": (accel.QuantLinear.from_float(lin, "dynamic"), torch.randn(4, 64), torch.randn(9, 64)),
        "QuantLinear auto 3-D": (accel.QuantLinear.from_float(lin, "auto"), torch.randn(2, 3, 64),
                                 torch.randn(5, 7, 64)),
        "QuantConv2d": (accel.QuantConv2d.from_float(conv), torch.randn(2, 16, 8, 8), torch.randn(3, 16, 8, 8)),
        "SparseLinear": (accel.SparseLinear.from_dense(lin, sparsity=0.5, block=16), torch.randn(4, 64),
                         torch.randn(9, 64)),
        "SparseQuantLinear": (accel.SparseQuantLinear.from_sparse(accel.SparseLinear.from_dense(lin, sparsity=0.5,
                                                                                                 block=16)),
                              torch.randn(4, 64), torch.randn(9, 64)),
    }


@pytest.mark.parametrize("kind", list(_models()))
def test_jit_trace_of_converted_layers(kind):
    m, x, other = _models()[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        traced = torch.jit.trace(m.eval(), (x,))
    with torch.no_grad():
        assert torch.equal(traced(x), m(x))
        assert torch.equal(traced(other), m(other))  # another batch size: the op, not a frozen path


class _ReadsWeight(nn.Module):
    """Casts its input to a layer's weight dtype, as Hugging Face ViT / T5 / CLIP do."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32, 32)

    def forward(self, x):
        y = self.conv(x.to(self.conv.weight.dtype)).mean((2, 3))
        return self.fc(y.to(self.fc.weight.dtype))


@pytest.mark.parametrize("how", ["quantize", "sparsify"])
def test_torch_export_of_a_forward_reading_the_weight(how):
    torch.manual_seed(0)
    m = _ReadsWeight().eval()
    if how == "quantize":
        accel.quantize_(m, accel.QuantConfig(linear_mode="dynamic", conv_mode="dynamic", measure=False))
    else:
        accel.sparsify_(m, accel.SparsityConfig(block=16, sparsity=0.5, convs=True, measure=False))
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = m(x)
    exported = torch.export.export(m, (x,)).module()
    with torch.no_grad():
        assert torch.allclose(exported(x), y, atol=1e-6)


def test_a_decoder_tied_to_a_sparse_layers_weight_trains_it():
    """``F.linear(z, enc.weight.t())`` inside a forward autograd records: the weight is differentiable in the
    SparseLinear's values (it was an inference tensor: 'cannot be saved for backward')."""
    torch.manual_seed(0)
    enc = accel.SparseLinear.from_dense(nn.Linear(32, 16), sparsity=0.5, block=16)
    dense = nn.Linear(32, 16)
    with torch.no_grad():
        dense.weight.copy_(enc.dense_weight())
        dense.bias.copy_(enc.bias)
    x = torch.randn(4, 32)
    out = nn.functional.linear(enc(x), enc.weight.t())
    out.square().sum().backward()
    ref = nn.functional.linear(dense(x), dense.weight.t())
    ref.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    kept = bsr_to_dense(torch.ones_like(enc.values), enc.crow_indices, enc.col_indices, (16, 32))  # stored blocks
    assert enc.values.grad is not None
    assert torch.allclose(bsr_to_dense(enc.values.grad, enc.crow_indices, enc.col_indices, (16, 32)),
                          dense.weight.grad * kept, atol=1e-4)


class _MyLinear(nn.Linear):  # like transformers' FalconLinear
    def forward(self, x):
        return x @ self.weight.T + self.bias


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.fc1, self.fc2, self.plain = _MyLinear(64, 256), _MyLinear(256, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.emb.weight  # tied output head

    def forward(self, ids):
        return self.head(self.plain(self.fc2(torch.relu(self.fc1(self.emb(ids))))))


def test_linear_subclasses_with_their_own_forward_are_left_out_and_said_so():
    torch.manual_seed(0)
    m = _LM()
    with pytest.warns(UserWarning, match="cannot convert.*'fc1'.*_MyLinear subclasses Linear with its own forward"):
        masks = prune.prune_(m, 0.5, block=32)
    assert sorted(masks) == ["plain"]
    accel.sparsify_(m, masks=masks)  # the documented flow goes through
    assert isinstance(m.plain, accel.SparseLinear) and type(m.fc1) is _MyLinear
    m = _LM()
    rows = accel.sparsify_(m, accel.SparsityConfig(measure=False))
    why = {r["layer"]: r["reason"] for r in rows}
    assert "subclasses Linear with its own forward" in why["fc1"] and "subclasses" in why["fc2"]
    assert "tied" in why["head"] and isinstance(m.plain, accel.SparseLinear)
    with pytest.warns(UserWarning, match="prepare_qat leaves out 2 layer"):
        accel.prepare_qat(_LM())
    only_subclasses = nn.Sequential(_MyLinear(8, 8))
    with pytest.raises(ValueError, match="cannot be converted.*subclasses Linear with its own forward"):
        prune.prune_(only_subclasses, 0.5, block=8)


def test_calls_on_an_already_converted_model_say_so():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    accel.sparsify_(m, accel.SparsityConfig(block=16, sparsity=0.5, measure=False))
    with pytest.raises(ValueError, match="already converted"):
        accel.sparsify_(m, accel.SparsityConfig(block=16, sparsity=0.75, measure=False))
    with pytest.raises(ValueError, match="already converted"):
        prune.GradualPruner(m, 0.75, begin=0, end=2, block=16).step()
    with pytest.raises(ValueError, match="already converted"):
        prune.sensitivity_scan(m, example_inputs=(torch.randn(4, 64),))
    with pytest.warns(UserWarning, match="already converted"):
        assert accel.prepare_qat(m) == []
    q = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    accel.quantize_(q, accel.QuantConfig(measure=False))
    rows = accel.quantize_(q, accel.QuantConfig(measure=False))
    assert [r["layer"] for r in rows] == ["0", "2"] and all("already int8" in r["reason"] for r in rows)


class _Experts(nn.Module):
    """Fused expert tables, as transformers 5 stores a mixture of experts."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(4, 64, 32) / 8)
        self.router = nn.Linear(32, 4)

    def forward(self, x):
        w = self.router(x).softmax(-1)
        return torch.einsum("be,eoi,bi->bo", w, self.gate_up, x)


def test_weights_used_through_a_models_own_code_are_reported():
    for fn in (lambda m: accel.quantize_(m, accel.QuantConfig(measure=False)),
               lambda m: accel.sparsify_(m, accel.SparsityConfig(block=16, measure=False))):
        m = nn.Sequential(nn.Linear(32, 32), _Experts())
        rows = fn(m)
        row = next(r for r in rows if r["layer"] == "1.gate_up")
        assert row["decision"] == "float" and "[4, 64, 32] parameter _Experts uses in its own forward" in row["reason"]


def test_the_weight_of_an_eval_sparse_layer_stays_cached_and_read_only():
    """Only a training forward builds the weight in the graph: in eval (even with grad enabled) a read is the
    cached, read-only view (a write raises rather than silently changing nothing)."""
    s = accel.SparseLinear.from_dense(nn.Linear(32, 16), sparsity=0.5, block=16).eval()
    assert s.weight is s.weight
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        s.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        nn.init.zeros_(s.weight)
    s.train()
    w = s.weight
    assert w.requires_grad and w.grad_fn is not None


def test_qat_layers_are_reported_by_quantize_and_still_pruned():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    accel.prepare_qat(m)
    masks = prune.block_masks(m, 0.5, block=16)
    assert sorted(masks) == ["0", "2"]  # the CLI prunes during QAT
    rows = accel.quantize_(m, accel.QuantConfig(measure=False))
    assert [r["layer"] for r in rows] == ["0", "2"]
    assert all("fake-quantized QAT layer: accel.convert(model)" in r["reason"] for r in rows)


def test_dense_storage_compiles_without_graph_breaks():
    torch.manual_seed(0)
    m = accel.SparseLinear.from_dense(nn.Linear(32, 32), sparsity=0.5, block=16, mode="dense")
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = m(x)
        y = torch.compile(m, backend="eager", fullgraph=True)(x)
    assert torch.allclose(y, ref, atol=1e-6)


def test_a_bad_saved_act_qmax_leaves_the_layer_unchanged():
    q = accel.QuantLinear.from_float(nn.Linear(16, 8), "dynamic")
    before = {k: v.clone() for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = q.state_dict()
    sd["weight_q"] = torch.ones(8, 16, dtype=torch.int8)
    sd["_extra_state"] = {"mode": "dynamic", "activation": "none", "act_qmax": 5}
    with pytest.raises(RuntimeError, match="act_qmax must be 63, 127"):
        q.load_state_dict(sd)
    assert all(torch.equal(v, q.state_dict()[k]) or v.isnan().all() for k, v in before.items())
    assert q.act_qmax == 0 and not torch.equal(q.weight_q, sd["weight_q"])


def test_saving_an_unconverted_qat_model_warns(tmp_path):
    m = nn.Sequential(nn.Linear(8, 8))
    accel.prepare_qat(m)
    with pytest.warns(UserWarning, match="fake-quantized QAT layers.*accel.convert"):
        accel.save(m, str(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("mode", ["sparse", "auto", "dense"])
@pytest.mark.parametrize("conv", [False, True])
def test_a_resume_keeps_the_parameters_the_optimizer_holds(mode, conv):
    """Build model and optimizer, then load a checkpoint of the same layer (the usual resume order): the
    layer must keep training. The load used to replace the Parameter objects, silently freezing the layer."""
    torch.manual_seed(0)
    base = nn.Conv2d(16, 16, 3, padding=1) if conv else nn.Linear(32, 32)
    cls = accel.SparseConv2d if conv else accel.SparseLinear
    x = torch.randn(2, 16, 5, 5) if conv else torch.randn(4, 32)

    def make():
        return cls.from_dense(base, sparsity=0.5, block=16, mode=mode)

    def train(m, opt, steps):
        for _ in range(steps):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    ref = make()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    train(ref, ref_opt, 2)
    ckpt, opt_ckpt = copy.deepcopy(ref.state_dict()), copy.deepcopy(ref_opt.state_dict())
    train(ref, ref_opt, 2)
    resumed = make()
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)  # built before the load
    resumed.load_state_dict(ckpt)
    opt.load_state_dict(opt_ckpt)
    train(resumed, opt, 2)
    with torch.no_grad():
        assert torch.allclose(resumed(x), ref(x), atol=1e-6)


def test_double_backward_through_a_sparse_layer_is_refused_in_one_line():
    for layer, x in ((accel.SparseLinear.from_dense(nn.Linear(32, 32), sparsity=0.5, block=16, mode="sparse"),
                      torch.randn(4, 32, requires_grad=True)),
                     (accel.SparseConv2d.from_dense(nn.Conv2d(16, 16, 3), sparsity=0.5, block=16, mode="sparse"),
                      torch.randn(1, 16, 5, 5, requires_grad=True))):
        (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no double backward through a block-sparse layer"):
            g.square().sum().backward()


def test_distillation_arguments_are_checked():
    from accel.distill import kd_loss, train

    s, t = torch.randn(4, 10), torch.randn(4, 10)
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="temperature must be a finite positive number"):
            kd_loss(s, t, temperature=bad)
    with pytest.raises(ValueError, match="needs the teacher it was built with"):
        train(nn.Linear(4, 2), [], 1, features=object(), progress=False)


@pytest.mark.parametrize("conv", [False, True])
def test_a_failed_in_place_load_restores_the_contents(conv):
    """A checkpoint of the same storage loads in place; when a later entry is bad (a bias of the wrong size)
    the load fails and the layer must hold exactly what it held before (its tables were overwritten)."""
    torch.manual_seed(0)
    base = nn.Conv2d(16, 16, 3) if conv else nn.Linear(64, 64)
    cls = accel.SparseConv2d if conv else accel.SparseLinear
    a, b = cls.from_dense(base, sparsity=0.5, block=16), cls.from_dense(type(base)(*(
        (16, 16, 3) if conv else (64, 64))), sparsity=0.5, block=16)
    before = copy.deepcopy(a.state_dict())
    sd = b.state_dict()
    sd["bias"] = torch.zeros(17 if conv else 65)
    with pytest.raises(RuntimeError):
        a.load_state_dict(sd)
    after = a.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_prepare_qat_keeps_full_backward_hooks_and_apply_masks_refuses_converted_layers():
    m = nn.Sequential(nn.Linear(8, 8))
    calls = []
    m[0].register_full_backward_hook(lambda mod, gi, go: calls.append(1))
    accel.prepare_qat(m)
    m(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert calls == [1]
    s = nn.Sequential(accel.SparseLinear.from_dense(nn.Linear(32, 32), sparsity=0.5, block=16))
    with pytest.raises(ValueError, match="already converted by accel"):
        prune.apply_masks_(s, {"0": torch.ones(2, 2, dtype=torch.bool)}, block=16)


def test_load_names_corrupt_entries_and_refuses_embeddings_it_would_change(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))

    m = model()
    accel.quantize_(m, accel.QuantConfig(measure=False))
    path = str(tmp_path / "m.safetensors")
    accel.save(m, path)
    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["accel"]) if "accel" in meta else None
    if layers is not None:  # a hand-edited entry: a missing field is named, with the layer
        entry = next(v for v in (layers.get("layers", layers)).values() if isinstance(v, dict) and "type" in v)
        entry.pop("in_features", None) or entry.pop("num_embeddings", None)
        bad = str(tmp_path / "bad.safetensors")
        save_file(tensors, bad, metadata={**meta, "accel": json.dumps(layers)})
        with pytest.raises(ValueError, match="accel.load"):
            accel.load(model(), bad)
    target = model()
    target[0] = nn.Embedding(10, 8, max_norm=1.0)
    with pytest.raises(ValueError, match="renormalizes \\(max_norm\\)"):
        accel.load(target, path)
    assert accel.QuantEmbedding(10, 4, padding_idx=-3).padding_idx == 7  # as nn.Embedding stores it


class _TwoHeads(nn.Module):
    """Two task heads cloned from one head: equal int8 tables, not tied."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(32, 32)
        self.head_a = nn.Linear(32, 8)
        self.head_b = copy.deepcopy(self.head_a)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.head_a(h), self.head_b(h)


def test_load_keeps_untied_equal_tables_apart(tmp_path):
    m = _TwoHeads().eval()
    accel.quantize_(m, accel.QuantConfig(linear_mode="dynamic"))
    accel.save(m, tmp_path / "v1.safetensors")
    f = accel.load(_TwoHeads().eval(), tmp_path / "v1.safetensors")
    assert f.head_a.weight_q is not f.head_b.weight_q
    m2 = _TwoHeads().eval()
    with torch.no_grad():
        m2.head_b.weight.mul_(-1)
    accel.quantize_(m2, accel.QuantConfig(linear_mode="dynamic"))
    f.load_state_dict(m2.state_dict())  # a later state: head_a must stay head_a
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.equal(f(x)[0], m2(x)[0]) and torch.equal(f(x)[1], m2(x)[1])


def test_load_into_a_converted_model_keeps_its_parameters(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        accel.sparsify_(m, accel.SparsityConfig(sparsity=0.5, block=16, mode="sparse"))
        return m

    src = make()
    with torch.no_grad():
        src[0].values.mul_(2)
    accel.save(src, tmp_path / "ckpt.safetensors")
    model = make()
    layer = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    accel.load(model, tmp_path / "ckpt.safetensors")
    assert model[0] is layer and torch.equal(model[0].values, src[0].values)
    x = torch.randn(16, 64)
    with torch.no_grad():
        before = model(x).clone()
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert not torch.equal(model(x), before)  # the optimizer trains the loaded model


def test_load_carries_training_flags_and_hooks(tmp_path):
    def mk():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    m = mk().eval()
    accel.quantize_(m)
    accel.save(m, tmp_path / "f.safetensors")
    f = mk().eval()
    seen = []
    handles = [f[i].register_forward_hook(lambda *a, i=i: seen.append(i)) for i in (0, 2)]
    accel.load(f, tmp_path / "f.safetensors")
    assert isinstance(f[0], accel.QuantLinear) and not any(layer.training for layer in f)
    f(torch.randn(2, 32))
    assert seen == [0, 2]
    for h in handles:  # the user's handles still remove them
        h.remove()
    f(torch.randn(2, 32))
    assert seen == [0, 2]


def test_load_into_a_shrunk_model_keeps_removable_hooks(tmp_path):
    def mk():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    m = mk().eval()
    x = torch.randn(8, 16)
    accel.shrink_(m, (x,), 0.5)
    accel.quantize_(m, accel.QuantConfig(linear_mode="dynamic"), filter_fn=lambda mod, n: n == "2")
    accel.save(m, tmp_path / "s.safetensors")
    f = mk().eval()
    seen = []
    handles = [f[i].register_forward_hook(lambda *a, i=i: seen.append(i)) for i in (0, 2, 4)]
    accel.load(f, tmp_path / "s.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x))
    assert seen == [0, 2, 4]
    for h in handles:
        h.remove()
    f(x)
    assert seen == [0, 2, 4]


def test_nested_inputs_run_a_layers_hooks_once():
    layer = accel.QuantLinear.from_float(nn.Linear(8, 4))
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)])
    with torch.no_grad():
        out = layer(x)
    assert out.is_nested and len(calls) == 1
    torch.testing.assert_close(out.unbind()[1], layer(x.unbind()[1]))


def test_load_names_why_a_model_cannot_be_copied(tmp_path):
    class WithTensor(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            self.last = self.fc(x)  # a non-leaf tensor kept as an attribute
            return self.last

    m = WithTensor().eval()
    accel.quantize_(m)
    accel.save(m, tmp_path / "m.safetensors")
    target = WithTensor()
    target(torch.randn(2, 8))
    with pytest.raises(ValueError, match="cannot copy the model to load into it safely .*deepcopy raised"):
        accel.load(target, tmp_path / "m.safetensors")
    assert isinstance(target.fc, nn.Linear) and not isinstance(target.fc, accel.QuantLinear)


def test_static_layers_keep_the_range_they_were_calibrated_for(tmp_path, accel_env):
    def mk():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()

    model, x = mk(), torch.randn(32, 64)
    scales = accel.calibrate(model, [(x,)])
    accel.quantize_(model, accel.QuantConfig(act_scales=scales))
    native = accel.engines.native_act_qmax()
    assert model[0].act_qmax == native and model[0].mode == "static"
    accel.save(model, tmp_path / "static.safetensors")
    with torch.no_grad():
        here = model(x)
    accel_env(ACCEL_CPU_ACT_QMAX=63 if native == 127 else 127)  # a CPU with the other native range
    there = accel.load(mk(), tmp_path / "static.safetensors")
    assert there[0].act_qmax == native
    with torch.no_grad():
        torch.testing.assert_close(there(x), here)


@pytest.mark.parametrize("convert", ["quantize", "sparsify"])
def test_transformer_encoder_with_a_padding_mask_runs_the_converted_layers(convert):
    """nn.TransformerEncoder packs a padded batch into a nested tensor for its layers, and its fused inference
    path reads the Linear weights without calling the layers: converted layers take nested inputs, and the
    fused path is off so they run."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2,
                                enable_nested_tensor=True).eval()
    x = torch.randn(3, 10, 64)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        ref = enc(x, src_key_padding_mask=pad)
    m = copy.deepcopy(enc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if convert == "quantize":
            accel.quantize_(m, accel.QuantConfig(linear_mode="dynamic", keep_float=False),
                            example_inputs=((x,), {"src_key_padding_mask": pad}))
            kind = accel.QuantLinear
        else:
            accel.sparsify_(m, accel.SparsityConfig(sparsity=0.25, block=16, mode="sparse"))
            kind = accel.SparseLinear
    calls = []
    for layer in m.layers:
        assert isinstance(layer.linear1, kind) and isinstance(layer.linear2, kind)
        layer.linear2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = m(x, src_key_padding_mask=pad)
    assert calls
    keep = ~pad
    cos = torch.nn.functional.cosine_similarity(out[keep].flatten(), ref[keep].flatten(), dim=0)
    assert cos > (0.999 if convert == "quantize" else 0.5)
