"""What the final linear layer of a classifier sees, per image and its mirror image, cached on disk.

A frozen backbone (``--epochs 0``) gives every image the same features in every run, fold and
refit, and the feature pass is most of a probe's cost on a CPU; the head itself fits in seconds.
So features are stored under a key made of the backbone's weights (every tensor but the final
layer's), the input normalisation and the image size, one entry per image's bytes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import distributed

log = logging.getLogger(__name__)


def final_linear(model: nn.Module) -> nn.Linear:
    """The final linear layer: what a linear probe fits."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def logit_offset(model: nn.Module, features: torch.Tensor) -> torch.Tensor | float:
    """What the model adds to the final layer's logits for these features (a fixed prior such as
    ``nets.pretrained.PriorHead``'s), or 0."""
    head = next((m for m in model.modules() if hasattr(m, "logit_offset")), None)
    return head.logit_offset(features) if head is not None else 0.0


@torch.no_grad()
def head_inputs(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Inputs of the final linear layer for ``images`` and their mirror images: (2, N, D), eval mode.
    Under torchrun each process computes its share and every process gets them all."""
    model.eval()
    share = distributed.shard(images)
    captured: list[torch.Tensor] = []
    hook = final_linear(model).register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].float().cpu()))
    try:
        for view in (share, share.flip(-1)):
            for start in range(0, len(view), batch_size):
                distributed.raise_if_interrupted()
                model(view[start : start + batch_size].to(device))
    finally:
        hook.remove()
    by_image = torch.cat(captured).view(2, len(share), -1).transpose(0, 1).contiguous()
    return distributed.gather(by_image, len(images)).transpose(0, 1)


def backbone_key(model: nn.Module, image_size: int) -> str:
    """sha256 of what shapes the features: every weight and buffer by name but those of the head (the
    final layer and any prior beside it), the input normalisation and the input size."""
    head = {id(t) for m in model.modules() if m is final_linear(model) or hasattr(m, "logit_offset")
            for t in (*m.parameters(), *m.buffers())}
    normalize = getattr(model, "normalize", None)
    digest = hashlib.sha256(f"{normalize!r}|{image_size}".encode())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in head and not name.endswith("temperature"):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_head_inputs(model: nn.Module, paths: list[Path], images: torch.Tensor, device: torch.device,
                       folder: str | None) -> torch.Tensor:
    """``head_inputs`` of the images decoded from ``paths``, computed only for images not in the cache
    at ``folder`` (None or '': no cache)."""
    if not folder:
        return head_inputs(model, images, device)
    store = Path(folder).expanduser() / f"{backbone_key(model, images.shape[-1])}.npz"
    cached: dict[str, np.ndarray] = {}
    if store.is_file():
        with np.load(store) as saved:
            cached = dict(zip(saved["digests"].tolist(), saved["features"]))
    digests = [file_digest(p) for p in paths]
    missing = list({d: i for i, d in enumerate(digests) if d not in cached}.values())  # each distinct image once
    missing = distributed.union(missing)  # the feature pass is shared: every process asks for the same images
    if missing:
        log.info("feature cache %s: computing %d of %d images", store.name, len(missing), len(paths))
        fresh = head_inputs(model, images[missing], device).numpy()
        cached.update({digests[i]: fresh[:, j] for j, i in enumerate(missing)})
        store.parent.mkdir(parents=True, exist_ok=True)
        partial = store.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(partial, digests=np.array(list(cached)), features=np.stack(list(cached.values())))
        partial.replace(store)
    return torch.from_numpy(np.stack([cached[d] for d in digests], axis=1))
