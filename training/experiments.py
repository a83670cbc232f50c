"""The lab's studies, one command each: an MLflow parent run per study, one child per setting.

``--quick`` shrinks every study (tiny images, one epoch) to a smoke run of minutes; the full
settings are what the report shows. Conclusions are generated from the measured numbers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import mlflow
import torch
import torch.nn.functional as F

from . import tracking
from .config import ClassifyConfig, DehazeBaselineConfig, DehazeConfig
from .data.vehicles import load_images, split_vehicles
from .dehaze_engine import run_baselines, train_dehazer
from .engine import train_classifier
from .nets import model_options
from .nets.cnn import receptive_field
from .nets.handwritten import HandConv2d, LoopConv2d

STUDY_EXPERIMENT = "lab-studies"
# Where every classifier setting starts: the lab's CNN setting, spelled out so that the studies do
# not change when the training defaults do.
LAB_SETTING = dict(image_size=64, epochs=15, batch_size=64, normalization="per-image", augment="night")
# The shipped classifier's recipe (README, "The shipped classifier and the tail split's shift").
SHIPPED_RECIPE = dict(net="efficientnet_lite0", image_size=224, normalization="equalize-gray", epochs=0,
                      linear_probe_l2=0.01, val_fraction=0.0, balance_lighting=True)


@dataclass
class Study:
    name: str
    question: str
    settings: list[tuple[str, dict]]
    conclude: Callable[[list[dict]], str]
    measure: Callable[[ClassifyConfig], dict[str, float]] | None = None  # extra parent-run measurements
    notes: dict[str, str] = field(default_factory=dict)  # per-setting remarks shown in the report
    task: str = "classify"  # "dehaze": the dehazer against its baselines on the dehazing pairs
    curves: tuple[str, ...] = ("train_loss", "test_accuracy")  # per-epoch metrics the report overlays
    epochs: int | None = None  # instead of the lab setting's 15 (a wide sweep on a 2-core CPU)

    @property
    def default_data(self) -> str:
        return DehazeConfig.data if self.task == "dehaze" else ClassifyConfig.data  # the CLIs' defaults


def _best_worst(rows: list[dict], key: str = "test_accuracy") -> str:
    ranked = sorted(rows, key=lambda r: r[key], reverse=True)
    best, worst = ranked[0], ranked[-1]
    return (f"Best: **{best['setting']}** ({key} {best[key]:.3f}, {best['total_seconds']:.0f} s); "
            f"worst: **{worst['setting']}** ({worst[key]:.3f}, {worst['total_seconds']:.0f} s).")


def _pair(rows: list[dict], a: str, b: str, key: str = "test_accuracy") -> str:
    ra, rb = (next(r for r in rows if r["setting"] == s) for s in (a, b))
    diff = ra[key] - rb[key]
    verdict = "beats" if diff > 0.01 else "trails" if diff < -0.01 else "matches"
    return (f"{a} {verdict} {b} on {key}: {ra[key]:.3f} vs {rb[key]:.3f} ({diff:+.3f}); "
            f"time {ra['total_seconds']:.0f} s vs {rb['total_seconds']:.0f} s.")


def _conclude_single(rows: list[dict]) -> str:
    r = rows[0]
    gap = r["train_accuracy"] - r["test_accuracy"]
    nan = float("nan")
    return (f"{r['setting']}: test accuracy {r['test_accuracy']:.3f} (macro-F1 {r['test_macro_f1']:.3f}; night "
            f"{r.get('test_accuracy_dark', nan):.3f}, day {r.get('test_accuracy_bright', nan):.3f}) against "
            f"{r['train_accuracy']:.3f} on its training images, in {r['total_seconds']:.0f} s. The {gap:.3f} gap "
            "between training and test images measures the tail split's shift (see robustness).")


def _conclude_twins(rows: list[dict]) -> str:
    hand, torch_conv = rows
    same = all(hand[k] == torch_conv[k] for k in ("test_accuracy", "test_macro_f1", "train_accuracy"))
    return ((f"Identical results ({hand['test_accuracy']:.3f} test accuracy for both, same initialisation and data "
             "order): the hand-written convolution computes what nn.Conv2d computes. " if same else "")
            + _pair(rows, hand["setting"], torch_conv["setting"])
            + f" The hand-written twin takes {hand['total_seconds'] / torch_conv['total_seconds']:.2f}x the time.")


def _conclude_hyperparams(rows: list[dict]) -> str:
    lines = []
    for group in ("depth", "kernel", "batch", "lr"):
        members = [r for r in rows if r["setting"].startswith(group + "=")]
        if members:
            lines.append(f"- {group}: " + _best_worst(members))
    return "\n".join(lines)


RANDOM_SPLIT_SETTING = "random split: the shipped recipe, night cars on both sides"


def _conclude_robustness(rows: list[dict]) -> str:
    """Night and day accuracy on the tail split; the random-split row (other test images) is set
    apart as the recipe's score without the shift."""
    nan = float("nan")
    tail = [r for r in rows if r["setting"] != RANDOM_SPLIT_SETTING]
    lines = [f"- {r['setting']}: night accuracy {r.get('test_accuracy_dark', nan):.3f}, "
             f"day accuracy {r.get('test_accuracy_bright', nan):.3f}" for r in tail]
    lines.append(_best_worst(tail, "test_accuracy_dark").replace("Best", "Most robust at night"))
    shifted = next((r for r in tail if r["setting"].startswith("shipped")), None)
    unshifted = next((r for r in rows if r["setting"] == RANDOM_SPLIT_SETTING), None)
    if shifted and unshifted:
        lines.append(f"Without the shift (a seeded random split of the same images, same per-class counts) the shipped "
                     f"recipe scores {unshifted['test_accuracy']:.3f} accuracy / {unshifted['test_macro_f1']:.3f} "
                     f"macro-F1 (night {unshifted.get('test_accuracy_dark', nan):.3f}) against "
                     f"{shifted['test_accuracy']:.3f} / {shifted['test_macro_f1']:.3f} on the tail split: the gap is "
                     "the tail split's shift, not the recipe.")
    return "\n".join(lines)


def _conclude_dehaze(rows: list[dict]) -> str:
    model, *baselines = rows
    gains = "; ".join(f"{model['test_psnr'] - b['test_psnr']:+.2f} dB and {model['test_ssim'] - b['test_ssim']:+.3f} "
                      f"SSIM over the {b['setting']} ({b['test_psnr']:.2f} dB, {b['test_ssim']:.3f})" for b in baselines)
    return (f"The encoder-decoder scores {model['test_psnr']:.2f} dB / {model['test_ssim']:.3f} SSIM on whole test "
            f"images: {gains}. It trained for {model['total_seconds'] / 60:.0f} min; the dark-channel prior needs no "
            f"training and took {baselines[0]['total_seconds']:.0f} s for the test set.")


def measure_handwritten(cfg: ClassifyConfig) -> dict[str, float]:
    """Forward/backward agreement of the loop, vectorised and torch convolutions on a real batch,
    and the time each takes per batch (the loop on a small crop: it is that slow)."""
    split = split_vehicles(cfg.data)
    images, _ = load_images(split.train[:8], (cfg.image_size, cfg.image_size))
    x = torch.from_numpy(images).float() / 255
    torch.manual_seed(0)
    hand = HandConv2d(3, 16, 3, padding=1)
    weight = hand.weight.detach().clone().requires_grad_()
    bias = hand.bias.detach().clone().requires_grad_()
    y_hand, y_ref = hand(x), F.conv2d(x, weight, bias, padding=1)
    y_hand.square().sum().backward()
    y_ref.square().sum().backward()
    crop = x[:1, :, :12, :12]
    loop = LoopConv2d(3, 16, 3)
    loop.load_state_dict({"weight": weight.detach(), "bias": bias.detach()})
    out = {"forward_max_abs_diff": (y_hand - y_ref).abs().max().item(),
           "weight_grad_max_rel_diff": ((hand.weight.grad - weight.grad).abs().max() / weight.grad.abs().max()).item(),
           "loop_vs_torch_max_abs_diff": (loop(crop) - F.conv2d(crop, weight, bias)).abs().max().item()}
    for name, fn, inp in (("torch", lambda t: F.conv2d(t, weight, bias, padding=1), x), ("hand", hand, x),
                          ("loop_12px_1img", loop, crop)):
        start = time.perf_counter()
        for _ in range(3):
            fn(inp).sum().backward() if name != "loop_12px_1img" else fn(inp)
        out[f"seconds_per_batch_{name}"] = (time.perf_counter() - start) / 3
    return out


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("handwritten-conv", "Does the hand-written convolution match nn.Conv2d, and what does it cost?",
          [("hand_cnn", {"net": "hand_cnn"}), ("cnn (nn.Conv2d)", {"net": "cnn"})],
          _conclude_twins, measure=measure_handwritten),
    Study("cnn-baseline", "How does the lab's nn.Conv2d CNN train: time, accuracy and loss curves?",
          [("cnn", {"net": "cnn"})], _conclude_single),
    Study("hyperparams", "How do depth, kernel size, batch size and learning rate change the CNN?",
          [(f"depth={d}", {"net": "cnn", "net_options": {"depth": d}}) for d in (1, 2, 3, 4, 5)]
          + [(f"kernel={k}", {"net": "cnn", "net_options": {"kernel_size": k}}) for k in (3, 5, 7)]
          + [(f"batch={b}", {"net": "cnn", "batch_size": b}) for b in (16, 64, 256)]
          + [(f"lr={lr:g}", {"net": "cnn", "lr": lr}) for lr in (1e-4, 1e-3, 1e-2)],
          _conclude_hyperparams, epochs=8),
    Study("alexnet-mlp", "How do AlexNet and an MLP compare with the CNN?",
          [("cnn", {"net": "cnn"}), ("alexnet", {"net": "alexnet"}), ("mlp", {"net": "mlp"})],
          lambda rows: _best_worst(rows) + " " + _pair(rows, "cnn", "mlp")),
    Study("dilated", "Do HDC dilation rates [1,2,5] beat plain convolution and gridding-prone rates?",
          [("rates 1,2,5 (HDC)", {"net": "dilated_cnn", "net_options": {"rates": [1, 2, 5]}}),
           ("rates 1,1,1 (plain)", {"net": "dilated_cnn", "net_options": {"rates": [1, 1, 1]}}),
           ("rates 2,2,2 (gridding)", {"net": "dilated_cnn", "net_options": {"rates": [2, 2, 2], "enforce_hdc": False}})],
          lambda rows: _pair(rows, "rates 1,2,5 (HDC)", "rates 1,1,1 (plain)") + " "
          + _pair(rows, "rates 1,2,5 (HDC)", "rates 2,2,2 (gridding)"),
          notes={f"rates {','.join(map(str, r))}": f"receptive field {receptive_field(r)} px after the stem"
                 for r in ((1, 2, 5), (1, 1, 1), (2, 2, 2))}),
    Study("resnet-vs-plain", "Do residual connections help at equal depth (18 layers)?",
          [("resnet18", {"net": "resnet18"}), ("plain18", {"net": "plain18"})],
          lambda rows: _pair(rows, "resnet18", "plain18") + " " + _pair(rows, "resnet18", "plain18", "train_accuracy")),
    Study("dehaze", "How far does the encoder-decoder get beyond the dark-channel prior and the hazy input itself?",
          [("encoder-decoder", {}), ("dark-channel prior", {}), ("identity (hazy input)", {})],
          _conclude_dehaze, task="dehaze", curves=("train_loss", "eval_psnr"),
          notes={"encoder-decoder": "whole test images at full resolution, 8-bit output",
                 "dark-channel prior": "He et al. with guided-filter refinement"}),
    Study("robustness", "How much of the tail split's night shift do the shipped recipe and from-scratch ones handle?",
          [("shipped: EfficientNet-Lite0 linear probe", SHIPPED_RECIPE),
           ("unbalanced: the same without lighting balance", SHIPPED_RECIPE | {"balance_lighting": False}),
           ("naive: ResNet-18, x/255, flips+crops", {"net": "resnet18", "normalization": "scale", "augment": "basic"}),
           (RANDOM_SPLIT_SETTING, SHIPPED_RECIPE | {"split": "random"})],
          _conclude_robustness,
          notes={"shipped": "ImageNet features, equalised luma, 224 px, L-BFGS head (no epochs), lighting-balanced",
                 "unbalanced": "keeps the training part's night shots, all buses and trucks",
                 "naive": "no night augmentation; the per-image, night-augmented ResNet-18 is resnet-vs-plain's resnet18",
                 "random split": "not the lab's split: other test images, the recipe without the shift"}),
]}


def classify_rows(study: Study, base: dict, data: str, quick: bool) -> list[dict]:
    """Train one classifier per setting as a child run; one row of final metrics each."""
    rows = []
    for label, overrides in study.settings:
        cfg = ClassifyConfig(data=data, experiment=STUDY_EXPERIMENT, run_name=f"{study.name}: {label}",
                             log_model=False, **(base | overrides))
        if quick and "width" in model_options(cfg.net):
            cfg.net_options = {**(cfg.net_options or {}), "width": 8}
        result = train_classifier(cfg, nested=True)
        last_epoch = result.history[-1] if result.history else {}  # a linear probe alone has no epochs
        rows.append({"setting": label, "run_id": result.run_id, **result.metrics,
                     **{k: v for k, v in last_epoch.items() if k == "train_accuracy"}})
    if study.measure is not None:
        mlflow.log_metrics(study.measure(ClassifyConfig(data=data, image_size=base.get("image_size", 64))))
    return rows


def dehaze_rows(study: Study, base: dict, data: str, quick: bool) -> list[dict]:
    """The dehazer (the default recipe) and the baselines as two child runs; a row per method."""
    dehazer = train_dehazer(DehazeConfig(data=data, experiment=STUDY_EXPERIMENT, run_name=f"{study.name}: encoder-decoder",
                                         log_model=False, **base), nested=True)
    baselines = run_baselines(DehazeBaselineConfig(data=data, experiment=STUDY_EXPERIMENT,
                                                   run_name=f"{study.name}: identity and DCP"), nested=True)
    b = baselines.metrics
    return [{"setting": "encoder-decoder", "run_id": dehazer.run_id, **dehazer.metrics},
            {"setting": "dark-channel prior", "run_id": baselines.run_id, "test_psnr": b["dcp_psnr"],
             "test_ssim": b["dcp_ssim"], "total_seconds": b["dcp_seconds"]},
            {"setting": "identity (hazy input)", "run_id": baselines.run_id, "test_psnr": b["identity_psnr"],
             "test_ssim": b["identity_ssim"], "total_seconds": 0.0}]


def study_options(study: Study, quick: bool) -> dict:
    """The options every setting of ``study`` starts from: the lab's CNN setting, or the default
    dehazer recipe; ``quick`` shrinks either to a smoke run."""
    if study.task == "dehaze":
        return dict(epochs=1, crop_size=32, crops_per_image=1, eval_subset=1, net_options={"width": 8}) if quick else {}
    if quick:
        return LAB_SETTING | dict(image_size=48, epochs=1, batch_size=16)  # 48 px: the unpadded dilated net needs it
    return LAB_SETTING | ({"epochs": study.epochs} if study.epochs else {})


def run_study(name: str, data: str | None = None, quick: bool = False, epochs: int | None = None) -> str:
    """Run every setting of study ``name`` as nested runs (data: the study's dataset folder, by
    default the course's beside the checkout); return the parent run id."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    study = STUDIES[name]
    base = study_options(study, quick) | ({"epochs": epochs} if epochs else {})
    run_settings = dehaze_rows if study.task == "dehaze" else classify_rows
    with tracking.tracked_run(STUDY_EXPERIMENT, run_name=name, tags={"study": name, "quick": str(quick)}) as parent:
        tracking.log_params({"study": name, "question": study.question, "quick": quick, **base})
        rows = run_settings(study, base, data or study.default_data, quick)
        mlflow.log_dict({"rows": rows, "notes": study.notes}, "study/rows.json")
        mlflow.log_text(study.conclude(rows), "study/conclusion.md")
    return parent.info.run_id
