"""Eager CPU latency of a BN model (eval), its BN* version and its folded version, in one run.

    .venv/bin/python benchmarks/fold_latency.py [--repeats 50] [--batch 1]

Prints a Markdown table (the README's "BN* and folding" table is copied from it). Every BN is
frozen; "folded" folds every BN* that folds exactly (all of them in these two models).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import gnsurgeon
from gnsurgeon.fold import plan_folds

MODELS = ["resnet50", "mobilenetv3_large_100"]


def with_trained_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random-init BN is the identity; give it statistics like a trained model so the diff means something."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def latencies_ms(models: list, x: torch.Tensor, repeats: int) -> list[float]:
    """Median latency per model, timed round-robin so that machine drift hits all of them alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            for _ in range(5):
                model(x)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(x)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, batch {args.batch}, 224x224, "
        f"median of {args.repeats}\n"
    )
    print("| model | BN eval (ms) | BN* (ms) | folded (ms) | BN* / BN | folded / BN | folded layers | max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in MODELS:
        model = with_trained_statistics(timm.create_model(name)).eval()
        x = torch.randn(args.batch, 3, 224, 224)
        freeze = gnsurgeon.Selection(freeze=("*",))
        plan = gnsurgeon.make_plan(model, selection=freeze)
        frozen = gnsurgeon.apply_plan(model, plan).eval()
        fold_plan = plan_folds(model, plan, x[:1])
        folded = gnsurgeon.apply_plan(model, fold_plan).eval()
        with torch.inference_mode():
            ref, out = model(x), folded(x)
        rel = ((ref - out).abs().max() / ref.abs().max()).item()
        bn, star, fold = latencies_ms([model, frozen, folded], x, args.repeats)
        print(
            f"| {name} | {bn:.1f} | {star:.1f} | {fold:.1f} | {star / bn:.2f} | {fold / bn:.2f} "
            f"| {len(fold_plan.with_action('folded'))}/{len(fold_plan)} | {rel:.1e} |"
        )


if __name__ == "__main__":
    main()
