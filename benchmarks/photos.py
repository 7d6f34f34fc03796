"""Harder real data that ships in packages: crops of natural photographs, as image folders, with the
evaluation images shifted from the calibration images, and BN teachers trained on them. Shared by
the fidelity and fine-tuning benchmarks (issue #17: the digits alone overstated calibration).

The photos are the ones bundled in scikit-image's wheel (``skimage/data``) and scikit-learn's
``load_sample_images`` (china, flower): no download. Each benchmark has ten classes, one per source
photo; an image is a square crop of its photo, resized. Three folders, written once as PNGs in
ImageFolder layout under ``ROOT/<benchmark>/``:

* ``train/`` — the teachers' training images and the calibration images (calibration reads this);
* ``iid/`` — more crops drawn exactly like ``train/`` (never trained or calibrated on): the
  *calibration-like* images, which show how well calibration fits what it saw;
* ``val/`` — the *shifted* evaluation images, which the benchmark's top-1 is measured on.

Benchmarks:

* ``regions`` (64×64): crops from the left 60% of each photo for ``train``/``iid``, from the right
  40% for ``val`` (other parts of the same scenes). Sides 1/6-1/3 of the photo's short side.
* ``shifted`` (128×128, so a stride-32 net's last stage is 4×4): ``train``/``iid`` crops with sides
  1/5-2/5 of the short side; ``val`` crops zoomed out (2/5-3/5) and with a per-image contrast
  (×0.75-1.33) and brightness (±0.08) change: GN removes each sample's group mean and variance,
  which BN keeps, so this is where brightness/contrast cues show. A different set of photos, grey
  ones included (where brightness and texture, not colour, tell classes apart).
* ``shifted224``: the ``shifted`` crops at 224×224 (last stage 7×7), with teachers trained at 224.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from digits import fit_teacher, load_tensors, top1

from gnsurgeon.sources import DataConfig


@dataclass(frozen=True)
class PhotoBenchmark:
    """How one benchmark's crops are drawn (fractions are of the photo's width / short side)."""

    name: str
    size: int
    photos: tuple[str, ...]
    counts: tuple[int, int, int]  # crops per class: train, iid, val
    train_scale: tuple[float, float]  # crop side / short side
    val_scale: tuple[float, float]
    train_columns: tuple[float, float] = (0.0, 1.0)  # where train/iid crops lie, as fractions of the width
    val_columns: tuple[float, float] = (0.0, 1.0)
    contrast: float = 1.0  # val images: contrast in [1/contrast, contrast] (log-uniform)
    brightness: float = 0.0  # val images: brightness offset in [-brightness, brightness]
    epochs: tuple[int, int] = (20, 30)  # teacher training: resnet18, mobilenetv3_small_100

    @property
    def config(self) -> DataConfig:
        return DataConfig(
            input_size=(3, self.size, self.size),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            crop_pct=1.0,
            interpolation="bilinear",
        )


BENCHMARKS = {
    "regions": PhotoBenchmark(
        name="regions",
        size=64,
        photos=(
            "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
            "hubble_deep_field", "ihc", "retina", "china", "flower",
        ),  # fmt: skip
        counts=(100, 25, 40),
        train_scale=(1 / 6, 1 / 3),
        val_scale=(1 / 6, 1 / 3),
        train_columns=(0.0, 0.6),
        val_columns=(0.6, 1.0),
    ),
    "shifted": PhotoBenchmark(
        name="shifted",
        size=128,
        photos=(
            "camera", "moon", "coins", "brick", "grass",
            "gravel", "astronaut", "coffee", "chelsea", "motorcycle_right",
        ),  # fmt: skip
        counts=(40, 20, 30),
        train_scale=(1 / 5, 2 / 5),
        val_scale=(2 / 5, 3 / 5),
        contrast=1.33,
        brightness=0.08,
        epochs=(15, 25),
    ),
}
# The same crops at 224×224 (the same seeded positions, resized less): a stride-32 net's last stage is
# 7×7, as at ImageNet's resolution, where calibration's cost and its end-to-end pass are in question
# (issue #13). Its teachers are trained at 224.
BENCHMARKS["shifted224"] = replace(BENCHMARKS["shifted"], name="shifted224", size=224)


def _photo(name: str) -> np.ndarray:
    """One bundled photo as an (H, W, 3) uint8 array (grey photos repeated over RGB)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    else:  # the files themselves: some bundled photos (motorcycle_left) have no loader function
        import skimage.data
        from PIL import Image

        folder = Path(skimage.data.__file__).parent
        path = next(folder / f"{name}{ext}" for ext in (".png", ".jpg") if (folder / f"{name}{ext}").exists())
        image = np.asarray(Image.open(path))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _crop(image: np.ndarray, rng: np.random.Generator, bench: PhotoBenchmark, split: str) -> np.ndarray:
    """One random square crop of ``image`` for ``split``, resized to the benchmark's size (float, 0-1)."""
    from PIL import Image

    h, w = image.shape[:2]
    lo, hi = bench.val_scale if split == "val" else bench.train_scale
    c0, c1 = bench.val_columns if split == "val" else bench.train_columns
    side = min(int(rng.uniform(lo, hi) * min(h, w)), int((c1 - c0) * w), h)
    x_lo = int(c0 * w)
    x_hi = max(x_lo, int(c1 * w) - side)
    x = int(rng.integers(x_lo, x_hi + 1))
    y = int(rng.integers(0, h - side + 1))
    crop = Image.fromarray(image[y : y + side, x : x + side]).resize((bench.size, bench.size), Image.BICUBIC)
    pixels = np.asarray(crop, dtype=np.float32) / 255.0
    if split == "val" and (bench.contrast != 1.0 or bench.brightness):
        contrast = float(np.exp(rng.uniform(-np.log(bench.contrast), np.log(bench.contrast))))
        pixels = (pixels - pixels.mean()) * contrast + pixels.mean() + rng.uniform(-bench.brightness, bench.brightness)
    return np.clip(pixels, 0.0, 1.0)


def write_photos(root: str | Path, bench: PhotoBenchmark) -> dict[str, Path]:
    """Write the benchmark's folders once (seeded); return ``{"train", "iid", "val"}`` -> folder."""
    from PIL import Image

    base = Path(root) / bench.name
    folders = {split: base / split for split in ("train", "iid", "val")}
    marker = base / ".complete"
    if marker.exists():
        return folders
    rng = np.random.default_rng(0)
    for label, name in enumerate(bench.photos):
        image = _photo(name)
        for split, count in zip(folders, bench.counts, strict=True):
            folder = folders[split] / f"{label}-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (_crop(image, rng, bench, split) * 255).round().astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    marker.touch()
    return folders


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Teacher training augmentation: random horizontal flip and translation by up to 1/8 of the side."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
    shift = x.shape[-1] // 8
    padded = F.pad(x, (shift,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


@torch.no_grad()
def agreement(model: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, batch: int = 100) -> float:
    """Top-1 agreement (%) of ``model`` with ``teacher`` on ``x``."""
    model.eval()
    teacher.eval()
    same = sum(
        (model(x[i : i + batch]).argmax(1) == teacher(x[i : i + batch]).argmax(1)).sum().item()
        for i in range(0, len(x), batch)
    )
    return 100.0 * same / len(x)


TEACHER_LR = {"resnet18": 2e-3, "mobilenetv3_small_100": 5e-3}


def train_teacher(arch: str, root: str | Path, bench: PhotoBenchmark, seed: int = 0) -> tuple[Path, float, float]:
    """Train (or reuse the cached) BN teacher; return ``(weights_path, val_top1, seconds)``."""
    import timm
    from safetensors.torch import load_file, save_file

    folders = write_photos(root, bench)
    weights = Path(root) / bench.name / f"teacher-{arch}.safetensors"
    x_val, y_val = load_tensors(folders["val"], bench.config)
    model = timm.create_model(arch, num_classes=len(bench.photos))
    if weights.exists():
        model.load_state_dict(load_file(str(weights)))
        return weights, top1(model, x_val, y_val), 0.0
    lr, epochs = TEACHER_LR[arch], bench.epochs[list(TEACHER_LR).index(arch)]
    start = time.perf_counter()

    def log(epoch: int) -> None:
        print(f"  {bench.name} {arch}: epoch {epoch + 1}/{epochs}, {time.perf_counter() - start:.0f} s", flush=True)

    x_train, y_train = load_tensors(folders["train"], bench.config)
    fit_teacher(model, x_train, y_train, epochs=epochs, lr=lr, seed=seed, augment=augment, on_epoch=log)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights, top1(model, x_val, y_val), time.perf_counter() - start


def load_teacher(arch: str, root: str | Path, bench: PhotoBenchmark) -> torch.nn.Module:
    """The cached (or freshly trained) BN teacher, in eval mode."""
    import timm

    from gnsurgeon.sources import read_state_dict

    weights, _, _ = train_teacher(arch, root, bench)
    model = timm.create_model(arch, num_classes=len(bench.photos))
    model.load_state_dict(read_state_dict(weights))
    return model.eval()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the photo benchmarks' folders and train BN teachers on them.")
    parser.add_argument("root", nargs="?", default="bench-data/photos")
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--archs", nargs="+", default=list(TEACHER_LR))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.benchmarks:
        bench = BENCHMARKS[name]
        folders = write_photos(args.root, bench)
        x_iid, y_iid = load_tensors(folders["iid"], bench.config)
        for arch in args.archs:
            path, acc, secs = train_teacher(arch, args.root, bench)
            iid = top1(load_teacher(arch, args.root, bench), x_iid, y_iid)
            print(f"{name} {arch}: {acc:.2f}% val (shifted), {iid:.2f}% iid top-1 ({secs:.0f} s training) -> {path}")
