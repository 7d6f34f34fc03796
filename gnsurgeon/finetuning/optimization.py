"""The optimisation recipe: what decays, the learning-rate schedule, and one optimizer step.

The known-good recipe for GN (the GN paper, detectron2): weight decay 0 on normalization parameters
and biases, linear warmup then cosine decay to 0, SGD with Nesterov momentum (or AdamW). Layers
kept as BatchNorm train as BN; BN* layers have no parameters and stay frozen, as does anything with
``requires_grad=False``.

Stage: finetune's optimisation. It imports torch and :mod:`gnsurgeon.finetuning.settings`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .settings import ParamCounts, RunSettings

__all__ = ["NORM_TYPES", "Optimization", "WarmupCosine", "count_params", "make_optimizer", "param_groups"]

NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """Two groups: weights with ``weight_decay``; normalization γ/β and every bias with
    ``norm_weight_decay`` (0 by default: the GN paper's and detectron2's setting). Parameters
    with ``requires_grad=False`` are left out, so frozen parts stay frozen."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in norm_params or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": norm_weight_decay},
    ]


def count_params(groups: list[dict]) -> ParamCounts:
    """The sizes of :func:`param_groups`' two groups, for the settings and the report."""
    return ParamCounts(decay=len(groups[0]["params"]), no_decay=len(groups[1]["params"]))


class WarmupCosine:
    """lr factor for optimizer step ``s``: linear warmup to 1 over ``warmup`` steps, cosine to 0 at
    ``total``. A class (not a lambda) so LambdaLR's state_dict can carry it."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(groups: list[dict], settings: RunSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.momentum > 0)


class Optimization:
    """Optimizer, schedule and loss scaler of one run, stepped together.

    The scaler is active only for float16 autocast (bfloat16 needs no loss scaling). ``step_lr`` is
    the learning rate the last step used, for the log (the scheduler has moved on by then).
    """

    def __init__(self, groups: list[dict], settings: RunSettings, model: nn.Module, device: torch.device) -> None:
        self.model = model  # gradients are clipped over all its parameters
        self.clip_grad = settings.clip_grad
        self.optimizer = make_optimizer(groups, settings)
        schedule = WarmupCosine(settings.warmup_steps, settings.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "float16")
        self.step_lr: float | None = None

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Clip (unless off: 0 or None), step, advance the schedule, clear the gradients."""
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dicts(self) -> dict:
        """``optimizer``, ``scheduler`` and ``scaler`` states, as the training state stores them."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
        }

    def load_state_dicts(self, optimizer: dict, scheduler: dict, scaler: dict) -> None:
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        if scaler:
            self.scaler.load_state_dict(scaler)
