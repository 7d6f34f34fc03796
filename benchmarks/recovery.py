"""After calibration, the short fine-tune: does the recommended command recover the teacher?

    .venv/bin/python benchmarks/recovery.py [--benchmarks digits regions shifted]
        [--archs resnet18 mobilenetv3_small_100] [--policies G=32 C/G=16] [--steps 300] [--batch-size 8]
        [--set kd_weight=0 --set lr=0.01 ...] [--threads 2] [--workers 1]

Starts from the calibrated checkpoints that ``fidelity.py`` wrote (run it first) and runs
``gnsurgeon finetune CAL --data TRAIN --val VAL --steps 300 --batch-size 8 --teacher source`` — the
command the README recommends, with its defaults (``--set KEY=VALUE`` overrides a
``FinetuneOptions`` field, for ablations). Digits are not mirrored (``hflip=0``). Top-1 on the
evaluation images (shifted for the photo benchmarks), CPU. Prints the Markdown table that the
README quotes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import photos
import torch
from fidelity import ARCHS, POLICIES, checkpoint_path, open_bench, parse_sets

import gnsurgeon
from gnsurgeon import FinetuneOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", nargs="+", default=["digits", "regions", "shifted"])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--data", default="bench-data", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="FinetuneOptions field=value")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_sets(args.sets)
    print(
        f"gnsurgeon finetune CAL --data TRAIN --val VAL --steps {args.steps} --batch-size {args.batch_size} "
        f"--teacher source{' ' + ' '.join(args.sets) if args.sets else ''}; CPU, {args.threads} threads\n"
    )
    print("| benchmark | model | policy | teacher (BN) | calibrated | fine-tuned | fine-tuned − teacher | time |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in args.benchmarks:
        bench = open_bench(name, args.data)
        x_val, y_val = photos.load_tensors(bench.val, bench.config)
        for arch in args.archs:
            _, teacher = bench.teacher(arch)
            teacher_top1 = photos.top1(teacher, x_val, y_val)
            for policy in args.policies:
                calibrated = checkpoint_path(bench, arch, policy)
                if not calibrated.exists():
                    raise SystemExit(f"{calibrated} is missing: run benchmarks/fidelity.py first")
                values = {
                    "data": str(bench.train),
                    "val": str(bench.val),
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "teacher": "source",
                    "workers": args.workers,
                    "log_every": 50,
                    **({"hflip": 0.0} if name == "digits" else {}),
                    **overrides,
                }
                start = time.perf_counter()
                out = calibrated.with_suffix(".finetuned.safetensors")
                report = gnsurgeon.finetune(calibrated, out, FinetuneOptions(**values))
                seconds = time.perf_counter() - start
                after = photos.top1(gnsurgeon.load(out).eval(), x_val, y_val)
                before = report.before["top1"] if report.before else float("nan")
                print(
                    f"| {name} | {arch} | {policy} | {teacher_top1:.2f} | {before:.2f} | {after:.2f} "
                    f"| {after - teacher_top1:+.2f} | {seconds:.0f} s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
