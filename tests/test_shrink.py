"""Structural channel pruning (accel.shrink): the shrunk model is a smaller dense model of stock layers.

The equivalence tests zero exactly the channels that should go (producer rows and biases, and the
scale/shift of the norms they pass through), so removing them must not change the outputs: any
index mistake in a coupled layer (residual, concat offset, depthwise, flatten) shows up as a mismatch.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import accel
from accel import QuantConv2d
from accel.distill import train
from accel.models import ResNet18Shaped, SeedCNN, TransformerMLP
from accel.shrink import ShrinkError, ShrinkPlan, apply_plan, layer_shapes, plan_shrink, resize_, shrink_


# ------------------------------------------------------------------------------------------------ helpers
def pick(n: int, k: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def keep_of(n: int, gone: list[int]) -> list[int]:
    return [i for i in range(n) if i not in set(gone)]


@torch.no_grad()
def zero_rows(m: nn.Module, idx: list[int]) -> None:
    m.weight[idx] = 0
    if m.bias is not None:
        m.bias[idx] = 0


def assert_cut_is_zeroing(model: nn.Module, ref: nn.Module, x: torch.Tensor, layer: str, kept: int) -> None:
    """Plan ``model`` at ratio 0.5: ``layer`` keeps ``kept`` outputs, and the shrunk model equals ``ref`` (the
    same weights) with the removed output rows of ``layer`` zeroed."""
    plan = plan_shrink(model, (x,), 0.5)
    keep = plan.cuts[layer]["out"]
    assert len(keep) == kept
    zero_rows(ref.get_submodule(layer), [i for i in range(ref.get_submodule(layer).weight.shape[0]) if i not in keep])
    apply_plan(model, plan, (x,))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def zero_norm(m: nn.Module, idx: list[int]) -> None:
    m.weight[idx] = 0
    m.bias[idx] = 0


@torch.no_grad()
def randomize_norms(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)


def row_l1(name: str, m: nn.Module) -> torch.Tensor:
    """Importance = L1 norm of each output channel's own weights (ignores the consumers)."""
    w = m.weight.detach()
    if isinstance(m, nn.ConvTranspose2d):  # [in, out, kh, kw]
        w = w.transpose(0, 1)
    return w.abs().flatten(1).sum(1)


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before_state: dict, before_modules: list) -> None:
    assert list(model.modules()) == before_modules
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    for k, v in before_state.items():
        assert torch.equal(after[k], v), k


def check_shapes(model: nn.Module, expected: dict[str, dict]) -> None:
    for name, attrs in expected.items():
        m = model.get_submodule(name)
        for k, v in attrs.items():
            assert getattr(m, k) == v, f"{name}.{k} = {getattr(m, k)}, expected {v}"


def check_trains(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    out = model(x)
    sum(t.float().pow(2).mean() for t in (out.values() if isinstance(out, dict) else [out])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.zero_grad()
    model.eval()


# ------------------------------------------------------------------------------------------------ models
class CatNet(nn.Module):
    """Two branches concatenated, added to a third conv (coupling across the concat offsets), then a
    second concat with another branch feeding a conv, global pooling and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(3, 20, 1)
        self.bn = nn.BatchNorm2d(20)
        self.e = nn.Conv2d(20, 6, 3, padding=1)
        self.d = nn.Conv2d(26, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) + self.c(x)
        y = F.relu(self.bn(y))
        z = torch.cat([y, F.relu(self.e(y))], dim=1)
        z = F.relu(self.d(z))
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


class MobileBlockNet(nn.Module):
    """MobileNetV2-like: stem, inverted residual (1x1 expand, depthwise 3x3 with multiplier 2, 1x1
    project, residual add), global pooling, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(32, 64, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(64),
                                nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x.mean((2, 3)))


class GroupedNet(nn.Module):
    """A grouped conv (4 groups) between two plain convs: pruned by whole groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g, self.bn_g = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        x = F.relu(self.bn_g(self.g(x)))
        x = F.relu(self.c(x))
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


class NeXtSENet(nn.Module):
    """ConvNeXt-like block (depthwise 7x7, permute to channels-last, LayerNorm, MLP, permute back,
    residual) followed by squeeze-and-excitation (pool, fc, fc, sigmoid, view(N, C, 1, 1), multiply)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.dw = nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.ln = nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 128), nn.Linear(128, 32)
        self.se1, self.se2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.ln(self.dw(x).permute(0, 2, 3, 1))
        x = x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        s = torch.sigmoid(self.se2(F.relu(self.se1(x.mean((2, 3))))))
        x = x * s.view(x.size(0), x.size(1), 1, 1)
        return self.head(x.mean((2, 3)))


class UNetish(nn.Module):
    """Encoder, ConvTranspose and nearest upsampling, skip concatenation, dict outputs (one of them a
    pooled encoder feature: those channels stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.e1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.e2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.up = nn.ConvTranspose2d(32, 16, 2, 2)
        self.d = nn.Conv2d(16 + 16 + 32, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = self.e1(x)
        b = self.e2(a)
        y = torch.cat([a, self.up(b), F.interpolate(b, scale_factor=2.0)], 1)
        return {"mask": self.out(F.relu(self.d(y))), "feat": b.mean((2, 3))}


class Seq1d(nn.Module):
    """Conv1d / BatchNorm1d on sequences, a reshape-flatten, Linear / BatchNorm1d / Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv1d(4, 32, 3, padding=1), nn.BatchNorm1d(32)
        self.c2 = nn.Conv1d(32, 32, 3, padding=1)
        self.fc1, self.bn2, self.fc2 = nn.Linear(32 * 10, 64), nn.BatchNorm1d(64), nn.Linear(64, 3)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        return self.fc2(F.relu(self.bn2(self.fc1(x.reshape(x.shape[0], -1)))))


# ------------------------------------------------------------------------------------------------ cases
def case_seed_cnn():
    torch.manual_seed(0)
    m = SeedCNN(size=16, hidden=64)
    zero_rows(m.features[0], pick(32, 16, 1))
    zero_rows(m.features[3], pick(64, 32, 2))
    zero_rows(m.classifier[1], pick(64, 32, 3))
    expected = {"features.0": {"out_channels": 16}, "features.3": {"in_channels": 16, "out_channels": 32},
                # the Linear after the flatten: each kept channel is 4*4 consecutive features
                "classifier.1": {"in_features": 32 * 16, "out_features": 32},
                "classifier.3": {"in_features": 32, "out_features": 10}}
    return m, torch.randn(2, 3, 16, 16), expected


def case_resnet():
    torch.manual_seed(0)
    m = ResNet18Shaped(num_classes=10)
    randomize_norms(m)
    blocks = list(m.layers)
    for s, width in enumerate((64, 128, 256, 512)):
        z = pick(width, width // 2, 10 + s)  # the residual stream of stage s: every producer, same indices
        if s == 0:
            zero_rows(m.stem[0], z)
            zero_norm(m.stem[1], z)
        for i, blk in enumerate(blocks[2 * s:2 * s + 2]):
            zero_rows(blk.conv2, z)
            zero_norm(blk.bn2, z)
            if blk.down is not None:
                zero_rows(blk.down[0], z)
                zero_norm(blk.down[1], z)
            z1 = pick(width, width // 2, 100 + 2 * s + i)
            zero_rows(blk.conv1, z1)
            zero_norm(blk.bn1, z1)
    expected = {"stem.0": {"out_channels": 32}, "stem.1": {"num_features": 32},
                "layers.0.conv1": {"in_channels": 32, "out_channels": 32},
                "layers.2.conv1": {"in_channels": 32, "out_channels": 64},
                "layers.2.down.0": {"in_channels": 32, "out_channels": 64},
                "layers.7.conv2": {"in_channels": 256, "out_channels": 256},
                "fc": {"in_features": 256, "out_features": 10}}
    return m, torch.randn(2, 3, 32, 32), expected


def case_cat():
    torch.manual_seed(0)
    m = CatNet()
    randomize_norms(m)
    za, zb = pick(8, 4, 1), pick(12, 6, 2)
    zero_rows(m.a, za)
    zero_rows(m.b, zb)
    zc = za + [8 + i for i in zb]  # the added conv is coupled to both branches, at their concat offsets
    zero_rows(m.c, zc)
    zero_norm(m.bn, zc)
    zero_rows(m.e, pick(6, 3, 3))
    zero_rows(m.d, pick(16, 8, 4))
    expected = {"a": {"out_channels": 4}, "b": {"out_channels": 6}, "c": {"out_channels": 10},
                "bn": {"num_features": 10}, "e": {"in_channels": 10, "out_channels": 3},
                "d": {"in_channels": 13, "out_channels": 8}, "fc": {"in_features": 8}}
    return m, torch.randn(2, 3, 8, 8), expected


def case_mobile():
    torch.manual_seed(0)
    m = MobileBlockNet()
    randomize_norms(m)
    zs = pick(16, 8, 1)  # residual stream: stem and project
    zero_rows(m.stem[0], zs)
    zero_norm(m.stem[1], zs)
    zero_rows(m.project[0], zs)
    zero_norm(m.project[1], zs)
    ze = pick(32, 16, 2)  # expanded channels, passing through the depthwise conv (2 outputs each)
    zero_rows(m.expand[0], ze)
    zero_norm(m.expand[1], ze)
    zero_norm(m.dw[1], [2 * i + k for i in ze for k in (0, 1)])
    expected = {"stem.0": {"out_channels": 8}, "expand.0": {"in_channels": 8, "out_channels": 16},
                "dw.0": {"in_channels": 16, "out_channels": 32, "groups": 16}, "dw.1": {"num_features": 32},
                "project.0": {"in_channels": 32, "out_channels": 8}, "head": {"in_features": 8}}
    return m, torch.randn(2, 3, 16, 16), expected


def case_grouped():
    torch.manual_seed(0)
    m = GroupedNet()
    randomize_norms(m)
    groups = pick(4, 2, 1)
    z = [4 * g + i for g in groups for i in range(4)]  # whole groups: the inputs and outputs of group g
    zero_rows(m.a, z)
    zero_norm(m.bn_a, z)
    zero_rows(m.g, z)
    zero_norm(m.bn_g, z)
    zero_rows(m.c, pick(8, 4, 2))
    expected = {"a": {"out_channels": 8}, "g": {"in_channels": 8, "out_channels": 8, "groups": 2},
                "bn_g": {"num_features": 8}, "c": {"in_channels": 8, "out_channels": 4}, "fc": {"in_features": 4}}
    return m, torch.randn(2, 3, 8, 8), expected


def case_mlp():
    torch.manual_seed(0)
    m = TransformerMLP(32, 128)
    zero_rows(m.fc1, pick(128, 64, 1))
    expected = {"fc1": {"in_features": 32, "out_features": 64}, "fc2": {"in_features": 64, "out_features": 32}}
    return m, torch.randn(2, 5, 32), expected


def case_unet():
    torch.manual_seed(0)
    m = UNetish()
    randomize_norms(m)
    z1 = pick(16, 8, 1)
    zero_rows(m.e1[0], z1)
    zero_norm(m.e1[1], z1)
    zu = pick(16, 8, 2)
    with torch.no_grad():  # ConvTranspose weights are [in, out, kh, kw]
        m.up.weight[:, zu] = 0
        m.up.bias[zu] = 0
    zero_rows(m.d, pick(16, 8, 3))
    expected = {"e1.0": {"out_channels": 8}, "e2.0": {"in_channels": 8, "out_channels": 32},
                "up": {"in_channels": 32, "out_channels": 8}, "d": {"in_channels": 8 + 8 + 32, "out_channels": 8},
                "out": {"in_channels": 8, "out_channels": 2}}
    return m, torch.randn(2, 3, 8, 8), expected


def case_seq1d():
    torch.manual_seed(0)
    m = Seq1d()
    with torch.no_grad():
        for bn in (m.bn, m.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    z = pick(32, 16, 1)
    zero_rows(m.c1, z)
    zero_norm(m.bn, z)
    zero_rows(m.c2, pick(32, 16, 2))
    z3 = pick(64, 32, 3)
    zero_rows(m.fc1, z3)
    zero_norm(m.bn2, z3)
    expected = {"c1": {"out_channels": 16}, "bn": {"num_features": 16}, "c2": {"in_channels": 16, "out_channels": 16},
                "fc1": {"in_features": 16 * 10, "out_features": 32}, "bn2": {"num_features": 32},
                "fc2": {"in_features": 32}}
    return m, torch.randn(4, 4, 10), expected


CASES = {"seed_cnn": case_seed_cnn, "resnet18": case_resnet, "concat": case_cat, "depthwise": case_mobile,
         "grouped": case_grouped, "transformer_mlp": case_mlp, "unet_convtranspose": case_unet, "conv1d": case_seq1d}


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", list(CASES))
def test_removing_zeroed_channels_keeps_outputs(case):
    model, x, expected = CASES[case]()
    model.eval()
    with torch.no_grad():
        ref = model(x)
    report = shrink_(model, (x,), 0.5, importance=row_l1)
    check_shapes(model, expected)
    assert all(type(m).__module__.startswith("torch.nn.modules") for m in model.modules()
               if list(m.parameters(recurse=False)))  # stock layers only
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert any(r["status"] == "pruned" for r in report)
    out_rows = [r for r in report if r["status"] == "fixed"]
    assert out_rows and all("output" in r["reason"] for r in out_rows)
    check_trains(model, x)


def test_builtin_importance_finds_channels_zeroed_everywhere():
    """l2 / l1 sum every weight of a channel (producer rows, consumer columns): zero them all."""
    for importance in ("l2", "l1"):
        torch.manual_seed(0)
        m = SeedCNN(size=16, hidden=64).eval()
        x = torch.randn(2, 3, 16, 16)
        z0, z1, z2 = pick(32, 16, 1), pick(64, 32, 2), pick(64, 32, 3)
        with torch.no_grad():
            zero_rows(m.features[0], z0)
            m.features[3].weight[:, z0] = 0
            zero_rows(m.features[3], z1)
            m.classifier[1].weight.view(64, 64, 16)[:, z1] = 0
            zero_rows(m.classifier[1], z2)
            m.classifier[3].weight[:, z2] = 0
            ref = m(x)
        shrink_(m, x, 0.5, importance=importance)
        assert m.features[3].out_channels == 32 and m.classifier[1].in_features == 32 * 16
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
        assert m.features[3].weight.abs().flatten(1).sum(1).min() > 0  # the zero ones went


def test_ratio_zero_is_identity():
    torch.manual_seed(0)
    m = ResNet18Shaped(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    before_state, before_modules = state(m), list(m.modules())
    report = shrink_(m, (x,), 0.0)
    assert_unchanged(m, before_state, before_modules)
    assert all(r["channels_before"] == r["channels_after"] for r in report)
    assert {r["status"] for r in report} == {"kept", "fixed"}
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_resnet_groups_and_batchnorm_stats():
    model, x, _ = case_resnet()
    model.eval()
    z = pick(64, 32, 10)
    old_bn = model.stem[1]
    old_conv_w = model.layers[0].conv1.weight.detach().clone()
    report = shrink_(model, (x,), 0.5, importance=row_l1)
    keep = keep_of(64, z)
    new_bn = model.stem[1]
    assert new_bn is not old_bn and new_bn.num_features == 32
    assert torch.equal(new_bn.running_mean, old_bn.running_mean[keep])
    assert torch.equal(new_bn.running_var, old_bn.running_var[keep])
    assert torch.equal(new_bn.weight.detach(), old_bn.weight.detach()[keep])
    assert new_bn.num_batches_tracked == old_bn.num_batches_tracked
    # consumers of the residual stream lose the same input channels
    z1 = pick(64, 32, 100)
    assert torch.equal(model.layers[0].conv1.weight.detach(), old_conv_w[keep_of(64, z1)][:, keep])
    rows = {tuple(r["layers"]): r for r in report}
    stage0 = rows[("stem.0", "layers.0.conv2", "layers.1.conv2")]
    assert (stage0["channels_before"], stage0["channels_after"], stage0["status"]) == (64, 32, "pruned")
    assert "stem.1" in stage0["coupled"] and "layers.2.down.0" in stage0["coupled"]
    assert ("layers.2.conv2", "layers.2.down.0", "layers.3.conv2") in rows
    assert rows[("fc",)]["status"] == "fixed"


def test_coupled_layers_keep_the_same_channels():
    """Random weights: the layers of a group rank their own channels differently; only the coupling
    makes them keep the same ones (residual adds, concat offsets, whole groups of a grouped conv)."""
    torch.manual_seed(0)
    m = ResNet18Shaped(num_classes=10).eval()
    c = plan_shrink(m, torch.randn(1, 3, 32, 32), 0.5).cuts
    own = [set(row_l1(n, m.get_submodule(n)).argsort()[32:].tolist()) for n in ("stem.0", "layers.0.conv2")]
    assert own[0] != own[1]
    stage0 = c["stem.0"]["out"]
    assert len(stage0) == 32
    assert c["layers.0.conv2"]["out"] == c["layers.1.conv2"]["out"] == c["stem.1"]["out"] == stage0
    assert c["layers.0.conv1"]["in"] == c["layers.1.conv1"]["in"] == c["layers.2.down.0"]["in"] == stage0
    stage1 = c["layers.2.conv2"]["out"]
    assert c["layers.2.down.0"]["out"] == c["layers.3.conv2"]["out"] == c["layers.4.down.0"]["in"] == stage1
    assert c["fc"]["in"] == c["layers.7.conv2"]["out"] and c["fc"]["out"] is None

    torch.manual_seed(0)
    c = plan_shrink(CatNet().eval(), torch.randn(2, 3, 8, 8), 0.5).cuts
    assert c["c"]["out"] == c["a"]["out"] + [8 + i for i in c["b"]["out"]] == c["bn"]["out"] == c["e"]["in"]
    assert c["d"]["in"] == c["c"]["out"] + [20 + i for i in c["e"]["out"]]

    torch.manual_seed(0)
    c = plan_shrink(GroupedNet().eval(), torch.randn(2, 3, 8, 8), 0.5).cuts
    kept = c["g"]["out"]
    assert len(kept) == 8 and c["a"]["out"] == c["g"]["in"] == c["bn_g"]["out"] == kept
    assert {i // 4 for i in kept} == {i // 4 for i in kept[::4]} and len({i // 4 for i in kept}) == 2


def test_convnext_layernorm_and_squeeze_excite():
    torch.manual_seed(0)
    m = NeXtSENet().eval()
    x = torch.randn(2, 3, 16, 16)
    report = shrink_(m, (x,), 0.5)
    check_shapes(m, {"stem": {"out_channels": 16}, "dw": {"in_channels": 16, "out_channels": 16, "groups": 16},
                     "ln": {"normalized_shape": (16,)}, "fc1": {"in_features": 16, "out_features": 64},
                     "fc2": {"in_features": 64, "out_features": 16}, "se1": {"in_features": 16, "out_features": 4},
                     "se2": {"in_features": 4, "out_features": 16}, "head": {"in_features": 16}})
    stream = next(r for r in report if "stem" in r["layers"])
    assert set(stream["layers"]) == {"stem", "fc2", "se2"}  # the SE scale multiplies the stream: coupled
    assert {"dw", "ln"} <= set(stream["coupled"])
    assert m(x).shape == (2, 10)
    check_trains(m, x)


def test_global_and_layer_scope_and_floor():
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        with torch.no_grad():  # 48 of the first hidden layer's channels are near zero everywhere
            small = pick(64, 48, 1)
            m[0].weight[small] *= 1e-3
            m[0].bias[small] *= 1e-3
            m[2].weight[:, small] *= 1e-3
        return m, small

    x = torch.randn(4, 16)
    m, small = make()
    rows = shrink_(m, x, 48 / 128, scope="global")
    assert (m[0].out_features, m[2].out_features) == (16, 64)
    assert [r["channels_after"] for r in rows] == [16, 64, 4]
    assert torch.equal(m[2].weight.detach(), make()[0][2].weight.detach()[:, keep_of(64, small)])

    m, _ = make()
    shrink_(m, x, 48 / 128, scope="layer")
    assert (m[0].out_features, m[2].out_features) == (40, 40)

    m, _ = make()
    shrink_(m, x, 0.5, scope="global", floor=0.5)  # the small layer can lose only half
    assert (m[0].out_features, m[2].out_features) == (32, 32)

    m, _ = make()
    shrink_(m, x, 0.9, scope="layer", min_channels=20)
    assert (m[0].out_features, m[2].out_features) == (20, 20)

    m, _ = make()
    shrink_(m, x, 0.99 - 1e-9, scope="layer", floor=0.0)  # never to zero
    assert (m[0].out_features, m[2].out_features) == (1, 1)

    m, _ = make()
    shrink_(m, x, 0.3, scope="layer", round_to=8)  # 64 - 19 = 45 kept, rounded up to 48
    assert (m[0].out_features, m[2].out_features) == (48, 48)


def test_refused_patterns_are_fixed_and_reported():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
            self.conv = nn.Conv2d(3, 8, 3)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x, img):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)  # split into heads
            a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, 32))
            x = x + self.fc2(F.gelu(self.fc1(x)))
            h = F.relu(self.conv(img))
            y = self.conv2(h) + F.conv2d(h, self.conv2.weight, padding=1)  # a layer's weight used outside it
            return x, y

    torch.manual_seed(0)
    m = Attn().eval()
    args = (torch.randn(2, 5, 32), torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        ref = m(*args)
    report = shrink_(m, args, 0.5)
    by = {r["layers"][0]: r for r in report}
    assert by["qkv"]["status"] == "fixed" and "splits the channel dimension" in by["qkv"]["reason"]
    assert by["proj"]["status"] == "fixed" and "output" in by["proj"]["reason"]
    assert by["conv"]["status"] == "fixed" and "consumed by conv2d" in by["conv"]["reason"]
    assert by["conv2"]["status"] == "fixed" and "conv2: its parameters are used directly by conv2d" in by["conv2"]["reason"]
    assert by["fc1"]["status"] == "pruned" and m.fc1.out_features == 32 and m.fc2.in_features == 32
    assert m.qkv.out_features == 96 and m.conv.out_channels == 8
    out = m(*args)
    assert [o.shape for o in out] == [o.shape for o in ref]


def test_ignore_keeps_layers():
    torch.manual_seed(0)
    m = SeedCNN(size=16, hidden=64).eval()
    x = torch.randn(2, 3, 16, 16)
    report = shrink_(m, x, 0.5, ignore=["features.3"])
    assert m.features[0].out_channels == 16 and m.features[3].out_channels == 64
    assert m.classifier[1].out_features == 32
    assert "ignored" in next(r for r in report if r["layers"] == ["features.3"])["reason"]
    m2 = SeedCNN(size=16, hidden=64).eval()
    shrink_(m2, x, 0.5, ignore=lambda name, mod: isinstance(mod, nn.Linear))
    assert m2.classifier[1].out_features == 64 and m2.features[3].out_channels == 32


def test_bad_arguments_raise_before_any_change():
    torch.manual_seed(0)
    m = SeedCNN(size=16, hidden=64)
    x = torch.randn(2, 3, 16, 16)
    before_state, before_modules = state(m), list(m.modules())
    bad = [({"ratio": 1.0}, "ratio must be a number in \\[0, 1\\).*1.0"), ({"ratio": -0.1}, "-0.1"),
           ({"ratio": "0.5"}, "'0.5'"), ({"scope": "model"}, "scope must be 'global' or 'layer', got 'model'"),
           ({"importance": "l3"}, "importance must be.*'l3'"), ({"min_channels": 0}, "min_channels.*got 0"),
           ({"floor": 1.5}, "floor.*1.5"), ({"round_to": 0}, "round_to.*got 0"),
           ({"ignore": ["features.9"]}, "'features.9', which is not a submodule")]
    for kw, msg in bad:
        kw = {"ratio": 0.5, **kw}
        with pytest.raises(ValueError, match=msg):
            shrink_(m, x, **kw)
    with pytest.raises(TypeError, match="example_inputs"):
        shrink_(m, 3, 0.5)
    with pytest.raises(ValueError, match="importance\\('features.0'\\) must give 32 finite scores"):
        shrink_(m, x, 0.5, importance=lambda n, mod: torch.ones(3))
    assert_unchanged(m, before_state, before_modules)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_failures_leave_the_model_unchanged():
    class HardCodedView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, 16 * 8 * 8))  # the size is in the code, not read from x

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for model, inputs, msg in [
        (HardCodedView(), x, "after cutting"),
        (SeedCNN(size=16), torch.randn(2, 3, 12, 12), "running the model on example_inputs failed"),
        (nn.Sequential(nn.Conv2d(3, 8, 3), torch.jit.script(nn.Conv2d(8, 8, 3))), x, "TorchScript"),
    ]:
        before_state, before_modules = state(model), list(model.modules())
        flags = [mod.training for mod in model.modules()]
        with pytest.raises(ShrinkError, match=msg):
            shrink_(model, inputs, 0.5)
        assert_unchanged(model, before_state, before_modules)
        assert [mod.training for mod in model.modules()] == flags

    m = SeedCNN(size=16, hidden=64)
    before_state, before_modules = state(m), list(m.modules())
    with pytest.raises(ValueError, match="increasing list of ints in \\[0, 64\\)"):
        apply_plan(m, {"cuts": {"features.0": {"out": [0, 1], "in": None}, "features.3": {"out": [70], "in": None}}})
    with pytest.raises(ValueError, match="'nope', which is not a submodule"):
        apply_plan(m, {"cuts": {"nope": {"out": [0], "in": None}}})
    assert_unchanged(m, before_state, before_modules)


def test_train_only_consumer_is_caught_and_rolled_back():
    class AuxHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.aux = nn.Conv2d(3, 8, 3), nn.Linear(8, 2), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = F.relu(self.conv(x))
            out = self.fc(y.mean((2, 3)))
            return out + self.aux(y).mean((2, 3)) if self.training else out

    m = AuxHead()
    before_state, before_modules = state(m), list(m.modules())
    with pytest.raises(ShrinkError, match="train mode"):
        shrink_(m, torch.randn(2, 3, 8, 8), 0.5)
    assert_unchanged(m, before_state, before_modules)
    assert m.training
    shrink_(m, torch.randn(2, 3, 8, 8), 0.5, ignore=["conv"])  # the way out: keep those channels


def test_example_input_forms_and_shared_layers():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 3)

        def forward(self, x, *, y=None):
            h = self.bn(self.conv(x)) + self.bn(self.conv(y))  # one layer called twice
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    cuts = []
    for inputs in [{"x": x, "y": y}, ((x,), {"y": y})]:
        torch.manual_seed(0)
        m = KW().eval()
        plan = plan_shrink(m, inputs, 0.5)
        cuts.append(plan.cuts)
        apply_plan(m, plan, inputs)
        assert m.conv.out_channels == 4 and m.bn.num_features == 4 and m.fc.in_features == 4
        assert m(x, y=y).shape == (2, 3)
    assert cuts[0] == cuts[1]


def test_tied_and_aliased_layers():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), shared, nn.ReLU(), shared, nn.Linear(16, 2))
    x = torch.randn(3, 8)
    report = shrink_(m, x, 0.5)
    assert m[2] is m[4] and m[2].out_features == 8 and m[0].out_features == 8
    assert m(x).shape == (3, 2)
    assert sorted(r["channels_after"] for r in report) == [2, 8]

    tied = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16), nn.Linear(16, 2))
    tied[4].weight = tied[0].weight
    report = shrink_(tied, x, 0.5)
    assert tied[0].out_features == 16 and tied[4].weight is tied[0].weight
    assert any("shares a parameter" in r["reason"] for r in report)


def test_requires_grad_hooks_and_distillation_recovery():
    torch.manual_seed(0)
    teacher = SeedCNN(size=16, hidden=64).eval()
    student = SeedCNN(size=16, hidden=64)
    student.load_state_dict(teacher.state_dict())
    student.features[0].weight.requires_grad_(False)
    seen = []
    student.features[3].register_forward_hook(lambda mod, i, o: seen.append(o.shape[1]))
    x = torch.randn(2, 3, 16, 16)
    shrink_(student, x, 0.5)
    assert not student.features[0].weight.requires_grad and student.features[0].bias.requires_grad
    seen.clear()
    student(x)
    assert seen == [32]  # the hook moved to the new layer
    loader = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(4)]
    before = student.classifier[1].weight.detach().clone()
    hist = train(student, loader, epochs=2, lr=1e-3, teacher=teacher, progress=False)
    assert all(torch.isfinite(torch.tensor(hist))) and hist[-1] < hist[0]
    assert not torch.equal(before, student.classifier[1].weight.detach())


def test_quantize_after_shrink():
    torch.manual_seed(0)
    m = ResNet18Shaped(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    shrink_(m, x, 0.5)
    with torch.no_grad():
        ref = m(x)
    rows = accel.quantize_(m)
    assert sum(isinstance(mod, QuantConv2d) for mod in m.modules()) == 20 and len(rows) == 21
    with torch.no_grad():
        out = m(x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()


def test_state_dict_reload_and_pickle(tmp_path):
    torch.manual_seed(0)
    m = SeedCNN(size=16, hidden=64).eval()
    x = torch.randn(2, 3, 16, 16)
    plan = plan_shrink(m, x, 0.5)
    apply_plan(m, plan, x)
    with torch.no_grad():
        ref = m(x)
    sd = m.state_dict()

    fresh = SeedCNN(size=16, hidden=64).eval()  # shapes from the layer sizes (e.g. stored with the weights)
    shapes = json.loads(json.dumps(layer_shapes(m)))
    resize_(fresh, shapes)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)

    again = SeedCNN(size=16, hidden=64).eval()  # or from the plan's JSON form
    apply_plan(again, ShrinkPlan.from_dict(json.loads(json.dumps(plan.to_dict()))))
    again.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref)
    with pytest.raises(RuntimeError, match="size mismatch"):
        SeedCNN(size=16, hidden=64).load_state_dict(sd)

    torch.save(m, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)


class _WSConv(nn.Conv2d):
    """A weight-standardized conv (BiT-style): a Conv2d subclass with its own forward."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_layers_shrink_does_not_cut_are_reported():
    """Subclasses with their own forward and accel layers are rows ("fixed", with the reason), never a silent
    empty report; a group fixed only by being joined to fixed channels says so."""
    x = torch.randn(1, 3, 8, 8)
    ws = nn.Sequential(_WSConv(3, 8, 3, padding=1), nn.ReLU(), _WSConv(8, 8, 3, padding=1))
    rows = shrink_(ws, (x,), 0.5)
    assert [(r["layers"], r["status"]) for r in rows] == [(["0"], "fixed"), (["2"], "fixed")]
    assert all("_WSConv subclasses Conv2d with its own forward" in r["reason"] for r in rows)

    class Plain(nn.Conv2d):  # keeps the stock forward: still not a layer shrink cuts, and reported
        pass

    rows = shrink_(nn.Sequential(Plain(3, 8, 3)), (x,), 0.5)
    assert len(rows) == 1 and rows[0]["status"] == "fixed" and "Plain subclasses Conv2d:" in rows[0]["reason"]
    q = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    accel.quantize_(q, accel.QuantConfig(keep_float=False))
    rows = shrink_(q, (x,), 0.5)
    assert rows and all(r["status"] == "fixed" and "accel layer" in r["reason"] for r in rows)

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    rows = shrink_(Sum(), (x,), 0.5)
    assert rows and all(r["status"] == "fixed" and r["reason"] for r in rows)
    with pytest.raises(ValueError, match=r"cannot be converted.*: .0. \(_WSConv\)"):
        accel.sparsify_(nn.Sequential(_WSConv(3, 32, 1)), accel.SparsityConfig(convs=True))


def test_zero_pad_on_the_channel_dim_is_not_a_barrier():
    """Swin-style F.pad of a channels-last (B, H, W, C) stream pads H and W with a zero pair for C: the
    channels stay prunable, and the cut equals zeroing them; a real pad of C still fixes them."""
    class M(nn.Module):
        def __init__(self, pad):
            super().__init__()
            self.a, self.b, self.pad = nn.Linear(4, 16), nn.Linear(16, 2), pad

        def forward(self, x):
            h = F.pad(F.relu(self.a(x)), self.pad)
            return self.b(h) if self.pad[:2] == (0, 0) else h.sum(-1)

    torch.manual_seed(0)
    x = torch.randn(2, 7, 7, 4)
    m = M((0, 0, 0, 1, 0, 1)).eval()
    ref = M((0, 0, 0, 1, 0, 1)).eval()
    ref.load_state_dict(m.state_dict())
    assert_cut_is_zeroing(m, ref, x, "a", 8)
    rows = shrink_(M((0, 1)).eval(), (x,), 0.5)
    assert rows[0]["status"] == "fixed" and "pad works over the channel dimension" in rows[0]["reason"]


class _Gate(nn.Module):
    """An attention gate: features times the sigmoid of a 1-channel conv of them (broadcast over channels)."""

    def __init__(self):
        super().__init__()
        self.a, self.p, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h * torch.sigmoid(self.p(h)))


class _CatMask(nn.Module):
    """Features concatenated with a 1-channel mask predicted from them."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 1, 1), nn.Conv2d(17, 4, 1)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(torch.cat([h, torch.sigmoid(self.m(h))], 1))


@pytest.mark.parametrize("make", [_Gate, _CatMask])
def test_single_channel_layer_does_not_fix_the_features_it_meets(make):
    """A 1-channel layer's output (broadcast by a gate, or concatenated) leaves the features prunable, and
    the cut equals zeroing the removed channels."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    m = make().eval()
    ref = make().eval()
    ref.load_state_dict(m.state_dict())
    assert_cut_is_zeroing(m, ref, x, "a", 8)
