"""Models defined in the project: the seed CNN of the main job, and the larger shapes of the
end-to-end benchmark (a ResNet-18-shaped CNN and a transformer MLP block), randomly initialised."""

from __future__ import annotations

import torch
import torch.nn as nn


class SeedCNN(nn.Module):
    """Conv2d(3,32) - Conv2d(32,64) - Linear - Linear on 3x``size``x``size`` images.

    Each conv is 3x3 / padding 1 followed by ReLU and 2x2 max-pooling, so the flatten size is
    ``64 * (size // 4) ** 2`` (4096 for 32x32), computed here rather than hard-coded.
    """

    def __init__(self, num_classes: int = 10, size: int = 32, hidden: int = 256) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"SeedCNN: image size must be a multiple of 4, got {size}")
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten_size = 64 * (size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(self.flatten_size, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet18Shaped(nn.Module):
    """The layer shapes of ResNet-18 (7x7 stem, 4 stages of 2 basic blocks, 64-512 channels, fc)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class TransformerMLP(nn.Module):
    """The feed-forward block of a transformer layer: Linear(d, 4d) - GELU - Linear(4d, d)."""

    def __init__(self, d_model: int = 1024, hidden: int = 4096) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
