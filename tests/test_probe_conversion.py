"""What a conversion must leave as it was (found by a prober on CNN workflows): every module's own training flag,
frozen parameters, the user's hooks on a converted layer, the global random state, and one truthful report row
for layers accel has no form for. Also: inputs resized for other batch sizes keep their memory format."""

import warnings

import pytest
import torch
import torch.nn as nn

import accel
from accel import SparseConv2d, SparseLinear
from accel.inputs import at_batch


def _cnn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                      nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    m.train()
    m[1].eval()  # a frozen BatchNorm inside a model being fine-tuned
    return m


X = torch.randn(2, 3, 8, 8)
CONVERSIONS = {
    "quantize_": lambda m, **kw: accel.quantize_(m, accel.QuantConfig(budget_s=0.01), **kw),
    "sparsify_": lambda m, **kw: accel.sparsify_(m, accel.SparsityConfig(sparsity=0.5, block=16, convs=True,
                                                                         budget_s=0.01), **kw),
}


@pytest.mark.parametrize("what", list(CONVERSIONS))
@pytest.mark.parametrize("with_inputs", [False, True])
def test_conversion_keeps_each_modules_training_flag(what, with_inputs, measuring):
    m = _cnn()
    flags = {n: s.training for n, s in m.named_modules()}
    CONVERSIONS[what](m, **({"example_inputs": (X,)} if with_inputs else {}))
    assert {n: s.training for n, s in m.named_modules()} == flags  # the converted layers take their originals'


def test_calibrate_and_sensitivity_scan_keep_each_modules_training_flag():
    m = _cnn()
    flags = {n: s.training for n, s in m.named_modules()}
    accel.calibrate(m, [(X,)])
    assert {n: s.training for n, s in m.named_modules()} == flags
    accel.prune.sensitivity_scan(m, example_inputs=(X,), sparsities=(0.5,), block=16)
    assert {n: s.training for n, s in m.named_modules()} == flags


@pytest.mark.parametrize("with_inputs", [False, True])
def test_sparsify_keeps_frozen_parameters_frozen(with_inputs, measuring):
    m = _cnn()
    for layer in (m[0], m[5]):
        layer.requires_grad_(False)
    m[7].bias.requires_grad_(False)
    CONVERSIONS["sparsify_"](m, **({"example_inputs": (X,)} if with_inputs else {}))
    for i in (0, 5):
        assert not any(p.requires_grad for p in m[i].parameters()), type(m[i]).__name__
    assert all(p.requires_grad for p in m[3].parameters())
    last = m[7]
    assert not last.bias.requires_grad and (last.values if isinstance(last, SparseLinear) else last.weight).requires_grad


def test_stock_layers_back_from_sparse_keep_grad_flags_and_the_random_state():
    lin = nn.Linear(64, 32)
    lin.weight.requires_grad_(False)
    s = SparseLinear.from_dense(lin, sparsity=0.5, block=16)
    conv = nn.Conv2d(32, 32, 3)
    conv.bias.requires_grad_(False)
    c = SparseConv2d.from_dense(conv, sparsity=0.5, block=16)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    back, back_c = s.to_linear(), c.to_dense()
    assert torch.equal(torch.rand(3), expected)  # no random init drawn
    assert not back.weight.requires_grad and back.bias.requires_grad
    assert back_c.weight.requires_grad and not back_c.bias.requires_grad
    assert torch.equal(back.weight, s.dense_weight()) and torch.equal(back_c.weight, c.dense_weight())


@pytest.mark.parametrize("what", list(CONVERSIONS))
@pytest.mark.parametrize("with_inputs", [False, True])
def test_conversion_leaves_the_random_state_alone(what, with_inputs, measuring):
    m = _cnn()
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    CONVERSIONS[what](m, **({"example_inputs": (X,)} if with_inputs else {}))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("what", list(CONVERSIONS))
def test_users_hooks_on_a_converted_layer_keep_firing(what):
    m = _cnn().eval()
    fired = []
    h1 = m[3].register_forward_pre_hook(lambda mod, a: fired.append("pre"))
    h2 = m[3].register_forward_hook(lambda mod, a, o: fired.append(("out", tuple(o.shape))))
    CONVERSIONS[what](m)
    assert type(m[3]) is not nn.Conv2d
    with torch.no_grad():
        m(X)
    assert fired == ["pre", ("out", (2, 32, 8, 8))]
    h1.remove()
    h2.remove()  # the handles still remove them
    fired.clear()
    with torch.no_grad():
        m(X)
    assert fired == []


def test_qat_convert_keeps_hooks_and_flags():
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    fired = []
    m[2].register_forward_hook(lambda mod, a, o: fired.append(type(mod).__name__))
    accel.prepare_qat(m)
    m.eval()
    accel.convert(m)
    with torch.no_grad():
        m(torch.randn(3, 16))
    assert fired == ["QuantLinear"] and not m[2].training


def test_layers_without_a_form_get_one_truthful_row():
    m = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ConvTranspose2d(32, 32, 2, 2), nn.Flatten(), nn.Linear(32 * 28 * 28, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = accel.sparsify_(m, accel.SparsityConfig(sparsity=0.5, block=16, convs=True))
    mine = [r for r in rows if r["layer"] == "1"]
    assert len(mine) == 1 and "no block-sparse form for ConvTranspose2d" in mine[0]["reason"]
    m = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ConvTranspose2d(32, 32, 2, 2), nn.Flatten(), nn.Linear(32 * 28 * 28, 10))
    rows = accel.quantize_(m)
    mine = [r for r in rows if r["layer"] == "1"]
    assert len(mine) == 1 and "no int8 form for ConvTranspose2d" in mine[0]["reason"]


def test_inputs_resized_for_another_batch_keep_channels_last():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    (y,), _ = at_batch((x,), 5)
    assert y.shape == (5, 8, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y[2:4], x)
    (z,), _ = at_batch((torch.randn(2, 8, 5, 5),), 3)
    assert z.is_contiguous()


def test_a_conv_mask_of_the_wrong_shape_names_the_shapes_it_takes():
    conv = nn.Conv2d(3, 16, 3)
    with pytest.raises(ValueError, match=r"like the weight \(16, 3, 3, 3\).*matrix \(16, 27\).*block mask \(1, 2\)"):
        SparseConv2d.from_dense(conv, mask=torch.ones(16, dtype=torch.bool), block=16)
    s = SparseConv2d.from_dense(conv, mask=torch.ones(16, 3, 3, 3, dtype=torch.bool), block=16)
    assert s.density == 1.0


def test_sensitivity_scan_with_a_users_evaluate_restores_every_flag():
    m = _cnn()
    flags = {n: s.training for n, s in m.named_modules()}

    def evaluate(model):
        model.eval()  # the usual evaluate
        with torch.no_grad():
            return float(model(X).square().mean())

    accel.prune.sensitivity_scan(m, evaluate, sparsities=(0.5,), block=16)
    assert {n: s.training for n, s in m.named_modules()} == flags


def test_hooks_of_a_conv1d_come_back_as_they_are_now():
    """A Hugging Face Conv1D made sparse and later stored dense again (its type restored from a template) has the
    hooks the layer has then: a hook removed meanwhile stays removed, one kept still fires and still removes."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    from accel.api import linearize_kept_dense_

    m = nn.Sequential(Conv1D(32, 64))
    fired = []
    gone = m[0].register_forward_hook(lambda mod, a, o: fired.append("gone"))
    kept = m[0].register_forward_hook(lambda mod, a, o: fired.append(type(mod).__name__))
    accel.sparsify_(m, accel.SparsityConfig(sparsity=0.5, block=16), filter_fn=lambda mod, n: True)
    assert isinstance(m[0], SparseLinear)
    gone.remove()
    linearize_kept_dense_(m, [{"layer": "0", "decision": "dense"}])
    assert type(m[0]) is Conv1D
    with torch.no_grad():
        m(torch.randn(2, 64))
    assert fired == ["Conv1D"]
    kept.remove()
    fired.clear()
    with torch.no_grad():
        m(torch.randn(2, 64))
    assert fired == []


def test_sparsify_asks_filter_fn_about_the_model_as_given():
    seen = []

    def filter_fn(mod, name):
        seen.append(type(mod).__name__)
        return isinstance(mod, nn.Linear)

    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    bil = nn.Bilinear(8, 8, 4)
    m.add_module("bil", bil)
    accel.sparsify_(m, accel.SparsityConfig(sparsity=0.5, block=16), filter_fn=filter_fn)
    assert "SparseLinear" not in seen and "Bilinear" in seen


def test_eval_mode_lets_a_models_own_train_undo_itself():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.noise = nn.Linear(8, 8), 0.1

        def train(self, mode=True):
            self.noise = 0.1 if mode else 0.0  # e.g. a regularizer switched off for evaluation
            return super().train(mode)

        def forward(self, x):
            return self.lin(x) + self.noise * torch.randn_like(x)

    m = Noisy()
    m.train()
    accel.quantize_(m, accel.QuantConfig(budget_s=0.01), example_inputs=(torch.randn(2, 8),))
    assert m.training and m.noise == 0.1 and m.lin.training



def test_eval_mode_with_a_model_that_only_infers_and_an_error_in_the_block():
    from accel.inputs import eval_mode

    class InferenceOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def train(self, mode=True):
            if mode:
                raise RuntimeError("inference only")
            return super().train(mode)

        def forward(self, x):
            return self.fc(x)

    m = InferenceOnly()  # training=True from nn.Module, though train(True) raises
    accel.quantize_(m, accel.QuantConfig(budget_s=0.01), example_inputs=(torch.randn(2, 8),))
    assert m.training and m.fc.training
    with pytest.raises(KeyError, match="body"):  # the block's own error, not the one of train() at exit
        with eval_mode(m):
            raise KeyError("body")
    assert m.training


def test_a_users_evaluate_that_switches_modes_is_undone_by_the_models_own_train():
    calls = []

    class SideFx(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.dropout_on = nn.Linear(16, 16), True

        def train(self, mode=True):
            calls.append(mode)
            self.dropout_on = mode
            return super().train(mode)

        def forward(self, x):
            return self.fc(x)

    m = SideFx()

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            return float(model(torch.ones(1, 16)).sum())

    accel.prune.sensitivity_scan(m, evaluate, sparsities=(0.5,), block=16)
    assert m.training and m.dropout_on and calls[-1] is True
