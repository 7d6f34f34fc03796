"""What calibration costs at ImageNet size, streamed vs cached: resnet50 and mobilenetv3_large_100 at
224×224 on CPU, in one run and one Markdown table.

    .venv/bin/python benchmarks/calibration_cost.py [--models resnet50 mobilenetv3_large_100]
        [--images 40] [--steps 2] [--final-steps 2] [--threads 2] [--modes off ram fp16 disk]
    .venv/bin/python benchmarks/calibration_cost.py --whole   # the whole default calibration, measured

Each (model, cache mode) runs the same calibration, one after the other, each in its own child
process so that each mode's peak RSS is its own (timings never overlap). Random init with BN
statistics set as a trained model's would be, and random images: the cost does not depend on the
values. 20% of the images are held out, as by default (40 images: 32 fitted, one batch). The
calibration report's seconds per phase give each row; the per-layer errors after calibration, and
the parameters, are compared with streaming (equal up to float rounding for float32 caches; the
float16 row says how far a float16 cache moves them).

The mode rows run the layer fit and block tuning only: the end-to-end pass (the same whatever the
cache) holds a training step of the whole model at batch 2 × 32 (mixup), which would hide each
mode's memory; it runs in a child of its own (cached layer fit, no block tuning, the end-to-end
steps). The last table extrapolates the whole default calibration (256 images: 205 fitted, 51 held
out; layer fit, 150 steps per block, and the end-to-end pass where the default runs it: 300 steps
where some GN group holds fewer than 512 values, :func:`gnsurgeon.calibration.auto_final_steps`)
from those two runs: the layer fit and the cache's propagation scale with the images, tuning with
the steps, each pass's held-out scoring and the report's metrics with the held-out images.

The machine may be shared (note `uptime` before and after): each row also gives the CPU seconds
of its calibration (all threads), the cached/streaming ratio is given in both, and the
extrapolation has a second total scaled by each run's CPU seconds per thread over its wall seconds:
an estimate of the time on an unloaded machine (threads spinning while they wait for a core make it
an over-estimate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from PIL import Image

import gnsurgeon
from gnsurgeon.calibration import CalibrationOptions, auto_final_steps, calibrate, smallest_groups
from gnsurgeon.layers import norm_kind
from gnsurgeon.sources import DataConfig

MODES = {  # row name -> (CalibrationOptions.cache, cache_mem)
    "off": ("off", "50%"),
    "ram": ("ram", "50%"),
    "fp16": ("ram", 1),  # RAM forced over a 1-byte budget: the float16 cache
    "disk": ("disk", "50%"),
}
E2E = "e2e"  # the end-to-end pass alone (after the cached layer fit): its own child, its own peak RSS
WHOLE = "whole"  # --whole: the whole default calibration, timed for real
DEFAULT_IMAGES, DEFAULT_FIT, DEFAULT_HELD = 256, 205, 51
DEFAULT_BLOCK_STEPS = 150


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """BN statistics and affine far from (0, 1), as after training, so the per-layer errors mean something."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if norm_kind(m) is not None and getattr(m, "running_var", None) is not None:
                c = m.running_var.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model.eval()


def child(args: argparse.Namespace) -> None:
    """One calibration; prints its report's numbers as one JSON line and saves the parameters."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = _trained_like(timm.create_model(args.model))
    plan = gnsurgeon.make_plan(teacher)
    student = gnsurgeon.apply_plan(teacher, plan)
    config = DataConfig(input_size=(3, args.size, args.size), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
    if args.mode == WHOLE:  # every default: what `convert --calibrate DIR` runs
        options = CalibrationOptions(data=args.folder, samples=args.images)
    else:
        cache, cache_mem = MODES["ram" if args.mode == E2E else args.mode]
        options = CalibrationOptions(
            data=args.folder,
            samples=args.images,
            block_steps=args.steps,
            final_steps=args.final_steps,
            cache=cache,
            cache_mem=cache_mem,
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    calibrated, report = calibrate(teacher, student, plan, config, options)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.save(calibrated.state_dict(), Path(args.folder).parent / f"{args.model}-{args.mode}.pt")
    out = report.to_dict()
    keep = ("samples", "holdout", "settings", "phases", "memory", "cache", "layers", "after")
    print(json.dumps({k: out[k] for k in keep} | {"seconds": seconds, "cpu_seconds": cpu_seconds}))


def _run_child(args: argparse.Namespace, folder: Path, model: str, mode: str) -> dict:
    steps, final_steps = (0, args.final_steps) if mode == E2E else (args.steps, 0)
    command = [sys.executable, __file__, "--child", model, mode, "--folder", str(folder)]
    command += ["--steps", str(steps), "--final-steps", str(final_steps)]
    for name in ("images", "threads", "size"):
        command += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{model} {mode} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_whole(args: argparse.Namespace, results: dict) -> None:
    """The --whole table: each model's default calibration, measured, by phase (minutes)."""
    print(
        f"Whole default calibration, measured: {args.size}x{args.size}, {DEFAULT_IMAGES} random images (205 fitted, "
        f"51 held out), every CalibrationOptions default; CPU, {args.threads} threads, torch {torch.__version__}\n"
    )
    for model, r in results.items():
        for key, why in r["settings"].get("auto", {}).items():
            print(f"- {model}: {key} {why}")
    phases = ["probe", "layer_fit", "propagation", "block_tuning", "scoring", "end_to_end", "metrics"]
    head = " | ".join(phases)
    print(f"\n| model | batch | end-to-end steps | {head} | total (min) | CPU (min) | peak RSS (MiB) |")
    print("|---|---:|---:|" + "---:|" * (len(phases) + 3))
    for model, r in results.items():
        cells = " | ".join(f"{r['phases'].get(p, 0.0) / 60:.2f}" for p in phases)
        print(
            f"| {model} | {r['settings']['batch_size']} | {r['settings']['final_steps']} | {cells} "
            f"| {r['seconds'] / 60:.1f} | {r['cpu_seconds'] / 60:.1f} | {r['memory'].get('peak_rss_mb', 0):.0f} |"
        )


def _unloaded(r: dict, threads: int) -> float:
    """How much a loaded machine stretched this child: wall seconds over CPU seconds per thread. On a
    shared machine, CPU seconds / threads estimates the wall time the child would take alone."""
    return (r["cpu_seconds"] / threads) / max(r["seconds"], 1e-9)


def _max_param_difference(a: dict, b: dict) -> float:
    """Max over tensors of max |Δ| / max |tensor|: relative, since a closed-form γ on a near-constant
    channel can be in the hundreds (random images) and move by more than 1 while the layer's output does not."""
    return max(
        ((a[k].double() - b[k].double()).abs().max() / a[k].double().abs().max().clamp_min(1e-12)).item()
        for k in a
        if a[k].is_floating_point() and a[k].numel()
    )


def _row(model: str, r: dict, base: dict, params: float) -> str:
    ph, cache = r["phases"], r["cache"]
    errors = {p: e["after"] for p, e in r["layers"].items()}
    worst = max(abs(errors[p] - base["layers"][p]["after"]) for p in errors)
    cosine = r["after"].get("logits_cosine", 0.0) - base["after"].get("logits_cosine", 0.0)
    where = "streaming" if cache["mode"] == "off" else f"{cache['mode']} {cache['dtype']}"
    cached = f"{cache['bytes_cached'] / 2**20:.0f}" if cache["mode"] != "off" else "0"
    return (
        f"| {model} | {where} | {ph.get('layer_fit', 0):.1f} | {ph.get('block_tuning', 0):.1f} "
        f"| {ph.get('propagation', 0):.1f} | {ph.get('scoring', 0):.1f} | {_core(r):.1f} | {r['cpu_seconds']:.0f} "
        f"| {r['memory'].get('peak_rss_mb', 0):.0f} | {cached} | {sum(errors.values()) / len(errors):.3g} "
        f"| {worst:.1e} | {params:.1e} | {cosine:+.1e} | {cache['resyncs']} |"
    )


def _core(r: dict) -> float:
    """Seconds of the passes the cache changes: layer fit, block tuning, propagation, scoring."""
    ph = r["phases"]
    return sum(ph.get(k, 0.0) for k in ("probe", "layer_fit", "block_tuning", "propagation", "scoring"))


def default_final_steps(model: str, size: int) -> tuple[int, str]:
    """The end-to-end steps the default runs for ``model`` at ``size`` (auto), and why."""
    teacher = timm.create_model(model).eval()
    plan = gnsurgeon.make_plan(teacher)
    student = gnsurgeon.apply_plan(teacher, plan)
    return auto_final_steps(*smallest_groups(student, [lp.path for lp in plan], torch.zeros(1, 3, size, size)))


def _whole_default(r: dict, e2e: dict, steps: int, final_steps: int, default_final: int) -> dict[str, float]:
    """Seconds of the whole default calibration, extrapolated from the cached run ``r`` and the
    end-to-end run ``e2e`` (see the docstring); ``default_final``: the end-to-end steps the default runs."""
    ph, n_fit, n_held = r["phases"], r["samples"], max(1, r["holdout"])
    e2e_step = e2e["phases"].get("end_to_end", 0.0) / max(1, final_steps)
    e2e_scoring = e2e["phases"].get("scoring", 0.0) if default_final else 0.0
    # Held-out scoring happens twice per tuned block and twice for the end-to-end pass.
    return {
        "layer fit": ph.get("layer_fit", 0.0) * DEFAULT_FIT / n_fit,
        "cache propagation and re-syncs": ph.get("propagation", 0.0) * DEFAULT_IMAGES / (n_fit + r["holdout"]),
        "block tuning": ph.get("block_tuning", 0.0) / max(1, steps) * DEFAULT_BLOCK_STEPS,
        "held-out scoring (keep/undo)": (ph.get("scoring", 0.0) + e2e_scoring) * DEFAULT_HELD / n_held,
        "end to end": e2e_step * default_final,
        "report metrics and probe": ph.get("metrics", 0.0) * DEFAULT_HELD / n_held + ph.get("probe", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenetv3_large_100"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--images", type=int, default=40, help="calibration images (20%% held out)")
    parser.add_argument("--steps", type=int, default=2, help="tuning steps timed per block")
    parser.add_argument("--final-steps", type=int, default=2, help="end-to-end steps timed (in a child of their own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--whole", action="store_true", help="instead: run the whole default calibration (256 images) once per model"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.model, args.mode = args.child
        return child(args)
    if args.whole:
        args.images = DEFAULT_IMAGES
    with tempfile.TemporaryDirectory(prefix="gnsurgeon-calib-cost-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        gen = torch.Generator().manual_seed(0)
        for i in range(args.images):
            pixels = (torch.rand(args.size, args.size, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        if args.whole:
            return _print_whole(args, {m: _run_child(args, folder, m, WHOLE) for m in args.models})
        results = {(m, mode): _run_child(args, folder, m, mode) for m in args.models for mode in args.modes}
        params = {key: torch.load(Path(tmp) / f"{key[0]}-{key[1]}.pt") for key in results}
        e2e = {m: _run_child(args, folder, m, E2E) for m in args.models if args.final_steps}
        _print(args, results, params, e2e)


def _print(args: argparse.Namespace, results: dict, params: dict, e2e: dict) -> None:
    first = next(iter(results.values()))
    print(
        f"{args.size}x{args.size}, {first['samples']} fitted + {first['holdout']} held-out random images, "
        f"batch 32, {args.steps} tuning steps per block; CPU, {args.threads} threads, torch {torch.__version__}; "
        "one child process per row, run one after another\n"
    )
    print(
        "| model | cache | layer fit (s) | block tuning (s) | propagation (s) | keep/undo scoring (s) | total (s) "
        "| CPU (s, all threads) "
        "| peak RSS (MiB) | cached (MiB) | mean layer error after | max Δ error vs streaming "
        "| max relative Δ parameter vs streaming | Δ held-out logits cosine vs streaming | re-syncs |"
    )
    print("|---|---|" + "---:|" * 13)
    for (model, mode), r in results.items():
        base_key = (model, "off") if (model, "off") in results else (model, mode)
        base = results[base_key]
        print(_row(model, r, base, _max_param_difference(params[base_key], params[(model, mode)])))
    print(
        "\n| model | cached / streaming: layer fit + tuning + propagation + scoring, wall "
        "| whole calibration, wall | whole calibration, CPU |\n|---|---:|---:|---:|"
    )
    for model in args.models:
        if (model, "off") in results and (model, "ram") in results:
            cached, streamed = results[(model, "ram")], results[(model, "off")]
            ratios = (
                _core(cached) / _core(streamed),
                cached["seconds"] / streamed["seconds"],
                cached["cpu_seconds"] / streamed["cpu_seconds"],
            )
            print(f"| {model} | " + " | ".join(f"{x:.3f}" for x in ratios) + " |")
    if not e2e:
        return
    finals = {model: default_final_steps(model, args.size) for model in args.models}
    print(
        f"\nWhole default calibration ({DEFAULT_IMAGES} images, {DEFAULT_BLOCK_STEPS} steps per block, the "
        f"end-to-end pass where the default runs it), extrapolated from the float32 cached run and "
        f"{args.final_steps} end-to-end steps at batch 2 × 32 (minutes):\n"
    )
    for model, (_steps, why) in finals.items():
        print(f"- {model}: end-to-end pass {why}")
    print()
    parts = list(_whole_default(first, first, 1, 1, 1))
    print(
        "| model | " + " | ".join(parts) + " | total | total, at CPU time / threads | end-to-end peak RSS (MiB) "
        "| end to end if forced on (300 steps) |"
    )
    print("|---|" + "---:|" * (len(parts) + 4))
    for model in args.models:
        if (model, "ram") in results and model in e2e:
            est = _whole_default(results[(model, "ram")], e2e[model], args.steps, args.final_steps, finals[model][0])
            forced = _whole_default(results[(model, "ram")], e2e[model], args.steps, args.final_steps, 300)
            cells = " | ".join(f"{v / 60:.1f}" for v in est.values())
            rss = e2e[model]["memory"].get("peak_rss_mb", 0)
            e2e_part = est["end to end"]
            alone = (sum(est.values()) - e2e_part) * _unloaded(results[(model, "ram")], args.threads)
            alone += e2e_part * _unloaded(e2e[model], args.threads)
            rss_cell = f"{rss:.0f}" if finals[model][0] else f"({rss:.0f}, not run)"
            print(
                f"| {model} | {cells} | {sum(est.values()) / 60:.1f} | {alone / 60:.1f} | {rss_cell} "
                f"| {forced['end to end'] / 60:.1f} |"
            )


if __name__ == "__main__":
    main()
