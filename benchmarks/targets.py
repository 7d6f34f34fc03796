"""The trap, measured: timm's GN models load a BN-converted state dict strictly whatever G it was
converted with, and only ``--like`` (each layer's G from the target) computes the same function.

    .venv/bin/python benchmarks/targets.py [--size 224]

For each BN model / timm GN model pair (random init, BN statistics randomised as a trained model's
would be): how many keys load strictly, how many layers a plain G=32 conversion gives a different G
than the target, the max |Δ| of the target's output after a strict load of that conversion, and the
same after ``convert --like``. Prints a Markdown table: the README's "Taking the model elsewhere"
table is copied from it.
"""

from __future__ import annotations

import argparse
import platform

import timm
import torch

import gnsurgeon
from gnsurgeon.conversion import ConvertOptions
from gnsurgeon.targets import open_like, plan_like

PAIRS = [("resnet50", "resnet50_gn"), ("resnetv2_50d", "resnetv2_50d_gn"), ("efficientnet_b0", "efficientnet_b0_gn")]


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if gnsurgeon.layers.norm_kind(m) is not None:
                c = m.running_mean.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def max_delta(converted: torch.nn.Module, target_name: str, x: torch.Tensor) -> tuple[int, float]:
    """Strictly load ``converted``'s tensors into a fresh target; (keys loaded, max |Δ| of outputs)."""
    target = timm.create_model(target_name).eval()
    state = converted.state_dict()
    target.load_state_dict(state, strict=True)
    with torch.no_grad():
        return len(state), float((converted.eval()(x) - target(x)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
        f"input 2x3x{args.size}x{args.size}, random init with randomised BN statistics\n"
    )
    print(
        "| BN model | timm GN model | keys loaded strictly | layers where G=32 gives another G "
        "| max abs diff, plain G=32 | max abs diff, `--like` |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for source, target in PAIRS:
        model = randomize_bn(timm.create_model(source)).eval()
        plain_plan = gnsurgeon.make_plan(model, ConvertOptions().policy())
        like = open_like(f"timm:{target}", None)
        like_plan = plan_like(model, like, ConvertOptions().selection())
        differ = sum(a.groups != b.groups for a, b in zip(plain_plan, like_plan, strict=True))
        keys, plain = max_delta(gnsurgeon.apply_plan(model, plain_plan), target, x)
        _, matched = max_delta(gnsurgeon.apply_plan(model, like_plan), target, x)
        print(f"| {source} | {target} | {keys} | {differ} of {len(like_plan)} | {plain:.2g} | {matched:.2g} |")


if __name__ == "__main__":
    main()
