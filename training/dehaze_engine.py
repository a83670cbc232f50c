"""Dehazing runs: ``train_dehazer`` (random full-resolution crops, whole-image evaluation) and
``run_baselines`` (identity and dark-channel prior), each one MLflow run.

Scores are always taken as a client would see them: whole test images at their original size,
the output rounded to 8 bits, PSNR/SSIM per image and averaged (``image_metrics``).
"""
from __future__ import annotations

import json
import logging
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
from tqdm import tqdm

from . import interrupts, tracking
from .config import DehazeBaselineConfig, DehazeConfig
from .data.dehaze import DehazeSplit, load_pair, load_pairs, random_crops, split_dehaze
from .dcp import dehaze_dcp
from .engine import make_scheduler, resolve_device, restore_checkpoint, seed_everything
from .image_metrics import mean_scores, psnr, quantize, ssim_map, to_unit
from .nets import count_parameters, get_model, model_task
from .nets.dehazer import dehaze_padded

log = logging.getLogger(__name__)

GRID_PAIRS = 6  # test pairs shown as hazy | output | clear in every run


def _split(cfg: DehazeConfig | DehazeBaselineConfig) -> DehazeSplit:
    return split_dehaze(cfg.data, cfg.test_fraction, cfg.hazy_dir, cfg.clear_dir)


def _log_data(split: DehazeSplit) -> None:
    tracking.log_params({f"data.{k}": v for k, v in split.summary().items()})
    mlflow.log_text("\n".join(f"{p}\t{why}" for p, why in split.excluded) or "none", "data/excluded.tsv")


def spaced(items: list, count: int) -> list:
    """``count`` items evenly spaced through ``items`` (all of them when count is 0 or too big)."""
    if not count or count >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def dehaze_loss(output: torch.Tensor, target: torch.Tensor, ssim_weight: float) -> torch.Tensor:
    loss = F.l1_loss(output, target)
    if ssim_weight:
        loss = loss + ssim_weight * (1.0 - ssim_map(output, target).mean())
    return loss


def train_one_epoch(model: nn.Module, images, steps: int, cfg: DehazeConfig, optimizer, scheduler,
                    device: torch.device, generator: torch.Generator, desc: str = "train") -> dict[str, float]:
    model.train()
    loss_sum = 0.0
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
        interrupts.raise_if_pending()
        hazy, clear = random_crops(images, cfg.batch_size, cfg.crop_size, generator)
        loss = dehaze_loss(model(hazy.to(device)), clear.to(device), cfg.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item()
    return {"train_loss": loss_sum / steps}


@torch.no_grad()
def dehaze_image(model: nn.Module, hazy: torch.Tensor, device: torch.device) -> np.ndarray:
    """One uint8 CHW image through the model at full resolution; uint8 CHW out."""
    model.eval()
    output = dehaze_padded(model, hazy[None].to(device).float() / 255.0)
    return quantize(output[0].cpu().numpy())


def evaluate(model: nn.Module, images, device: torch.device, prefix: str) -> tuple[dict[str, float], list[np.ndarray]]:
    """Mean PSNR/SSIM (as ``<prefix>_psnr``/``_ssim``), the outputs, and the model's throughput."""
    outputs, seconds, pixels = [], 0.0, 0
    for hazy, _ in images:
        interrupts.raise_if_pending()
        tick = time.perf_counter()
        outputs.append(dehaze_image(model, hazy, device))
        seconds += time.perf_counter() - tick
        pixels += hazy.shape[1] * hazy.shape[2]
    scores = mean_scores(zip(outputs, (clear.numpy() for _, clear in images)))
    return {f"{prefix}_psnr": scores["psnr"], f"{prefix}_ssim": scores["ssim"],
            f"{prefix}_megapixels_per_second": pixels / seconds / 1e6}, outputs


@dataclass
class DehazeResult:
    run_id: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    model: nn.Module
    checkpoint: Path


def train_dehazer(cfg: DehazeConfig, nested: bool = False) -> DehazeResult:
    """Train one dehazer as one MLflow run; checkpoints every epoch; resumable."""
    if model_task(cfg.net) != "dehaze":
        raise ValueError(f"network {cfg.net!r} is not a dehazing network")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    generator = seed_everything(cfg.seed)
    split = _split(cfg)
    train_images, test_images = load_pairs(split.train), load_pairs(split.test)
    eval_images = spaced(test_images, cfg.eval_subset)
    steps = max(1, len(train_images) * cfg.crops_per_image // cfg.batch_size)

    model = get_model(cfg.net, **(cfg.net_options or {})).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = make_scheduler(cfg, optimizer, steps)

    start_epoch, history, run_id = 0, [], None
    if cfg.resume:
        state = restore_checkpoint(cfg.resume, device, model, optimizer, scheduler)
        generator.set_state(state["generator"])
        start_epoch, history, run_id = state["epoch"], state["history"], state["run_id"]

    with tracking.tracked_run(cfg.experiment, cfg.run_name or cfg.net, run_id=run_id, nested=nested,
                              tags={"task": "dehaze", "net": cfg.net}) as run:
        checkpoint = Path(cfg.checkpoint_dir) / run.info.run_id / "last.pt"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if run_id is None:
            tracking.log_params({**cfg.params(), "parameters": count_parameters(model), "device": str(device),
                                 "steps_per_epoch": steps, "eval_pairs": len(eval_images)})
            _log_data(split)
        started = time.perf_counter() - sum(h["epoch_seconds"] for h in history)
        for epoch in range(start_epoch, cfg.epochs):
            tick = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
            row.update(train_one_epoch(model, train_images, steps, cfg, optimizer, scheduler, device, generator,
                                       desc=f"epoch {epoch + 1}/{cfg.epochs}"))
            row["epoch_seconds"] = time.perf_counter() - tick
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                row.update(evaluate(model, eval_images, device, "eval")[0])
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "epoch": epoch + 1, "history": history, "run_id": run.info.run_id}, checkpoint)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                            if k in ("train_loss", "eval_psnr", "eval_ssim", "epoch_seconds")))
        final, outputs = evaluate(model, test_images, device, "test")
        identity = mean_scores((hazy.numpy(), clear.numpy()) for hazy, clear in test_images)
        final.update({"test_identity_psnr": identity["psnr"], "test_identity_ssim": identity["ssim"],
                      "total_seconds": time.perf_counter() - started})
        mlflow.log_metrics(final)
        _log_artifacts(cfg, model, split, test_images, outputs, history)
    return DehazeResult(run.info.run_id, final, history, model, checkpoint)


def _comparison_grid(split: DehazeSplit, images, outputs: list[np.ndarray], label: str):
    """hazy | ``label`` output | clear for ``GRID_PAIRS`` test pairs spread over the split."""
    shown, titles = [], []
    for i in spaced(list(range(len(images))), GRID_PAIRS):
        hazy, clear = (t.numpy() for t in images[i])
        score = psnr(to_unit(outputs[i]), to_unit(clear))
        shown += [hazy, outputs[i], clear]
        titles += [f"{split.test[i].name} hazy {psnr(to_unit(hazy), to_unit(clear)):.1f} dB",
                   f"{label} {score:.1f} dB", "clear (ground truth)"]
    return tracking.image_grid_figure(shown, titles, columns=3, size=3.0)


def _log_per_image(split: DehazeSplit, images, outputs: list[np.ndarray], path: str) -> None:
    rows = ["pair\thazy_psnr\toutput_psnr"]
    for pair, (hazy, clear), out in zip(split.test, images, outputs):
        target = to_unit(clear.numpy())
        rows.append(f"{pair.name}\t{psnr(to_unit(hazy.numpy()), target):.3f}\t{psnr(to_unit(out), target):.3f}")
    mlflow.log_text("\n".join(rows), path)


def _log_artifacts(cfg: DehazeConfig, model: nn.Module, split: DehazeSplit, images, outputs, history) -> None:
    tracking.log_figure(_comparison_grid(split, images, outputs, "output"), "plots/comparison.png")
    tracking.log_figure(tracking.curves_figure(history, {
        "L1 loss": ["train_loss"], "PSNR (dB)": ["eval_psnr"], "SSIM": ["eval_ssim"]}), "plots/curves.png")
    _log_per_image(split, images, outputs, "metrics/test_per_image.tsv")
    # Weights and the options to rebuild them: what `roadsight export dehaze` loads (no pickle).
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.save(model.state_dict(), tmp / "weights.pt")
        (tmp / "config.json").write_text(json.dumps({**asdict(cfg), "task": "dehaze",
                                                     "pad_multiple": model.pad_multiple}, indent=2))
        mlflow.log_artifacts(str(tmp), "checkpoint")
    if cfg.log_model:
        example = images[0][0][None, :, :64, :64].float().numpy() / 255.0
        mlflow.pytorch.log_model(model.cpu().eval(), name="model", input_example=example,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


@dataclass
class BaselineResult:
    run_id: str
    metrics: dict[str, float]


def run_baselines(cfg: DehazeBaselineConfig, nested: bool = False) -> BaselineResult:
    """Score doing nothing (the hazy image) and the dark-channel prior on the test pairs."""
    split = _split(cfg)
    images = load_pairs(split.test)
    tick = time.perf_counter()
    outputs = [quantize(dehaze_dcp(hazy.numpy(), **cfg.dcp_options())) for hazy, _ in images]
    dcp_seconds = time.perf_counter() - tick
    identity = mean_scores((hazy.numpy(), clear.numpy()) for hazy, clear in images)
    dcp = mean_scores(zip(outputs, (clear.numpy() for _, clear in images)))
    metrics = {"identity_psnr": identity["psnr"], "identity_ssim": identity["ssim"],
               "dcp_psnr": dcp["psnr"], "dcp_ssim": dcp["ssim"], "dcp_seconds": dcp_seconds}
    with tracking.tracked_run(cfg.experiment, cfg.run_name, nested=nested,
                              tags={"task": "dehaze", "net": "baselines"}) as run:
        tracking.log_params({**asdict(cfg), "test_pairs": len(images)})
        _log_data(split)
        mlflow.log_metrics(metrics)
        tracking.log_figure(_comparison_grid(split, images, outputs, "DCP"), "plots/comparison.png")
        _log_per_image(split, images, outputs, "metrics/test_per_image.tsv")
    return BaselineResult(run.info.run_id, metrics)
