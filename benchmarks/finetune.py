"""Fine-tuning on real data: how fast GN recovers after conversion, BN's small-batch weakness, and
the speed of ``gnsurgeon finetune`` next to a plain hand-written PyTorch loop.

Data and teacher are the fidelity benchmark's (``benchmarks/digits.py``): scikit-learn's digits as
32x32 image folders (1,347 train / 450 val) and a timm resnet18 BN teacher trained on them.

* GN: the teacher converted by ``convert_source`` (γ/β copied, G = 32), fine-tuned with CE + KD
  from the teacher.
* BN: the teacher itself (every BN kept), fine-tuned the same way: at small batches its batch
  statistics are noise and its running statistics drift away from the data.

Each cell is a separate run with its own warmup + cosine schedule of that many steps, seed 0,
defaults otherwise (SGD, lr 0.02 x batch / 32, weight decay 0 on norm γ/β and biases), with
``hflip=0`` because digits must not be mirrored.

    python benchmarks/finetune.py [bench-data/digits] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from digits import DIGITS_CONFIG, train_teacher  # noqa: E402

import gnsurgeon  # noqa: E402
from gnsurgeon import ConvertOptions, FinetuneOptions  # noqa: E402
from gnsurgeon.checkpoint import write_atomically  # noqa: E402

ARCH = "resnet18"
RECIPE = {"hflip": 0.0, "min_crop_scale": 0.7, "log_every": 25}


def make_checkpoints(root: Path) -> tuple[Path, Path, Path, float]:
    """``(gn, bn, teacher_weights, teacher_top1)``; both checkpoints carry the digits data config."""
    teacher, teacher_top1, _ = train_teacher(ARCH, root)
    out = root / "finetune"
    out.mkdir(exist_ok=True)
    paths = {}
    for name, extra in (("gn", {}), ("bn", {"skip": ["*"]})):
        path = out / f"{ARCH}-{name}.safetensors"
        options = ConvertOptions(num_classes=10, weights=str(teacher), input_size=DIGITS_CONFIG.input_size, **extra)
        gnsurgeon.convert_source(f"timm:{ARCH}", path, options)
        info = gnsurgeon.read_checkpoint(path)  # the digits' normalisation and crop, not ImageNet's
        model = gnsurgeon.load(path)
        gnsurgeon.save(path, model, info.plan, source=info.source, data_config=DIGITS_CONFIG, history=info.history)
        paths[name] = path
    return paths["gn"], paths["bn"], teacher, teacher_top1


def finetune_top1(checkpoint: Path, root: Path, teacher: Path, steps: int, batch: int, workers: int) -> dict:
    out = root / "finetune" / "run.safetensors"
    options = FinetuneOptions(
        data=str(root / "train"),
        val=str(root / "val"),
        steps=steps,
        batch_size=batch,
        teacher=f"timm:{ARCH}",
        teacher_weights=str(teacher),
        workers=workers,
        **RECIPE,
    )
    report = gnsurgeon.finetune(checkpoint, out, options)
    return {"before": report.before["top1"], "after": report.after["top1"], "ips": report.images_per_s}


def plain_loop(checkpoint: Path, root: Path, steps: int, batch: int, workers: int, lr: float) -> float:
    """The loop a user writes by hand: ImageFolder, DataLoader, SGD, CE. Returns images/s."""
    from torchvision.datasets import ImageFolder

    from gnsurgeon.data import train_transform

    model = gnsurgeon.load(checkpoint).train()
    data = ImageFolder(root / "train", transform=train_transform(DIGITS_CONFIG, hflip=0.0, scale=(0.7, 1.0)))
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, persistent_workers=workers > 0
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    start, done = time.perf_counter(), 0
    while done < steps:
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    loss.item()
    return steps * batch / (time.perf_counter() - start)


def gnsurgeon_loop(checkpoint: Path, root: Path, steps: int, batch: int, workers: int) -> float:
    """``gnsurgeon finetune`` doing the same work (CE only, no evaluation). Returns images/s."""
    options = FinetuneOptions(data=str(root / "train"), steps=steps, batch_size=batch, workers=workers, **RECIPE)
    report = gnsurgeon.finetune(checkpoint, root / "finetune" / "speed.safetensors", options)
    return report.images_per_s


def state_write_seconds(checkpoint: Path, root: Path) -> tuple[float, float]:
    """``(seconds, MB)`` of one training-state write: a 1-step run, then the state file it wrote."""
    out = root / "finetune" / "state.safetensors"
    options = FinetuneOptions(data=str(root / "train"), steps=1, workers=0, **RECIPE)
    gnsurgeon.finetune(checkpoint, out, options)
    state = torch.load(out.with_suffix(".state.pt"), weights_only=True)
    start = time.perf_counter()
    write_atomically(out.with_suffix(".state.pt"), lambda tmp: torch.save(state, tmp))
    return time.perf_counter() - start, out.with_suffix(".state.pt").stat().st_size / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="bench-data/digits")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared 2-core box)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="only 50 steps, batch 8 (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    start = time.perf_counter()
    gn, bn, teacher, teacher_top1 = make_checkpoints(root)
    steps_list, batches = ((50,), (8,)) if args.quick else ((50, 100, 300), (2, 8))

    print(f"Teacher: timm {ARCH} (BN), {teacher_top1:.2f}% val top-1. CPU, {args.threads} thread(s).\n")
    print("| model | batch | start | " + " | ".join(f"{s} steps" for s in steps_list) + " |")
    print("|---|---:|---:|" + "---:|" * len(steps_list))
    for name, checkpoint in (("GN (converted, KD + CE)", gn), ("BN (original, KD + CE)", bn)):
        for batch in batches:
            cells, before = [], None
            for steps in steps_list:
                result = finetune_top1(checkpoint, root, teacher, steps, batch, args.workers)
                before = result["before"]
                cells.append(f"{result['after']:.2f}")
            print(f"| {name} | {batch} | {before:.2f} | " + " | ".join(cells) + " |", flush=True)

    steps, batch, repeats = (50, 8, 1) if args.quick else (100, 8, 5)
    lr = 0.02 * batch / 32
    ours, plain = [], []
    for _ in range(repeats):  # adjacent pairs: background load drifts over minutes, not seconds
        plain.append(plain_loop(gn, root, steps, batch, args.workers, lr))
        ours.append(gnsurgeon_loop(gn, root, steps, batch, args.workers))
    ratio = statistics.median(o / p for o, p in zip(ours, plain, strict=True))
    print(f"\nThroughput, GN {ARCH}, batch {batch}, {steps} steps, CE only, {args.workers} loader worker(s), CPU, ")
    print(f"{args.threads} thread(s); {repeats} interleaved pairs, medians:\n")
    print("| loop | images/s (median) | each run | ratio (median of pairs) |")
    print("|---|---:|---|---:|")
    print(
        f"| plain PyTorch (ImageFolder, DataLoader, SGD) | {statistics.median(plain):.1f} | "
        + ", ".join(f"{x:.0f}" for x in plain)
        + " | 1.00 |"
    )
    print(
        f"| `gnsurgeon finetune` | {statistics.median(ours):.1f} | "
        + ", ".join(f"{x:.0f}" for x in ours)
        + f" | {ratio:.2f} |"
    )
    seconds, size = state_write_seconds(gn, root)
    print(f"\nOne training-state write (model + SGD momentum + RNG, {size:.0f} MB): {seconds:.2f} s.")
    if not torch.cuda.is_available():
        print("\nNo CUDA device here: GPU figures (AMP vs fp32) not measured.")
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
