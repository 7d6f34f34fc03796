"""Image folders and the transforms that match a model's data config.

A folder is either ImageFolder-style (one sub-folder per class, labels from sorted folder names) or
flat (images directly inside: no labels, for calibration and distillation). Unreadable images never
crash a worker: the dataset returns a marker, :func:`collate_skip_broken` drops it and carries the
path, and :class:`BrokenImages` counts them for the report.

Stage: input data for calibration, fine-tuning and verification. It imports torch, torchvision/timm
transforms, :mod:`gnsurgeon.errors` and :mod:`gnsurgeon.models` (the data config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .errors import GNSurgeonError
from .models import DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
NO_LABEL = -1


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``([(path, label)], classes)``; a flat folder gives label -1 and no classes."""
    root = Path(root)
    if not root.is_dir():
        raise GNSurgeonError(f"data folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _images_in(p))
    if classes:
        samples = [(p, i) for i, c in enumerate(classes) for p in _images_in(root / c)]
    else:
        samples = [(p, NO_LABEL) for p in _images_in(root)]
    if not samples:
        raise GNSurgeonError(
            f"data folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), "
            "neither directly nor in class sub-folders"
        )
    return samples, classes


def eval_transform(config: DataConfig):
    """Resize + center crop + normalise, as timm evaluates (crop_pct from the data config)."""
    from timm.data import create_transform

    _require_image_input(config)
    return create_transform(
        config.input_size,
        is_training=False,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
        crop_pct=config.crop_pct,
    )


def train_transform(config: DataConfig, hflip: float = 0.5, scale: tuple[float, float] = (0.5, 1.0)):
    """Light augmentation for short fine-tuning: random resized crop (mild scale) and flip."""
    from timm.data import create_transform

    _require_image_input(config)
    return create_transform(
        config.input_size,
        is_training=True,
        interpolation=config.interpolation,
        mean=config.mean,
        std=config.std,
        scale=scale,
        hflip=hflip,
        color_jitter=None,
    )


def _require_image_input(config: DataConfig) -> None:
    if len(config.input_size) != 3:
        raise GNSurgeonError(
            f"image folders feed (C, H, W) inputs; this model takes {tuple(config.input_size)} (video?)"
        )


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def is_readable(path: str | Path) -> bool:
    """Whether the image at ``path`` decodes (fully: a truncated file fails here, not in a worker)."""
    try:
        _open_rgb(Path(path))
    except Exception:  # PIL raises many types for truncated/corrupt files
        return False
    return True


class ImageFolderData(Dataset):
    """Images from a folder, transformed; a broken image yields ``(None, label, path)``.

    ``limit`` takes that many images in a seeded random order. ``readable_only`` decodes each one
    first and passes over those that fail (listed in :attr:`unreadable`), so that ``len()`` counts
    images that will really be used: for the few hundred images of calibration, where the count is
    reported; a training folder is not decoded twice (its unreadable images are counted as met).
    """

    def __init__(
        self, root: str | Path, transform, limit: int | None = None, seed: int = 0, readable_only: bool = False
    ) -> None:
        self.root = Path(root)
        self.samples, self.classes = scan_image_folder(root)
        self.unreadable: list[str] = []
        order = list(range(len(self.samples)))
        if limit is not None and limit < len(self.samples):
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(seed)).tolist()
        if readable_only:
            chosen = []
            for i in order:
                if limit is not None and len(chosen) >= limit:
                    break
                if is_readable(self.samples[i][0]):
                    chosen.append(i)
                else:
                    self.unreadable.append(str(self.samples[i][0]))
        else:
            chosen = order[:limit]
        self.samples = [self.samples[i] for i in sorted(chosen)]
        self.transform = transform

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return self.transform(_open_rgb(path)), label, str(path)
        except Exception:  # PIL raises many types for truncated/corrupt files
            return None, label, str(path)


def collate_skip_broken(batch):
    """Stack the readable samples; return ``(images, labels, broken_paths)``."""
    good = [(x, y) for x, y, _ in batch if x is not None]
    broken = [p for x, _, p in batch if x is None]
    if not good:
        return None, None, broken
    images = torch.stack([x for x, _ in good])
    labels = torch.tensor([y for _, y in good], dtype=torch.long)
    return images, labels, broken


@dataclass
class BrokenImages:
    """Unreadable images met so far: a count and the first few paths, for the report."""

    count: int = 0
    first: list[str] = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, paths: list[str]) -> None:
        """Record unreadable images; one met again (next epoch, next pass) is counted once."""
        for path in paths:
            if path not in self._seen:
                self._seen.add(path)
                self.count += 1
                if len(self.first) < 5:
                    self.first.append(path)

    def to_dict(self) -> dict:
        return {"count": self.count, "first": self.first}
