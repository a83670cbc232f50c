"""The shipped ONNX models rebuilt as eager torch modules, for the torch-vs-onnxruntime timings and
the naive per-request server.

The models' MLflow runs are not needed: the architectures come from ``training.nets`` (named in
each JSON's ``source``) and the weights from the ONNX initializers, matched to the state_dict by name.
The exporter folded every BatchNorm into the convolution before it (``<conv>.weight`` scaled, its
shift stored as ``<conv>.weight_bias``), so those BatchNorms are loaded as identities carrying the
shift: the same function and the same eager work as the trained module in eval mode. Anything the
ONNX file lacks keeps its fresh initialisation and is reported, and ``parity`` compares the twin's
output with onnxruntime's on real images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from training.nets import build_classifier, get_model, model_options


@dataclass
class Twin:
    model: nn.Module
    contract: dict
    loaded: list[str] = field(default_factory=list)
    not_in_onnx: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        source = self.contract["source"]
        return {"net": source["net"], "weights": "shipped ONNX initializers" if not self.not_in_onnx
                else "shipped ONNX initializers; not in the ONNX file (fresh initialisation): "
                     + ", ".join(self.not_in_onnx),
                "tensors_loaded": len(self.loaded)}


def _initializers(onnx_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    graph = onnx.load(str(onnx_path)).graph
    return {tensor.name.removeprefix(prefix): torch.from_numpy(numpy_helper.to_array(tensor).copy())
            for tensor in graph.initializer}


def _load_by_name(model: nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy ONNX initializers into ``model`` by state_dict name, unfolding Conv+BatchNorm pairs."""
    state = model.state_dict()
    loaded = []
    previous_conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            previous_conv = name
        elif isinstance(module, nn.BatchNorm2d) and previous_conv and f"{previous_conv}.weight_bias" in weights:
            shift = weights[f"{previous_conv}.weight_bias"]
            state[f"{name}.weight"] = torch.ones_like(shift)
            state[f"{name}.bias"] = shift
            state[f"{name}.running_mean"] = torch.zeros_like(shift)
            state[f"{name}.running_var"] = torch.full_like(shift, 1.0 - module.eps)  # (x - 0) / sqrt(var + eps) = x
            loaded += [f"{name}.{part}" for part in ("weight", "bias", "running_mean", "running_var")]
            previous_conv = None
    for name, tensor in weights.items():
        if name in state and state[name].shape == tensor.shape:
            state[name] = tensor
            loaded.append(name)
    model.load_state_dict(state)
    skipped = [name for name in state if name not in loaded and not name.endswith("num_batches_tracked")]
    return loaded, skipped


def classifier_twin(models_dir: Path) -> Twin:
    """The shipped vehicle classifier (ImageClassifier: normalisation + backbone) plus its softmax."""
    contract = json.loads((models_dir / "vehicle_classifier.json").read_text())
    config = contract["source"]["training_config"]
    spec = contract["input"]
    net, options = contract["source"]["net"], dict(contract["source"]["net_options"] or {})
    # The ONNX file has every weight: no ImageNet load needed, except to build an ImageNet prior head
    # (the package's weights, then overwritten by the file's).
    if "pretrained" in model_options(net) and not options.get("imagenet_prior"):
        options["pretrained"] = False
    classifier = build_classifier(net, len(contract["labels"]), (spec["height"], spec["width"]),
                                  config["normalization"], **options)
    loaded, skipped = _load_by_name(classifier, _initializers(models_dir / contract["file"], "classifier."))
    model = nn.Sequential(classifier, nn.Softmax(dim=1)).eval()
    return Twin(model, contract, loaded, skipped)


def dehazer_twin(models_dir: Path) -> Twin:
    """The shipped dehazer's architecture from ``training.nets`` with the weights the ONNX file has."""
    contract = json.loads((models_dir / "dehazer.json").read_text())
    model = get_model(contract["source"]["net"], **(contract["source"]["net_options"] or {}))
    loaded, skipped = _load_by_name(model, _initializers(models_dir / contract["file"], ""))
    return Twin(model.eval(), contract, loaded, skipped)


@torch.no_grad()
def parity(twin: Twin, session, batch: np.ndarray) -> float:
    """Max |torch - onnxruntime| over ``batch`` (the model's contract input)."""
    inputs = session.get_inputs()[0].name
    (expected,) = session.run(None, {inputs: batch})
    return float(np.abs(twin.model(torch.from_numpy(batch)).numpy() - expected).max())
