"""The GPU paths, measured: fine-tuning (fp32, bf16 / fp16 AMP, channels_last, torch.compile) and
calibration of one model per task (classification, segmentation, detection, video) on one CUDA device.

Everything is made here, nothing is downloaded: synthetic image folders (coloured discs on noise: the
class is the disc's colour; segmentation masks and detection boxes are the discs; video clips are a
disc moving in one of four directions, as frame folders), a BN teacher per task trained on them for a
few hundred steps, its GN conversion (``convert --calibrate`` on the GPU), then one short
``finetune --teacher source`` per variant from the calibrated checkpoint. For each run the table
gives images (clips) per second of training, the peak GPU memory, and what the run reached on the
validation folder: top-1 (and agreement with the BN teacher) for classification and video,
per-pixel agreement for segmentation, feature cosine and box agreement for detection.

The fp16 rows force float16 autocast (with loss scaling) on a GPU that has bf16, by making
``torch.cuda.is_bf16_supported`` answer False for that run: that is the path older GPUs take.
Runs are ordered so that the torch.compile rows come last; once the time budget (``--budget``,
400 s, counted from the start) is spent the remaining rows say "skipped" instead of running.

    python benchmarks/gpu.py                 # on a CUDA machine (< 8 minutes on an H100/H200)
    python benchmarks/gpu.py --cpu-smoke     # the same code at toy sizes on the CPU (no CUDA lines)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import gnsurgeon
from gnsurgeon import ConvertOptions, FinetuneOptions
from gnsurgeon.errors import first_line

COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 200, 40], [200, 40, 200]], np.uint8)
DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))  # video classes: the disc moves right, left, down, up


@dataclass
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: str
    image: int  # classification side
    dense: int  # segmentation / detection side
    clip: tuple[int, int]  # frames, side
    train: int  # images (clips: a quarter) per training folder
    val: int
    teacher_steps: int
    steps: int  # fine-tuning steps per variant
    batch: dict = field(default_factory=dict)
    workers: int = 8
    calib: dict = field(default_factory=dict)


GPU = Sizes(
    "cuda", 128, 256, (8, 112), 2048, 256, 300, 60,
    {"classification": 64, "segmentation": 16, "detection": 8, "video": 8},
    calib={"calib_samples": 128, "calib_steps": 50, "calib_final_steps": 100},
)  # fmt: skip
SMOKE = Sizes(
    "cpu", 32, 64, (4, 32), 16, 16, 2, 2,
    {"classification": 4, "segmentation": 2, "detection": 2, "video": 2}, workers=0,
    calib={"calib_samples": 8, "calib_steps": 2, "calib_final_steps": 2},
)  # fmt: skip

# task -> (source, constructor kwargs, teacher learning rate)
MODELS = {
    "classification": ("timm:resnet50", {"num_classes": len(COLOURS)}),
    "segmentation": ("torchvision:deeplabv3_mobilenet_v3_large", {"num_classes": 4, "aux_loss": True}),
    "detection": ("torchvision:fasterrcnn_mobilenet_v3_large_fpn", {"num_classes": 4}),
    "video": ("torchvision:r3d_18", {"num_classes": len(DIRECTIONS)}),
}
VARIANTS = (  # name, FinetuneOptions fields, force float16
    ("fp32", {"amp": False, "channels_last": False}, False),
    ("bf16", {"amp": True, "channels_last": False}, False),
    ("bf16 + channels_last", {"amp": True, "channels_last": True}, False),
    ("fp16 + channels_last", {"amp": True, "channels_last": True}, True),
    ("bf16 + channels_last + compile", {"amp": True, "channels_last": True, "compile": True}, False),
)


# --------------------------------------------------------------------------------------------- data
def disc_scene(rng, side: int, shapes: int, colour: int | None = None) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Noise with ``shapes`` discs of random colours (or of ``colour``): (image, mask, boxes, labels);
    label k+1 is colour k."""
    image = rng.integers(0, 110, (side, side, 3)).astype(np.uint8)
    mask = np.zeros((side, side), np.int64)
    boxes, labels = [], []
    yy, xx = np.mgrid[:side, :side]
    for _ in range(shapes):
        r = rng.integers(side // 10, side // 4)
        cy, cx = rng.integers(r, side - r, 2)
        k = colour if colour is not None else int(rng.integers(3))
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[inside] = COLOURS[k]
        mask[inside] = k + 1
        boxes.append([cx - r, cy - r, cx + r, cy + r])
        labels.append(k + 1)
    return image, mask, boxes, labels


def make_images(folder: Path, n: int, side: int, seed: int, classes: bool, shapes: int) -> list:
    """Write ``n`` scenes (in class folders by disc colour, the colours in turn so that every folder has
    every class, or flat); returns them for teacher training."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, mask, boxes, labels = disc_scene(rng, side, shapes, i % len(COLOURS) if classes else None)
        sub = folder / f"c{labels[0] - 1}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:05d}.png")
        out.append((image, mask, boxes, labels))
    return out


def make_clips(folder: Path, n: int, frames: int, side: int, seed: int) -> list:
    """``n`` frame folders, one sub-folder per direction; returns (clip (T, H, W, 3), label) pairs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    out = []
    for i in range(n):
        label = i % len(DIRECTIONS)  # every direction in every folder
        dx, dy = DIRECTIONS[label]
        r, speed = side // 8, side / (2 * frames)
        cy, cx = side / 2 - dy * side / 4, side / 2 - dx * side / 4
        clip_dir = folder / f"d{label}" / f"clip{i:04d}"
        clip_dir.mkdir(parents=True)
        clip = []
        for t in range(frames):
            image = rng.integers(0, 110, (side, side, 3)).astype(np.uint8)
            image[(yy - cy - dy * speed * t) ** 2 + (xx - cx - dx * speed * t) ** 2 <= r * r] = COLOURS[0]
            Image.fromarray(image).save(clip_dir / f"{t:03d}.png")
            clip.append(image)
        out.append((np.stack(clip), label))
    return out


# ----------------------------------------------------------------------------------------- teachers
def _batches(n: int, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (batch,), generator=gen)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.485, 0.456, 0.406), device=x.device).view(1, 3, *([1] * (x.dim() - 2)))
    std = torch.tensor((0.229, 0.224, 0.225), device=x.device).view(1, 3, *([1] * (x.dim() - 2)))
    return (x - mean) / std


def train_teacher(task: str, model: torch.nn.Module, data: list, sizes: Sizes) -> torch.nn.Module:
    """A few hundred AdamW steps (bf16 autocast on CUDA) on the generated data, from scratch."""
    device = torch.device(sizes.device)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, sizes.teacher_steps))))
    )
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    if task == "video":
        clips = torch.from_numpy(np.stack([c for c, _ in data])).permute(0, 4, 1, 2, 3)  # (N, 3, T, H, W)
        side = sizes.clip[1]
        x_all = F.interpolate(clips.float().flatten(1, 2), size=(side, side)).view(*clips.shape[:3], side, side) / 255
        y_all = torch.tensor([label for _, label in data])
    else:
        x_all = torch.from_numpy(np.stack([d[0] for d in data])).permute(0, 3, 1, 2).float() / 255
    batch = {"classification": 64, "segmentation": 16, "detection": 8, "video": 16}[task]
    batch = min(batch, sizes.batch[task] * 4)
    for idx in _batches(len(data), batch, sizes.teacher_steps, 0):
        with amp:
            if task == "classification":
                labels = torch.tensor([data[i][3][0] - 1 for i in idx.tolist()], device=device)
                loss = F.cross_entropy(model(_normalise(x_all[idx].to(device))), labels)
            elif task == "segmentation":
                masks = torch.from_numpy(np.stack([data[i][1] for i in idx.tolist()])).to(device)
                out = model(_normalise(x_all[idx].to(device)))
                loss = F.cross_entropy(out["out"], masks) + 0.5 * F.cross_entropy(out["aux"], masks)
            elif task == "detection":
                targets = [
                    {
                        "boxes": torch.tensor(data[i][2], dtype=torch.float32, device=device),
                        "labels": torch.tensor(data[i][3], device=device),
                    }
                    for i in idx.tolist()
                ]
                loss = sum(model(list(x_all[idx].to(device)), targets).values())
            else:
                loss = F.cross_entropy(model(_normalise(x_all[idx].to(device))), y_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval().cpu()


def build(task: str, sizes: Sizes) -> torch.nn.Module:
    from gnsurgeon.models import SourceSpec, build_model

    source, kwargs = MODELS[task]
    library, name = source.split(":")
    kwargs = dict(kwargs)
    if task == "detection":
        kwargs.update(min_size=sizes.dense, max_size=sizes.dense)
    return build_model(SourceSpec(library, name, kwargs))


# ------------------------------------------------------------------------------------------ running
def input_size(task: str, sizes: Sizes) -> tuple[int, ...]:
    if task == "classification":
        return (3, sizes.image, sizes.image)
    if task == "video":
        return (3, sizes.clip[0], sizes.clip[1], sizes.clip[1])
    return (3, sizes.dense, sizes.dense)


def convert(task: str, root: Path, weights: Path, train: Path, sizes: Sizes) -> tuple[Path, str]:
    """The GN checkpoint to fine-tune (calibrated on the GPU where calibration reads the data) and
    the calibration's result in words."""
    source, kwargs = MODELS[task]
    kwargs = dict(kwargs)
    extra: dict = {}
    if task == "detection":
        kwargs.update(min_size=sizes.dense, max_size=sizes.dense)
        extra = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "calib_final_steps": 0}  # it normalises inside
    common = {"weights": str(weights), "model_kwargs": kwargs, "input_size": input_size(task, sizes)}
    out = root / f"{task}-gn.safetensors"
    if task == "video":  # calibration reads image folders; clips are fine-tuned from the γ/β copy
        gnsurgeon.convert_source(source, out, ConvertOptions(**common))
        return out, "n/a (calibration reads image folders)"
    options = ConvertOptions(**common, calibrate=str(train), calib_device=sizes.device, **{**sizes.calib, **extra})
    start = time.perf_counter()
    report = gnsurgeon.convert_source(source, out, options).to_dict()
    seconds = time.perf_counter() - start
    cal = report.get("calibration") or {}
    before, after = cal.get("before") or {}, cal.get("after") or {}
    if after.get("top1_agreement") is not None:
        text = f"agreement {before.get('top1_agreement', 0):.1f}% -> {after['top1_agreement']:.1f}%"
    else:
        text = "layer fit + blocks (no class logits)"
    return out, f"{text}, {seconds:.0f} s"


def reached(task: str, result: dict | None) -> str:
    if not result:
        return "-"
    if task in ("classification", "video"):
        return f"top-1 {result.get('top1') or 0:.1f}%, agreement {result.get('teacher_agreement') or 0:.1f}%"
    if task == "segmentation":
        return f"per-pixel agreement {result.get('teacher_agreement') or 0:.1f}%"
    agreement = result.get("teacher_agreement")
    boxes = f"{agreement:.1f}%" if agreement is not None else "-"
    return f"feature cosine {result.get('feature_cosine') or 0:.4f}, box agreement {boxes}"


@contextlib.contextmanager
def forced_fp16(on: bool):
    """float16 autocast on a bf16 GPU: settings ask ``torch.cuda.is_bf16_supported`` (True on H100)."""
    if not on:
        yield
        return
    saved = torch.cuda.is_bf16_supported
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: False
    try:
        yield
    finally:
        torch.cuda.is_bf16_supported = saved


def finetune_row(task, checkpoint, train, val, variant, sizes, root) -> str:
    name, fields, fp16 = variant
    options = FinetuneOptions(
        data=str(train), val=str(val), teacher="source", steps=sizes.steps, batch_size=sizes.batch[task],
        workers=sizes.workers, device=sizes.device, log_every=max(1, sizes.steps // 4), eval_batch_size=32, **fields,
    )  # fmt: skip
    cuda = sizes.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with forced_fp16(fp16):
            report = gnsurgeon.finetune(checkpoint, root / f"{task}-ft.safetensors", options)
    except Exception as exc:  # a failing variant (e.g. compile) is a row, not the end of the benchmark
        return f"| {task} | {name} | failed: {first_line(exc)[:100]} | | | |"
    memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-"
    unit = "clips" if task == "video" else "images"
    speed = f"{report.images_per_s:.0f} {unit}/s" if report.images_per_s else "-"
    amp = report.settings.amp or "off"
    before, after = reached(task, report.before), reached(task, report.after)
    return f"| {task} | {name} (amp {amp}) | {speed} | {memory} | {before} | {after} |"


def prepare(task: str, root: Path, sizes: Sizes) -> tuple[Path, Path, Path, str]:
    """Data folders, the trained BN teacher's weights, the (calibrated) GN checkpoint."""
    from safetensors.torch import save_file

    train, val = root / f"{task}-train", root / f"{task}-val"
    if task == "video":
        data = make_clips(train, sizes.train // 4, sizes.clip[0], sizes.clip[1] + sizes.clip[1] // 8, 0)
        make_clips(val, sizes.val // 4, sizes.clip[0], sizes.clip[1] + sizes.clip[1] // 8, 1)
    else:
        side = sizes.image if task == "classification" else sizes.dense
        shapes = 1 if task == "classification" else 3
        data = make_images(train, sizes.train, side, 0, task == "classification", shapes)
        make_images(val, sizes.val, side, 1, task == "classification", shapes)
    teacher = train_teacher(task, build(task, sizes), data, sizes)
    weights = root / f"{task}-bn.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(weights))
    checkpoint, calibration = convert(task, root, weights, train, sizes)
    return train, val, checkpoint, calibration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the non-CUDA code")
    parser.add_argument("--budget", type=float, default=400.0, help="seconds after which remaining runs are skipped")
    parser.add_argument("--tasks", default="classification,segmentation,detection,video")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("No CUDA device here: nothing measured (python benchmarks/gpu.py --cpu-smoke checks the CPU side).")
        return 0
    sizes = SMOKE if args.cpu_smoke else GPU
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gnsurgeon-gpu-"))
    tasks = args.tasks.split(",")
    device = "CPU (smoke run: toy sizes, numbers meaningless)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(f"Device: {device}; torch {torch.__version__}; {sizes.steps} fine-tuning steps per run.\n", flush=True)
    prepared, calibration_rows = {}, []
    for task in tasks:
        t0 = time.perf_counter()
        train, val, checkpoint, calibration = prepare(task, root, sizes)
        prepared[task] = (train, val, checkpoint)
        calibration_rows.append(f"| {task} | {MODELS[task][0]} | {calibration} | {time.perf_counter() - t0:.0f} s |")
        print(f"prepared {task}: {calibration}", flush=True)
    rows = []
    variants = [v for v in VARIANTS if not (args.cpu_smoke and (v[2] or "compile" in v[1]))]
    for variant in variants:  # variant-major: the compile rows come last, where the budget may cut them
        for task in tasks:
            if time.perf_counter() - start > args.budget:
                rows.append(f"| {task} | {variant[0]} | skipped: --budget {args.budget:.0f} s spent | | | |")
                continue
            rows.append(finetune_row(task, prepared[task][2], *prepared[task][:2], variant, sizes, root))
            print(rows[-1], flush=True)
    print("\nCalibration (GN from the BN teacher, on the training images, no labels):\n")
    print("| task | model | calibration | data + teacher + convert |")
    print("|---|---|---|---:|")
    print("\n".join(calibration_rows))
    print(f"\nFine-tuning ({sizes.steps} steps, `finetune --teacher source`, from the calibrated checkpoint):\n")
    print("| task | variant | training speed | peak GPU memory (GiB) | before | after |")
    print("|---|---|---:|---:|---|---|")
    print("\n".join(sorted(rows, key=lambda r: tasks.index(r.split(" | ")[0][2:]))))
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
