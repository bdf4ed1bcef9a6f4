"""The main job's embedded dataset: scikit-learn's handwritten digits (1797 8x8 images shipped inside
the package, no download), upsampled to 3x32x32 so the seed CNN sees CIFAR-sized inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [1797, 3, size, size] float32, labels [1797] int64)``, images standardised."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.int64)


def digits_loaders(batch_size: int = 64, test_fraction: float = 0.2, seed: int = 0, size: int = 32
                   ) -> tuple[DataLoader, DataLoader]:
    """Stratified train/test split (every class split alike), shuffled training loader."""
    x, y = digits_tensors(size)
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: round(test_fraction * len(idx))])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    train = TensorDataset(x[~test_mask], y[~test_mask])
    test = TensorDataset(x[test_mask], y[test_mask])
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(test, batch_size=256))
