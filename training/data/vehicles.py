"""The vehicle dataset: folder scanning, the duplicate policy and the lab's tail split.

Layout: ``<root>/{bus,car,truck}/*.jpg``. The course archive nests the class folders one or two
levels down (``.../车辆分类数据集/{bus,car,truck}``), so the root may also be any folder above
them with a single path down. Non-image files (the archive's ``desktop.ini``) are skipped.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.images import open_rgb, stretch

from ..metrics import dark_mask

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
DEFAULT_CLASSES = ("bus", "car", "truck")
SPLITS = ("tail", "random")
TEST_FRACTION_RANGE = (0.2, 0.3)


class DataError(ValueError):
    """A dataset path or layout that cannot be used; the message names the path."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class VehicleSplit:
    classes: tuple[str, ...]
    train: list[Sample]
    test: list[Sample]
    excluded: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        counts = {"train": len(self.train), "test": len(self.test), "excluded": len(self.excluded)}
        for name, part in (("train", self.train), ("test", self.test)):
            for i, c in enumerate(self.classes):
                counts[f"{name}_{c}"] = sum(s.label == i for s in part)
        return counts


def natural_key(path: Path) -> list:
    """Sort ``car9`` before ``car10`` (the files are zero-padded, but users' copies may not be)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def list_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=natural_key)


def find_class_root(root: str | Path, classes: tuple[str, ...] = DEFAULT_CLASSES) -> Path:
    """The folder holding one sub-folder per class: ``root`` itself or the one below it."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"vehicle data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"vehicle data path {root} is a file, expected a folder with {'/'.join(classes)} sub-folders")
    candidates = [root] + [p for p in sorted(root.glob("*")) if p.is_dir()] + [p for p in sorted(root.glob("*/*")) if p.is_dir()]
    for candidate in candidates:
        if all((candidate / c).is_dir() for c in classes):
            return candidate
    raise DataError(f"vehicle data folder {root} has no {'/'.join(classes)} sub-folders (looked two levels down)")


def split_ranges(n: int, test_fraction: float) -> int:
    """How many of ``n`` items form the test part: round(n * fraction), at least one when n > 1."""
    return min(n - 1, max(1, round(n * test_fraction))) if n > 1 else 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def duplicate_exclusions(labelled: list[Sample], classes: tuple[str, ...]) -> dict[Path, str]:
    """The duplicate policy, as {path: reason} for the files to leave out of both splits.

    Byte-identical files with *conflicting* labels are all excluded: no label is trustworthy.
    Byte-identical files with the *same* label keep their first member by name only, so one
    image can never be counted twice or sit on both sides of a split.
    """
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in labelled:
        groups[_sha256(s.path)].append(s)
    excluded: dict[Path, str] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        names = " = ".join(f"{classes[m.label]}/{m.path.name}" for m in members)
        if len({m.label for m in members}) > 1:
            excluded.update({m.path: f"conflicting labels for identical files: {names}" for m in members})
        else:
            excluded.update({m.path: f"identical to {members[0].path.name}, kept once" for m in members[1:]})
    return excluded


def split_vehicles(root: str | Path, test_fraction: float = 0.2, split: str = "tail", seed: int = 0,
                   classes: tuple[str, ...] = DEFAULT_CLASSES) -> VehicleSplit:
    """The lab split: per class, the last ``test_fraction`` of files by name is the test set.

    ``split="random"`` draws the same per-class counts with ``seed`` instead. Positions are chosen
    on the complete listing (so the tail is exactly the lab's), then the duplicate policy removes
    files from whichever side they fell on.
    """
    lo, hi = TEST_FRACTION_RANGE
    if not lo <= test_fraction <= hi:
        raise ValueError(f"test fraction must be within {lo}-{hi} (the lab's 20-30%), got {test_fraction}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    class_root = find_class_root(root, classes)
    train: list[Sample] = []
    test: list[Sample] = []
    for label, name in enumerate(classes):
        files = list_images(class_root / name)
        if not files:
            raise DataError(f"class folder {class_root / name} holds no images")
        n_test = split_ranges(len(files), test_fraction)
        order = list(range(len(files)))
        if split == "random":
            random.Random(f"{seed}-{name}").shuffle(order)
        test_positions = set(order[len(files) - n_test:])
        for i, f in enumerate(files):
            (test if i in test_positions else train).append(Sample(f, label))
    excluded = duplicate_exclusions(train + test, classes)
    log.info("duplicate policy excluded %d files (listed in the run's data/excluded.tsv)", len(excluded))
    for path, reason in excluded.items():
        log.debug("excluded %s: %s", path, reason)
    keep = lambda part: [s for s in part if s.path not in excluded]  # noqa: E731
    return VehicleSplit(tuple(classes), keep(train), keep(test), sorted(excluded.items()))


def carve_validation(train: list[Sample], fraction: float, num_classes: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out the last ``fraction`` of each class of the training part, mirroring the tail split,
    for choosing recipes without looking at the test split."""
    fit: list[Sample] = []
    val: list[Sample] = []
    for label in range(num_classes):
        members = [s for s in train if s.label == label]
        n_val = split_ranges(len(members), fraction) if fraction > 0 else 0
        fit += members[: len(members) - n_val]
        val += members[len(members) - n_val:]
    return fit, val


def blocked_folds(samples: list[Sample], k: int, num_classes: int) -> list[list[int]]:
    """Indices of ``samples`` held out by each of ``k`` folds: per class, the files in name order cut
    into ``k`` contiguous blocks (sizes differing by at most one); fold i holds out block i of every class.

    Contiguous blocks imitate the tail split's shift in time and camera (the files are ordered by
    both), which random folds hide. Duplicates were settled by ``split_vehicles`` before (conflicting
    labels excluded, repeats kept once), so no image sits on both sides of a fold.
    """
    if k < 2:
        raise ValueError(f"blocked cross-validation needs at least 2 folds, got {k}")
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in range(num_classes):
        members = sorted((i for i, s in enumerate(samples) if s.label == label), key=lambda i: natural_key(samples[i].path))
        if members and len(members) < k:
            raise ValueError(f"class {label} has {len(members)} training images, fewer than the {k} folds")
        for fold, block in zip(folds, np.array_split(np.array(members, dtype=int), k)):
            fold.extend(block.tolist())
    return [sorted(fold) for fold in folds]


def parse_cv(spec: str | None) -> int:
    """The fold count of a ``--cv`` value: ``blocked:K``; 0 for none."""
    if not spec or spec == "none":
        return 0
    kind, _, count = spec.partition(":")
    if kind != "blocked" or not count.isdigit():
        raise ValueError(f"--cv must be 'blocked:K' (K contiguous blocks per class, e.g. blocked:5) or 'none', got {spec!r}")
    return int(count)


def labelled_folder(root: str | Path, classes: tuple[str, ...] = DEFAULT_CLASSES) -> list[Sample]:
    """Every image of ``<root>/{bus,car,truck}/`` with its label: a folder of other-source images
    (``--validate-on``) or a user's own camera (``--extra-data``); classes may be empty."""
    class_root = find_class_root(root, classes)
    samples = [Sample(f, label) for label, name in enumerate(classes) for f in list_images(class_root / name)]
    if not samples:
        raise DataError(f"vehicle data folder {class_root} holds no images in {'/'.join(classes)}")
    return samples


def source_group(path: Path) -> str:
    """The source an image comes from, by its file-name prefix (``web_...``, ``crop_...``); "" if none."""
    prefix, sep, _ = path.name.partition("_")
    return prefix.lower() if sep and prefix.isalpha() else ""


def load_images(samples: list[Sample], image_size: tuple[int, int], resize: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """Decode and stretch every sample once: uint8 (N, 3, H, W) images and int64 labels."""
    height, width = image_size
    images = np.empty((len(samples), 3, height, width), dtype=np.uint8)
    for i, s in enumerate(samples):
        try:
            images[i] = stretch(open_rgb(s.path), width, height, resize)
        except OSError as exc:
            raise DataError(f"cannot decode image {s.path}: {exc}") from exc
    return images, np.array([s.label for s in samples], dtype=np.int64)


def lighting_balanced(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Indices to keep so that every class has the same share of night shots, the smallest share
    any class has (bright images are all kept; of the night shots, the first by name).

    When lighting and label are confounded (every dark training image a bus or a truck), a model
    learns "dark" as evidence of the label; balancing the groups removes that evidence.
    """
    dark = dark_mask(images)
    shares = [dark[labels == c].mean() for c in range(num_classes) if (labels == c).any()]
    share = min(shares)
    keep = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        bright, night = members[~dark[members]], members[dark[members]]
        wanted = len(night) if share >= 1 else int(round(share * len(bright) / (1 - share)))
        keep.append(np.concatenate([bright, night[:wanted]]))
    return np.sort(np.concatenate(keep))
