"""Run options, one place: the CLI builds its flags from these dataclasses and MLflow logs them.

Defaults are the chosen recipe (see README, "Classifier recipe"); every field is a CLI flag
(``--image-size``, ``--label-smoothing`` ...), help text included.
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
    ema_decay: float = opt(0.0, "exponential moving average of weights, evaluated and kept if > 0 (e.g. 0.99)")
    split: str = opt("tail", "tail: last N%% of each class by name is test (the lab's); random: seeded",
                     choices=("tail", "random"))
    test_fraction: float = opt(0.2, "test share of each class, 0.2-0.3")
    val_fraction: float = opt(0.0, "share of the training part held out (tail of each class) for choosing recipes")
    seed: int = opt(0, "random seed (split, init, augmentation)")
    device: str = opt("auto", "auto (cuda when present), cpu or cuda")
    threads: int = opt(0, "CPU threads for torch (0: torch's default)")
    experiment: str = opt("vehicle-classification", "MLflow experiment name")
    run_name: str = opt(None, "MLflow run name (default: net name)")
    checkpoint_dir: str = opt("checkpoints", "where each epoch's checkpoint is written")
    resume: str = opt(None, "checkpoint file to continue from (its MLflow run continues too)")
    log_model: bool = opt(True, "log the trained model to MLflow")

    def params(self) -> dict:
        """What MLflow records: every option but the bookkeeping ones."""
        skip = {"resume", "checkpoint_dir", "experiment", "run_name", "log_model", "net_options"}
        params = {k: v for k, v in asdict(self).items() if k not in skip}
        params.update({f"net.{k}": v for k, v in (self.net_options or {}).items()})
        return params
