"""What ``roadsight train classify --extra-data`` buys on a new camera, measured blind.

From a pool of labelled images the shipped recipe never saw (the tail test split; the other-source
folder), draw k images per class (k = 5, 10, 20; 5 seeded draws), add them to the recipe's fitted part
exactly as ``--extra-data`` does (after the lighting balance of the course images, carrying
``--extra-share`` of the fit: ``--share`` here, default the CLI's), refit the head, and score the
**rest** of the pool. k = 0 is the shipped recipe itself, scored on the same rest, so
every gain is paired. The recipe is read from models/vehicle_classifier.json (``source.training_config``)
and must have a frozen backbone (``epochs`` 0), the case where a refit takes seconds.

    .venv/bin/python -m benchmarks.adaptation [--ks 5 10 20] [--draws 5] [--share 0.5] [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from training.config import ClassifyConfig
from training.data.vehicles import labelled_folder, split_vehicles
from training.engine import Images, Recipe, resolve_device
from training.metrics import classification_report, confusion_matrix
from training.nets import build_classifier

from .common import FULL_DATA, MODELS, command_line, machine, save_result, utc_now


def shipped_recipe(feature_cache: str, extra_share: float) -> ClassifyConfig:
    contract = json.loads((MODELS / "vehicle_classifier.json").read_text())
    known = {f.name for f in dataclasses.fields(ClassifyConfig)}
    options = {k: v for k, v in contract["source"]["training_config"].items() if k in known}
    cfg = ClassifyConfig(**{**options, "data": str(FULL_DATA / "vehicles"), "feature_cache": feature_cache,
                            "extra_share": extra_share})
    if cfg.epochs:
        raise SystemExit("the shipped recipe trains its backbone (epochs > 0): a refit is not a matter of seconds")
    return cfg


def scores(recipe: Recipe, part: Images, classes: tuple[str, ...]) -> dict[str, float]:
    predictions = recipe.logits(part).argmax(1).numpy()
    report = classification_report(confusion_matrix(part.y.numpy(), predictions, len(classes)), classes)
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def curve(recipe: Recipe, fitted: Images, pool: Images, classes: tuple[str, ...], ks: list[int], draws: int) -> list[dict]:
    """Per k: the refitted head's scores on the rest of the pool, and k = 0's on the same rest, per draw."""
    generator = torch.Generator().manual_seed(0)
    recipe.fit(fitted, generator)
    baseline = recipe.logits(pool).argmax(1).numpy() == pool.y.numpy()
    rows = []
    for k in ks:
        per_draw = []
        for seed in range(draws):
            rng = np.random.default_rng(seed)
            drawn = np.concatenate([rng.choice(np.flatnonzero(pool.y.numpy() == c), k, replace=False)
                                    for c in range(len(classes))])
            rest = np.setdiff1d(np.arange(len(pool.y)), drawn)
            tick = time.perf_counter()
            recipe.fit(fitted.with_extra(pool.subset(drawn), recipe.cfg.extra_share), generator)
            refit_seconds = time.perf_counter() - tick
            per_draw.append({"seed": seed, **scores(recipe, pool.subset(rest), classes),
                             "k0_accuracy": float(baseline[rest].mean()), "refit_seconds": refit_seconds})
        summary = {key: [float(np.mean([d[key] for d in per_draw])), float(np.std([d[key] for d in per_draw]))]
                   for key in ("accuracy", "macro_f1", "k0_accuracy", "refit_seconds")}
        rows.append({"k": k, "scored_images": len(pool.y) - k * len(classes), **summary, "draws": per_draw})
    return rows


def measure(ks: list[int], draws: int, feature_cache: str, extra_share: float) -> dict:
    cfg = shipped_recipe(feature_cache, extra_share)
    device = resolve_device("cpu")
    split = split_vehicles(cfg.data, cfg.test_fraction, cfg.split, cfg.seed)
    classes = split.classes
    model = build_classifier(cfg.net, len(classes), (cfg.image_size, cfg.image_size), cfg.normalization,
                             **(cfg.net_options or {}))
    recipe = Recipe(cfg, model, device, len(classes))
    fitted = recipe.balanced(Images.load(split.train, cfg.image_size))
    pools = {"tail split": Images.load(split.test, cfg.image_size),
             "vehicles-other": Images.load(labelled_folder(FULL_DATA / "vehicles-other", classes), cfg.image_size)}
    contract = json.loads((MODELS / "vehicle_classifier.json").read_text())
    return {"model_sha256": contract["sha256"], "recipe": cfg.params(),
            "pools": {name: curve(recipe, fitted, pool, classes, ks, draws) for name, pool in pools.items()}}


def format_table(result: dict) -> str:
    lines = [f"{'pool':<16}{'k':>4}{'scored':>8}{'accuracy':>18}{'macro-F1':>18}{'k=0, same images':>20}{'refit s':>9}"]
    for name, rows in result["pools"].items():
        for row in rows:
            (acc, acc_sd), (f1, f1_sd), (k0, k0_sd) = row["accuracy"], row["macro_f1"], row["k0_accuracy"]
            lines.append(f"{name:<16}{row['k']:>4}{row['scored_images']:>8}{acc:>11.3f} +- {acc_sd:.3f}"
                         f"{f1:>11.3f} +- {f1_sd:.3f}{k0:>13.3f} +- {k0_sd:.3f}{row['refit_seconds'][0]:>9.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20], help="labelled images drawn per class")
    parser.add_argument("--draws", type=int, default=5, help="seeded draws per k")
    parser.add_argument("--share", type=float, default=ClassifyConfig.extra_share,
                        help="the share of the fit the drawn images carry (--extra-share)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--feature-cache", default=ClassifyConfig.feature_cache, help="the recipe's feature cache")
    args = parser.parse_args()
    if not (FULL_DATA / "vehicles-other").is_dir():
        raise SystemExit(f"needs the full course data and vehicles-other in {FULL_DATA}")
    torch.set_num_threads(args.threads)
    result = {"date": utc_now(), "command": command_line("benchmarks.adaptation"), "machine": machine(),
              **measure(args.ks, args.draws, args.feature_cache, args.share)}
    print(format_table(result))
    print("saved", save_result("adaptation", result))


if __name__ == "__main__":
    main()
