"""The lab's plain CNN and its dilated (hybrid dilated convolution) variant."""
from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .registry import register_model


class ConvHead(nn.Module):
    """Feature layers, then global average pooling and one linear layer, as in the lab slides."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int):
        super().__init__()
        self.features = features
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _conv_bn_relu(conv: Callable[..., nn.Module], cin: int, cout: int, kernel_size: int, dilation: int = 1,
                  padding: int | None = None) -> list[nn.Module]:
    pad = dilation * (kernel_size - 1) // 2 if padding is None else padding
    return [conv(cin, cout, kernel_size, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def plain_cnn_layers(depth: int, kernel_size: int, width: int, pool: bool,
                     conv: Callable[..., nn.Module] = nn.Conv2d) -> tuple[nn.Sequential, int]:
    """``depth`` conv-BN-ReLU blocks, channels doubling from ``width`` (capped at 8x), each
    followed by 2x2 max pooling when ``pool`` (keeps deep settings affordable on a CPU)."""
    if not 1 <= depth <= 8:
        raise ValueError(f"depth must be 1..8, got {depth}")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    layers: list[nn.Module] = []
    cin = 3
    for i in range(depth):
        cout = width * 2 ** min(i, 3)
        layers += _conv_bn_relu(conv, cin, cout, kernel_size)
        if pool:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        cin = cout
    return nn.Sequential(*layers), cin


@register_model()
def cnn(num_classes: int = 3, depth: int = 3, kernel_size: int = 3, width: int = 32, pool: bool = True) -> nn.Module:
    """The lab CNN with ``torch.nn.Conv2d``: configurable depth and kernel size."""
    layers, channels = plain_cnn_layers(depth, kernel_size, width, pool)
    return ConvHead(layers, channels, num_classes)


def check_hdc(rates: Sequence[int], kernel_size: int = 3) -> None:
    """Raise ``ValueError`` unless ``rates``, one HDC group, satisfy hybrid dilated convolution
    (Wang et al. 2018; a sawtooth stack such as [1, 2, 5, 1, 2, 5] repeats one valid group).

    Rule 1: the rates share no common factor > 1 (else gridding remains, e.g. [2, 4, 6]).
    Rule 2: with M_n = r_n and M_i = max(M_{i+1} - 2 r_i, M_{i+1} - 2 (M_{i+1} - r_i), r_i),
    M_2 <= kernel_size, so the last layer's receptive field has no holes.
    """
    rates = list(rates)
    if not rates or any(r < 1 for r in rates):
        raise ValueError(f"dilation rates must be positive integers, got {rates}")
    common = reduce(math.gcd, rates)
    if common > 1:
        raise ValueError(f"dilation rates {rates} share the common factor {common}: stacked, they "
                         "still skip pixels (gridding); use rates like [1, 2, 5]")
    if len(rates) >= 2:
        m = rates[-1]
        for r in reversed(rates[1:-1]):
            m = max(m - 2 * r, m - 2 * (m - r), r)
        if m > kernel_size:
            raise ValueError(f"dilation rates {rates}: M_2 = {m} > kernel size {kernel_size}, so the "
                             "receptive field has holes; lower the later rates")


def receptive_field(rates: Sequence[int], kernel_size: int = 3) -> int:
    """Receptive field of stacked stride-1 dilated convolutions, in input pixels."""
    return 1 + sum((kernel_size - 1) * r for r in rates)


@register_model()
def dilated_cnn(num_classes: int = 3, rates: Sequence[int] = (1, 2, 5), kernel_size: int = 3, width: int = 32,
                enforce_hdc: bool = True) -> nn.Module:
    """The lab's dilated CNN: one stride-2 stem, then conv-BN-ReLU per rate (no padding, as in the
    slides), global average pooling. ``rates=(1, 1, 1)`` is its plain twin of equal depth;
    ``enforce_hdc=False`` admits gridding-prone rates such as (2, 2, 2) for the comparison."""
    rates = tuple(int(r) for r in rates)
    if enforce_hdc:
        check_hdc(rates, kernel_size)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    cin = width
    for i, rate in enumerate(rates):
        cout = width * 2 ** min(i + 1, 3)
        layers += _conv_bn_relu(nn.Conv2d, cin, cout, kernel_size, dilation=rate, padding=0)
        cin = cout
    return ConvHead(nn.Sequential(*layers), cin, num_classes)
