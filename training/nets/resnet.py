"""ResNet-18 and the plain net of identical depth and widths (the lab's residual experiment)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; with ``residual`` the input (1x1-projected when shape changes) is
    added before the last ReLU ("add, then activate", as the lab slides stress)."""

    def __init__(self, cin: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.left = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = residual
        self.shortcut = nn.Identity()
        if residual and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.left(x)
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class ResNet18Layout(nn.Module):
    """Stem + 4 stages of 2 blocks (64-128-256-512 x width/64) + pooling + linear: 18 weighted layers.

    ``small_stem`` swaps the ImageNet stem (7x7/2 conv + 3x3/2 max-pool) for one 3x3/1 conv, for
    inputs under ~64 px.
    """

    def __init__(self, num_classes: int, residual: bool, width: int, small_stem: bool, dropout: float):
        super().__init__()
        if small_stem:
            stem = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        blocks: list[nn.Module] = []
        cin = width
        for stage in range(4):
            cout = width * 2 ** stage
            for b in range(2):
                blocks.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1, residual=residual))
                cin = cout
        self.features = nn.Sequential(*stem, *blocks)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))


@register_model()
def resnet18(num_classes: int = 3, width: int = 64, small_stem: bool = False, dropout: float = 0.0) -> nn.Module:
    """ResNet-18: residual blocks with 1x1 projection shortcuts."""
    return ResNet18Layout(num_classes, residual=True, width=width, small_stem=small_stem, dropout=dropout)


@register_model()
def plain18(num_classes: int = 3, width: int = 64, small_stem: bool = False, dropout: float = 0.0) -> nn.Module:
    """ResNet-18's exact layers without any shortcut: the same-depth plain net."""
    return ResNet18Layout(num_classes, residual=False, width=width, small_stem=small_stem, dropout=dropout)
