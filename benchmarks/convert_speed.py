"""Conversion cost next to model construction cost (CPU, random init, median of N runs).

    .venv/bin/python benchmarks/convert_speed.py [--repeats 5]

Prints a Markdown table: the README's "Conversion speed" table is copied from it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

import gnsurgeon

MODELS = ["resnet50", "efficientnet_b0", "mobilenetv3_large_100"]


def median_seconds(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| model | norm layers | converted | fallbacks | build (ms) | plan (ms) | convert (ms) | convert / build |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODELS:
        build_s, model = median_seconds(lambda name=name: timm.create_model(name), args.repeats)
        plan_s, plan = median_seconds(lambda model=model: gnsurgeon.make_plan(model), args.repeats)
        apply_s, converted = median_seconds(lambda m=model, p=plan: gnsurgeon.apply_plan(m, p), args.repeats)
        assert not any(gnsurgeon.layers.norm_kind(m) for m in converted.modules())
        summary = plan.summary()
        print(
            f"| {name} | {summary['layers']} | {summary['actions'].get('gn', 0)} | {len(summary['fallbacks'])} "
            f"| {build_s * 1e3:.0f} | {plan_s * 1e3:.1f} | {apply_s * 1e3:.0f} | {apply_s / build_s:.2f} |"
        )


if __name__ == "__main__":
    main()
