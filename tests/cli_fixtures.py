"""A user's own model and data for the CLI test (``--model`` / ``--data`` take module:function)."""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset


def tiny_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 64), nn.ReLU(),
                         nn.Linear(64, 2))


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), DataLoader(TensorDataset(x[64:], y[64:]))


def not_a_model():
    return 3


def one_loader():
    return tiny_data()[0]
