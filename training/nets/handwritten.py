"""Hand-written 2-D convolution: the lab's ``corr2d`` loop and a vectorised im2col layer.

``corr2d``/``LoopConv2d`` follow the lab slides literally and are kept for teaching and for
timing; ``HandConv2d`` is the one that trains (unfold + one matmul, equal to ``F.conv2d``
in forward and gradients, with stride, padding, dilation and multi-channel in/out).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cnn import plain_cnn_layers, ConvHead
from .registry import register_model


def corr2d(X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """The lab's 2-D cross-correlation of one (H, W) map with one (k_h, k_w) kernel, by loops."""
    h, w = K.shape
    Y = torch.zeros((X.shape[0] - h + 1, X.shape[1] - w + 1), dtype=torch.result_type(X, K))
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            Y[i, j] = (X[i : i + h, j : j + w] * K).sum()
    return Y


def _init_conv_parameters(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """The same initialisation as ``nn.Conv2d`` so the hand-written twins train alike."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class LoopConv2d(nn.Module):
    """Multi-channel convolution built from ``corr2d`` exactly as the lab does (stride 1, no padding).

    Orders of magnitude slower than ``HandConv2d``: used to check agreement and to time it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv_parameters(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for sample in x:
            maps = [sum(corr2d(sample[c], k[c]) for c in range(sample.shape[0])) for k in self.weight]
            outputs.append(torch.stack(maps))
        y = torch.stack(outputs)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class HandConv2d(nn.Module):
    """Convolution as im2col (``F.unfold``) followed by a single matrix product."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, bias: bool = True):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _init_conv_parameters(self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        out_h = (h + 2 * p - d * (k - 1) - 1) // s + 1
        out_w = (w + 2 * p - d * (k - 1) - 1) // s + 1
        columns = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*k*k, L)
        y = self.weight.flatten(1) @ columns  # (O, C*k*k) @ (N, C*k*k, L) -> (N, O, L)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1)
        return y.view(n, -1, out_h, out_w)

    def extra_repr(self) -> str:
        o, i = self.weight.shape[:2]
        return f"{i}, {o}, kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, dilation={self.dilation}"


@register_model()
def hand_cnn(num_classes: int = 3, depth: int = 3, kernel_size: int = 3, width: int = 32, pool: bool = True) -> nn.Module:
    """The lab CNN (``cnn``) with every ``nn.Conv2d`` replaced by ``HandConv2d``."""
    layers, channels = plain_cnn_layers(depth, kernel_size, width, pool, conv=HandConv2d)
    return ConvHead(layers, channels, num_classes)
