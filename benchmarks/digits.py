"""Real data that ships in a package: scikit-learn's handwritten digits, as image folders, and BN
teachers trained on them. Shared by the fidelity and fine-tuning benchmarks (and the demo).

1,797 8×8 grey images of 10 digits, upsampled to 32×32 RGB PNGs in ImageFolder layout:
``ROOT/train/<digit>/*.png`` (75%) and ``ROOT/val/<digit>/*.png`` (25%, stratified, seed 0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gnsurgeon.sources import DataConfig

SIZE = 32
DIGITS_CONFIG = DataConfig(
    input_size=(3, SIZE, SIZE), mean=(0.25,) * 3, std=(0.35,) * 3, crop_pct=1.0, interpolation="bilinear"
)


def write_digits(root: str | Path, size: int = SIZE) -> tuple[Path, Path]:
    """Write the digits as PNG folders once; return ``(train_dir, val_dir)``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    train_dir, val_dir = root / "train", root / "val"
    marker = root / ".complete"
    if marker.exists():
        return train_dir, val_dir
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    rng = np.random.default_rng(0)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = len(idx) // 4
        for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (images[i, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                Image.fromarray(pixels, mode="L").convert("RGB").save(folder / f"{i:04d}.png")
    marker.touch()
    return train_dir, val_dir


def load_tensors(folder: Path, config: DataConfig = DIGITS_CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a folder, eval-transformed, as one tensor (a few hundred images: they fit in memory)."""
    from gnsurgeon.data import ImageFolderData, eval_transform

    data = ImageFolderData(folder, eval_transform(config))
    xs, ys = zip(*[(x, y) for x, y, _ in (data[i] for i in range(len(data)))], strict=True)
    return torch.stack(xs), torch.tensor(ys)


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 3) -> torch.Tensor:
    """Random translations by up to ``shift`` pixels (digits must not be flipped)."""
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return padded[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 100) -> float:
    model.eval()
    correct = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(x), batch))
    return 100.0 * correct / len(x)


def train_teacher(
    arch: str, root: str | Path, epochs: int = 30, seed: int = 0, lr: float = 2e-3
) -> tuple[Path, float, float]:
    """Train (or reuse the cached) BN teacher; return ``(weights_path, val_top1, seconds)``."""
    import timm
    from safetensors.torch import load_file, save_file

    root = Path(root)
    train_dir, val_dir = write_digits(root)
    weights = root / f"teacher-{arch}.safetensors"
    x_val, y_val = load_tensors(val_dir)
    model = timm.create_model(arch, num_classes=10)
    if weights.exists():
        model.load_state_dict(load_file(str(weights)))
        return weights, top1(model, x_val, y_val), 0.0
    start = time.perf_counter()
    fit_teacher(model, *load_tensors(train_dir), epochs=epochs, lr=lr, seed=seed, augment=augment)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return weights, top1(model, x_val, y_val), time.perf_counter() - start


def fit_teacher(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    on_epoch: Callable[[int], None] | None = None,
) -> None:
    """The benchmarks' teacher recipe (AdamW, one-cycle, batch 64, label smoothing 0.1), shared by the
    digits and photo benchmarks so their BN teachers are trained the same way; seeded."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x_train) + 63) // 64
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        if on_epoch:
            on_epoch(epoch)
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the digits folders and train BN teachers on them.")
    parser.add_argument("root", nargs="?", default="bench-data/digits")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv3_small_100"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 (resnet18), 40 (others)")
    args = parser.parse_args()
    for arch in args.archs:
        epochs = args.epochs or (30 if arch == "resnet18" else 40)
        path, acc, secs = train_teacher(arch, args.root, epochs=epochs, lr=2e-3 if arch == "resnet18" else 5e-3)
        print(f"{arch}: {acc:.2f}% val top-1 ({secs:.0f} s training) -> {path}")
