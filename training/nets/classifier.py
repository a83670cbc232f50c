"""The deployable classifier: raw uint8 RGB in, logits out, normalisation inside the graph.

Keeping the normalisation in the module (and so in the exported ONNX graph) means serving only
has to stretch the image to the contract's size; no mean/std constants live outside the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import get_model, model_options

LUMA_WEIGHTS = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
NORMALIZATIONS = ("equalize-gray", "equalize", "per-image", "centered", "scale")


class InputNormalization(nn.Module):
    """Maps uint8-range images to network inputs.

    ``equalize``: per-channel histogram equalisation, each 8-bit value replaced by its mid-rank
    in its own image channel (the channel's empirical CDF), then centred. Exposure, contrast and
    colour casts all vanish, which is what separates the tail split's night-time test cars from
    the daytime training cars.
    ``equalize-gray``: the same on the Rec.601 luma only, repeated to three channels. Colour is
    dropped on purpose: a night-lit car turns blue, and blue is common among training trucks.
    ``per-image``: standardise each image by its own mean and standard deviation over all pixels
    and channels. It removes global exposure and contrast, so a night shot and a day shot of the
    same vehicle start closer together (the tail split's test cars are mostly night shots), while
    colour ratios survive. ``centered``: x / 127.5 - 1, the [-1, 1] colour input the EfficientNet-Lite
    ImageNet weights were trained on (what their own ImageNet head expects). ``scale``: x / 255, the
    naive choice, kept for comparison.
    """

    def __init__(self, mode: str = "per-image"):
        super().__init__()
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "equalize":
            return self._equalize(x)
        if self.mode == "equalize-gray":
            luma = (x.float() * LUMA_WEIGHTS.to(x.device)).sum(dim=1, keepdim=True)
            return self._equalize(luma).expand(-1, 3, -1, -1)
        if self.mode == "centered":
            return x.float() / 127.5 - 1.0
        x = x.float() / 255.0
        if self.mode == "scale":
            return x
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)

    @staticmethod
    def _equalize(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        values = x.float().round().clamp(0, 255).long().reshape(n, c, h * w)
        histogram = torch.zeros(n, c, 256, device=x.device).scatter_add_(2, values, torch.ones_like(values, dtype=torch.float))
        mid_rank = (histogram.cumsum(2) - histogram / 2) / (h * w)  # fraction of pixels below, ties halved
        equalized = mid_rank.gather(2, values).reshape(n, c, h, w)
        return (equalized - 0.5) * 3.4641  # uniform [0, 1] -> zero mean, unit variance

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ImageClassifier(nn.Module):
    """``InputNormalization`` followed by a registered backbone; logits divided by a fitted
    ``temperature`` (1 until calibrated), so the exported probabilities carry the calibration."""

    def __init__(self, backbone: nn.Module, normalization: str):
        super().__init__()
        self.normalize = InputNormalization(normalization)
        self.backbone = backbone
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images)) / self.temperature

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "temperature", torch.ones(()))  # runs from before calibration existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_classifier(net: str, num_classes: int, image_size: tuple[int, int], normalization: str = "per-image",
                     **net_options) -> ImageClassifier:
    """Build network ``net`` by name; ``image_size`` reaches the nets whose layers depend on it."""
    options = dict(net_options, num_classes=num_classes)
    if "image_size" in model_options(net):
        options["image_size"] = tuple(image_size)
    return ImageClassifier(get_model(net, **options), normalization)
