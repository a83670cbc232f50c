"""The dehazer: a small fully convolutional encoder-decoder that corrects the hazy image.

Haze follows the scattering model I = J t + A (1 - t), so the clear image is an affine function
of the hazy one per pixel, J = I / t + A (1 - 1 / t), with t and A smooth except at depth edges.
The network therefore predicts a per-pixel, per-channel gain and offset at half resolution
(cheap, and the maps are smooth) which a last full-resolution convolution sharpens at edges;
the output is the hazy input plus that correction, clipped to [0, 1]. Fine detail comes straight
from the input instead of having to pass through the bottleneck.

On the course data the haze is nearly uniform: one per-channel gain and offset fitted to each test
pair (an oracle) already scores 30.4 dB against 17.6 dB for the hazy input. A local receptive field
sees too little of the image to estimate that map, so a global branch (average-pooled bottleneck
features, two linear layers) predicts it for the whole image and the local head adds the parts
that vary with depth.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cnn import check_hdc
from .registry import register_model


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation),
                         nn.ReLU(inplace=True))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class Dehazer(nn.Module):
    """Encoder at 1/2, 1/4, 1/8 resolution; at 1/8, ``blocks`` residual blocks of dilated
    convolutions (one HDC group of ``rates`` each: a sawtooth that widens the context without
    gridding, cheap at that resolution); a global gain/offset from the pooled bottleneck; decoder
    with skips; a full-resolution head mapping (features, input) to local gain and offset. Input and output are float NCHW RGB in [0, 1]; H and W
    must be multiples of ``pad_multiple`` (see :func:`dehaze_padded`)."""

    pad_multiple = 8

    def __init__(self, width: int, rates: Sequence[int], blocks: int):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.enc1 = nn.Sequential(_conv(3, w1, stride=2), _conv(w1, w1))
        self.enc2 = nn.Sequential(_conv(w1, w2, stride=2), _conv(w2, w2))
        self.enc3 = _conv(w2, w3, stride=2)
        self.context = nn.ModuleList(nn.Sequential(*[_conv(w3, w3, dilation=r) for r in rates]) for _ in range(blocks))
        self.dec2 = _conv(w3 + w2, w2)
        self.dec1 = _conv(w2 + w1, w1)
        self.global_head = nn.Sequential(nn.Linear(w3, w3), nn.ReLU(inplace=True), nn.Linear(w3, 6))
        self.head = nn.Conv2d(w1 + 3, 6, 3, padding=1)
        for last in (self.head, self.global_head[-1]):  # start as the identity: output = hazy input
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        for block in self.context:
            e3 = e3 + block(e3)
        d2 = self.dec2(torch.cat([_up(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([_up(d2), e1], dim=1))
        whole_image = self.global_head(e3.mean(dim=(2, 3)))[:, :, None, None]
        gain, offset = (self.head(torch.cat([_up(d1), x], dim=1)) + whole_image).chunk(2, dim=1)
        return torch.clamp(x + gain * x + offset, 0.0, 1.0)


@register_model(task="dehaze")
def dehazer(width: int = 24, rates: Sequence[int] = (1, 2, 5), blocks: int = 2) -> nn.Module:
    """Encoder-decoder dehazer; ``rates``, the dilations of each bottleneck block, must be a valid
    HDC group."""
    rates = tuple(int(r) for r in rates)
    check_hdc(rates)
    if blocks < 1:
        raise ValueError(f"blocks must be at least 1, got {blocks}")
    return Dehazer(width, rates, blocks)


def dehaze_padded(model: nn.Module, hazy: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on any H x W: reflect-pad bottom/right to its ``pad_multiple``, crop back.

    The same rule the ONNX contract asks of clients (models/README.md, ``pad_multiple``).
    """
    height, width = hazy.shape[-2:]
    multiple = model.pad_multiple
    padded = F.pad(hazy, (0, -width % multiple, 0, -height % multiple), mode="reflect")
    return model(padded)[..., :height, :width]
