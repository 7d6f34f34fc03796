"""What calibration costs at ImageNet size: resnet50 at 224×224, per pass, in one run.

    .venv/bin/python benchmarks/calibration_cost.py [--images 32] [--steps 2] [--threads 2]

Calibration streams batches with bounded memory, so each layer fit and each tuning step re-runs the
models up to that layer. This times each pass in one run (random init and random images: the cost
does not depend on the values; the progress callback timestamps every layer fit and optimiser step,
and a pass's first step includes scoring it before tuning) and extrapolates the defaults (256
images, 150 steps per block, 300 end-to-end steps). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from PIL import Image

import gnsurgeon
from gnsurgeon.calibration import CalibrationOptions, calibrate, calibration_blocks
from gnsurgeon.sources import DataConfig

CONFIG = DataConfig(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="calibration images (all fitted, none held out)")
    parser.add_argument("--steps", type=int, default=2, help="tuning steps timed per pass")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="gnsurgeon-calib-cost-"))
    gen = torch.Generator().manual_seed(0)
    for i in range(args.images):
        pixels = (torch.rand(224, 224, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    teacher = timm.create_model("resnet50").eval()
    plan = gnsurgeon.make_plan(teacher)
    student = gnsurgeon.apply_plan(teacher, plan)
    paths = [lp.path for lp in plan.with_action("gn")]
    blocks = sum(b not in members for b, members in calibration_blocks(student, paths, 4))

    # One run; the progress callback timestamps every layer fit and optimiser step. Their order is
    # known: per block its layers' fits then its tuning steps, then the end-to-end steps.
    kinds = []
    for block, members in calibration_blocks(student, paths, 4):
        kinds += ["layer"] * len(members) + (["block"] * args.steps if block not in members else [])
    kinds += ["final"] * args.steps
    stamps: list[float] = []
    options = CalibrationOptions(
        data=str(folder), samples=args.images, holdout=0, block_steps=args.steps, final_steps=args.steps
    )
    start = time.perf_counter()
    calibrate(teacher, student, plan, CONFIG, options, progress=lambda done, total: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    assert len(stamps) == len(kinds), (len(stamps), len(kinds))
    spent = {"layer": 0.0, "block": 0.0, "final": 0.0}
    for kind, before, after in zip(kinds[1:], stamps[:-1], stamps[1:], strict=True):  # the first tick holds setup
        spent[kind] += after - before
    layer = spent["layer"]
    per_block_step = spent["block"] / (args.steps * blocks)
    per_final_step = spent["final"] / args.steps
    other = total - sum(spent.values())
    print(f"resnet50, 224x224, batch 32, CPU, {args.threads} threads, torch {torch.__version__}\n")
    rows = [
        (
            f"layer fit ({len(paths)} layers)",
            f"{layer:.0f} s for {args.images} images",
            layer * 256 / args.images,
            "256 images",
        ),
        (
            f"block tuning ({blocks} blocks)",
            f"{per_block_step:.1f} s per step",
            per_block_step * 150 * blocks,
            "150 steps per block",
        ),
        ("end to end", f"{per_final_step:.1f} s per step", per_final_step * 300, "300 steps"),
    ]
    print("| pass | measured | at the defaults |")
    print("|---|---:|---:|")
    for name, measured, default_seconds, budget in rows:
        print(f"| {name} | {measured} | {default_seconds / 60:.0f} min for {budget} |")
    print(f"| setup, first layer, before/after reports | {other:.0f} s | |")


if __name__ == "__main__":
    main()
