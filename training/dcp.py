"""Dark-channel-prior dehazing (He, Sun and Tang, CVPR 2009), with the guided-filter refinement
of the transmission (He, Sun and Tang, ECCV 2010): the classical baseline the dehazer must beat.

In haze-free outdoor patches some channel is nearly black, so the dark channel of the hazy image
measures haze: t = 1 - omega * dark(I / A). The clear image follows from the scattering model,
J = (I - A) / max(t, t0) + A. NumPy only.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LUMA = np.array([0.299, 0.587, 0.114])


def min_filter(image: np.ndarray, size: int) -> np.ndarray:
    """Minimum over size x size windows of a 2-D array (edges repeated)."""
    r = size // 2
    padded = np.pad(image, r, mode="edge")
    return sliding_window_view(sliding_window_view(padded, size, axis=0).min(-1), size, axis=1).min(-1)


def dark_channel(image: np.ndarray, patch: int) -> np.ndarray:
    """Per-pixel minimum over the channels (HWC) and a patch x patch neighbourhood."""
    return min_filter(image.min(axis=2), patch)


def atmospheric_light(image: np.ndarray, dark: np.ndarray, top: float) -> np.ndarray:
    """Among the ``top`` share of pixels with the haziest dark channel, the brightest input pixel."""
    count = max(1, int(dark.size * top))
    candidates = np.argpartition(dark.ravel(), -count)[-count:]
    pixels = image.reshape(-1, 3)[candidates]
    return pixels[pixels.sum(axis=1).argmax()]


def box_mean(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over (2r+1)^2 windows clipped to the image, from an integral image."""
    height, width = image.shape
    integral = np.pad(image, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    y0 = np.clip(np.arange(height) - radius, 0, height)
    y1 = np.clip(np.arange(height) + radius + 1, 0, height)
    x0 = np.clip(np.arange(width) - radius, 0, width)
    x1 = np.clip(np.arange(width) + radius + 1, 0, width)
    sums = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    return sums / np.outer(y1 - y0, x1 - x0)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Edge-preserving smoothing of ``source`` following the edges of the gray ``guide``."""
    mean_g, mean_s = box_mean(guide, radius), box_mean(source, radius)
    a = (box_mean(guide * source, radius) - mean_g * mean_s) / (box_mean(guide * guide, radius) - mean_g**2 + eps)
    b = mean_s - a * mean_g
    return box_mean(a, radius) * guide + box_mean(b, radius)


def dehaze_dcp(hazy: np.ndarray, *, patch: int, omega: float, t0: float, top: float, radius: int,
               eps: float) -> np.ndarray:
    """Dehaze a uint8 CHW RGB image; returns float CHW in [0, 1]. The options (and their
    defaults, He et al.'s) are those of ``config.DehazeBaselineConfig``."""
    image = np.asarray(hazy, np.float64).transpose(1, 2, 0) / 255.0
    light = atmospheric_light(image, dark_channel(image, patch), top)
    transmission = 1.0 - omega * dark_channel(image / np.maximum(light, 1e-6), patch)
    transmission = guided_filter(image @ LUMA, transmission, radius, eps)
    clear = (image - light) / np.maximum(transmission, t0)[..., None] + light
    return np.clip(clear, 0.0, 1.0).transpose(2, 0, 1)
