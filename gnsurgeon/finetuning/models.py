"""The networks of a fine-tuning run: the student loaded from the checkpoint, the frozen teacher it
may distil from, and the wrapper the student trains through (DDP, torch.compile).

The task a run trains as (classification, video, segmentation, detection: :mod:`.tasks`) is
chosen here from the student's structure; the task then checks that both networks output what it
trains on, alike, before any training. The teacher is opened with convert's SOURCE syntax, or as
``source``: the BN model the checkpoint records it was converted from.

Stage: finetune's models. It imports :mod:`gnsurgeon.checkpoint`, :mod:`gnsurgeon.conversion` (to
open a teacher), :mod:`gnsurgeon.errors`, :mod:`gnsurgeon.probe`, :mod:`gnsurgeon.provenance` (the
recorded teacher weights) and the finetune modules ``options``, ``processes``, ``tasks`` and
``detection``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import CheckpointInfo, is_checkpoint, load
from ..errors import GNSurgeonError
from ..probe import model_device
from ..provenance import recorded_weights
from ..sources import SourceOptions, open_source
from .detection import DetectionTask, is_detector
from .options import FinetuneOptions
from .processes import Processes
from .tasks import ClassificationTask, SegmentationTask, Task, VideoTask, dense_logits, probe

__all__ = ["Models", "all_finite", "choose_task", "converted_from", "open_teacher", "to_channels_last"]


def converted_from(info: CheckpointInfo, need_weights: bool = True) -> tuple[str, str | None, bool]:
    """``teacher: source``: the BN model a checkpoint was converted from, per its own history, and
    its weights file, found relative to the checkpoint and checked to be a weights file before it is
    opened (:func:`~gnsurgeon.provenance.recorded_weights`)."""
    entry = next((h for h in info.history if h.get("stage") == "convert"), None)
    if entry is None or not entry.get("source"):
        raise GNSurgeonError(
            f"--teacher source: checkpoint {info.path} records no conversion to take the BN original from; "
            "name the teacher (timm:NAME --teacher-weights FILE)"
        )
    if not need_weights:  # --teacher-weights given: the recorded weights are not read
        return entry["source"], None, False
    if not entry.get("weights") and not entry.get("pretrained"):
        raise GNSurgeonError(
            f"--teacher source: checkpoint {info.path} was converted from randomly initialised "
            f"{entry['source']}, which teaches nothing; pass --teacher-weights FILE"
        )
    weights = str(recorded_weights(entry, info.path, "--teacher source")) if entry.get("weights") else None
    return entry["source"], weights, bool(entry.get("pretrained"))


def open_teacher(options: FinetuneOptions, info: CheckpointInfo) -> tuple[nn.Module, str]:
    """The BN original as a frozen, eval-mode network, and a description of where it came from.

    ``options.teacher`` is convert's SOURCE syntax (``timm:NAME`` + weights, or a checkpoint), or
    ``source``: the model the student checkpoint was converted from.
    """
    kwargs = dict(info.source.kwargs) if info.source else {}
    source, weights = options.teacher, options.teacher_weights
    if source == "source":
        source, recorded, pretrained = converted_from(info, need_weights=not weights)
        weights = weights or recorded
        source_options = SourceOptions(weights=weights, pretrained=pretrained and not weights, model_kwargs=kwargs)
    elif is_checkpoint(source):
        source_options = SourceOptions(weights=weights)
    elif not weights:
        raise GNSurgeonError(
            f"--teacher {source} needs --teacher-weights FILE (a randomly initialised teacher teaches nothing), "
            "or pass a gnsurgeon checkpoint (or 'source') as the teacher"
        )
    else:
        source_options = SourceOptions(weights=weights, num_classes=kwargs.get("num_classes"))
    try:
        teacher = open_source(source, source_options).model
    except GNSurgeonError as exc:
        raise GNSurgeonError(f"--teacher {options.teacher}: {exc}") from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), source + (f" + {weights}" if weights else "")


def choose_task(student: nn.Module, info: CheckpointInfo, options: FinetuneOptions) -> Task:
    """The task a model trains as, from its structure and its data config: a torchvision detector
    (:func:`~.detection.is_detector`), a clip model (a (C, T, H, W) input), a segmenter (the data
    config says so, or the model's output is dense logits (N, K, H, W) / ``{"out": ...}``), else a
    classifier."""
    config = info.data_config
    if is_detector(student):
        return DetectionTask(config, options)
    if len(config.input_size) == 4:
        return VideoTask(config, options)
    if config.task == "segmentation":
        return SegmentationTask(config, options)
    out = probe(student, torch.zeros(1, *config.input_size, device=model_device(student)), f"checkpoint {info.path}")
    if dense_logits(out)[0] is not None:
        return SegmentationTask(config, options)
    return ClassificationTask(config, options)


@torch.no_grad()
def all_finite(model: nn.Module) -> bool:
    """One device sync for the whole model (max |w| per tensor: no overflow from summing)."""
    peaks = [p.abs().amax() for p in model.parameters() if p.numel()]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


class Models:
    """The student, the task it trains as, its teacher (or None) and ``train_model``: what the
    training forward calls (the task's network, :meth:`~.tasks.Task.network`, or its DDP / compiled
    wrapper; all share the student's parameters)."""

    def __init__(
        self, student: nn.Module, task: Task, teacher: nn.Module | None = None, teacher_from: str | None = None
    ) -> None:
        self.student = student
        self.task = task
        self.teacher = teacher
        self.teacher_from = teacher_from  # where the teacher came from, for the settings
        self.train_model: nn.Module = student

    @classmethod
    def open(
        cls,
        checkpoint: Path,
        info: CheckpointInfo,
        options: FinetuneOptions,
        base: nn.Module | None,
        device: torch.device,
    ) -> Models:
        """The student in train mode, the task it trains as (:func:`choose_task`) and the teacher (if
        any) frozen in eval mode; checking that they fit the task is the task's
        (:meth:`~.tasks.Task.check`)."""
        student = load(checkpoint, model=base, device=device).train()
        task = choose_task(student, info, options)
        if not options.teacher:
            return cls(student, task)
        teacher, teacher_from = open_teacher(options, info)
        return cls(student, task, teacher.to(device), teacher_from)

    def to_channels_last(self) -> None:
        """Both networks' 4-d weights in channels_last, 5-d ones (Conv3d: video) in channels_last_3d,
        in place: the parameters stay the same objects. (``Module.to(memory_format=channels_last)``
        raises on a Conv3d weight, so video models could not take the default CUDA path.)"""
        for model in (self.student, self.teacher):
            if model is not None:
                to_channels_last(model)

    def wrap(self, proc: Processes, compile: bool) -> None:
        """Train through the task's network (:meth:`~.tasks.Task.network`: the student, or the
        detector's feature-matching forward), in DistributedDataParallel with several processes,
        compiled if asked."""
        model = self.task.network(self.student)
        if proc.world > 1:
            has_bn = any(isinstance(m, _BatchNorm) for m in self.student.modules())
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                forward_sync_buffers=has_bn,  # only kept BatchNorm layers have statistics to keep in sync
                find_unused_parameters=self.task.find_unused_parameters,
            )
        self.train_model = torch.compile(model) if compile else model

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's gradient-sync skip, for all but the last micro-batch of an accumulated step."""
        ddp = getattr(self.train_model, "_orig_mod", self.train_model)  # torch.compile wrapper
        return ddp.no_sync()


@torch.no_grad()
def to_channels_last(model: nn.Module) -> None:
    """Every 4-d parameter and buffer of ``model`` in channels_last, every 5-d one in channels_last_3d."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.dim() in formats:
            tensor.data = tensor.data.contiguous(memory_format=formats[tensor.dim()])
