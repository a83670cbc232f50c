"""Training engine: plain ``train_one_epoch`` / ``evaluate`` functions and ``train_classifier``,
which wires data, network, optimiser, checkpoints and MLflow together for one run."""
from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from . import interrupts, tracking
from .config import ClassifyConfig
from .data.augment import BatchAugment, night_view
from .data.vehicles import carve_validation, lighting_balanced, load_images, split_vehicles
from .metrics import accuracy_by_lighting, classification_report, confusion_matrix
from .nets import build_classifier, count_parameters

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The final linear layer's parameters: what linear probing trains."""
    return list([m for m in model.modules() if isinstance(m, nn.Linear)][-1].parameters())


def freeze_all_but_head(model: nn.Module, frozen: bool) -> None:
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(not frozen or id(p) in head)


def make_optimizer(cfg: ClassifyConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD; no weight decay on biases and norms; the backbone's lr scaled by
    ``backbone_lr_scale`` (one group each, so schedulers scale every group alike)."""
    head = {id(p) for p in head_parameters(model)}
    groups = []
    for is_head in (False, True):
        lr = cfg.lr if is_head else cfg.lr * cfg.backbone_lr_scale
        params = [p for p in model.parameters() if (id(p) in head) == is_head]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return (torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam)(groups, lr=cfg.lr)


def make_scheduler(cfg: ClassifyConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total > 0:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total, pct_start=0.2)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def restore_checkpoint(path: str, device: torch.device, model: nn.Module, optimizer, scheduler) -> dict:
    """Load an epoch checkpoint into model, optimiser and scheduler; the caller takes what else it
    saved (epoch, history, MLflow run id, EMA or generator state) from the returned dict."""
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming %s at epoch %d (MLflow run %s)", path, state["epoch"] + 1, state["run_id"])
    return state


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer, scheduler, device: torch.device,
                    augment: nn.Module, label_smoothing: float = 0.0, ema: AveragedModel | None = None,
                    desc: str = "train") -> dict[str, float]:
    model.train()
    for m in model.modules():  # frozen BatchNorm layers keep their (pretrained) statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=None):
        interrupts.raise_if_pending()
        images, labels = augment(images.to(device)), labels.to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(labels)
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}


def fit_linear_probe(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, l2: float,
                     device: torch.device) -> None:
    """Fit the final linear layer as an L2-regularised logistic regression on frozen features.

    The standard linear-probe protocol for pretrained backbones: features of every training image
    and its mirror image are taken once (eval mode), then full-batch L-BFGS minimises mean
    cross-entropy + l2/2 * ||W||^2. Frozen pretrained features keep what makes them robust to
    distribution shift; fine-tuning them on a small set is what distorts them.
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().cpu()))
    try:
        predict_logits(model, torch.cat([images, images.flip(-1)]), device)
    finally:
        hook.remove()
    features, targets = torch.cat(captured).to(device), torch.cat([labels, labels]).to(device)
    weight, bias = head.weight, head.bias
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, targets) + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    batches = []
    for start in range(0, len(images), batch_size):
        interrupts.raise_if_pending()
        batches.append(model(images[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(batches)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
             device: torch.device, prefix: str = "test") -> tuple[dict[str, float], np.ndarray]:
    """Loss, accuracy, macro-F1 and per-class scores with ``prefix``; also the predictions."""
    logits = predict_logits(model, images, device)
    predictions = logits.argmax(1).numpy()
    report = classification_report(confusion_matrix(labels.numpy(), predictions, len(classes)), classes)
    report["loss"] = F.cross_entropy(logits, labels).item()
    return {f"{prefix}_{k}": v for k, v in report.items()}, predictions


@dataclass
class ClassifyResult:
    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    model: nn.Module
    checkpoint: Path


def _tensors(samples, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_images(samples, (size, size))
    return torch.from_numpy(images), torch.from_numpy(labels)


def train_classifier(cfg: ClassifyConfig, nested: bool = False) -> ClassifyResult:
    """Train one classifier as one MLflow run; checkpoints every epoch; resumable."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    split = split_vehicles(cfg.data, cfg.test_fraction, cfg.split, cfg.seed)
    fit_samples, val_samples = carve_validation(split.train, cfg.val_fraction, len(split.classes))
    train_x, train_y = _tensors(fit_samples, cfg.image_size)
    dropped = []
    if cfg.balance_lighting:
        keep = lighting_balanced(train_x.numpy(), train_y.numpy(), len(split.classes))
        kept = set(keep.tolist())
        dropped = [s for i, s in enumerate(fit_samples) if i not in kept]
        train_x, train_y = train_x[keep], train_y[keep]
    test_x, test_y = _tensors(split.test, cfg.image_size)
    val_x, val_y = _tensors(val_samples, cfg.image_size) if val_samples else (None, None)

    model = build_classifier(cfg.net, len(split.classes), (cfg.image_size, cfg.image_size), cfg.normalization,
                             **(cfg.net_options or {})).to(device)
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=len(train_y) > cfg.batch_size, generator=generator)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, len(loader))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema_decay else None
    augment = BatchAugment(cfg.augment)

    start_epoch, history, run_id = 0, [], None
    if cfg.resume:
        state = restore_checkpoint(cfg.resume, device, model, optimizer, scheduler)
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]

    with tracking.tracked_run(cfg.experiment, cfg.run_name or cfg.net, run_id=run_id, nested=nested,
                              tags={"task": "classify", "net": cfg.net}) as run:
        checkpoint = Path(cfg.checkpoint_dir) / run.info.run_id / "last.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if run_id is None:
            tracking.log_params({**cfg.params(), "parameters": count_parameters(model), "device": str(device),
                                 "classes": split.classes, **{f"data.{k}": v for k, v in split.summary().items()},
                                 "data.lighting_dropped": len(dropped)})
            mlflow.log_text("\n".join(f"{p}\t{why}" for p, why in split.excluded) or "none", "data/excluded.tsv")
            if dropped:
                mlflow.log_text("\n".join(str(s.path) for s in dropped), "data/lighting_dropped.txt")
        evaluated = ema.module if ema is not None else model
        started = time.perf_counter() - sum(h["epoch_seconds"] for h in history)
        if cfg.linear_probe_l2 > 0 and start_epoch == 0:
            tick = time.perf_counter()
            fit_linear_probe(model, train_x, train_y, cfg.linear_probe_l2, device)
            probe = {"probe_seconds": time.perf_counter() - tick, **evaluate(model, test_x, test_y, split.classes, device)[0]}
            if val_x is not None:
                probe.update(evaluate(model, val_x, val_y, split.classes, device, "val")[0])
            mlflow.log_metrics(probe, step=0)
            if ema is not None:
                ema.module.load_state_dict(model.state_dict())
        for epoch in range(start_epoch, cfg.epochs):
            tick = time.perf_counter()
            freeze_all_but_head(model, frozen=epoch < cfg.head_only_epochs)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"]}
            row.update(train_one_epoch(model, loader, optimizer, scheduler, device, augment, cfg.label_smoothing,
                                       ema, desc=f"epoch {epoch + 1}/{cfg.epochs}"))
            row["epoch_seconds"] = time.perf_counter() - tick
            row.update(evaluate(evaluated, test_x, test_y, split.classes, device)[0])
            if val_x is not None:
                row.update(evaluate(evaluated, val_x, val_y, split.classes, device, "val")[0])
                row.update(evaluate(evaluated, night_view(val_x), val_y, split.classes, device, "val_night")[0])
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "epoch": epoch + 1, "history": history, "run_id": run.info.run_id}, checkpoint)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                            if k in ("train_loss", "test_accuracy", "test_macro_f1", "epoch_seconds")))
        final, predictions = evaluate(evaluated, test_x, test_y, split.classes, device)
        final.update({f"test_{k}": v for k, v in accuracy_by_lighting(test_x.numpy(), test_y.numpy(), predictions).items()})
        final["total_seconds"] = time.perf_counter() - started
        mlflow.log_metrics(final)
        _log_artifacts(cfg, evaluated, split, test_x, test_y, predictions, history)
    return ClassifyResult(run.info.run_id, final, history, evaluated, checkpoint)


def _log_artifacts(cfg: ClassifyConfig, model: nn.Module, split, test_x: torch.Tensor, test_y: torch.Tensor,
                   predictions: np.ndarray, history: list[dict[str, float]]) -> None:
    classes = split.classes
    cm = confusion_matrix(test_y.numpy(), predictions, len(classes))
    tracking.log_figure(tracking.confusion_figure(cm, classes), "plots/confusion_matrix.png")
    tracking.log_figure(tracking.curves_figure(history, {
        "loss": ["train_loss", "test_loss", "val_loss"],
        "accuracy": ["train_accuracy", "test_accuracy", "val_accuracy", "val_night_accuracy"],
        "macro-F1": ["test_macro_f1", "val_macro_f1"]}), "plots/curves.png")
    wrong = np.flatnonzero(predictions != test_y.numpy())[:32]
    tracking.log_figure(tracking.image_grid_figure(
        [test_x[i].numpy() for i in wrong],
        [f"{split.test[i].path.name}\n{classes[test_y[i]]}->{classes[predictions[i]]}" for i in wrong]),
        "plots/misclassified.png")
    mlflow.log_dict({"classes": list(classes), "confusion_matrix": cm.tolist(),
                     "report": classification_report(cm, classes)}, "metrics/test_report.json")
    # Weights and the options to rebuild them: what `roadsight export` loads (no pickle involved).
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.save(model.state_dict(), tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps({**asdict(cfg), "classes": list(classes)}, indent=2))
        mlflow.log_artifacts(str(tmp), "checkpoint")
    if cfg.log_model:
        example = test_x[:2].numpy()
        mlflow.pytorch.log_model(model.cpu().eval(), name="model", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

