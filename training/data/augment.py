"""Batch augmentation on uint8-range image tensors, vectorised so it costs little on 2 CPU cores.

Presets, from none to the default:
- ``none``: nothing.
- ``basic``: horizontal flip and a random scale/shift crop.
- ``color``: ``basic`` + brightness, contrast and saturation jitter.
- ``night``: ``color`` + strong exposure drops, gamma, per-channel colour casts and occasional
  grayscale. The tail split's test cars are mostly night shots while every dark training image
  is a bus or truck; darkening and tinting all classes alike stops "dark and blue" from being
  evidence of the label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = False
    crop_scale: float = 1.0        # smallest zoom-in factor's inverse: 0.75 keeps >= 75% of each side
    shift: float = 0.0             # max translation as a fraction of the side
    brightness: float = 0.0        # multiplicative jitter, +- fraction
    contrast: float = 0.0
    saturation: float = 0.0
    night_p: float = 0.0           # probability of a night-like exposure drop
    night_gain: tuple[float, float] = (0.25, 0.7)
    gamma: float = 0.0             # log-uniform gamma in [exp(-g), exp(g)]
    channel_cast: float = 0.0      # per-channel gain jitter (colour cast), +- fraction
    grayscale_p: float = 0.0


PRESETS = {
    "none": AugmentConfig(),
    "basic": AugmentConfig(flip=True, crop_scale=0.8, shift=0.08),
    "color": AugmentConfig(flip=True, crop_scale=0.8, shift=0.08, brightness=0.3, contrast=0.3, saturation=0.4),
    "night": AugmentConfig(flip=True, crop_scale=0.8, shift=0.08, brightness=0.3, contrast=0.3, saturation=0.5,
                           night_p=0.5, gamma=0.5, channel_cast=0.25, grayscale_p=0.1),
}


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.empty(n, 1, 1, 1, device=device).uniform_(low, high)


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


class BatchAugment(nn.Module):
    """Applies an ``AugmentConfig`` independently to each image of a float batch in [0, 255]."""

    def __init__(self, preset: str | AugmentConfig = "night"):
        super().__init__()
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"augmentation preset must be one of {sorted(PRESETS)}, got {preset!r}")
            preset = PRESETS[preset]
        self.config = preset

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c, x = self.config, images.float()
        n, dev = x.shape[0], x.device
        if c.flip:
            flip = torch.rand(n, 1, 1, 1, device=dev) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        if c.crop_scale < 1.0 or c.shift > 0:
            x = self._geometric(x)
        x = x / 255.0
        if c.night_p > 0:
            dark = torch.rand(n, 1, 1, 1, device=dev) < c.night_p
            x = torch.where(dark, x * _uniform(n, *c.night_gain, dev), x)
        if c.brightness > 0:
            x = x * _uniform(n, 1 - c.brightness, 1 + c.brightness, dev)
        if c.contrast > 0:
            mean = _luma(x).mean(dim=(2, 3), keepdim=True)
            x = (x - mean) * _uniform(n, 1 - c.contrast, 1 + c.contrast, dev) + mean
        if c.saturation > 0:
            gray = _luma(x)
            x = (x - gray) * _uniform(n, 1 - c.saturation, 1 + c.saturation, dev) + gray
        if c.channel_cast > 0:
            x = x * torch.empty(n, 3, 1, 1, device=dev).uniform_(1 - c.channel_cast, 1 + c.channel_cast)
        x = x.clamp(0, 1)
        if c.gamma > 0:
            x = x.clamp_min(1e-4) ** torch.exp(_uniform(n, -c.gamma, c.gamma, dev))
        if c.grayscale_p > 0:
            gray = torch.rand(n, 1, 1, 1, device=dev) < c.grayscale_p
            x = torch.where(gray, _luma(x).expand_as(x), x)
        return x * 255.0

    def _geometric(self, x: torch.Tensor) -> torch.Tensor:
        """Random zoom-in (scale in [crop_scale, 1]) and shift, as one affine resample."""
        c, n, dev = self.config, x.shape[0], x.device
        scale = torch.empty(n, device=dev).uniform_(c.crop_scale, 1.0)
        tx, ty = (torch.empty(n, device=dev).uniform_(-c.shift, c.shift) * 2 for _ in range(2))
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0] = scale
        theta[:, 1, 1] = scale
        theta[:, 0, 2] = tx.clamp(-(1 - scale) - c.shift, (1 - scale) + c.shift)
        theta[:, 1, 2] = ty.clamp(-(1 - scale) - c.shift, (1 - scale) + c.shift)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def night_view(images: torch.Tensor, gain: float = 0.35, cast: tuple[float, float, float] = (0.8, 0.9, 1.2)) -> torch.Tensor:
    """A fixed, deterministic "night" rendering of a batch (dark, blue cast), used to score a
    validation set under the shift the test split has, without touching the test split."""
    x = images.float() / 255.0 * gain * torch.tensor(cast, device=images.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) ** math.exp(0.3) * 255.0).round().to(torch.uint8)
