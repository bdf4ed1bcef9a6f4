"""Regression tests for the model-level API defects a prober found: HF ``Conv1D`` (GPT-2) through load /
calibrate / QAT / pruning / sparsify_, modules registered under two names, parametrized (weight-norm) layers,
layers calibration never saw, ``batch_sizes`` with non-batched inputs, and the converted-model check."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

import accel
from accel import QuantLinear, SparseLinear
from accel.inputs import at_batch, detect_batch_size
from accel.prune import (
    GradualPruner,
    apply_masks_,
    block_masks,
    element_mask,
    prune_,
    sensitivity_scan,
)
from accel.qat import FakeQuantConv1D, calibrate, convert, prepare_qat, strip


def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=4, n_positions=64)
    return cfg, transformers.GPT2LMHeadModel(cfg).eval()


def _conv1d_names(model):
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------------ D5: load GPT-2
@pytest.mark.parametrize("convert_with", ["quantize", "sparsify", "both"])
def test_gpt2_compressed_file_loads_into_a_fresh_model(tmp_path, convert_with):
    cfg, model = _gpt2()
    transformers = pytest.importorskip("transformers")
    names = _conv1d_names(model)
    assert names
    if convert_with in ("sparsify", "both"):
        accel.sparsify_(model, accel.SparsityConfig(sparsity=0.5, block=16, mode="sparse"))
        assert all(isinstance(model.get_submodule(n), SparseLinear) for n in names)  # D8: Conv1D is sparsified
    if convert_with in ("quantize", "both"):
        accel.quantize_(model, accel.QuantConfig(linear_mode="dynamic"))
    ids = torch.randint(0, 300, (2, 9))
    ref = _logits(model, ids)
    accel.save(model, str(tmp_path / "gpt2.safetensors"))
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    accel.load(fresh, str(tmp_path / "gpt2.safetensors"))
    assert [type(fresh.get_submodule(n)) for n in names] == [type(model.get_submodule(n)) for n in names]
    torch.testing.assert_close(_logits(fresh, ids), ref, rtol=0, atol=0)


def test_load_checks_a_conv1d_target_shape(tmp_path):
    class OneConv1D(nn.Module):
        def __init__(self, nx, nf):
            super().__init__()
            from transformers.pytorch_utils import Conv1D

            self.proj = Conv1D(nf, nx)

        def forward(self, x):
            return self.proj(x)

    pytest.importorskip("transformers")
    model = OneConv1D(16, 24)
    accel.quantize_(model)
    assert isinstance(model.proj, QuantLinear) and (model.proj.in_features, model.proj.out_features) == (16, 24)
    accel.save(model, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match=r"\(in, out\) = \(16, 24\), the model's layer is \(24, 16\)"):
        accel.load(OneConv1D(24, 16), str(tmp_path / "c.safetensors"))


# ------------------------------------------------------------------------------------------------ D3: shared modules
class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a  # one layer, two names
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


class SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.dec = self.enc  # a shared container: its layers have two names each

    def forward(self, x):
        return self.dec(self.enc(x))


@pytest.mark.parametrize("convert_with", ["quantize", "sparsify"])
def test_shared_module_is_converted_under_every_name_and_round_trips(tmp_path, convert_with):
    torch.manual_seed(0)
    model = Shared().eval()
    x = torch.randn(3, 32)
    if convert_with == "quantize":
        rows = accel.quantize_(model, accel.QuantConfig(linear_mode="dynamic"))
        kind = QuantLinear
    else:
        rows = accel.sparsify_(model, accel.SparsityConfig(sparsity=0.5, block=16, mode="sparse"),
                               filter_fn=lambda m, n: n != "head")
        kind = SparseLinear
    assert isinstance(model.a, kind) and model.a is model.b
    assert [r["layer"] for r in rows].count("a") == 1 and not any(r["layer"] == "b" for r in rows)
    assert "also at b" in next(r for r in rows if r["layer"] == "a")["reason"]
    ref = model(x)
    accel.save(model, str(tmp_path / "shared.safetensors"))
    fresh = accel.load(Shared().eval(), str(tmp_path / "shared.safetensors"))
    assert isinstance(fresh.a, kind) and fresh.a is fresh.b
    torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)


def test_shared_container_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SharedBlock().eval()
    x = torch.randn(2, 16)
    accel.quantize_(model, accel.QuantConfig(linear_mode="dynamic"))
    assert isinstance(model.enc[0], QuantLinear) and model.enc is model.dec
    accel.save(model, str(tmp_path / "block.safetensors"))
    fresh = accel.load(SharedBlock().eval(), str(tmp_path / "block.safetensors"))
    assert isinstance(fresh.dec[0], QuantLinear) and fresh.enc[0] is fresh.dec[0]
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_prepare_qat_keeps_sharing():
    model = Shared()
    prepare_qat(model, act_qmax=127)
    assert model.a is model.b and type(model.a).__name__ == "FakeQuantLinear"
    convert(model)
    assert isinstance(model.a, QuantLinear) and model.a is model.b


# ------------------------------------------------------------------------------------------------ D1/D2: parametrized
def _weight_normed(style):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    if style == "parametrize":
        parametrizations.weight_norm(model[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(model[0])
    return model.eval()


@pytest.mark.parametrize("style", ["parametrize", "old"])
def test_pruning_refuses_layers_with_a_computed_weight(style):
    model = _weight_normed(style)
    x = torch.randn(4, 64)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"prune_: 1 layer\(s\) compute their weight.*'0'"):
        prune_(model, 0.75, block=16, scope="layer")
    with pytest.raises(ValueError, match=r"apply_masks_: .*'0'"):
        apply_masks_(model, block_masks(model, 0.75, block=16, scope="layer"), block=16)
    with pytest.raises(ValueError, match=r"GradualPruner: .*'0'"):
        GradualPruner(model, 0.5, begin=0, end=10, block=16)
    with pytest.raises(ValueError, match=r"prepare_qat: .*'0'"):
        prepare_qat(model, act_qmax=127)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing changed
    prune_(model, 0.75, block=16, scope="layer", filter_fn=lambda m, n: n == "2")  # the others still prune
    assert float((model[2].weight == 0).float().mean()) == pytest.approx(0.75)
    assert model(x).shape == (4, 8)


@pytest.mark.parametrize("style", ["parametrize", "old"])
def test_sensitivity_scan_scores_a_parametrized_layer_by_its_computed_weight(style):
    model = _weight_normed(style)
    x = torch.randn(4, 64)
    plain = nn.Sequential(accel.prune.as_plain(model[0]), nn.ReLU(), copy.deepcopy(model[2]))  # (no deepcopy of
    # an old-style weight-norm module)
    assert type(plain[0]) is nn.Linear
    rows = sensitivity_scan(model, example_inputs=(x,), block=16)
    ref = sensitivity_scan(plain, example_inputs=(x,), block=16)
    got = [r["metric"] for r in rows if r["layer"] == "0"]
    assert all(g < 100 for g in got)  # was inf: the zeros never reached the computed weight
    assert got == pytest.approx([r["metric"] for r in ref if r["layer"] == "0"], rel=1e-6)
    assert type(model[0]) is not nn.Linear or style == "old"  # the layer is back in place
    assert model[0] is not plain[0]


@pytest.mark.parametrize("style", ["parametrize", "old"])
def test_quantize_and_sparsify_convert_a_parametrized_layer_from_its_computed_weight(style):
    def model_with_new_g():
        model = _weight_normed(style)
        with torch.no_grad():  # the old-style hook's weight attribute is stale until the next forward
            g = model[0].parametrizations.weight.original0 if style == "parametrize" else model[0].weight_g
            g.mul_(2.0)
        return model

    x = torch.randn(4, 64)
    with torch.no_grad():
        ref = model_with_new_g()(x)
    q = model_with_new_g()
    rows = accel.quantize_(q, accel.QuantConfig(linear_mode="dynamic"))
    assert isinstance(q[0], QuantLinear)
    assert "converted from its computed weight" in next(r for r in rows if r["layer"] == "0")["reason"]
    assert accel.quant.sqnr(ref, q(x)) > 30
    s = model_with_new_g()
    rows = accel.sparsify_(s, accel.SparsityConfig(sparsity=0.0, block=16, mode="sparse"))
    assert isinstance(s[0], SparseLinear)
    torch.testing.assert_close(s(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ D7: calibrate
class AuxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.dead = nn.Linear(16, 16)  # sees only zeros: relu of a negative input
        self.aux_head = nn.Linear(16, 4)  # never runs at inference

    def forward(self, x):
        return self.a(x) + self.dead(torch.relu(-x.abs() - 1))


def test_calibrate_leaves_out_layers_that_saw_nothing_and_static_quantize_works():
    torch.manual_seed(0)
    model = AuxHead().eval()
    x = torch.randn(8, 16)
    with pytest.warns(UserWarning, match=r"dead \(only zeros\), aux_head \(no input\)"):
        scales = calibrate(model, [x], qmax=127)
    assert set(scales) == {"a"} and scales["a"] > 0
    ref = model(x)
    with pytest.warns(UserWarning, match="no scale for 2 layer"):
        rows = accel.quantize_(model, accel.QuantConfig(linear_mode="static", act_scales=scales, act_qmax=127))
    assert model.a.mode == "static" and model.aux_head.mode == "dynamic" and model.dead.mode == "dynamic"
    assert "no act_scale" in next(r for r in rows if r["layer"] == "aux_head")["reason"]
    assert accel.quant.sqnr(ref, model(x)) > 30


def test_a_bad_act_scale_names_the_layer():
    with pytest.raises(ValueError, match=r"act_scales\['aux_head'\] must be one finite positive number, got 0.0"):
        accel.QuantConfig(act_scales={"a": 0.1, "aux_head": 0.0})
    config = accel.QuantConfig()
    config.act_scales["head"] = float("nan")  # set after construction: checked again by quantize_
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"act_scales\['head'\]"):
        accel.quantize_(model, config)
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="needs act_scales"):
        accel.quantize_(model, accel.QuantConfig(linear_mode="static"))


# ------------------------------------------------------------------------------------------------ D8: GPT-2 Conv1D
def test_gpt2_calibrate_static_quantize_and_qat():
    _, model = _gpt2()
    names = _conv1d_names(model)
    ids = torch.randint(0, 300, (2, 9))
    scales = calibrate(model, [{"input_ids": ids}], qmax=127)
    assert set(names) <= set(scales)
    ref = _logits(model, ids)
    q = copy.deepcopy(model)
    accel.quantize_(q, accel.QuantConfig(linear_mode="static", act_scales=scales, act_qmax=127))
    assert all(q.get_submodule(n).mode == "static" for n in names)
    assert accel.quant.sqnr(ref, _logits(q, ids)) > 20

    params = {n: model.get_submodule(n).weight for n in names}
    swapped = prepare_qat(model, act_qmax=127)
    assert set(names) <= set(swapped)
    assert all(isinstance(model.get_submodule(n), FakeQuantConv1D) for n in names)
    assert all(model.get_submodule(n).weight is params[n] for n in names)  # the optimizer's parameters
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    assert all(params[n].grad is not None for n in names)
    assert accel.quant.sqnr(ref, out.detach()) > 20
    trained = copy.deepcopy(model)
    convert(trained)
    assert all(isinstance(trained.get_submodule(n), QuantLinear) for n in names)
    torch.testing.assert_close(_logits(trained, ids), out.detach(), rtol=1e-4, atol=1e-4)  # what QAT simulated
    strip(model)
    assert all(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
    torch.testing.assert_close(_logits(model, ids), ref)


def test_gpt2_pruning_reaches_conv1d_in_the_layout_sparsify_reads():
    _, model = _gpt2()
    names = _conv1d_names(model)
    assert set(names) <= set(block_masks(model, 0.5, block=16, scope="layer"))  # the default filter takes Conv1D
    only = lambda m, n: n in names  # noqa: E731 - (lm_head's weight is tied to wte: pruning it prunes the embedding)
    masks = block_masks(model, 0.5, block=16, scope="layer", filter_fn=only)
    c = model.get_submodule(names[0])
    assert masks[names[0]].shape == (-(-c.weight.shape[1] // 16), -(-c.weight.shape[0] // 16))  # [out, in] blocks
    pruned = copy.deepcopy(model)
    prune_(pruned, 0.5, block=16, scope="layer", filter_fn=only)
    for n in names:
        w = pruned.get_submodule(n).weight
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
        assert torch.equal(w != 0, element_mask(model.get_submodule(n), masks[n], 16).bool())
    ids = torch.randint(0, 300, (2, 9))
    sparse = copy.deepcopy(model)
    accel.sparsify_(sparse, accel.SparsityConfig(block=16, mode="sparse"), masks=masks)
    assert all(isinstance(sparse.get_submodule(n), SparseLinear) for n in names)
    torch.testing.assert_close(_logits(sparse, ids), _logits(pruned, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ D13: batch_sizes
class Weighted(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(16, 16)

    def forward(self, x, w):
        return self.l(x * w)


def test_batch_sizes_resize_only_batched_inputs():
    x, w = torch.randn(3, 16), torch.rand(16)
    args, _ = at_batch((x, w), 8)
    assert args[0].shape == (8, 16) and args[1] is w
    _, kw = at_batch({"ids": torch.zeros(2, 5, dtype=torch.long), "pos": torch.arange(5)[None], "lens": torch.ones(2)}, 4)
    assert kw["ids"].shape == (4, 5) and kw["pos"].shape == (1, 5) and kw["lens"].shape == (4,)
    rows = accel.quantize_(Weighted().eval(), accel.QuantConfig(batch_sizes=(1, 8)), example_inputs=(x, w))
    assert sorted(r["batch"] for r in rows) == [1, 8]


def test_batch_sizes_with_an_ambiguous_batch_raise_before_changing_anything():
    seq_first = (torch.randn(7, 2, 16), torch.zeros(2, 7, dtype=torch.bool))  # [T, B, F] beside a [B, T] mask
    with pytest.raises(ValueError, match=r"args\[0\]: \[7, 2, 16\], args\[1\]: \[2, 7\]"):
        detect_batch_size(seq_first)

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(16, 16)

        def forward(self, x, mask):
            return self.l(x)

    model = SeqFirst()
    with pytest.raises(ValueError, match=r"quantize_: batch_sizes=\(1, 4\): cannot tell the batch size"):
        accel.quantize_(model, accel.QuantConfig(batch_sizes=(1, 4)), example_inputs=seq_first)
    with pytest.raises(ValueError, match="cannot tell the batch size"):
        accel.sparsify_(model, accel.SparsityConfig(batch_sizes=(1, 4), block=16), example_inputs=seq_first)
    assert type(model.l) is nn.Linear
    assert accel.quantize_(model, example_inputs=seq_first)[0]["batch"] is None  # without batch_sizes: fine


# ------------------------------------------------------------------------------------------------ converted-model check
class TypeChecking(nn.Module):
    """User code that depends on the layer being the stock one (as models reading ``layer.weight.dtype`` or
    ``.view``-ing a conv output did): breaks only after conversion."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 4)

    def forward(self, x):
        if not isinstance(self.l2, nn.Linear):
            raise TypeError(f"l2 must be an nn.Linear, got {type(self.l2).__name__}")
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("convert_with", ["quantize", "sparsify"])
def test_a_conversion_that_breaks_the_model_is_undone_and_raises(convert_with):
    model = TypeChecking().eval()
    x = torch.randn(2, 16)
    ref = model(x)
    originals = dict(model.named_children())
    with pytest.raises(RuntimeError, match=r"converted model fails on example_inputs.*Linear -> (Quant|Sparse)Linear "
                                           r"\(x2\).*TypeError: l2 must be an nn.Linear"):
        if convert_with == "quantize":
            accel.quantize_(model, accel.QuantConfig(keep_float=False), example_inputs=(x,))
        else:
            accel.sparsify_(model, accel.SparsityConfig(block=16), example_inputs=(x,))
    assert dict(model.named_children()) == originals  # the very same modules
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_the_check_costs_one_forward_per_batch_size():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    accel.quantize_(model, accel.QuantConfig(batch_sizes=(1, 4), keep_float=False), example_inputs=(torch.randn(2, 16),))
    assert sorted(calls) == [1, 1, 4, 4]  # capture + check, per batch size
    calls.clear()
    accel.quantize_(nn.Sequential(model), accel.QuantConfig(measure=False), example_inputs=(torch.randn(2, 16),))
    assert calls == []  # nothing left to convert: no check
    fresh = nn.Sequential(nn.Linear(16, 4)).eval()
    fresh.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    accel.quantize_(fresh, accel.QuantConfig(measure=False), example_inputs=(torch.randn(2, 16),))
    assert calls == [2]
