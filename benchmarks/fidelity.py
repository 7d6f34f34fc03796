"""Calibration fidelity on real data: BN teacher vs GN (γ/β copy) vs calibrated GN, in one run.

    .venv/bin/python benchmarks/fidelity.py [--archs resnet18 mobilenetv3_small_100] [--data bench-data/digits]
        [--policies G=32 C/G=16] [--threads 2] [--final-lr 1e-3] [--no-augment] [--cache auto] [--cache-mem 50%]

Teachers are timm BN models trained on scikit-learn's digits (32×32; cached under --data, see
digits.py). Each is converted at G=32 and at 16 channels per group, then calibrated on 256 training
images (no labels used); top-1 is measured on the held-out validation images (445). Prints the Markdown
table that the README quotes.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
from digits import DIGITS_CONFIG, load_tensors, top1, train_teacher, write_digits

import gnsurgeon
from gnsurgeon.calibration import CalibrationOptions, calibrate
from gnsurgeon.sources import read_state_dict

POLICIES = {
    "G=32": gnsurgeon.GroupPolicy(groups=32),
    "C/G=16": gnsurgeon.GroupPolicy(groups=None, channels_per_group=16),
}
TEACHER_LR = {"resnet18": 2e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv3_small_100"])
    parser.add_argument("--data", default="bench-data/digits")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150, help="block reconstruction steps per block")
    parser.add_argument("--final-steps", type=int, default=300, help="end-to-end logits-matching steps")
    parser.add_argument("--final-lr", type=float, default=CalibrationOptions.final_lr, help="end-to-end lr")
    parser.add_argument("--no-augment", action="store_true", help="end-to-end pass with mixup only (ablation)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    parser.add_argument("--cache", default="auto", choices=["auto", "off", "ram", "disk"], help="calibration cache")
    parser.add_argument(
        "--cache-mem", default="50%", help="cache memory budget (8G, 50%%; '--cache ram --cache-mem 0': float16)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_dir, val_dir = write_digits(args.data)
    x_val, y_val = load_tensors(val_dir)
    print(
        f"digits 32x32, {len(y_val)} val images; calibration: {args.samples} train images (20% held out for "
        f"the agreement metric), {args.steps} steps/block + {args.final_steps} end-to-end steps at lr "
        f"{args.final_lr:g}{' (mixup only)' if args.no_augment else ''}, cache {args.cache} {args.cache_mem}; "
        f"torch {torch.__version__}, CPU, "
        f"{args.threads} threads\n"
    )
    print(
        "| model | policy | teacher (BN) | GN, γ/β copy | GN, layer fit | GN, calibrated | calibrated / teacher "
        "| calibration time |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for arch in args.archs:
        weights, _, _ = train_teacher(
            arch, args.data, lr=TEACHER_LR.get(arch, 5e-3), epochs=30 if arch == "resnet18" else 40
        )
        teacher = timm.create_model(arch, num_classes=10)
        teacher.load_state_dict(read_state_dict(weights))
        teacher.eval()
        teacher_top1 = top1(teacher, x_val, y_val)
        for name in args.policies:
            policy = POLICIES[name]
            plan = gnsurgeon.make_plan(teacher, policy)
            student = gnsurgeon.apply_plan(teacher, plan).eval()
            results = {}
            for method in ("layer", "block"):
                start = time.perf_counter()
                options = CalibrationOptions(
                    data=str(train_dir),
                    samples=args.samples,
                    method=method,
                    block_steps=args.steps,
                    final_steps=args.final_steps,
                    final_lr=args.final_lr,
                    final_augment=not args.no_augment,
                    cache=args.cache,
                    cache_mem=int(args.cache_mem) if args.cache_mem.isdigit() else args.cache_mem,
                )
                calibrated, _ = calibrate(teacher, student, plan, DIGITS_CONFIG, options)
                results[method] = (top1(calibrated, x_val, y_val), time.perf_counter() - start)
            block_top1, seconds = results["block"]
            print(
                f"| {arch} | {name} | {teacher_top1:.2f} | {top1(student, x_val, y_val):.2f} "
                f"| {results['layer'][0]:.2f} | {block_top1:.2f} | {block_top1 / teacher_top1:.3f} | {seconds:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
