import copy

import pytest
import torch
import torch.nn as nn

from accel import QuantConv2d, QuantLinear
from accel.qat import FakeQuantConv2d, FakeQuantLinear, Observer, calibrate, convert, fake_quant, prepare_qat, strip
from accel.quant import quantize_rows_ref, quantize_weight, sqnr


def test_observers():
    torch.manual_seed(0)
    data = [torch.randn(64, 100) for _ in range(4)]
    data[2][0, 0] = 40.0  # one outlier
    obs = {m: Observer(m) for m in ("minmax", "percentile", "mse")}
    for x in data:
        for o in obs.values():
            o.observe(x)
    assert obs["minmax"].clip() == 40.0 and obs["minmax"].scale(127) == pytest.approx(40.0 / 127)
    assert obs["percentile"].clip() < 10.0  # the outlier is clipped away
    assert 0.3 * 40 <= obs["mse"].clip() < 40.0
    with pytest.raises(ValueError, match="NaN or inf"):
        obs["minmax"].observe(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="calibration method must be one of"):
        Observer("entropy")


def test_calibrate_gives_one_scale_per_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    loader = [(torch.randn(8, 3, 8, 8), None) for _ in range(3)]
    scales = calibrate(model, loader, "minmax", qmax=127)
    assert set(scales) == {"0", "2"}
    assert scales["0"] == pytest.approx(max(float(b[0].abs().max()) for b in loader) / 127)
    assert all(s > 0 for s in scales.values())
    q = QuantLinear.from_float(model[2], act_scale=scales["2"])
    assert q.mode == "static"


def test_fake_quant_matches_the_integer_rule_and_passes_gradients():
    x = torch.randn(5, 40, requires_grad=True)
    y = fake_quant(x, 127, (1,))
    q, s = quantize_rows_ref(x.detach(), 127)
    torch.testing.assert_close(y.detach(), q.float() * s[:, None])
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # straight through (inv * scale = 1)
    w = torch.randn(6, 3, 3, 3)
    wq, ws = quantize_weight(w)
    torch.testing.assert_close(fake_quant(w, 127, (1, 2, 3)), wq.float() * ws.view(-1, 1, 1, 1))


@pytest.mark.parametrize("act_qmax", [63, 127])
def test_prepare_train_convert(act_qmax):
    """Inference computes what QAT simulated, for both activation ranges, on any CPU (qmax 127 without
    VNNI runs as two exact 7-bit passes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    swapped = prepare_qat(model, act_qmax=act_qmax)
    assert swapped == ["0", "4"]  # the grouped conv stays float
    assert isinstance(model[0], FakeQuantConv2d) and isinstance(model[4], FakeQuantLinear)
    with torch.no_grad():
        assert sqnr(ref, model(x)) > 25
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(x).pow(2).mean().backward()
    assert model[0].weight.grad is not None
    opt.step()
    with torch.no_grad():
        fq = model(x)
    convert(model)
    assert isinstance(model[0], QuantConv2d) and isinstance(model[4], QuantLinear)
    assert model[0].act_qmax == act_qmax and model[4].act_qmax == act_qmax
    with torch.no_grad():
        assert sqnr(fq, model(x)) > 40  # inference computes what QAT simulated
    restored = copy.deepcopy(model)
    restored.load_state_dict(model.state_dict())
    assert restored[4].get_extra_state()["act_qmax"] == act_qmax


def test_strip_returns_plain_layers_with_the_trained_weights():
    model = nn.Sequential(nn.Linear(4, 3))
    prepare_qat(model)
    w = model[0].weight
    strip(model)
    assert type(model[0]) is nn.Linear and model[0].weight is w


def test_prepare_qat_keeps_the_layers_hooks():
    """A forward hook on a layer (a feature distiller capturing its output) must still fire after prepare_qat
    swaps the layer for its fake-quantized twin, and its handle must still remove it."""
    m = nn.Sequential(nn.Linear(8, 8))
    seen = []
    handle = m[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    prepare_qat(m)
    m(torch.randn(2, 8))
    assert seen == [(2, 8)] and type(m[0]).__name__ == "FakeQuantLinear"
    handle.remove()
    m(torch.randn(2, 8))
    assert len(seen) == 1
