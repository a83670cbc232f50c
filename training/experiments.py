"""The lab's studies, one command each: an MLflow parent run per study, one child run per setting,
seed and test split; and ``recipes``, the shipped classifier's selection protocol (blocked CV and
other-source photos, the test split never scored), one child run per recipe.

Every classifier setting is trained with n seeds on two splits of the course images: a seeded
random split with the lab's per-class test proportions (in-distribution: where architectures can
be told apart) and the lab's tail split (night cars, another camera: robustness to the shift).
Seed s fixes the random split, the initialisation and the data order, so two settings are compared
paired by seed, and a difference is claimed only when its interval excludes zero (``stats``).

A child run already FINISHED with the same options (its ``lab.config`` tag, a hash of them) is
reused instead of trained again, so an interrupted study continues where it stopped and a setting
that several studies share (the lab CNN) trains once. ``--quick`` shrinks every study (tiny
images, one epoch, one seed) to a smoke run; the full settings are what the report shows.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import torch
import torch.nn.functional as F
from mlflow.entities import Metric, RunTag

from . import tracking
from .compare import compare_runs
from .config import ClassifyConfig, DehazeBaselineConfig, DehazeConfig
from .data.vehicles import load_images, split_vehicles
from .dehaze_engine import run_baselines, train_dehazer
from .engine import train_classifier
from .nets import model_options
from .nets.cnn import receptive_field
from .nets.handwritten import HandConv2d, LoopConv2d
from .stats import paired_difference, t_interval, verdict

STUDY_EXPERIMENT = "lab-studies"
# Where every classifier setting starts: the lab's CNN setting, spelled out so that the studies do
# not change when the training defaults do, shrunk to 48 px and 8 epochs (the lab's 64 px and 15
# epochs would not fit n seeds x two splits of every study into 4 hours of a 2-core CPU).
LAB_SETTING = dict(image_size=48, epochs=8, batch_size=64, normalization="per-image", augment="night")
# The shipped classifier's recipe (README, "The shipped classifier: chosen on blocked CV and other-source photos").
SHIPPED_RECIPE = dict(net="efficientnet_lite0", net_options={"imagenet_prior": 1.0}, image_size=224,
                      normalization="centered", epochs=0, linear_probe_l2=0.1, val_fraction=0.0, balance_lighting=True)
DEHAZE_EPOCHS = 2  # the default recipe's 10 take 45-60 min; the shipped dehazer is trained apart
SPLITS = {"random": "in-distribution", "tail": "tail split"}  # split -> what its test measures
# Options that change how fast a run goes, not what it computes: left out of the reuse key.
NOT_IN_KEY = {"resume", "checkpoint_dir", "experiment", "run_name", "log_model", "device", "threads",
              "feature_cache"}
# (split, metric) -> the words conclusions use for it
MEASURES = {("random", "test_accuracy"): "in-distribution accuracy",
            ("random", "test_macro_f1"): "in-distribution macro-F1",
            ("tail", "test_accuracy"): "tail-split accuracy",
            ("tail", "test_macro_f1"): "tail-split macro-F1",
            ("tail", "test_accuracy_dark"): "tail-split night accuracy",
            ("tail", "test_accuracy_bright"): "tail-split day accuracy",
            ("tail", "train_accuracy"): "training accuracy (tail split's training part)",
            ("tail", "train_loss"): "final training loss (tail split's training part; lower is better)"}
ACCURACIES = (("random", "test_accuracy"), ("tail", "test_accuracy"))
# What the selection protocol decides on (README, "The shipped classifier"), per recipe
SELECTION_METRICS = ("cv_accuracy", "cv_accuracy_std", "cv_accuracy_min", "other_accuracy", "other_web_accuracy",
                     "other_crop_accuracy")
RULE_MARGIN = 0.02  # a recipe replaces the shipped one when min(CV mean, other sources) gains this much


@dataclass
class Study:
    name: str
    question: str
    settings: list[tuple[str, dict]]
    conclude: Callable[[list[dict]], str]
    measure: Callable[[ClassifyConfig], dict[str, float]] | None = None  # extra parent-run measurements
    notes: dict[str, str] = field(default_factory=dict)  # per-setting remarks shown in the report
    task: str = "classify"  # "dehaze": the dehazer against its baselines on the dehazing pairs
    # (split, per-epoch metric) panels the report draws as mean and band over seeds
    curves: tuple[tuple[str, str], ...] = (("tail", "train_loss"), ("random", "test_accuracy"), ("tail", "test_accuracy"))
    seeds: int = 5  # 5 where a run takes under a minute, else 3
    splits: tuple[str, ...] = ("random", "tail")  # "select": the tail split's training part only, never its test

    @property
    def default_data(self) -> str:
        return DehazeConfig.data if self.task == "dehaze" else ClassifyConfig.data  # the CLIs' defaults


def by_seed(rows: list[dict], setting: str, split: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in rows if r["setting"] == setting and r["split"] == split and metric in r}


def compare(rows: list[dict], a: str, b: str, measures=ACCURACIES) -> list[str]:
    """One verdict per measure: a against b, paired by seed."""
    return ["- " + verdict(a, b, paired_difference(by_seed(rows, a, *m), by_seed(rows, b, *m)), MEASURES[m],
                           higher_is_better=not m[1].endswith("loss"))
            for m in measures]


def summary(rows: list[dict], setting: str, measures=ACCURACIES) -> str:
    """``setting``: each measure as mean ± sd [95% CI] over its seeds."""
    parts = [f"{MEASURES[m]} {t_interval(list(by_seed(rows, setting, *m).values())).text()}"
             for m in measures if by_seed(rows, setting, *m)]
    return f"- {setting}: " + "; ".join(parts) + "."


def shift(rows: list[dict], setting: str) -> str:
    """What the tail split costs ``setting``: in-distribution minus tail-split accuracy by seed."""
    d = paired_difference(by_seed(rows, setting, "random", "test_accuracy"), by_seed(rows, setting, "tail", "test_accuracy"))
    spread = f"95% CI {d.low:.3f} to {d.high:.3f}, n = {d.n} seeds" if d.n > 1 else "n = 1"
    return f"- {setting}: the tail split costs {d.mean:.3f} accuracy against the in-distribution test ({spread})."


def _conclude_pairs(*pairs: tuple[str, str], measures=ACCURACIES) -> Callable[[list[dict]], str]:
    return lambda rows: "\n".join(line for a, b in pairs for line in compare(rows, a, b, measures))


def _conclude_single(rows: list[dict]) -> str:
    setting = rows[0]["setting"]
    peaks = [r for r in rows if r["split"] == "tail" and "peak_test_accuracy" in r]
    lines = [summary(rows, setting, (*ACCURACIES, ("tail", "test_accuracy_dark"), ("tail", "test_accuracy_bright"),
                                     ("tail", "train_accuracy"))), shift(rows, setting)]
    if peaks:
        fall = paired_difference({r["seed"]: r["peak_test_accuracy"] for r in peaks},
                                 {r["seed"]: r["test_accuracy"] for r in peaks})
        lines.append(f"- During training the tail-split accuracy peaks (best epoch picked on the test itself: an "
                     f"optimistic number) at "
                     f"{t_interval([r['peak_test_accuracy'] for r in peaks]).text()} (epochs "
                     f"{', '.join(str(r['peak_epoch']) for r in peaks)}) and ends at "
                     f"{t_interval([r['test_accuracy'] for r in peaks]).text()}: "
                     + (f"{fall.mean:.3f} below its peak (95% CI {fall.low:.3f} to {fall.high:.3f}, n = {fall.n} "
                        "seeds), so the final tail number depends on when training stops as much as on the setting; "
                        "the in-distribution test is the one that ranks settings." if fall.excludes_zero() else
                        f"no measurable fall from the peak at n = {fall.n} ({fall.mean:.3f})."))
    return "\n".join(lines)


def _conclude_twins(rows: list[dict]) -> str:
    hand, torch_conv = (label for label, _ in STUDIES["handwritten-conv"].settings)
    clock = "cpu_seconds" if all("cpu_seconds" in r for r in rows) else "total_seconds"  # CPU: immune to sharing
    ratio = t_interval([h[clock] / t[clock] for h in rows for t in rows
                        if h["setting"] == hand and t["setting"] == torch_conv
                        and (h["seed"], h["split"]) == (t["seed"], t["split"])])
    return "\n".join(compare(rows, hand, torch_conv, (*ACCURACIES, ("tail", "train_loss")))
                     + [f"- The hand-written twin takes {ratio.text(2)} times the {clock.replace('_', ' ')} of "
                        "nn.Conv2d's per run."])


def _conclude_hyperparams(rows: list[dict]) -> str:
    base = HYPERPARAMS_BASE
    lines = [summary(rows, base)]
    for label, _ in STUDIES["hyperparams"].settings:
        if label != base:
            lines += compare(rows, label, base)
    return "\n".join(lines)


def _conclude_robustness(rows: list[dict]) -> str:
    """Night and day accuracy on the tail split, the shift each recipe pays, and the shipped recipe
    against the others."""
    labels = [label for label, _ in STUDIES["robustness"].settings]
    night_day = (("tail", "test_accuracy_dark"), ("tail", "test_accuracy_bright"))
    lines = [summary(rows, label, night_day) for label in labels] + [shift(rows, label) for label in labels]
    for other in labels[1:]:
        lines += compare(rows, labels[0], other, (*ACCURACIES, ("tail", "test_accuracy_dark")))
    return "\n".join(lines)


def _conclude_recipes(rows: list[dict]) -> str:
    """Per recipe the two decision figures and their minimum against the shipped recipe's (the rule), then
    each recipe against the shipped one image by image (exact McNemar on each figure's images)."""
    shipped = rows[0]
    floor = lambda r: min(r["cv_accuracy"], r["other_accuracy"])  # noqa: E731
    lines = [f"- {r['setting']}: blocked CV {r['cv_accuracy']:.3f} ± {r['cv_accuracy_std']:.3f} (worst fold "
             f"{r['cv_accuracy_min']:.3f}), other sources {r['other_accuracy']:.3f} (web {r['other_web_accuracy']:.3f}, "
             f"crop {r['other_crop_accuracy']:.3f}); the lower of the two {floor(r):.3f}"
             + ("." if r is shipped else f", {floor(r) - floor(shipped):+.3f} against the shipped recipe's (the rule "
                f"asks {RULE_MARGIN:+.2f}).") for r in rows]
    for row in rows[1:]:
        lines += ["- " + c["verdict"] for c in compare_runs(row["run_id"], shipped["run_id"], (row["setting"], shipped["setting"]))]
    return "\n".join(lines)


def _per_image(rows: list[dict], setting: str) -> dict[str, float]:
    """Per test pair PSNR of ``setting``, averaged over its seeds."""
    mine = [r["per_image_psnr"] for r in rows if r["setting"] == setting]
    return {pair: statistics.fmean(m[pair] for m in mine) for pair in mine[0]}


def _conclude_dehaze(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["setting"] for r in rows))
    per_image = {m: _per_image(rows, m) for m in methods}
    lines = []
    for m, scores in per_image.items():
        values = sorted(scores.values())
        ssim = statistics.fmean(r["test_ssim"] for r in rows if r["setting"] == m)
        lines.append(f"- {m}: PSNR over the {len(values)} test pairs {statistics.fmean(values):.2f} dB, sd "
                     f"{statistics.stdev(values):.2f} per image, median {statistics.median(values):.2f}, range "
                     f"{values[0]:.2f}-{values[-1]:.2f}; mean SSIM {ssim:.3f}.")
    model, dcp, identity = methods
    for a, b in ((model, dcp), (model, identity), (dcp, identity)):
        wins = sum(per_image[a][p] > per_image[b][p] for p in per_image[a])
        lines.append("- " + verdict(a, b, paired_difference(per_image[a], per_image[b]), "PSNR per test image (dB)", 2)
                     + f" Better on {wins} of {len(per_image[a])} images.")
    seeds = sorted({r["seed"] for r in rows if r["setting"] == model})
    lines.append(f"- The encoder-decoder trained {DEHAZE_EPOCHS} epochs of the default recipe (seed "
                 f"{', '.join(map(str, seeds))}; the intervals are over test images, not over training seeds).")
    return "\n".join(lines)


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


HYPERPARAMS_BASE = "base: depth=3, kernel=3, batch=64, lr=2e-3"
HALF_WIDTH = {"width": 32}  # ResNet-18's layout at half its channels: a quarter of the multiply-adds, the same 18 layers

LITE_STACK = "efficientnet_lite_stack"

STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("handwritten-conv", "Does the hand-written convolution match nn.Conv2d, and what does it cost?",
          [("hand_cnn", {"net": "hand_cnn"}), ("cnn (nn.Conv2d)", {"net": "cnn"})],
          _conclude_twins, measure=measure_handwritten, seeds=3),
    Study("cnn-baseline", "How does the lab's nn.Conv2d CNN train: time, accuracy and loss curves?",
          [("cnn", {"net": "cnn"})], _conclude_single),
    # One base setting, each other setting changes one thing from it (the base is not run three
    # times under three names).
    Study("hyperparams", "How do depth, kernel size, batch size and learning rate change the CNN?",
          [(HYPERPARAMS_BASE, {"net": "cnn"})]
          + [(f"depth={d}", {"net": "cnn", "net_options": {"depth": d}}) for d in (1, 5)]
          + [(f"kernel={k}", {"net": "cnn", "net_options": {"kernel_size": k}}) for k in (5, 7)]
          + [(f"batch={b}", {"net": "cnn", "batch_size": b}) for b in (16, 256)]
          + [(f"lr={lr:g}", {"net": "cnn", "lr": lr}) for lr in (1e-4, 1e-2)],
          _conclude_hyperparams),
    Study("alexnet-mlp", "How do AlexNet and an MLP compare with the CNN?",
          [("cnn", {"net": "cnn"}), ("alexnet", {"net": "alexnet"}), ("mlp", {"net": "mlp"})],
          _conclude_pairs(("alexnet", "cnn"), ("mlp", "cnn"), ("alexnet", "mlp"))),
    Study("dilated", "Do HDC dilation rates [1,2,5] beat plain convolution and gridding-prone rates?",
          [("rates 1,2,5 (HDC)", {"net": "dilated_cnn", "net_options": {"rates": [1, 2, 5]}}),
           ("rates 1,1,1 (plain)", {"net": "dilated_cnn", "net_options": {"rates": [1, 1, 1]}}),
           ("rates 2,2,2 (gridding)", {"net": "dilated_cnn", "net_options": {"rates": [2, 2, 2], "enforce_hdc": False}})],
          _conclude_pairs(("rates 1,2,5 (HDC)", "rates 1,1,1 (plain)"), ("rates 1,2,5 (HDC)", "rates 2,2,2 (gridding)")),
          notes={f"rates {','.join(map(str, r))}": f"receptive field {receptive_field(r)} px after the stem"
                 for r in ((1, 2, 5), (1, 1, 1), (2, 2, 2))}),
    Study("resnet-vs-plain", "Do residual connections help at equal depth (18 layers)?",
          [("resnet18", {"net": "resnet18", "net_options": HALF_WIDTH}), ("plain18", {"net": "plain18", "net_options": HALF_WIDTH})],
          _conclude_pairs(("resnet18", "plain18"), measures=(*ACCURACIES, ("tail", "train_accuracy"), ("tail", "train_loss"))),
          seeds=3),
    Study("dehaze", "How far does the encoder-decoder get beyond the dark-channel prior and the hazy input itself?",
          [("encoder-decoder", {}), ("dark-channel prior", {}), ("identity (hazy input)", {})],
          _conclude_dehaze, task="dehaze", curves=(("tail", "train_loss"), ("tail", "eval_psnr")), seeds=1,
          splits=("tail",),
          notes={"encoder-decoder": f"default recipe cut to {DEHAZE_EPOCHS} epochs; whole test images at full "
                                    "resolution, 8-bit output",
                 "dark-channel prior": "He et al. with guided-filter refinement"}),
    Study("robustness", "How much of the tail split's night shift do the shipped recipe and from-scratch ones handle?",
          [("shipped: EfficientNet-Lite0 linear probe", SHIPPED_RECIPE),
           ("unbalanced: the same without lighting balance", SHIPPED_RECIPE | {"balance_lighting": False}),
           ("naive: ResNet-18, x/255, flips+crops", {"net": "resnet18", "net_options": HALF_WIDTH, "normalization": "scale",
                                                      "augment": "basic"})],
          _conclude_robustness, seeds=3,
          notes={"shipped": "ImageNet features of colour images, 224 px, L-BFGS head (no epochs) around the ImageNet "
                            "head's bus/car/truck prior, lighting-balanced",
                 "unbalanced": "keeps the training part's night shots, all buses and trucks",
                 "naive": "no night augmentation; the per-image, night-augmented ResNet-18 is resnet-vs-plain's resnet18"}),
    Study("recipes", "Which classifier recipe holds up beyond the course's cameras? (blocked CV on the training part and "
                     "photos from other sources; the test split is never scored)",
          [("shipped (Lite0 + ImageNet prior)", SHIPPED_RECIPE),
           ("no prior, L2 0.01", SHIPPED_RECIPE | {"net_options": {}, "linear_probe_l2": 0.01}),
           ("not lighting-balanced", SHIPPED_RECIPE | {"balance_lighting": False}),
           ("prior weight 0.5, L2 0.3", SHIPPED_RECIPE | {"net_options": {"imagenet_prior": 0.5}, "linear_probe_l2": 0.3}),
           ("Lite1 (240 px)", SHIPPED_RECIPE | {"net": "efficientnet_lite1", "image_size": 240}),
           ("Lite2 (260 px)", SHIPPED_RECIPE | {"net": "efficientnet_lite2", "image_size": 260}),
           ("stack Lite0 + Lite1 (240 px)", SHIPPED_RECIPE | {"net": LITE_STACK, "image_size": 240,
                                                                     "net_options": {"imagenet_prior": 1.0, "variants": [0, 1]}}),
           ("stack Lite0 + Lite1 + Lite2 (260 px)", SHIPPED_RECIPE | {
               "net": LITE_STACK, "image_size": 260, "net_options": {"imagenet_prior": 1.0, "variants": [0, 1, 2]}})],
          _conclude_recipes, task="select", curves=(), seeds=1, splits=("tail",),
          notes={"shipped": "models/vehicle_classifier.onnx; every other recipe changes it where its name says",
                 "stack": "one probe on the backbones' features side by side, their ImageNet priors averaged"}),
]}


def provenance() -> dict[str, str]:
    """Where a study ran: the code's commit (``+dirty`` with uncommitted changes), CPU model and
    cores, for the report's header."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short=10", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"commit": commit, "cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__}


def reuse_key(cfg) -> str:
    """A hash of every option that changes what a run computes (the data folder resolved)."""
    options = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    options["data"] = str(Path(options["data"]).expanduser().resolve())
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:20]


def finished_run(key: str):
    """The newest FINISHED run of the studies' experiment with reuse key ``key``, or None."""
    experiment = mlflow.get_experiment_by_name(STUDY_EXPERIMENT)
    runs = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], f"tags.`lab.config` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def tracked_child(cfg, train: Callable[[object], str], tags: dict[str, str]) -> tuple[str, bool]:
    """Reuse the finished run with ``cfg``'s options, or run ``train(cfg)`` (which returns its run
    id) and tag the new run with ``tags``, its reuse key and its process CPU seconds. Returns the
    run id and whether it was reused."""
    key = reuse_key(cfg)
    done = finished_run(key)
    if done is not None:
        return done.info.run_id, True
    cpu = time.process_time()
    run_id = train(cfg)
    # the key last: a run interrupted before this line is trained again, never half-reused
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric("cpu_seconds", time.process_time() - cpu,
                                                            int(time.time() * 1000), 0)],
                                    tags=[RunTag(f"lab.{k}", str(v)) for k, v in tags.items()] + [RunTag("lab.config", key)])
    return run_id, False


def classify_row(run_id: str) -> dict:
    """The final metrics of a classifier run and the peak of its per-epoch test accuracy."""
    client = mlflow.MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    keys = {"total_seconds", "cpu_seconds"} | {m for _, m in MEASURES}
    row = {k: v for k, v in metrics.items() if k in keys}
    epochs = [m for m in client.get_metric_history(run_id, "test_accuracy") if m.step >= 1]
    if epochs:
        peak = max(epochs, key=lambda m: m.value)
        row.update(peak_test_accuracy=peak.value, peak_epoch=peak.step)
    return row


def other_sources(study: Study, data: str, validate_on: str | None) -> str:
    """The folder of other-source photos a ``select`` study scores every recipe on: ``validate_on``, by
    default ``vehicles-other`` beside ``data``; checked before any run starts."""
    other = Path(validate_on or Path(data).expanduser().parent / "vehicles-other")
    if not other.is_dir():
        raise ValueError(f"study {study.name} scores every recipe on photos from other sources: {other} is not a "
                         "folder (pass --validate-on DIR with {bus,car,truck}/ inside)")
    return str(other)


def select_rows(study: Study, base: dict, data: str, seeds: int, quick: bool, validate_on: str | None) -> list[dict]:
    """Cross-validate and fit (or reuse) each recipe once on the training part, scored on ``validate_on``
    (``other_sources``), as child runs: their decision figures, one row each."""
    rows = []
    for label, overrides in study.settings:
        recipe = base | overrides | ({"image_size": 64} if quick else {})
        cfg = ClassifyConfig(data=data, experiment=STUDY_EXPERIMENT, log_model=False, split="tail", validate_on=validate_on,
                             cv="blocked:2" if quick else "blocked:5", score_test=False,
                             run_name=f"{study.name}: {label}", **recipe)
        run_id, reused = tracked_child(cfg, lambda c: train_classifier(c, nested=True).run_id,
                                       {"study": study.name, "setting": label, "seed": 0, "split": "tail"})
        metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
        rows.append({"setting": label, "seed": 0, "split": "tail", "run_id": run_id, "reused": reused,
                     **{k: metrics[k] for k in (*SELECTION_METRICS, "total_seconds", "cpu_seconds") if k in metrics}})
    return rows


def classify_rows(study: Study, base: dict, data: str, seeds: int, quick: bool, validate_on: str | None) -> list[dict]:
    """Train (or reuse) one classifier per seed, setting and split, as child runs; one row each.
    Seeds outermost, so an interrupted study already holds complete pairs."""
    rows = []
    train = lambda cfg: train_classifier(cfg, nested=True).run_id  # noqa: E731
    for seed in range(1, seeds + 1):
        for label, overrides in study.settings:
            for split in study.splits:
                cfg = ClassifyConfig(data=data, experiment=STUDY_EXPERIMENT, log_model=False, seed=seed, split=split,
                                     run_name=f"{study.name}: {label} (seed {seed}, {split})", **(base | overrides))
                if quick and "width" in model_options(cfg.net):
                    cfg.net_options = {**(cfg.net_options or {}), "width": 8}
                run_id, reused = tracked_child(cfg, train, {"study": study.name, "setting": label, "seed": seed,
                                                            "split": split})
                rows.append({"setting": label, "seed": seed, "split": split, "run_id": run_id, "reused": reused,
                             **classify_row(run_id)})
    if study.measure is not None:
        mlflow.log_metrics(study.measure(ClassifyConfig(data=data, image_size=base.get("image_size", 64))))
    return rows


def per_image_psnr(run_id: str, column: str) -> dict[str, float]:
    """One column of a dehazing run's ``metrics/test_per_image.tsv``, by pair name."""
    lines = mlflow.artifacts.load_text(f"runs:/{run_id}/metrics/test_per_image.tsv").splitlines()
    index = lines[0].split("\t").index(column)
    return {fields[0]: float(fields[index]) for fields in (line.split("\t") for line in lines[1:])}


def dehaze_rows(study: Study, base: dict, data: str, seeds: int, quick: bool, validate_on: str | None) -> list[dict]:
    """The dehazer per seed and the baselines (deterministic, once) as child runs; a row per method
    with its per-image PSNR."""
    client = mlflow.MlflowClient()
    rows = []
    for seed in range(1, seeds + 1):
        cfg = DehazeConfig(data=data, experiment=STUDY_EXPERIMENT, log_model=False, seed=seed,
                           run_name=f"{study.name}: encoder-decoder (seed {seed})", **base)
        run_id, reused = tracked_child(cfg, lambda c: train_dehazer(c, nested=True).run_id,
                                       {"study": study.name, "setting": "encoder-decoder", "seed": seed, "split": "tail"})
        m = client.get_run(run_id).data.metrics
        rows.append({"setting": "encoder-decoder", "seed": seed, "split": "tail", "run_id": run_id, "reused": reused,
                     **{k: m[k] for k in ("test_psnr", "test_ssim", "total_seconds", "cpu_seconds") if k in m},
                     "per_image_psnr": per_image_psnr(run_id, "output_psnr")})
    cfg = DehazeBaselineConfig(data=data, experiment=STUDY_EXPERIMENT, run_name=f"{study.name}: identity and DCP")
    run_id, reused = tracked_child(cfg, lambda c: run_baselines(c, nested=True).run_id,
                                   {"study": study.name, "setting": "baselines", "seed": 0, "split": "tail"})
    m = client.get_run(run_id).data.metrics
    common = {"seed": 0, "split": "tail", "run_id": run_id, "reused": reused}
    return rows + [{"setting": "dark-channel prior", **common, "test_psnr": m["dcp_psnr"], "test_ssim": m["dcp_ssim"],
                    "total_seconds": m["dcp_seconds"], "per_image_psnr": per_image_psnr(run_id, "output_psnr")},
                   {"setting": "identity (hazy input)", **common, "test_psnr": m["identity_psnr"],
                    "test_ssim": m["identity_ssim"], "total_seconds": 0.0,
                    "per_image_psnr": per_image_psnr(run_id, "hazy_psnr")}]


def study_options(study: Study, quick: bool) -> dict:
    """The options every setting of ``study`` starts from: the lab's CNN setting, or the default
    dehazer recipe cut to ``DEHAZE_EPOCHS``; ``quick`` shrinks either to a smoke run."""
    if study.task == "dehaze":
        return (dict(epochs=1, crop_size=32, crops_per_image=1, eval_subset=1, net_options={"width": 8}) if quick
                else {"epochs": DEHAZE_EPOCHS})
    if study.task == "select":
        return {}  # each recipe is spelled out in full
    if quick:
        return LAB_SETTING | dict(image_size=48, epochs=1, batch_size=16)  # 48 px: the unpadded dilated net needs it
    return dict(LAB_SETTING)


def run_study(name: str, data: str | None = None, quick: bool = False, epochs: int | None = None,
              seeds: int | None = None, threads: int = 0, validate_on: str | None = None) -> str:
    """Run every setting x seed x split of study ``name`` as nested runs, reusing finished ones
    (data: the study's dataset folder, by default the course's beside the checkout); return the
    parent run id."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    study = STUDIES[name]
    n = seeds or (1 if quick else study.seeds)
    base = study_options(study, quick) | ({"epochs": epochs} if epochs else {}) | ({"threads": threads} if threads else {})
    data = data or study.default_data
    if study.task == "select":
        validate_on = other_sources(study, data, validate_on)
    run_settings = {"dehaze": dehaze_rows, "select": select_rows}.get(study.task, classify_rows)
    with tracking.tracked_run(STUDY_EXPERIMENT, run_name=name,
                              tags={"study": name, "quick": str(quick), **provenance()}) as parent:
        tracking.log_params({"study": name, "question": study.question, "quick": quick, "seeds": n,
                             "splits": list(study.splits), **base})
        rows = run_settings(study, base, data, n, quick, validate_on)
        mlflow.log_dict({"rows": rows, "notes": study.notes}, "study/rows.json")
        mlflow.log_text(study.conclude(rows), "study/conclusion.md")
    return parent.info.run_id
