import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from accel.distill import FeatureDistiller, evaluate, kd_loss, train


def test_kd_loss_limits():
    s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(kd_loss(s, t, y, alpha=0.0), F.cross_entropy(s, y))
    assert kd_loss(t, t, None) == pytest.approx(0.0, abs=1e-6)
    soft = kd_loss(s, t, None, temperature=2.0)
    ref = F.kl_div(F.log_softmax(s / 2, -1), F.softmax(t / 2, -1), reduction="batchmean") * 4
    torch.testing.assert_close(soft, ref)
    torch.testing.assert_close(kd_loss(s, t, y, 2.0, 0.3), 0.3 * ref + 0.7 * F.cross_entropy(s, y))


def test_temperature_squared_keeps_gradient_scale():
    """With T^2, the soft-target gradient stays O(1) as T grows (Hinton et al.)."""
    t = torch.randn(64, 10) * 3
    norms = []
    for temp in (2.0, 8.0):
        s = torch.randn(64, 10, requires_grad=True)
        kd_loss(s, t, None, temperature=temp).backward()
        norms.append(s.grad.norm().item())
    assert 0.1 < norms[1] / norms[0] < 10


def test_kd_loss_errors():
    with pytest.raises(ValueError, match="temperature must be a finite positive number"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0)
    with pytest.raises(ValueError, match=r"\(2, 3\) and teacher logits \(2, 4\)"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_feature_distiller_with_adapter_learns():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))
    student = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    x = torch.randn(32, 3, 8, 8)
    fd = FeatureDistiller(student, teacher, {"1": "1"}, x[:2])
    assert isinstance(fd.adapters["1"], nn.Conv2d)
    opt = torch.optim.Adam(list(student.parameters()) + list(fd.parameters()), lr=1e-2)
    losses = []
    for _ in range(60):
        student(x)
        with torch.no_grad():
            teacher(x)
        loss = fd.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    fd.remove()
    with pytest.raises(ValueError, match="no module 'nope'"):
        FeatureDistiller(student, teacher, {"nope": "1"}, x[:1])


def test_train_with_teacher_improves_accuracy():
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, 0] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    train(teacher, loader, 5, 1e-2, progress=False)
    student = nn.Sequential(nn.Linear(20, 2))
    before = evaluate(student, loader)
    calls = []
    hist = train(student, loader, 5, 1e-2, teacher=teacher, after_step=lambda: calls.append(1), progress=False)
    assert len(hist) == 5 and len(calls) == 5 * len(loader)
    assert evaluate(student, loader) >= before + 25


def test_feature_distiller_adapts_token_features_on_their_last_dim():
    class Enc(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.emb, self.mlp, self.head = nn.Embedding(100, d), nn.Linear(d, d), nn.Linear(d, 5)

        def forward(self, ids):
            return self.head(self.mlp(self.emb(ids)).mean(1))

    teacher, student, ids = Enc(64), Enc(32), torch.randint(0, 100, (4, 10))
    fd = FeatureDistiller(student, teacher, {"mlp": "mlp"}, ids)
    assert isinstance(fd.adapters["mlp"], nn.Linear) and fd.adapters["mlp"].in_features == 32
    student(ids)
    teacher(ids)
    fd.loss().backward()
    with pytest.raises(ValueError, match=r"'mlp' gives \(4, 10, 32\), 'head' gives \(4, 5\): they may differ in width"):
        FeatureDistiller(student, teacher, {"mlp": "head"}, ids)
