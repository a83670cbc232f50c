"""Run options, one place: the CLI builds its flags from these dataclasses and MLflow logs them.

Classifier defaults are the lab's from-scratch recipe (ResNet-18, 96 px, 30 epochs); the shipped
classifier's recipe is a set of flags (README, "The shipped classifier", and
``experiments.SHIPPED_RECIPE``). Every field is a CLI flag (``--image-size``, ``--label-smoothing``
...), help text included.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .data.augment import PRESETS
from .nets.classifier import NORMALIZATIONS


def opt(default, help: str, **extra):  # noqa: A002  (argparse's own word)
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class ClassifyConfig:
    data: str = opt("../shared/data/vehicles", "vehicle folder with bus/car/truck sub-folders")
    net: str = opt("resnet18", "registered network name (see `roadsight nets`)")
    net_options: dict = opt(None, "network options as JSON, e.g. '{\"depth\": 5, \"kernel_size\": 5}'", json=True)
    image_size: int = opt(96, "images are stretched to this square size")
    normalization: str = opt("per-image", "input normalisation inside the model", choices=NORMALIZATIONS)
    augment: str = opt("night", "augmentation preset", choices=tuple(PRESETS))
    epochs: int = opt(30, "training epochs")
    batch_size: int = opt(64, "batch size")
    optimizer: str = opt("adamw", "optimiser", choices=("adamw", "adam", "sgd"))
    lr: float = opt(2e-3, "peak learning rate")
    weight_decay: float = opt(0.05, "weight decay")
    schedule: str = opt("onecycle", "learning-rate schedule", choices=("onecycle", "cosine", "constant"))
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy")
    head_only_epochs: int = opt(0, "first N epochs train only the final linear layer, the rest frozen with its "
                                   "BatchNorm statistics (linear probing; then fine-tuning: LP-FT)")
    linear_probe_l2: float = opt(0.0, "before any epoch, fit the final layer by L-BFGS logistic regression on the "
                                      "frozen features of the training images (and their mirror images) with this "
                                      "L2 strength; 0: off. With --epochs 0 that is the whole training")
    backbone_lr_scale: float = opt(1.0, "learning-rate multiplier for every layer but the final one")
    ema_decay: float = opt(0.0, "exponential moving average of weights, evaluated and kept if > 0 (e.g. 0.99)")
    split: str = opt("tail", "tail: last N%% of each class by name is test (the lab's); random: seeded",
                     choices=("tail", "random"))
    test_fraction: float = opt(0.2, "test share of each class, 0.2-0.3")
    val_fraction: float = opt(0.0, "share of the training part held out (tail of each class) for choosing recipes")
    balance_lighting: bool = opt(False, "drop night shots (mean luma < 80) from the fitted part until every class has "
                                        "the same share of them, the smallest any class has, so lighting is no "
                                        "evidence of the label (the tail split's training cars have none)")
    cv: str = opt(None, "blocked:K: K-fold cross-validation of the recipe on the training part, each fold "
                        "holding out one contiguous block (by file name) of every class, as child runs; the run "
                        "itself then fits on the whole training part")
    validate_on: str = opt(None, "a {bus,car,truck}/ folder of images from other sources scored at the end (and by "
                                 "every fold): accuracy, per class and per file-name prefix (web_, crop_); never fitted")
    extra_data: str = opt(None, "a {bus,car,truck}/ folder of labelled images of your own camera, added to the fitted "
                                "part (after any lighting balance); with --epochs 0 the head refits in seconds")
    extra_share: float = opt(0.5, "the share of the linear probe's fit that the --extra-data images carry together "
                                  "(0.5: as much as the course images; training epochs see every image alike)")
    calibrate: bool = opt(True, "with --cv: fit a temperature on the out-of-fold predictions (minimum NLL); it divides "
                                "the logits inside the model, so the exported probabilities carry it")
    score_test: bool = opt(True, "score the test split at the end; --no-score-test keeps recipe-choosing runs blind "
                                 "to it (`roadsight evaluate` scores the export once)")
    feature_cache: str = opt("~/.cache/roadsight/features", "where frozen-backbone features are cached (by backbone "
                                                            "weights and image bytes) for --epochs 0 recipes; '' off")
    seed: int = opt(0, "random seed (split, init, augmentation)")
    device: str = opt("auto", "auto (cuda when present), cpu or cuda")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    experiment: str = opt("vehicle-classification", "MLflow experiment name")
    run_name: str = opt(None, "MLflow run name; None names the run after the net")
    checkpoint_dir: str = opt("checkpoints", "where each epoch's checkpoint is written")
    resume: str = opt(None, "checkpoint file to continue from (its MLflow run continues too)")
    log_model: bool = opt(True, "log the trained model to MLflow")

    def params(self) -> dict:
        """What MLflow records: every option but the bookkeeping ones."""
        skip = {"resume", "checkpoint_dir", "experiment", "run_name", "log_model", "net_options", "feature_cache"}
        params = {k: v for k, v in asdict(self).items() if k not in skip}
        params.update({f"net.{k}": v for k, v in (self.net_options or {}).items()})
        return params


@dataclass
class DehazeConfig:
    data: str = opt("../shared/data/dehaze", "dehaze folder with hazy/clear (or FogPictures/NoFogPictures, haze/no_haze) sub-folders")
    hazy_dir: str = opt(None, "explicit hazy folder (with --clear-dir; overrides --data)")
    clear_dir: str = opt(None, "explicit clear folder (with --hazy-dir)")
    net: str = opt("dehazer", "registered dehazing network (see `roadsight nets`)")
    net_options: dict = opt(None, "network options as JSON, e.g. '{\"width\": 16}'", json=True)
    crop_size: int = opt(240, "training crops (px, full resolution: the scale it is evaluated at; large, so the "
                              "global branch sees much of the picture; at most the smallest side, 250)")
    crops_per_image: int = opt(4, "random crops per training pair and epoch")
    epochs: int = opt(10, "training epochs (the default recipe: about 2800 steps, 45-60 min on one CPU thread)")
    batch_size: int = opt(6, "crops per batch")
    lr: float = opt(2e-3, "peak learning rate (Adam)")
    schedule: str = opt("cosine", "learning-rate schedule", choices=("onecycle", "cosine", "constant"))
    ssim_weight: float = opt(0.0, "loss = L1 + this * (1 - SSIM)")
    test_fraction: float = opt(0.2, "test share: the last pairs by name")
    eval_every: int = opt(1, "evaluate on the test subset every N epochs (the last epoch always)")
    eval_subset: int = opt(16, "test pairs evaluated per epoch, evenly spaced (0: all); the final score uses all")
    seed: int = opt(0, "random seed (init, crops)")
    device: str = opt("auto", "auto (cuda when present), cpu or cuda")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    experiment: str = opt("dehazing", "MLflow experiment name")
    run_name: str = opt(None, "MLflow run name; None names the run after the net")
    checkpoint_dir: str = opt("checkpoints", "where each epoch's checkpoint is written")
    resume: str = opt(None, "checkpoint file to continue from (its MLflow run continues too)")
    log_model: bool = opt(True, "log the trained model to MLflow")

    params = ClassifyConfig.params


@dataclass
class DehazeBaselineConfig:
    """Identity (the hazy image itself) and dark-channel prior, scored like the dehazer."""

    data: str = opt("../shared/data/dehaze", "dehaze folder with hazy/clear sub-folders")
    hazy_dir: str = opt(None, "explicit hazy folder (with --clear-dir; overrides --data)")
    clear_dir: str = opt(None, "explicit clear folder (with --hazy-dir)")
    test_fraction: float = opt(0.2, "test share: the last pairs by name")
    patch: int = opt(15, "dark-channel window (px)")
    omega: float = opt(0.95, "haze share removed (< 1 keeps distant objects looking distant)")
    t0: float = opt(0.1, "lower bound on the transmission")
    top: float = opt(0.001, "share of haziest dark-channel pixels searched for the atmospheric light")
    radius: int = opt(60, "guided-filter radius (px) refining the transmission")
    eps: float = opt(1e-4, "guided-filter regularisation")
    experiment: str = opt("dehazing", "MLflow experiment name")
    run_name: str = opt("baselines", "MLflow run name")

    def dcp_options(self) -> dict:
        return {k: getattr(self, k) for k in ("patch", "omega", "t0", "top", "radius", "eps")}
