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


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, x):
        y = self.net(x)
        return y, y.detach()


def tuple_model():
    return _TupleOut()


class _Tokens(nn.Module):
    """Token ids in, class logits out (an Embedding first: the inputs are integers)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc1, self.fc2 = nn.Linear(32 * 6, 128), nn.Linear(128, 2)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).flatten(1))))


def token_model():
    torch.manual_seed(0)
    return _Tokens()


def token_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50, (96, 6), generator=g)
    y = (x[:, 0] % 2)
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), DataLoader(TensorDataset(x[64:], y[64:]), batch_size=8)


def _loaders(train_batches):
    return train_batches, tiny_data()[1]


def triples_data():  # (x, y, w) batches: training used to die mid-run unpacking them
    x, y = next(iter(tiny_data()[0]))
    return _loaders([(x, y, torch.ones(len(y)))])


def float_label_data():  # float labels: cross_entropy used to fail mid-run
    x, y = next(iter(tiny_data()[0]))
    return _loaders([(x, y.float())])


def empty_train_data():  # nothing to train on: the run used to finish "compressing" an untrained model
    return _loaders([])
