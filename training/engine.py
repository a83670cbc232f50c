"""Training engine: plain ``train_one_epoch`` / ``evaluate`` functions and ``train_classifier``,
which wires data, network, optimiser, checkpoints and MLflow together for one run, in one process
or several under torchrun (see ``distributed``)."""
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
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from . import distributed, tracking
from .config import ClassifyConfig
from .data.augment import BatchAugment, night_view
from .data.vehicles import (Sample, blocked_folds, carve_validation, labelled_folder, lighting_balanced, load_images, parse_cv,
                            source_group, split_vehicles)
from .features import cached_head_inputs, final_linear, logit_offset
from .metrics import (accuracy_by_lighting, classification_report, confusion_matrix, expected_calibration_error,
                      reliability_bins)
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
    return list(final_linear(model).parameters())


def freeze_all_but_head(model: nn.Module, frozen: bool) -> None:
    """Only the head trains (``frozen``) or everything does, except the parameters of modules marked
    ``fixed`` (the ImageNet prior's rows), which no training step changes."""
    head = {id(p) for p in head_parameters(model)}
    fixed = {id(p) for module in model.modules() if getattr(module, "fixed", False) for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in fixed and (not frozen or id(p) in head))


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
                    desc: str = "train") -> tuple[dict[str, float], list[float]]:
    """One pass over ``loader``: the epoch's loss and accuracy, and each step's loss, over every process."""
    model.train()
    for m in model.modules():  # frozen BatchNorm layers keep their (pretrained) statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()
    steps = []  # per step: loss x samples, samples, correct
    for images, labels in distributed.progress(loader, desc):
        distributed.raise_if_interrupted()
        images, labels = augment(images.to(device)), labels.to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        steps.append([loss.item() * len(labels), len(labels), (logits.argmax(1) == labels).sum().item()])
    totals = distributed.sum_over_processes(torch.tensor(steps))
    loss_sum, seen, correct = totals.sum(0).tolist()
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen}, (totals[:, 0] / totals[:, 1]).tolist()


def fit_linear_probe(model: nn.Module, features: torch.Tensor, labels: torch.Tensor, l2: float,
                     device: torch.device, weights: torch.Tensor | None = None) -> None:
    """Fit the final linear layer as an L2-regularised logistic regression on frozen features.

    The standard linear-probe protocol for pretrained backbones: ``features`` are what the final
    layer sees for every training image and its mirror image (``features.head_inputs``, (2, N, D)),
    and full-batch L-BFGS minimises the mean cross-entropy (weighted by ``weights``, one per image, if
    given) + l2/2 * ||W||^2 (around the model's fixed ``logit_offset``, if it has one: the larger l2,
    the closer to that prior). Frozen pretrained features keep what makes them robust to distribution
    shift; fine-tuning them on a small set is what distorts them.
    """
    head = final_linear(model)
    features, targets = features.reshape(-1, features.shape[-1]).to(device), labels.repeat(len(features)).to(device)
    weights = (torch.ones(len(labels)) if weights is None else weights).repeat(len(targets) // len(labels)).to(device)
    with torch.no_grad():
        offset = logit_offset(model, features)
    weight, bias = head.weight, head.bias
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (weights * F.cross_entropy(features @ weight.T + bias + offset, targets, reduction="none")).sum() \
            / weights.sum() + l2 / 2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    distributed.broadcast_from_main(weight, bias)  # the same fit everywhere, to the last bit across machines


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T minimising the cross-entropy of softmax(logits / T) (Guo et al., 2017)."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits of every image, on every process; each process computes its share of them."""
    model.eval()
    share, batches = distributed.shard(images), []
    for start in range(0, len(share), batch_size):
        distributed.raise_if_interrupted()
        batches.append(model(share[start : start + batch_size].to(device)).float().cpu())
    return distributed.gather(torch.cat(batches), len(images))


def score_logits(logits: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], prefix: str,
                 groups: list[str] | None = None) -> dict[str, float]:
    """Loss, accuracy, macro-F1, calibration error and per-class scores with ``prefix``; with ``groups``
    (one source name per image) also accuracy and per-class recall within each source."""
    predictions = logits.argmax(1).numpy()
    truth = labels.numpy()
    report = classification_report(confusion_matrix(truth, predictions, len(classes)), classes)
    report["loss"] = F.cross_entropy(logits, labels).item()
    report["ece"] = expected_calibration_error(torch.softmax(logits, 1).numpy(), truth)
    for group in sorted(set(groups or [])) if any(groups or []) else []:
        mask = np.array([g == group for g in groups])
        name = group or "unprefixed"
        report[f"{name}_accuracy"] = float((predictions[mask] == truth[mask]).mean())
        for i, c in enumerate(classes):
            members = mask & (truth == i)
            if members.any():
                report[f"{name}_recall_{c}"] = float((predictions[members] == i).mean())
    return {f"{prefix}_{k}": v for k, v in report.items()}


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...],
             device: torch.device, prefix: str = "test") -> tuple[dict[str, float], np.ndarray]:
    """``score_logits`` of the model on ``images``; also the predictions."""
    logits = predict_logits(model, images, device)
    return score_logits(logits, labels, classes, prefix), logits.argmax(1).numpy()


def head_logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The model's logits from what its final layer sees (one view of ``head_inputs``): a frozen
    backbone's runs, folds and other-source scores never repeat the feature pass."""
    with torch.no_grad():
        return (final_linear(model)(features) + logit_offset(model, features)) / model.temperature


@dataclass
class ClassifyResult:
    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    model: nn.Module
    checkpoint: Path


@dataclass
class Images:
    """Decoded, stretched images of one part of a run, with their files, labels and the weight each
    image has in a linear probe's fit (1 unless ``with_extra`` set it)."""

    samples: list[Sample]
    x: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor | None = None

    def __post_init__(self):
        if self.weight is None:
            self.weight = torch.ones(len(self.y))

    @classmethod
    def load(cls, samples: list[Sample], size: int) -> "Images":
        images, labels = load_images(samples, (size, size))
        return cls(list(samples), torch.from_numpy(images), torch.from_numpy(labels))

    def subset(self, index) -> "Images":
        index = list(index)
        return Images([self.samples[i] for i in index], self.x[index], self.y[index], self.weight[index])

    def __add__(self, other: "Images") -> "Images":
        return Images(self.samples + other.samples, torch.cat([self.x, other.x]), torch.cat([self.y, other.y]),
                      torch.cat([self.weight, other.weight]))

    def with_extra(self, extra: "Images", share: float) -> "Images":
        """These images plus ``extra`` (the user's own camera), which carry ``share`` of the probe's fit:
        a few dozen images of the camera the model will serve would otherwise count for little beside a
        thousand course images (share 0.5: as much as all of these together)."""
        if not extra.samples:
            return self
        if not 0 < share < 1:
            raise ValueError(f"--extra-share must be between 0 and 1 (exclusive), got {share}")
        total = share / (1 - share) * float(self.weight.sum())
        return self + Images(extra.samples, extra.x, extra.y, torch.full((len(extra.y),), total / len(extra.y)))


class Recipe:
    """How a run turns images into a fitted model, shared by the run itself and its CV folds.

    With ``--epochs 0`` the backbone stays as built (ImageNet weights or a seeded init), so its
    features are computed once per image (and cached on disk) and only the head is fitted and
    scored from them; otherwise every fit trains the network on the images.
    """

    def __init__(self, cfg: ClassifyConfig, model: nn.Module, device: torch.device, num_classes: int):
        self.cfg, self.model, self.device, self.num_classes = cfg, model, device, num_classes
        self.frozen = cfg.epochs == 0
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        self._features: dict[Path, torch.Tensor] = {}

    def features(self, part: Images) -> torch.Tensor:
        """(2, N, D) head inputs of ``part``, each image's computed once per run (and cached on disk)."""
        todo = [i for i, s in enumerate(part.samples) if s.path not in self._features]
        if todo:
            fresh = cached_head_inputs(self.model, [part.samples[i].path for i in todo], part.x[todo], self.device,
                                       self.cfg.feature_cache if self.frozen else None)
            self._features.update({part.samples[i].path: fresh[:, j] for j, i in enumerate(todo)})
        return torch.stack([self._features[s.path] for s in part.samples], dim=1)

    def balanced(self, part: Images) -> Images:
        """``part`` with ``--balance-lighting`` applied (see ``lighting_balanced``)."""
        if not self.cfg.balance_lighting:
            return part
        return part.subset(lighting_balanced(part.x.numpy(), part.y.numpy(), self.num_classes))

    def fit(self, part: Images, generator: torch.Generator) -> None:
        """Reset the model to its initial state and fit it on ``part`` (CV folds; the run's own fit
        keeps its per-epoch logging and checkpoints in ``train_classifier``)."""
        self.model.load_state_dict(self.initial)
        if self.cfg.linear_probe_l2 > 0:
            fit_linear_probe(self.model, self.features(part), part.y, self.cfg.linear_probe_l2, self.device, part.weight)
        if self.cfg.epochs:
            loader = DataLoader(TensorDataset(part.x, part.y), batch_size=self.cfg.batch_size, shuffle=True,
                                drop_last=len(part.y) > self.cfg.batch_size, generator=generator)
            optimizer = make_optimizer(self.cfg, self.model)
            scheduler = make_scheduler(self.cfg, optimizer, len(loader))
            for epoch in range(self.cfg.epochs):
                freeze_all_but_head(self.model, frozen=epoch < self.cfg.head_only_epochs)
                train_one_epoch(self.model, loader, optimizer, scheduler, self.device, BatchAugment(self.cfg.augment),
                                self.cfg.label_smoothing, desc=f"fold epoch {epoch + 1}/{self.cfg.epochs}")

    def logits(self, part: Images, model: nn.Module | None = None) -> torch.Tensor:
        """Logits of ``model`` (default: the recipe's own; an EMA copy, say) on ``part``."""
        model = model or self.model
        if self.frozen:
            return head_logits(model, self.features(part)[0])
        return predict_logits(model, part.x, self.device)


def cross_validate(recipe: Recipe, course: Images, extra: Images, other: Images | None, folds: int,
                   classes: tuple[str, ...], generator: torch.Generator) -> tuple[dict[str, float], torch.Tensor]:
    """Blocked ``folds``-fold CV of the recipe on the course training part, one nested MLflow run per
    fold (fitted on the other blocks, lighting-balanced as the recipe says, plus ``extra``; scored on
    its block and on ``other``). Returns the mean and spread of the fold scores and the out-of-fold
    logits of every course image, for calibration."""
    out_of_fold = torch.zeros(len(course.y), len(classes))
    rows = []
    for i, held in enumerate(blocked_folds(course.samples, folds, len(classes))):
        held_out = set(held)
        fitted = recipe.balanced(course.subset(j for j in range(len(course.y)) if j not in held_out)).with_extra(
            extra, recipe.cfg.extra_share)
        with tracking.tracked_run(recipe.cfg.experiment, f"fold {i + 1} of {folds}", nested=True,
                                  tags={"task": "classify", "net": recipe.cfg.net, "cv_fold": str(i + 1)}):
            mlflow.log_params({"fold": i + 1, "folds": folds, "fitted_images": len(fitted.y), "held_out": len(held)})
            mlflow.log_text("\n".join(str(course.samples[j].path) for j in held), "data/held_out.txt")
            recipe.fit(fitted, generator)
            out_of_fold[held] = recipe.logits(course.subset(held))
            row = score_logits(out_of_fold[held], course.y[held], classes, "cv")
            if other is not None:
                row.update(score_logits(recipe.logits(other), other.y, classes, "other",
                                        [source_group(s.path) for s in other.samples]))
            mlflow.log_metrics(row)
        rows.append(row)
    tracking.log_predictions("cv_out_of_fold", [s.path for s in course.samples], course.y.tolist(),
                             out_of_fold.argmax(1).tolist(), classes)
    summary = {}
    for key in ("cv_accuracy", "cv_macro_f1", "other_accuracy", "other_macro_f1"):
        values = [row[key] for row in rows if key in row]
        if values:
            name = key if key.startswith("cv_") else f"cv_{key}"
            summary.update({name: float(np.mean(values)), f"{name}_std": float(np.std(values)),
                            f"{name}_min": float(np.min(values))})
    return summary, out_of_fold


def train_classifier(cfg: ClassifyConfig, nested: bool = False) -> ClassifyResult:
    """Train one classifier as one MLflow run; checkpoints every epoch; resumable. With ``cfg.cv``
    the recipe is cross-validated first (child runs) and, with ``cfg.calibrate``, a temperature is
    fitted on the out-of-fold predictions."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    processes = distributed.setup(resolve_device(cfg.device), cfg.batch_size)
    device = processes.device
    folds = parse_cv(cfg.cv)
    if folds and processes.world_size > 1:
        raise ValueError("--cv runs in one process (its folds are not distributed): leave out torchrun / --nproc")
    generator = seed_everything(cfg.seed + processes.rank)  # augmentation and dropout differ per process; DDP
    # starts every process from rank 0's weights
    split = split_vehicles(cfg.data, cfg.test_fraction, cfg.split, cfg.seed)
    classes = split.classes
    fit_samples, val_samples = carve_validation(split.train, cfg.val_fraction, len(classes))
    course = Images.load(fit_samples, cfg.image_size)
    extra = Images.load(labelled_folder(cfg.extra_data, classes) if cfg.extra_data else [], cfg.image_size)
    other = Images.load(labelled_folder(cfg.validate_on, classes), cfg.image_size) if cfg.validate_on else None
    test = Images.load(split.test, cfg.image_size) if cfg.score_test else None
    val = Images.load(val_samples, cfg.image_size) if val_samples else None

    model = build_classifier(cfg.net, len(classes), (cfg.image_size, cfg.image_size), cfg.normalization,
                             **(cfg.net_options or {})).to(device)
    recipe = Recipe(cfg, model, device, len(classes))
    fitted = recipe.balanced(course)
    dropped = sorted({s.path for s in course.samples} - {s.path for s in fitted.samples})
    fitted = fitted.with_extra(extra, cfg.extra_share)
    train_x, train_y = fitted.x, fitted.y
    # One seeded order per epoch, rank r taking every W-th sample of it: the same global batches at any
    # process count (the tail of the epoch that would make a short batch is left out)
    dataset = TensorDataset(train_x, train_y)
    sampler = DistributedSampler(dataset, processes.world_size, processes.rank, seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=processes.batch_size, sampler=sampler,
                        drop_last=len(sampler) > processes.batch_size)
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
    trained = distributed.wrap(model, processes, find_unused_parameters=cfg.head_only_epochs > 0)

    with distributed.tracked_run(processes, cfg, "classify", run_id, nested) as (tracked_id, checkpoint):
        if processes.is_main and run_id is None:
            tracking.log_params({**cfg.params(), **processes.params(), "parameters": count_parameters(model),
                                 "device": str(device), "classes": classes,
                                 **{f"data.{k}": v for k, v in split.summary().items()},
                                 "data.lighting_dropped": len(dropped), "data.extra": len(extra.y),
                                 "data.other": len(other.y) if other is not None else 0})
            mlflow.log_text("\n".join(f"{p}\t{why}" for p, why in split.excluded) or "none", "data/excluded.tsv")
            if dropped:
                mlflow.log_text("\n".join(map(str, dropped)), "data/lighting_dropped.txt")
            if extra.samples:
                mlflow.log_text("\n".join(str(s.path) for s in extra.samples), "data/extra.txt")
        evaluated = ema.module if ema is not None else model
        started = time.perf_counter() - sum(h["epoch_seconds"] for h in history)
        out_of_fold, summary = None, {}
        if folds and start_epoch == 0:
            tick = time.perf_counter()
            summary, out_of_fold = cross_validate(recipe, course, extra, other, folds, classes, generator)
            summary["cv_seconds"] = time.perf_counter() - tick
            model.load_state_dict(recipe.initial)
        if cfg.linear_probe_l2 > 0 and start_epoch == 0:
            tick = time.perf_counter()
            fit_linear_probe(model, recipe.features(fitted), train_y, cfg.linear_probe_l2, device, fitted.weight)
            probe = {"probe_seconds": time.perf_counter() - tick}
            for name, part in (("test", test), ("val", val)):
                if part is not None:
                    probe.update(score_logits(recipe.logits(part), part.y, classes, name))
            if processes.is_main:
                mlflow.log_metrics(probe, step=0)
            if ema is not None:
                ema.module.load_state_dict(model.state_dict())
        for epoch in range(start_epoch, cfg.epochs):
            tick = time.perf_counter()
            freeze_all_but_head(model, frozen=epoch < cfg.head_only_epochs)
            sampler.set_epoch(epoch)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"], "world_size": processes.world_size}
            figures, step_losses = train_one_epoch(trained, loader, optimizer, scheduler, device, augment,
                                                   cfg.label_smoothing, ema, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            row.update(figures)
            row["epoch_seconds"] = time.perf_counter() - tick
            if test is not None:
                row.update(evaluate(evaluated, test.x, test.y, classes, device)[0])
            if val is not None:
                row.update(evaluate(evaluated, val.x, val.y, classes, device, "val")[0])
                row.update(evaluate(evaluated, night_view(val.x), val.y, classes, device, "val_night")[0])
            history.append(row)
            if not processes.is_main:
                continue
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            tracking.log_steps("train_step_loss", step_losses, epoch * len(loader) + 1)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                        "epoch": epoch + 1, "history": history, "run_id": tracked_id}, checkpoint)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                            if k in ("train_loss", "test_accuracy", "test_macro_f1", "epoch_seconds")))
        final = dict(summary)
        if out_of_fold is not None and cfg.calibrate:
            final.update(calibrate(evaluated, recipe, out_of_fold, course.y, other))
        if other is not None:
            other_logits = recipe.logits(other, evaluated)
            final.update(score_logits(other_logits, other.y, classes, "other", [source_group(s.path) for s in other.samples]))
            if processes.is_main:
                tracking.log_predictions("other", [s.path for s in other.samples], other.y.tolist(),
                                         other_logits.argmax(1).tolist(), classes)
        predictions = None
        if test is not None:
            scores, predictions = evaluate(evaluated, test.x, test.y, classes, device)
            final.update(scores)
            final.update({f"test_{k}": v for k, v in accuracy_by_lighting(test.x.numpy(), test.y.numpy(), predictions).items()})
        final["total_seconds"] = time.perf_counter() - started
        if processes.is_main:
            mlflow.log_metrics(final)
            _log_artifacts(cfg, evaluated, classes, test, predictions, history)
    return ClassifyResult(tracked_id, final, history, evaluated, checkpoint)


def calibrate(model: nn.Module, recipe: Recipe, out_of_fold: torch.Tensor, labels: torch.Tensor,
              other: Images | None) -> dict[str, float]:
    """Fit the model's temperature on the out-of-fold logits (never on ``other``), and report the
    calibration error before and after on both, with reliability diagrams (``plots/reliability.png``)."""
    temperature = fit_temperature(out_of_fold, labels)
    sets = {"cv out-of-fold": ("cv", out_of_fold, labels)}
    if other is not None:
        sets["other sources"] = ("other", recipe.logits(other, model), other.y)
    model.temperature.fill_(temperature)
    panels, metrics = {}, {"temperature": temperature}
    for name, (key, logits, truth) in sets.items():
        for suffix, scaled in (("uncalibrated", logits), ("calibrated", logits / temperature)):
            probabilities = torch.softmax(scaled, 1).numpy()
            metrics[f"{key}_ece_{suffix}"] = ece = expected_calibration_error(probabilities, truth.numpy())
            panels[f"{name}, {suffix}\nECE {ece:.3f}"] = reliability_bins(probabilities, truth.numpy())
    tracking.log_figure(tracking.reliability_figure(panels), "plots/reliability.png")
    return metrics


def _log_artifacts(cfg: ClassifyConfig, model: nn.Module, classes: tuple[str, ...], test: Images | None,
                   predictions: np.ndarray | None, history: list[dict[str, float]]) -> None:
    tracking.log_figure(tracking.curves_figure(history, {
        "loss": ["train_loss", "test_loss", "val_loss"],
        "accuracy": ["train_accuracy", "test_accuracy", "val_accuracy", "val_night_accuracy"],
        "macro-F1": ["test_macro_f1", "val_macro_f1"]}), "plots/curves.png")
    if test is not None:
        cm = confusion_matrix(test.y.numpy(), predictions, len(classes))
        tracking.log_figure(tracking.confusion_figure(cm, classes), "plots/confusion_matrix.png")
        wrong = np.flatnonzero(predictions != test.y.numpy())[:32]
        tracking.log_figure(tracking.image_grid_figure(
            [test.x[i].numpy() for i in wrong],
            [f"{test.samples[i].path.name}\n{classes[test.y[i]]}->{classes[predictions[i]]}" for i in wrong]),
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
        example = (test.x if test is not None else torch.zeros(2, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8))[:2].numpy()
        mlflow.pytorch.log_model(model.cpu().eval(), name="model", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])

