"""Knowledge distillation and the training loop used by the main job.

* :func:`kd_loss`: Hinton et al. (2015): ``alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) +
  (1 - alpha) * CE(s, labels)``; the ``T^2`` keeps the soft-target gradients on the scale of the
  hard-label ones when the temperature changes.
* :class:`FeatureDistiller`: MSE between intermediate outputs of named student / teacher modules,
  through a learned 1x1 adapter when their channel counts differ.
* :func:`train`: epochs of (optionally distilled) training with a tqdm progress bar, calling a
  pruner after every optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inputs import eval_mode


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Distillation loss; ``labels=None`` means soft targets only (``alpha`` is then ignored)."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits.detach() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


class FeatureDistiller(nn.Module):
    """Feature matching: ``sum_i MSE(adapter_i(student_feature_i), teacher_feature_i)``.

    ``pairs`` maps student module names to teacher module names; their outputs are captured with
    forward hooks during the normal forward passes. One forward of ``example_input`` through both
    models sizes the features: where the widths differ (the channels of 4-D image features, the last dim of
    ``[B, D]`` and ``[B, T, D]`` features), a 1x1 conv or a linear adapter maps the student's onto the
    teacher's; features differing in anything else are refused. Train the adapters with the student
    (``parameters()``; :func:`train` does).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, pairs: dict[str, str],
                 example_input: torch.Tensor) -> None:
        super().__init__()
        self.pairs = dict(pairs)
        self._s, self._t = {}, {}
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self._hooks = []
        for s_name, t_name in self.pairs.items():
            if s_name not in s_mods or t_name not in t_mods:
                raise ValueError(f"FeatureDistiller: no module {s_name!r} in the student or {t_name!r} in the teacher")
            self._hooks.append(s_mods[s_name].register_forward_hook(self._saver(self._s, s_name)))
            self._hooks.append(t_mods[t_name].register_forward_hook(self._saver(self._t, s_name)))
        with torch.no_grad():
            student(example_input)
            teacher(example_input)
        self.adapters = nn.ModuleDict()
        for key in self.pairs:
            s, t = self._s.get(key), self._t.get(key)
            if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor):
                raise ValueError(f"FeatureDistiller: {key!r} / {self.pairs[key]!r} must each return one tensor (got "
                                 f"{type(s).__name__} / {type(t).__name__}); pair the submodules that do")
            d = 1 if s.dim() == 4 else -1  # channels of an image feature, the last dim of [B, D] / [B, T, D]
            if s.dim() != t.dim() or s.dim() < 2 or \
                    [n for i, n in enumerate(s.shape) if i != d % s.dim()] != \
                    [n for i, n in enumerate(t.shape) if i != d % t.dim()]:
                raise ValueError(f"FeatureDistiller: {key!r} gives {tuple(s.shape)}, {self.pairs[key]!r} gives "
                                 f"{tuple(t.shape)}: they may differ in width only (dim {d})")
            if s.shape[d] != t.shape[d]:
                layer = nn.Conv2d(s.shape[d], t.shape[d], 1) if s.dim() == 4 else nn.Linear(s.shape[d], t.shape[d])
                self.adapters[self._slot(key)] = layer.to(s.device)

    @staticmethod
    def _slot(key: str) -> str:
        return key.replace(".", "_")

    @staticmethod
    def _saver(store, key):
        def hook(module, inputs, output):
            store[key] = output
        return hook

    def loss(self) -> torch.Tensor:
        total = 0.0
        for key in self.pairs:
            s, t = self._s[key], self._t[key].detach()
            if self._slot(key) in self.adapters:
                s = self.adapters[self._slot(key)](s)
            total = total + F.mse_loss(s, t)
        return total

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str = "cpu") -> float:
    """Top-1 accuracy in percent."""
    correct = total = 0
    with eval_mode(model):
        for x, y in loader:
            pred = model(x.to(device)).argmax(-1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    return 100.0 * correct / max(1, total)


def train(model: nn.Module, loader, epochs: int, lr: float = 1e-3, *, teacher: nn.Module | None = None,
          temperature: float = 4.0, alpha: float = 0.9, features: FeatureDistiller | None = None,
          feature_weight: float = 1.0, after_step: Callable[[], object] | None = None, device: str = "cpu",
          progress: bool = True, desc: str = "train") -> list[float]:
    """Adam training for ``epochs``; with a ``teacher`` the loss is :func:`kd_loss` (+ ``feature_weight``
    times the feature loss). ``after_step`` runs after every optimizer step (e.g. ``pruner.step``).
    Returns the mean loss of each epoch."""
    from tqdm.auto import tqdm

    if features is not None and teacher is None:  # its teacher-side features come from running the teacher
        raise ValueError("train: features (a FeatureDistiller) needs the teacher it was built with (teacher=...)")
    params = list(model.parameters()) + (list(features.parameters()) if features is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    if teacher is not None:
        teacher.eval()
    model.train()
    history = []
    for epoch in range(epochs):
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            out = model(x)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                loss = kd_loss(out, t_out, y, temperature, alpha)
                if features is not None:
                    loss = loss + feature_weight * features.loss()
            else:
                loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
            total += loss.item() * len(y)
            n += len(y)
            bar.set_postfix(loss=f"{total / n:.4f}")
        history.append(total / max(1, n))
    return history
