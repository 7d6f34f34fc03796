"""The resolved settings of one fine-tuning run: what the options come to on this data, these
processes and this device, as one frozen record.

Options leave things open (``lr=None`` scales with the batch, ``amp=None`` means "on for CUDA",
``epochs`` instead of ``steps``); a run needs numbers. :func:`resolve_settings` decides them once,
from plain values and without a model, so that the rules can be tested on their own and everything
downstream (the trainer, the report, the CLI table, the checkpoint history, the resume check) reads
one decision instead of re-deriving it. In JSON the record is the flat dict it has always been
(:meth:`RunSettings.to_dict`), so reports, histories and training states keep their format.

Stage: finetune's planning step (pure: no model, no files). It imports torch (device and dtype
names only), :mod:`gnsurgeon.errors` and :mod:`gnsurgeon.finetuning.options`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..errors import GNSurgeonError
from .options import FinetuneOptions

__all__ = ["SCHEDULE", "ParamCounts", "RunSettings", "resolve_settings"]

SCHEDULE = "linear warmup + cosine to 0"


@dataclass(frozen=True)
class ParamCounts:
    """How many parameter tensors get weight decay (weights) and how many not (norm γ/β, biases)."""

    decay: int
    no_decay: int


@dataclass(frozen=True)
class RunSettings:
    """Every number the run trains with, resolved. The field order is the JSON order of the report,
    the checkpoint history entry and the training state's trajectory.

    ``kd_temperature``/``kd_weight`` are None without a teacher (they play no part); ``momentum`` is
    None for AdamW; ``amp`` is the autocast dtype's name ("bfloat16", "float16") or None. ``task``
    is what the model trains as (:mod:`.tasks`); ``train_heads`` is None except for detection.
    """

    train_images: int
    labeled: bool
    classes: int
    total_steps: int
    batch_size: int
    grad_accum: int
    world_size: int
    effective_batch: int
    optimizer: str
    calibrated_start: bool
    lr: float
    momentum: float | None
    weight_decay: float
    norm_weight_decay: float
    warmup_steps: int
    schedule: str
    clip_grad: float | None
    label_smoothing: float
    teacher: str | None
    teacher_weights: str | None
    teacher_from: str | None
    kd_temperature: float | None
    kd_weight: float | None
    train_heads: bool | None
    hflip: float
    min_crop_scale: float
    seed: int
    task: str
    amp: str | None
    device: str
    channels_last: bool
    compile: bool
    params: ParamCounts

    # These change how fast the weights are computed, not what they are: a run may resume on
    # another device, with channels_last or compile switched, and still be the same run. (The task
    # follows from the checkpoint, which a resumed run reads again; ``calibrated_start`` only says
    # why the lr is what it is, and the lr itself is compared, so a state saved before the field
    # existed still resumes.)
    NOT_TRAJECTORY: ClassVar[tuple[str, ...]] = (
        "device",
        "channels_last",
        "compile",
        "params",
        "task",
        "calibrated_start",
    )

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on one process's shard (the sampler pads shards to equal size)."""
        return _batches_per_epoch(self.train_images, self.world_size, self.batch_size)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.amp) if self.amp else None

    def to_dict(self) -> dict:
        return asdict(self)

    def trajectory(self) -> dict:
        """The settings that decide the weights; resuming requires them unchanged."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_TRAJECTORY}

    def changes_from(self, saved: dict) -> list[str]:
        """How this run differs from the trajectory a training state was saved with, one
        ``"key=saved, now value"`` per differing setting (empty: resuming continues the same run)."""
        now = self.trajectory()
        return [f"{k}={saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]


def resolve_settings(
    options: FinetuneOptions,
    *,
    task: str = "classification",
    train_heads: bool | None = None,
    train_images: int,
    classes: int,
    labeled: bool,
    world_size: int,
    device: torch.device,
    cuda_bf16: bool,
    teacher_from: str | None,
    params: ParamCounts,
    calibrated_start: bool = False,
) -> RunSettings:
    """The run's settings from validated ``options`` and what setup found: the task (and its
    ``train_heads`` setting, detection only), the training folder's size, classes and labels
    (whether the task uses them), the number of processes, this process's device (``cuda_bf16``: whether that
    CUDA device computes in bfloat16), the teacher's description, the parameter groups' sizes and
    whether the checkpoint was calibrated (``calibrated_start``: a lower default lr).

    The rules: the run is ``steps`` optimizer steps, else ``epochs`` (default 1) passes over this
    process's shard; warmup is 5% of the run unless given, never longer than it; lr and weight decay
    are :meth:`FinetuneOptions.resolved_lr` of the effective batch (batch x accumulation x processes)
    and the start, and :meth:`FinetuneOptions.resolved_weight_decay`; AMP and channels_last are on for CUDA and off
    for CPU unless given. Too few images for one batch per process is a :class:`GNSurgeonError`.
    """
    o = options
    per_epoch = _batches_per_epoch(train_images, world_size, o.batch_size)
    if per_epoch == 0:
        raise GNSurgeonError(
            f"data folder {o.data} has {train_images} images: fewer than --batch-size {o.batch_size}"
            + (f" x {world_size} processes" if world_size > 1 else "")
        )
    epochs = o.epochs or 1.0
    total = o.steps if o.steps is not None else max(1, math.ceil(epochs * per_epoch / o.grad_accum))
    warmup = o.warmup_steps if o.warmup_steps is not None else round(0.05 * total)
    effective = o.batch_size * o.grad_accum * world_size
    return RunSettings(
        train_images=train_images,
        labeled=labeled,
        classes=classes,
        total_steps=total,
        batch_size=o.batch_size,
        grad_accum=o.grad_accum,
        world_size=world_size,
        effective_batch=effective,
        optimizer=o.optimizer,
        calibrated_start=calibrated_start,
        lr=o.resolved_lr(effective, calibrated_start),
        momentum=o.momentum if o.optimizer == "sgd" else None,
        weight_decay=o.resolved_weight_decay(),
        norm_weight_decay=o.norm_weight_decay,
        warmup_steps=min(warmup, total),
        schedule=SCHEDULE,
        clip_grad=o.clip_grad,
        label_smoothing=o.label_smoothing,
        teacher=o.teacher,
        teacher_weights=o.teacher_weights,
        teacher_from=teacher_from,
        kd_temperature=o.kd_temperature if o.teacher else None,
        kd_weight=o.kd_weight if o.teacher else None,
        train_heads=train_heads,
        hflip=o.hflip,
        min_crop_scale=o.min_crop_scale,
        seed=o.seed,
        task=task,
        amp=_amp_name(o.amp, device, cuda_bf16),
        device=str(device),
        channels_last=o.channels_last if o.channels_last is not None else device.type == "cuda",
        compile=o.compile,
        params=params,
    )


def _batches_per_epoch(train_images: int, world_size: int, batch_size: int) -> int:
    """DistributedSampler gives each process ceil(N / processes) samples; partial batches are dropped."""
    return math.ceil(train_images / world_size) // batch_size


def _amp_name(amp: bool | None, device: torch.device, cuda_bf16: bool) -> str | None:
    """bf16 where supported (no loss scaling needed), else fp16 with a GradScaler; CPU only if asked."""
    enabled = amp if amp is not None else device.type == "cuda"
    if not enabled:
        return None
    if device.type == "cuda" and not cuda_bf16:
        return "float16"
    return "bfloat16"
