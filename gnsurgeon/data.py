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


class _FolderSamples(Dataset):
    """``(path, label)`` samples of a folder, each read and transformed on demand; one that cannot be
    read (PIL and PyAV raise many types for truncated or corrupt files) yields ``(None, label, path)``,
    so it is counted and skipped by :func:`collate_skip_broken`, never fatal."""

    samples: list
    classes: list

    def read(self, path: Path):
        raise NotImplementedError

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            return self.read(path), label, str(path)
        except Exception:  # PIL and PyAV raise many types for truncated/corrupt files
            return None, label, str(path)


class ImageFolderData(_FolderSamples):
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

    def read(self, path: Path):
        return self.transform(_open_rgb(path))


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


# ------------------------------------------------------------------------------------- video clips
VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"}


def _is_clip(path: Path) -> bool:
    """A clip is a video file, or a folder holding its frames as images (sorted by name)."""
    if path.is_file():
        return path.suffix.lower() in VIDEO_SUFFIXES
    return path.is_dir() and bool(_images_in(path))


def _clips_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_clip(p))


def scan_clip_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """``([(clip, label)], classes)`` for a folder of clips: video files or frame folders directly in
    it (no labels), or in one sub-folder per class (a sub-folder that holds images itself is a clip,
    not a class). Video files need PyAV to decode; without it they are refused here, in one sentence,
    rather than reported broken one by one."""
    root = Path(root)
    if not root.is_dir():
        raise GNSurgeonError(f"data folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not _images_in(p) and _clips_in(p))
    if classes:
        samples = [(p, i) for i, c in enumerate(classes) for p in _clips_in(root / c)]
    else:
        samples = [(p, NO_LABEL) for p in _clips_in(root)]
    if not samples:
        raise GNSurgeonError(
            f"data folder {root} holds no clips: video files ({', '.join(sorted(VIDEO_SUFFIXES))}) or folders of "
            "frames, directly or in one sub-folder per class"
        )
    videos = [p for p, _ in samples if p.is_file()]
    if videos and not video_decoding_available():
        raise GNSurgeonError(
            f"data folder {root} holds video files ({videos[0].name}, ...) and PyAV is not installed to decode "
            "them: pip install av (or gnsurgeon[video]), or extract each clip's frames into a folder of images"
        )
    return samples, classes


def video_decoding_available() -> bool:
    """Whether video files can be decoded here: PyAV (torchvision 0.29's ``torchvision.io`` has no
    video reader any more, so PyAV is the one decoder used)."""
    import importlib.util

    return importlib.util.find_spec("av") is not None


def frame_indices(available: int, frames: int, train: bool) -> list[int]:
    """``frames`` indices spread over ``available`` frames: the clip cut into ``frames`` equal
    segments, one frame from each (a random one in training, drawn from torch's RNG so that the
    per-sample seed decides it; the middle one in evaluation), as TSN samples. A clip shorter than
    ``frames`` repeats frames."""
    if available <= 0:
        raise ValueError("a clip with no frames")
    edges = torch.linspace(0, available, frames + 1)
    starts, lengths = edges[:-1], (edges[1:] - edges[:-1])
    offsets = torch.rand(frames) * lengths if train else lengths / 2
    return [min(available - 1, int(i)) for i in (starts + offsets).floor().tolist()]


def read_clip(path: Path, frames: int, train: bool) -> torch.Tensor:
    """``frames`` RGB frames of the clip at ``path`` as a uint8 tensor (T, 3, H, W)."""
    import numpy as np

    if path.is_dir():
        files = _images_in(path)
        arrays = [np.asarray(_open_rgb(files[i])) for i in frame_indices(len(files), frames, train)]
    else:
        arrays = _decode_video(path, frames, train)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decode_video(path: Path, frames: int, train: bool) -> list:
    """Decode the frames wanted (PyAV); the container's frame count when it has one, else all frames
    are decoded once (short clips) and the wanted ones kept."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames
        if total <= 0:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            return [decoded[i] for i in frame_indices(len(decoded), frames, train)]
        wanted = frame_indices(total, frames, train)
        kept: dict[int, object] = {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    last = kept[max(kept)] if kept else None
    if last is None:
        raise ValueError(f"{path}: no frame decoded")
    return [kept.get(i, last) for i in wanted]  # a container that over-counts its frames: the last one


def clip_transform(config: DataConfig, train: bool, hflip: float = 0.5, scale: tuple[float, float] = (0.5, 1.0)):
    """(T, 3, H, W) uint8 frames -> a normalised (3, T, h, w) clip: the same crop and flip for every
    frame (torchvision's v2 transforms draw their parameters once per call, from torch's RNG).
    Training: random resized crop + flip; evaluation: resize by ``crop_pct`` + center crop, as the
    image transforms do."""
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    _, _, height, width = config.input_size
    if train:
        spatial = [v2.RandomResizedCrop((height, width), scale=scale, antialias=True), v2.RandomHorizontalFlip(hflip)]
    else:
        spatial = [v2.Resize(int(min(height, width) / config.crop_pct), antialias=True), v2.CenterCrop((height, width))]
    pipeline = v2.Compose(
        [*spatial, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(config.mean), list(config.std))]
    )

    def transform(frames: torch.Tensor) -> torch.Tensor:
        return pipeline(tv_tensors.Video(frames)).as_subclass(torch.Tensor).permute(1, 0, 2, 3).contiguous()

    return transform


class ClipFolderData(_FolderSamples):
    """Clips from a folder (:func:`scan_clip_folder`), ``frames`` per clip, transformed; a clip that
    cannot be read (a corrupt video, an unreadable frame) yields ``(None, label, path)`` like a
    broken image, so it is counted and skipped, never fatal."""

    def __init__(self, root: str | Path, transform, frames: int, train: bool) -> None:
        self.root = Path(root)
        self.samples, self.classes = scan_clip_folder(root)
        self.transform = transform
        self.frames = frames
        self.train = train

    def read(self, path: Path):
        return self.transform(read_clip(path, self.frames, self.train))
