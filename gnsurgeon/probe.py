"""Probe inputs and output handling shared by the checks of every stage.

A probe input is deterministic and shaped for the model's task, so a check (:mod:`gnsurgeon.checks`),
fold planning and ONNX verification see the same tensors on every run; :func:`flatten_outputs`
turns any model output (tensor, dict, list, tuple: classifiers, segmenters, detectors) into named
tensors that can be compared pairwise.

Stage: a leaf utility. It imports: sources (for the data config); every stage may import it.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import DataConfig


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
    """A probe input (a tensor, or a detector's list of images) on ``device``."""
    return [t.to(device) for t in x] if isinstance(x, list) else x.to(device)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter or buffer lives (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
