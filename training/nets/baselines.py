"""AlexNet adapted to small inputs, and an MLP baseline, for comparison with the CNNs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .registry import register_model


class AlexNet(nn.Module):
    """AlexNet's five conv layers (64-192-384-256-256, three max-pools) and its dropout MLP head.

    Adapted to the input size: the first conv is 11x11/4 for inputs of 160 px and more (as in
    the paper), 5x5/2 below; the classifier's input is sized from the feature map it gets, so
    any configured input size works.
    """

    def __init__(self, num_classes: int, image_size: tuple[int, int], hidden: int, dropout: float):
        super().__init__()
        large = min(image_size) >= 160
        k, s, p = (11, 4, 2) if large else (5, 2, 2)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, k, stride=s, padding=p), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, ceil_mode=True),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 3, *image_size)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model()
def alexnet(num_classes: int = 3, image_size: Sequence[int] = (64, 64), hidden: int = 1024, dropout: float = 0.5) -> nn.Module:
    return AlexNet(num_classes, (int(image_size[0]), int(image_size[1])), hidden, dropout)


@register_model()
def mlp(num_classes: int = 3, hidden: Sequence[int] = (512, 256), pool_to: int = 32, dropout: float = 0.2) -> nn.Module:
    """Fully connected baseline on the image average-pooled to ``pool_to`` x ``pool_to``."""
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool_to), nn.Flatten()]
    cin = 3 * pool_to * pool_to
    for h in hidden:
        layers += [nn.Linear(cin, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        cin = h
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)
