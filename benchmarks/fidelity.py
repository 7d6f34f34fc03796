"""Calibration fidelity on real data: BN teacher vs GN (γ/β copy) vs calibrated GN, in one run.

    .venv/bin/python benchmarks/fidelity.py [--benchmarks digits regions shifted shifted224]
        [--archs resnet18 mobilenetv3_small_100] [--policies G=32 C/G=16] [--threads 2]
        [--set calib_final_steps=0 --set max_frozen=0 ...] [--no-layer-fit]

Benchmarks (each with its BN teachers, trained once and cached under bench-data/):

* ``digits`` — scikit-learn's digits at 32×32 (``digits.py``); validation images are drawn like the
  calibration images, so there is no shifted set.
* ``regions`` — 64×64 photo crops; calibration-like crops (``iid``) and shifted crops from other
  parts of the photos (``val``), see ``photos.py``.
* ``shifted`` — 128×128 photo crops (last stage 4×4); shifted crops zoomed out and with another
  contrast and brightness.
* ``shifted224`` — the same crops at 224×224 (last stage 7×7), teachers trained at 224 (not in the
  default list: its teachers take about 15 minutes to train on 2 CPU cores).

Each teacher is converted with ``gnsurgeon.convert_source`` — the ``convert --calibrate TRAIN``
command with its defaults (``--set KEY=VALUE`` overrides a ``ConvertOptions`` field, for ablations) —
at G=32 and at 16 channels per group. Top-1 is measured on the evaluation images (``val``), and
top-1 agreement with the teacher on the calibration-like images and on the shifted ones (how much
calibration only fits what it saw). The calibrated checkpoints are kept for ``recovery.py``.
Prints the Markdown table that the README quotes.
"""

from __future__ import annotations

import argparse
import ast
import time
from dataclasses import dataclass
from pathlib import Path

import digits
import photos
import torch

import gnsurgeon
from gnsurgeon import ConvertOptions
from gnsurgeon.plan import Action
from gnsurgeon.sources import DataConfig

POLICIES = {"G=32": {"groups": 32}, "C/G=16": {"channels_per_group": 16}}
ARCHS = ["resnet18", "mobilenetv3_small_100"]


@dataclass
class Bench:
    """One benchmark's folders, data config and how to get a teacher's weights."""

    name: str
    root: Path
    config: DataConfig
    train: Path
    iid: Path  # calibration-like evaluation images
    val: Path  # the evaluation images (shifted from the calibration images, except for digits)
    shifted: bool

    def teacher(self, arch: str) -> tuple[Path, torch.nn.Module]:
        if self.name == "digits":
            lr, epochs = (2e-3, 30) if arch == "resnet18" else (5e-3, 40)
            weights, _, _ = digits.train_teacher(arch, self.root, epochs=epochs, lr=lr)
        else:
            weights, _, _ = photos.train_teacher(arch, self.root.parent, photos.BENCHMARKS[self.name])
        return weights, load_bn(arch, weights)


def load_bn(arch: str, weights: Path) -> torch.nn.Module:
    import timm

    from gnsurgeon.sources import read_state_dict

    model = timm.create_model(arch, num_classes=10)
    model.load_state_dict(read_state_dict(weights))
    return model.eval()


def open_bench(name: str, data: Path) -> Bench:
    if name == "digits":
        root = data / "digits"
        train, val = digits.write_digits(root)
        return Bench(name, root, digits.DIGITS_CONFIG, train, val, val, False)
    bench = photos.BENCHMARKS[name]
    folders = photos.write_photos(data / "photos", bench)
    return Bench(name, data / "photos" / name, bench.config, folders["train"], folders["iid"], folders["val"], True)


def convert_options(bench: Bench, weights: Path, policy: str, overrides: dict) -> ConvertOptions:
    """``convert timm:ARCH --weights W --calibrate TRAIN`` with the benchmark's data config: the defaults."""
    c = bench.config
    values = {
        "weights": str(weights),
        "num_classes": 10,
        "input_size": c.input_size,
        "mean": c.mean,
        "std": c.std,
        "crop_pct": c.crop_pct,
        "calibrate": str(bench.train),
        **POLICIES[policy],
        **overrides,
    }
    return ConvertOptions(**values)


def parse_sets(items: list[str]) -> dict:
    values = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            values[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[key] = raw
    return values


def checkpoint_path(bench: Bench, arch: str, policy: str, sets: tuple[str, ...] | list[str] = ()) -> Path:
    """Where the calibrated checkpoint goes: ``calibrated/`` for the defaults (``recovery.py`` reads
    them), a folder named after the ``--set`` overrides for an ablation, which so never replaces them."""
    tag = "-".join(item.replace("=", "_").replace("/", "") for item in sets)
    folder = bench.root / (f"calibrated-{tag}" if tag else "calibrated")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{arch}-{policy.replace('/', '')}.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks", nargs="+", default=["digits", "regions", "shifted"])
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--data", default="bench-data", type=Path)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="ConvertOptions field=value")
    parser.add_argument("--no-layer-fit", action="store_true", help="skip the layer-fit-only column (saves time)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = parse_sets(args.sets)
    defaults = ConvertOptions(**{"calibrate": "TRAIN", **overrides})
    print(
        f"convert --calibrate TRAIN with its defaults{' and ' + ', '.join(args.sets) if args.sets else ''}: "
        f"{defaults.calib_samples} images (20% held out), {defaults.calib_steps} steps/block, "
        f"{'auto' if defaults.calib_final_steps is None else defaults.calib_final_steps} end-to-end steps, "
        f"batches of {defaults.calib_batch_size or 'auto'}, --max-frozen {defaults.frozen_spec()} "
        f"(--frozen-rank {defaults.frozen_rank}); torch "
        f"{torch.__version__}, CPU, {args.threads} threads\n"
    )
    print(
        "| benchmark | model | policy | teacher (BN) | GN, γ/β copy | GN, layer fit | GN, calibrated "
        "| calibrated / teacher | agreement: calibration-like / shifted | BN* kept | calibration time |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name in args.benchmarks:
        bench = open_bench(name, args.data)
        x_val, y_val = photos.load_tensors(bench.val, bench.config)
        x_iid, _ = photos.load_tensors(bench.iid, bench.config)
        for arch in args.archs:
            weights, teacher = bench.teacher(arch)
            teacher_top1 = photos.top1(teacher, x_val, y_val)
            for policy in args.policies:
                options = convert_options(bench, weights, policy, overrides)
                plan = gnsurgeon.make_plan(teacher, options.policy())
                copy_top1 = photos.top1(gnsurgeon.apply_plan(teacher, plan).eval(), x_val, y_val)
                layer = "—"
                if not args.no_layer_fit:
                    layer_options = convert_options(bench, weights, policy, overrides | {"calib_method": "layer"})
                    out = checkpoint_path(bench, arch, policy, args.sets).with_suffix(".layer.safetensors")
                    gnsurgeon.convert_source(f"timm:{arch}", out, layer_options)
                    layer = f"{photos.top1(gnsurgeon.load(out).eval(), x_val, y_val):.2f}"
                start = time.perf_counter()
                out = checkpoint_path(bench, arch, policy, args.sets)
                report = gnsurgeon.convert_source(f"timm:{arch}", out, options)
                seconds = time.perf_counter() - start
                model = gnsurgeon.load(out).eval()
                cal = photos.top1(model, x_val, y_val)
                like = photos.agreement(model, teacher, x_iid)
                shifted = f"{photos.agreement(model, teacher, x_val):.1f}%" if bench.shifted else "—"
                frozen = report.plan.with_action(Action.FROZEN)
                print(
                    f"| {name} | {arch} | {policy} | {teacher_top1:.2f} | {copy_top1:.2f} | {layer} | {cal:.2f} "
                    f"| {cal / teacher_top1:.3f} | {like:.1f}% / {shifted} | {len(frozen)} of {len(report.plan)} "
                    f"| {seconds:.0f} s |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
