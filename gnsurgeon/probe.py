"""Probe inputs and output handling shared by the checks of every stage."""

from __future__ import annotations

import torch
from torch import nn

from .errors import VerificationError
from .layers import FrozenBNAffine, norm_kind
from .plan import Plan
from .sources import DataConfig


def make_probe_input(config: DataConfig, batch: int = 2, seed: int = 0):
    """A deterministic input shaped for the model's task (a list of images for detection)."""
    gen = torch.Generator().manual_seed(seed)
    if config.task == "detection":
        return [torch.rand(*config.input_size, generator=gen) for _ in range(batch)]
    return torch.randn(batch, *config.input_size, generator=gen)


def flatten_outputs(out, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` for every tensor in a model output (tensor, dict, list, tuple)."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, dict):
        return [item for k, v in out.items() for item in flatten_outputs(v, f"{prefix}.{k}")]
    if isinstance(out, (list, tuple)):
        return [item for i, v in enumerate(out) for item in flatten_outputs(v, f"{prefix}[{i}]")]
    return []


def move_to(x, device):
    return [t.to(device) for t in x] if isinstance(x, list) else x.to(device)


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def run_probe(original: nn.Module, converted: nn.Module, config: DataConfig, plan: Plan) -> dict:
    """Compare original and converted on one probe input (eval mode); raise if the result is broken.

    Checks: the same output structure and shapes (detection outputs, whose box counts depend on
    the weights, only by structure), finite outputs, and no converted layer still a batch norm.
    Reports the cosine similarity of the outputs: how far the function moved before any training.
    """
    modes = [(m, m.training) for m in (original, converted)]
    x = make_probe_input(config)
    try:
        original.eval()
        converted.eval()
        ref = flatten_outputs(original(move_to(x, model_device(original))))
        out = flatten_outputs(converted(move_to(x, model_device(converted))))
    except Exception as exc:
        raise VerificationError(f"probe forward on input {tuple(config.input_size)} failed: {exc}") from None
    finally:
        for m, was_training in modes:
            m.train(was_training)
    problems = []
    if [name for name, _ in ref] != [name for name, _ in out]:
        problems.append("output structure differs from the original")
    detection = config.task == "detection"
    cosines = []
    for (name, a), (_, b) in zip(ref, out, strict=False):
        if not detection and a.shape != b.shape:
            problems.append(f"{name} has shape {tuple(b.shape)}, original {tuple(a.shape)}")
        if b.is_floating_point() and not torch.isfinite(b).all():
            problems.append(f"{name} has non-finite values")
        if not detection and a.shape == b.shape and a.is_floating_point() and a.numel():
            cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
            cosines.append(float(cos))
    leftover = []
    for lp in plan.with_action("gn", "frozen", "folded"):
        module = converted.get_submodule(lp.path)
        expected = {"gn": nn.GroupNorm, "frozen": FrozenBNAffine}.get(lp.action)
        if norm_kind(module) is not None or (expected is not None and not isinstance(module, expected)):
            leftover.append(lp.path)
    if leftover:
        problems.append(f"{len(leftover)} selected layer(s) are still batch norms ({', '.join(leftover[:3])})")
    if problems:
        raise VerificationError("converted model failed its probe check: " + "; ".join(problems))
    return {
        "input_size": list(config.input_size),
        "outputs": [{"name": n, "shape": list(t.shape)} for n, t in out],
        # Detection outputs hold as many boxes as the weights find: compare their structure only.
        "compared": "structure" if detection else "shapes",
        "finite": True,
        "output_cosine": min(cosines) if cosines else None,
    }
