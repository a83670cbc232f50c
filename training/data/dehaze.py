"""The dehazing pairs: folder layouts, pairing by file name, the tail split, crops for training.

Layout: ``<root>/{hazy,clear}/NNN.jpg``; the course archive's ``FogPictures``/``NoFogPictures``
and other students' ``haze``/``no_haze`` are found too (at the root or up to two levels down),
or name the two folders explicitly. A pair is two files with the same name. Files without a
partner and pairs whose sizes differ are reported (logged and listed in the split), never used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serving.images import open_rgb

from .vehicles import DataError, list_images, natural_key, split_ranges

log = logging.getLogger(__name__)

LAYOUTS = (("hazy", "clear"), ("FogPictures", "NoFogPictures"), ("haze", "no_haze"))
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True)
class Pair:
    hazy: Path
    clear: Path

    @property
    def name(self) -> str:
        return self.hazy.name


@dataclass
class DehazeSplit:
    train: list[Pair]
    test: list[Pair]
    excluded: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"train": len(self.train), "test": len(self.test), "excluded": len(self.excluded)}


def find_pair_dirs(root: str | Path | None = None, hazy: str | Path | None = None,
                   clear: str | Path | None = None) -> tuple[Path, Path]:
    """The (hazy, clear) folders: both given explicitly, or a known layout under ``root``."""
    if hazy is not None or clear is not None:
        if hazy is None or clear is None:
            raise DataError("give both the hazy and the clear folder, or neither")
        dirs = Path(hazy).expanduser(), Path(clear).expanduser()
        for d in dirs:
            if not d.is_dir():
                raise DataError(f"dehaze image folder {d} does not exist")
        return dirs
    if root is None:
        raise DataError("no dehaze data folder given")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dehaze data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dehaze data path {root} is a file, expected a folder with hazy/clear sub-folders")
    candidates = [root] + [p for p in sorted(root.glob("*")) if p.is_dir()] + [p for p in sorted(root.glob("*/*")) if p.is_dir()]
    for candidate in candidates:
        for hazy_name, clear_name in LAYOUTS:
            if (candidate / hazy_name).is_dir() and (candidate / clear_name).is_dir():
                return candidate / hazy_name, candidate / clear_name
    layouts = ", ".join(f"{h}/{c}" for h, c in LAYOUTS)
    raise DataError(f"dehaze data folder {root} has none of the layouts {layouts} (looked two levels down)")


def image_size(path: Path) -> tuple[int, int]:
    """Width and height as decoded (EXIF orientation applied), read from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(0x0112) in _SWAPS_SIDES else (width, height)


def split_dehaze(root: str | Path | None = None, test_fraction: float = 0.2, hazy: str | Path | None = None,
                 clear: str | Path | None = None) -> DehazeSplit:
    """Pair by name and take the last ``test_fraction`` of the pairs (natural name order) as the
    test set: pairs 417-520 of the course's 520. Unpaired files and size mismatches are left out
    (logged, and listed in ``excluded``) before the split, so they never count as either side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction must be between 0 and 1, got {test_fraction}")
    hazy_dir, clear_dir = find_pair_dirs(root, hazy, clear)
    hazy_files = {p.name: p for p in list_images(hazy_dir)}
    clear_files = {p.name: p for p in list_images(clear_dir)}
    names = sorted(hazy_files.keys() | clear_files.keys(), key=lambda n: natural_key(Path(n)))
    if not names:
        raise DataError(f"dehaze folders {hazy_dir} and {clear_dir} hold no images")
    excluded: list[tuple[Path, str]] = []
    pairs: list[Pair] = []
    for name in names:
        if name not in clear_files:
            excluded.append((hazy_files[name], f"no clear image {clear_dir / name}"))
        elif name not in hazy_files:
            excluded.append((clear_files[name], f"no hazy image {hazy_dir / name}"))
        elif (hs := image_size(hazy_files[name])) != (cs := image_size(clear_files[name])):
            excluded.append((hazy_files[name], f"hazy is {hs[0]}x{hs[1]} but clear is {cs[0]}x{cs[1]}"))
        else:
            pairs.append(Pair(hazy_files[name], clear_files[name]))
    for path, reason in excluded:
        log.warning("dehaze pair left out: %s: %s", path, reason)
    if not pairs:
        raise DataError(f"dehaze folders {hazy_dir} and {clear_dir} hold no usable pairs ({len(excluded)} left out)")
    cut = len(pairs) - split_ranges(len(pairs), test_fraction)
    return DehazeSplit(pairs[:cut], pairs[cut:], excluded)


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """Hazy and clear images as uint8 CHW at their original resolution."""
    images = []
    for path in (pair.hazy, pair.clear):
        try:
            images.append(np.ascontiguousarray(np.asarray(open_rgb(path), dtype=np.uint8).transpose(2, 0, 1)))
        except OSError as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
    if images[0].shape != images[1].shape:
        raise DataError(f"pair {pair.name}: hazy is {images[0].shape} but clear is {images[1].shape} once decoded")
    return images[0], images[1]


def load_pairs(pairs: list[Pair]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode every pair once (uint8 CHW tensors; sizes vary)."""
    return [tuple(torch.from_numpy(a) for a in load_pair(p)) for p in pairs]


def random_crops(images: list[tuple[torch.Tensor, torch.Tensor]], count: int, size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` aligned hazy/clear crops of ``size`` px from random pairs at random places,
    half of them mirrored left-right, as float [0, 1]. Only horizontal flips: haze grows with
    depth, which runs up the picture, so a vertical flip would show an impossible scene."""
    picks = torch.randint(len(images), (count,), generator=generator).tolist()
    hazy = torch.empty(count, 3, size, size, dtype=torch.uint8)
    clear = torch.empty_like(hazy)
    for i, k in enumerate(picks):
        h_img, c_img = images[k]
        height, width = h_img.shape[1:]
        if min(height, width) < size:
            raise ValueError(f"crop size {size} exceeds the {width}x{height} training image {k}")
        top = int(torch.randint(height - size + 1, (1,), generator=generator))
        left = int(torch.randint(width - size + 1, (1,), generator=generator))
        hazy[i] = h_img[:, top : top + size, left : left + size]
        clear[i] = c_img[:, top : top + size, left : left + size]
    flip = torch.rand(count, generator=generator) < 0.5
    hazy[flip] = hazy[flip].flip(-1)
    clear[flip] = clear[flip].flip(-1)
    return hazy.float() / 255.0, clear.float() / 255.0
