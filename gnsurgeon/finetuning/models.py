"""The networks of a fine-tuning run: the student loaded from the checkpoint, the frozen teacher it
may distil from, and the wrapper the student trains through (DDP, torch.compile).

Both networks are checked before any training: each must output classification logits (N, K) on
the checkpoint's input size, with as many logits as each other and at least as many as the data
has classes; the teacher is opened with convert's SOURCE syntax, or as ``source``: the BN model the
checkpoint records it was converted from.

Stage: finetune's models. It imports :mod:`gnsurgeon.checkpoint`, :mod:`gnsurgeon.conversion` (to
open a teacher), :mod:`gnsurgeon.errors`, :mod:`gnsurgeon.hooks`, :mod:`gnsurgeon.outputs` (what counts as logits),
:mod:`gnsurgeon.provenance` (the recorded teacher weights) and the finetune modules
``options``, ``processes`` and ``sampling``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import CheckpointInfo, is_checkpoint, load
from ..errors import GNSurgeonError
from ..hooks import eval_mode
from ..outputs import Logits, describe_output, main_logits, split_logits
from ..provenance import recorded_weights
from ..sources import SourceOptions, open_source
from .options import FinetuneOptions
from .processes import Processes, autocast
from .sampling import Folders

__all__ = ["Models", "all_finite", "converted_from", "num_logits", "open_teacher"]


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


@torch.no_grad()
def num_logits(model: nn.Module, input_size: tuple[int, ...], device: torch.device, what: str) -> int:
    """Run one zero image in eval mode; the output must hold classification logits (N, K)
    (:func:`~gnsurgeon.outputs.main_logits`: a tensor, torchvision's namedtuples, ``{"out": ...}``)."""
    with eval_mode(model):
        try:
            out = model(torch.zeros(1, *input_size, device=device))
        except Exception as exc:
            raise GNSurgeonError(f"{what} fails on a {tuple(input_size)} input: {exc}") from None
    logits = main_logits(out)
    if logits is None or logits.dim() != 2:
        raise GNSurgeonError(
            f"{what} outputs {describe_output(out)}, not classification logits (N, K); finetune trains classifiers"
        )
    return int(logits.shape[1])


@torch.no_grad()
def all_finite(model: nn.Module) -> bool:
    """One device sync for the whole model (max |w| per tensor: no overflow from summing)."""
    peaks = [p.abs().amax() for p in model.parameters() if p.numel()]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


class Models:
    """The student, its teacher (or None) and ``train_model``: what the training forward calls
    (the student itself, or its DDP / compiled wrapper; both share the student's parameters)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, teacher_from: str | None = None) -> None:
        self.student = student
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
        folders: Folders,
    ) -> Models:
        """The student in train mode, the teacher frozen; both must output the same logits."""
        input_size = info.data_config.input_size
        student = load(checkpoint, model=base, device=device).train()
        logits = num_logits(student, input_size, device, f"checkpoint {checkpoint}")
        classes = len(folders.train.classes)
        if folders.labeled and classes > logits:
            raise GNSurgeonError(
                f"data folder {options.data} has {classes} classes but the model outputs {logits} logits"
            )
        if not options.teacher:
            return cls(student)
        teacher, teacher_from = open_teacher(options, info)
        teacher = teacher.to(device)
        teacher_logits = num_logits(teacher, input_size, device, f"--teacher {options.teacher}")
        if teacher_logits != logits:
            raise GNSurgeonError(f"--teacher {options.teacher} outputs {teacher_logits} logits, the student {logits}")
        return cls(student, teacher, teacher_from)

    def to_channels_last(self) -> None:
        """Both networks in channels_last memory format, in place (the parameters stay the same objects)."""
        self.student.to(memory_format=torch.channels_last)
        if self.teacher is not None:
            self.teacher.to(memory_format=torch.channels_last)

    def wrap(self, proc: Processes, compile: bool) -> None:
        """Train through DistributedDataParallel with several processes, compiled if asked."""
        model = self.student
        if proc.world > 1:
            has_bn = any(isinstance(m, _BatchNorm) for m in self.student.modules())
            model = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                forward_sync_buffers=has_bn,  # only kept BatchNorm layers have statistics to keep in sync
            )
        self.train_model = torch.compile(model) if compile else model

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's gradient-sync skip, for all but the last micro-batch of an accumulated step."""
        ddp = getattr(self.train_model, "_orig_mod", self.train_model)  # torch.compile wrapper
        return ddp.no_sync()

    def forward(
        self, images: torch.Tensor, device: torch.device, amp: torch.dtype | None
    ) -> tuple[Logits, torch.Tensor | None]:
        """Student logits (with gradients; in train mode GoogLeNet/Inception add their auxiliary
        heads' logits) and the teacher's main logits (without, or None), all float32."""
        with autocast(device, amp):
            output = self.train_model(images)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = main_logits(self.teacher(images))
        logits = split_logits(output)
        if logits is None:
            raise GNSurgeonError(
                f"the model outputs {describe_output(output)} in training mode, not classification logits "
                "(a tensor, or torchvision's GoogLeNet/Inception outputs)"
            )
        student = Logits(logits.main.float(), tuple(a.float() for a in logits.aux))
        return student, (teacher_logits.float() if teacher_logits is not None else None)
