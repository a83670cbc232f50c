"""Dehazing runs: ``train_dehazer`` (random full-resolution crops, whole-image evaluation) and
``run_baselines`` (identity and dark-channel prior), each one MLflow run.

Scores are always taken as a client would see them: whole test images at their original size,
the output rounded to 8 bits, PSNR/SSIM per image and averaged (``image_metrics``). Under torchrun
(see ``distributed``) each process scores its share of the pairs and the means are over all of them.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import mlflow
import mlflow.pytorch
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed, tracking
from .config import DehazeBaselineConfig, DehazeConfig
from .data.dehaze import DehazeSplit, load_pair, load_pairs, random_crops, split_dehaze
from .dcp import dehaze_dcp
from .engine import make_scheduler, resolve_device, restore_checkpoint, seed_everything
from .image_metrics import mean_scores, psnr, quantize, ssim, ssim_map, to_unit
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
                    device: torch.device, generator: torch.Generator,
                    desc: str = "train") -> tuple[dict[str, float], list[float]]:
    """``steps`` batches of random crops: the epoch's mean loss and each step's, over every process.

    Every process draws the whole global batch from the same generator and trains on its share of
    it, so the batches (and the generator a checkpoint saves) are the same at any process count."""
    model.train()
    losses = []
    for _ in distributed.progress(range(steps), desc):
        distributed.raise_if_interrupted()
        hazy, clear = (distributed.shard(t) for t in random_crops(images, cfg.batch_size, cfg.crop_size, generator))
        loss = dehaze_loss(model(hazy.to(device)), clear.to(device), cfg.ssim_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append([loss.item() * len(hazy), len(hazy)])
    totals = distributed.sum_over_processes(torch.tensor(losses))
    step_losses = totals[:, 0] / totals[:, 1]
    return {"train_loss": step_losses.mean().item()}, step_losses.tolist()


@torch.no_grad()
def dehaze_image(model: nn.Module, hazy: torch.Tensor, device: torch.device) -> np.ndarray:
    """One uint8 CHW image through the model at full resolution; uint8 CHW out."""
    model.eval()
    output = dehaze_padded(model, hazy[None].to(device).float() / 255.0)
    return quantize(output[0].cpu().numpy())


def evaluate(model: nn.Module, images, device: torch.device, prefix: str,
             shown: Sequence[int] = ()) -> tuple[dict[str, float], list[float], dict[int, np.ndarray]]:
    """Mean PSNR/SSIM (as ``<prefix>_psnr``/``_ssim``) and the model's throughput; each pair's PSNR;
    the outputs of the ``shown`` pairs (by index)."""
    rows, outputs = [], {}
    for i in distributed.shard(range(len(images))):
        distributed.raise_if_interrupted()
        hazy, clear = images[i]
        tick = time.perf_counter()
        output = dehaze_image(model, hazy, device)
        seconds = time.perf_counter() - tick
        pair = to_unit(output), to_unit(clear.numpy())
        rows.append([psnr(*pair), ssim(*pair), seconds, hazy.shape[1] * hazy.shape[2]])
        if i in shown:
            outputs[i] = output
    scores = distributed.gather(torch.tensor(rows, dtype=torch.float64), len(images))
    return {f"{prefix}_psnr": scores[:, 0].mean().item(), f"{prefix}_ssim": scores[:, 1].mean().item(),
            f"{prefix}_megapixels_per_second": (scores[:, 3].sum() / scores[:, 2].sum()).item() / 1e6
            }, scores[:, 0].tolist(), distributed.merge(outputs)


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
    processes = distributed.setup(resolve_device(cfg.device), cfg.batch_size)
    device = processes.device
    generator = seed_everything(cfg.seed)  # the same crops on every process: each trains on its share
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
    trained = distributed.wrap(model, processes)

    with distributed.tracked_run(processes, cfg, "dehaze", run_id, nested) as (tracked_id, checkpoint):
        if processes.is_main and run_id is None:
            tracking.log_params({**cfg.params(), **processes.params(), "parameters": count_parameters(model),
                                 "device": str(device), "steps_per_epoch": steps, "eval_pairs": len(eval_images)})
            _log_data(split)
        started = time.perf_counter() - sum(h["epoch_seconds"] for h in history)
        for epoch in range(start_epoch, cfg.epochs):
            tick = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "world_size": processes.world_size}
            figures, step_losses = train_one_epoch(trained, train_images, steps, cfg, optimizer, scheduler, device,
                                                   generator, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            row.update(figures)
            row["epoch_seconds"] = time.perf_counter() - tick
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                row.update(evaluate(model, eval_images, device, "eval")[0])
            history.append(row)
            if not processes.is_main:
                continue
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            tracking.log_steps("train_step_loss", step_losses, epoch * steps + 1)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                        "epoch": epoch + 1, "history": history, "run_id": tracked_id}, checkpoint)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                            if k in ("train_loss", "eval_psnr", "eval_ssim", "epoch_seconds")))
        final, output_psnr, shown = evaluate(model, test_images, device, "test", _grid_pairs(len(test_images)))
        identity = mean_scores((hazy.numpy(), clear.numpy()) for hazy, clear in test_images)
        final.update({"test_identity_psnr": identity["psnr"], "test_identity_ssim": identity["ssim"],
                      "total_seconds": time.perf_counter() - started})
        if processes.is_main:
            mlflow.log_metrics(final)
            _log_artifacts(cfg, model, split, test_images, shown, output_psnr, history)
    return DehazeResult(tracked_id, final, history, model, checkpoint)


def _grid_pairs(count: int) -> list[int]:
    """The ``GRID_PAIRS`` test pairs (indices) that runs show, spread over the split."""
    return spaced(list(range(count)), GRID_PAIRS)


def _comparison_grid(split: DehazeSplit, images, shown: dict[int, np.ndarray], label: str):
    """hazy | ``label`` output | clear for the ``shown`` test pairs (index: output)."""
    panels, titles = [], []
    for i, output in sorted(shown.items()):
        hazy, clear = (t.numpy() for t in images[i])
        score = psnr(to_unit(output), to_unit(clear))
        panels += [hazy, output, clear]
        titles += [f"{split.test[i].name} hazy {psnr(to_unit(hazy), to_unit(clear)):.1f} dB",
                   f"{label} {score:.1f} dB", "clear (ground truth)"]
    return tracking.image_grid_figure(panels, titles, columns=3, size=3.0)


def _log_per_image(split: DehazeSplit, images, output_psnr: Sequence[float], path: str) -> None:
    rows = ["pair\thazy_psnr\toutput_psnr"]
    for pair, (hazy, clear), score in zip(split.test, images, output_psnr):
        rows.append(f"{pair.name}\t{psnr(to_unit(hazy.numpy()), to_unit(clear.numpy())):.3f}\t{score:.3f}")
    mlflow.log_text("\n".join(rows), path)


def _log_artifacts(cfg: DehazeConfig, model: nn.Module, split: DehazeSplit, images, shown, output_psnr,
                   history) -> None:
    tracking.log_figure(_comparison_grid(split, images, shown, "output"), "plots/comparison.png")
    tracking.log_figure(tracking.curves_figure(history, {
        "L1 loss": ["train_loss"], "PSNR (dB)": ["eval_psnr"], "SSIM": ["eval_ssim"]}), "plots/curves.png")
    _log_per_image(split, images, output_psnr, "metrics/test_per_image.tsv")
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
        tracking.log_figure(_comparison_grid(split, images, {i: outputs[i] for i in _grid_pairs(len(images))}, "DCP"),
                            "plots/comparison.png")
        _log_per_image(split, images, [psnr(to_unit(o), to_unit(c.numpy())) for o, (_, c) in zip(outputs, images)],
                       "metrics/test_per_image.tsv")
    return BaselineResult(run.info.run_id, metrics)
