import pytest
import torch
import torch.nn as nn

from accel.prune import (
    GradualPruner,
    apply_masks_,
    block_masks,
    channel_masks,
    cubic_sparsity,
    prune_,
    sensitivity_scan,
    sparsity_of,
)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def test_layer_scope_prunes_each_layer_alike():
    masks = block_masks(_mlp(), 0.5, block=32, scope="layer")
    assert set(masks) == {"0", "2", "4"}
    for m in masks.values():
        assert int(m.sum()) == round(0.5 * m.numel())


def test_global_scope_prunes_the_total_relative_to_each_layer():
    model = _mlp()
    with torch.no_grad():
        model[2].weight.mul_(100)  # raw norms would keep only this layer; relative norms do not
    masks = block_masks(model, 0.5, block=32, scope="global")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * total)
    assert all(m.any() for m in masks.values())
    assert not masks["2"].all()


def test_global_scope_floor_and_warning():
    model = _mlp()
    with torch.no_grad():
        model[0].weight[:, :32].mul_(1000)  # one block column dominates layer 0: the rest would go
    with pytest.warns(UserWarning, match=r"held \d+ layer\(s\) at the floor min_density=0.5: 0 "):
        masks = block_masks(model, 0.8, block=32, scope="global", min_density=0.5)
    for name, m in masks.items():
        assert m.sum() >= 0.5 * m.numel() - 1e-9, name
    with pytest.raises(ValueError, match="min_density <= max_density"):
        block_masks(model, 0.5, min_density=0.6, max_density=0.5)


def test_l1_and_l2_rank_differently():
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, :32] = 0.1  # block 0: many small values, L1 = 102.4, L2 = 3.2
        lin.weight[0, 32] = 5.0  # block 1: one big value, L1 = 5, L2 = 5
    model = nn.Sequential(lin)
    assert block_masks(model, 0.5, block=32, norm=1, scope="layer")["0"].tolist() == [[True, False]]
    assert block_masks(model, 0.5, block=32, norm=2, scope="layer")["0"].tolist() == [[False, True]]


def test_prune_zeroes_blocks_and_channels():
    model = _mlp()
    prune_(model, 0.75, block=32, scope="layer")
    assert sparsity_of(model) == pytest.approx(0.75, abs=0.05)
    model = _mlp()
    masks = channel_masks(model, 0.5)
    apply_masks_(model, masks)
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert (w[~mask] == 0).all() and (w[mask] != 0).any(dim=1).all()
        assert (model.get_submodule(name).bias[~mask] == 0).all()


def test_conv_blocks_use_the_implicit_gemm_matrix():
    conv = nn.Conv2d(8, 64, 3)  # [64, 72] matrix: 2 x 3 blocks of 32
    masks = block_masks(nn.Sequential(conv), 0.5, block=32, scope="layer", filter_fn=lambda m, n: True)
    assert masks["0"].shape == (2, 3)
    apply_masks_(nn.Sequential(conv), masks)
    assert sparsity_of(nn.Sequential(conv), lambda m, n: True) > 0.3


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.8, 10, 110) == 0.0
    assert cubic_sparsity(110, 0.8, 10, 110) == 0.8
    assert cubic_sparsity(500, 0.8, 10, 110) == 0.8
    mid = cubic_sparsity(60, 0.8, 10, 110)
    assert mid == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    values = [cubic_sparsity(t, 0.8, 10, 110) for t in range(0, 120)]
    assert values == sorted(values)


def test_gradual_pruner_reaches_target_and_keeps_pruned_weights_zero():
    model = _mlp()
    pruner = GradualPruner(model, 0.75, begin=0, end=20, frequency=5, block=32, scope="layer")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for _ in range(30):
        opt.zero_grad()
        model(torch.randn(16, 128)).pow(2).mean().backward()
        opt.step()
        seen.append(pruner.step())
    assert seen[-1] == pytest.approx(0.75)
    assert seen == sorted(seen)
    for name, mask in pruner.masks.items():
        assert int(mask.sum()) == max(1, round(0.25 * mask.numel()))  # a layer keeps at least one block
    assert sparsity_of(model) == pytest.approx(0.75, abs=0.05)


def test_sensitivity_scan():
    model = _mlp()
    x = torch.randn(32, 128)
    ref = model(x).detach()

    def evaluate(m):
        with torch.no_grad():
            return float((m(x) - ref).pow(2).mean())

    rows = sensitivity_scan(model, evaluate, sparsities=(0.5, 0.9))
    assert rows[0] == {"layer": None, "sparsity": 0.0, "metric": 0.0}
    assert len(rows) == 1 + 3 * 2
    by = {(r["layer"], r["sparsity"]): r["metric"] for r in rows[1:]}
    for layer in ("0", "2", "4"):
        assert by[(layer, 0.9)] >= by[(layer, 0.5)] > 0
    assert torch.equal(model(x), ref)  # the scan works on copies


def test_errors():
    with pytest.raises(ValueError, match="scope must be"):
        block_masks(_mlp(), 0.5, scope="net")
    with pytest.raises(ValueError, match="no layer to prune"):
        block_masks(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="begin < end"):
        GradualPruner(_mlp(), 0.5, begin=10, end=5)
    with pytest.raises(ValueError, match="structure must be"):
        prune_(_mlp(), 0.5, structure="unstructured")


def test_pruning_leaves_out_tied_layers():
    """An output head tied to the token embeddings is not pruned by the pruners (zeros written into it would
    land in the embedding table), with a warning naming it; sparsify_ says to pass the pruner's block size
    when masks of another grid are given."""
    import accel

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 64, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.emb(ids))))

    torch.manual_seed(0)
    model = LM()
    table = model.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'head' \(tied to 'emb'\)"):
        pruner = GradualPruner(model, 0.5, begin=0, end=1, block=16)
    pruner.step()
    assert set(pruner.masks) == {"body"} and torch.equal(model.emb.weight, table)
    assert float((model.body.weight == 0).float().mean()) >= 0.45
    with pytest.raises(ValueError, match=r"pass SparsityConfig\(block=16\)"):
        accel.sparsify_(model, masks=pruner.masks)
    rows = accel.sparsify_(model, accel.SparsityConfig(block=16), masks=pruner.masks)
    assert [r["layer"] for r in rows] == ["body"]


def test_a_gradual_pruner_resumes_from_its_state_dict():
    """A checkpoint of model, optimizer and pruner resumes at the pruned sparsity (a fresh pruner started
    with no masks, and the restored momentum revived the pruned blocks)."""
    import torch.nn.functional as F

    from accel.prune import GradualPruner, sparsity_of

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    def step(m, o, p):
        o.zero_grad()
        F.mse_loss(m(torch.randn(8, 64)), torch.randn(8, 32)).backward()
        o.step()
        p.step()

    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = GradualPruner(model, 0.75, begin=5, end=20, block=16)
    for _ in range(30):
        step(model, opt, pruner)
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}
    model2 = build()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    pruner2 = GradualPruner(model2, 0.75, begin=5, end=20, block=16)
    pruner2.load_state_dict(ckpt["pruner"])
    for _ in range(3):
        step(model2, opt2, pruner2)
    assert abs(sparsity_of(model2) - 0.75) < 0.02 and pruner2.step_count == 33
    bad = dict(ckpt["pruner"], masks={"0": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask for '0' must be a bool \(4, 4\) block grid"):
        pruner2.load_state_dict(bad)
