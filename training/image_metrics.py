"""Image-restoration metrics: PSNR and SSIM on RGB images in [0, 1], one image at a time.

SSIM is Wang et al. (2004): an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, each
channel's map averaged over the pixels whose window lies inside the image (what scikit-image's
``structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)`` reports).
The map is written with slicing and arithmetic only, so the same code scores NumPy images (the
ONNX evaluator needs no torch) and serves as a differentiable training loss on torch tensors.
"""
from __future__ import annotations

import math

import numpy as np

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> list[float]:
    """Normalised 1-D Gaussian taps (as Python floats, so they scale NumPy and torch alike)."""
    x = np.arange(size) - (size - 1) / 2
    taps = np.exp(-(x**2) / (2 * sigma**2))
    return [float(t) for t in taps / taps.sum()]


def _blur(image, taps: list[float]):
    """Separable 'valid' filtering over the last two axes."""
    n = len(taps)
    height, width = image.shape[-2:]
    rows = sum(t * image[..., k : height - n + 1 + k, :] for k, t in enumerate(taps))
    return sum(t * rows[..., k : width - n + 1 + k] for k, t in enumerate(taps))


def ssim_map(x, y, data_range: float = 1.0):
    """Local SSIM of ``x`` against ``y`` (arrays or tensors, ``(..., H, W)``), per channel."""
    if min(x.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW}, got {tuple(x.shape[-2:])}")
    taps = gaussian_window()
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_x, mu_y = _blur(x, taps), _blur(y, taps)
    var_x = _blur(x * x, taps) - mu_x * mu_x
    var_y = _blur(y * y, taps) - mu_y * mu_y
    cov = _blur(x * y, taps) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of one image (CHW or HW, float in [0, 1]) against its reference."""
    return float(ssim_map(np.asarray(x, np.float64), np.asarray(y, np.float64)).mean())


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    """PSNR in dB of one image (float in [0, 1]) against its reference; inf when identical."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 image to float64 in [0, 1]."""
    return np.asarray(image, np.float64) / 255.0


def quantize(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] image to uint8, as any saved or served output is: scores are taken after this."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def mean_scores(pairs) -> dict[str, float]:
    """Per-image PSNR and SSIM averaged over ``(output, reference)`` uint8 image pairs."""
    scores = [(psnr(to_unit(o), to_unit(r)), ssim(to_unit(o), to_unit(r))) for o, r in pairs]
    if not scores:
        raise ValueError("no images to score")
    return {"psnr": float(np.mean([s[0] for s in scores])), "ssim": float(np.mean([s[1] for s in scores])),
            "images": len(scores)}
