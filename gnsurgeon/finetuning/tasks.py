"""What differs between the tasks ``finetune`` trains, behind one seam: a :class:`Task` per kind.

The loop (:mod:`.trainer`) is the same for every model that ``convert`` accepts: seeded samples,
AMP, gradient accumulation, torchrun, exact resume, the NaN stop. What differs is small and lives
here, one class per kind, chosen once from the model's structure and its data config
(:func:`~gnsurgeon.finetuning.models.choose_task`):

* the data: image folders, or clip folders for video (:class:`~gnsurgeon.data.ClipFolderData`);
* the checks that student and teacher output the same kind of thing;
* the loss of one batch, ``(loss, ce, kd)``: classifiers and video models CE on the folder's
  labels plus KD from the teacher's logits; segmentation models per-pixel KL to the teacher's
  logits (no labels: class folders are not masks); detectors, in :mod:`.detection`, the teacher's
  backbone/FPN features (their box outputs are not a stable distillation target);
* the evaluation counts, summed over processes, and what they come to.

Stage: finetune's per-task logic. It imports torch, :mod:`gnsurgeon.data`, :mod:`gnsurgeon.errors`,
:mod:`gnsurgeon.hooks`, :mod:`gnsurgeon.metrics`, :mod:`gnsurgeon.models`, :mod:`gnsurgeon.outputs`
(what counts as logits) and :mod:`gnsurgeon.finetuning.options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import ClipFolderData, ImageFolderData, clip_transform, eval_transform, train_transform
from ..errors import GNSurgeonError
from ..hooks import eval_mode
from ..metrics import kl_divergence
from ..models import DataConfig
from ..outputs import AUX_WEIGHT, describe_output, main_logits, split_logits
from .options import FinetuneOptions

__all__ = [
    "SEGMENTATION_AUX_WEIGHT",
    "ClassificationTask",
    "LossParts",
    "SegmentationTask",
    "Task",
    "VideoTask",
    "dense_logits",
    "probe",
]

# torchvision's segmentation reference training: loss = out + 0.5 * aux (references/segmentation/train.py).
SEGMENTATION_AUX_WEIGHT = 0.5


@dataclass(frozen=True)
class LossParts:
    """One micro-batch's loss (with gradients) and its parts for the log (CE, KD), all scalars."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


@torch.no_grad()
def probe(model: nn.Module, x, what: str):
    """``model(x)`` in eval mode (modes restored); a failure is one sentence naming ``what``."""
    with eval_mode(model):
        try:
            return model(x)
        except Exception as exc:
            raise GNSurgeonError(f"{what} fails on a probe input: {exc}") from None


def dense_logits(output) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(out, aux)`` of a segmentation output (:func:`~gnsurgeon.outputs.split_logits`: torchvision's
    ``{"out", "aux"}`` or a bare tensor) when ``out`` is (N, K, H, W); ``(None, None)`` otherwise."""
    logits = split_logits(output)
    if logits is None or logits.main.dim() != 4:
        return None, None
    aux = next((a for a in logits.aux if a.dim() == 4), None)
    return logits.main, aux


class Task:
    """The per-kind part of a fine-tuning run. Subclasses set the class attributes and override
    the methods whose default (a classifier's) does not fit.

    ``uses_labels``: whether class sub-folders are labels (cross-entropy). ``needs_teacher``: the
    task trains by distillation alone, so a teacher is required. ``counters``: the names of the
    evaluation counts :meth:`eval_counts` returns, summed over processes before :meth:`summarize`.
    ``channels_last`` is set by the trainer once the settings are resolved.
    """

    kind: ClassVar[str] = "classification"
    uses_labels: ClassVar[bool] = True
    needs_teacher: ClassVar[bool] = False
    find_unused_parameters: ClassVar[bool] = False  # DDP: every trained parameter gets a gradient
    counters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DataConfig, options: FinetuneOptions) -> None:
        self.config = config
        self.options = options
        self.channels_last = False

    # ------------------------------------------------------------------ data
    def dataset(self, root: str, train: bool) -> Dataset:
        """The training (augmented) or evaluation dataset at ``root``: image folders by default."""
        o = self.options
        transform = (
            train_transform(self.config, hflip=o.hflip, scale=(o.min_crop_scale, 1.0))
            if train
            else eval_transform(self.config)
        )
        return ImageFolderData(root, transform)

    def probe_input(self, device: torch.device):
        return torch.zeros(1, *self.config.input_size, device=device)

    # ---------------------------------------------------------------- models
    def check(self, student: nn.Module, teacher: nn.Module | None, classes: int, device: torch.device) -> None:
        """Both networks output what this task trains on, alike; raise one sentence if not."""

    def prepare(self, student: nn.Module, plan, options: FinetuneOptions) -> list[str]:
        """Freeze what must not train (``requires_grad``), before the optimizer is built; returns notes."""
        return []

    def network(self, student: nn.Module) -> nn.Module:
        """What the training forward calls (and DDP / torch.compile wrap): the student itself."""
        return student

    def train_heads(self) -> bool | None:
        """The ``--train-heads`` setting where it means something (detection), else None."""
        return None

    def run_notes(self) -> list[str]:
        """What the run's report should say about how this task trained, once it has."""
        return []

    # -------------------------------------------------------------- training
    def loss(self, net: nn.Module, teacher: nn.Module | None, images, labels: torch.Tensor, labeled: bool) -> LossParts:
        raise NotImplementedError

    # ------------------------------------------------------------ evaluation
    def eval_counts(self, student: nn.Module, teacher: nn.Module | None, images, labels: torch.Tensor) -> list[float]:
        raise NotImplementedError

    def summarize(self, sums: dict[str, float], has_teacher: bool) -> dict:
        raise NotImplementedError


class ClassificationTask(Task):
    """(N, K) logits: CE on the labels (when the folder has classes) + Hinton KD from the teacher.
    Outputs are read by :func:`~gnsurgeon.outputs.split_logits`: auxiliary heads that a model returns
    in training mode (GoogLeNet, Inception3) get the same loss, weighted :data:`~gnsurgeon.outputs.AUX_WEIGHT`."""

    counters = ("images", "labelled", "correct", "agree", "teacher_correct")

    def __init__(self, config: DataConfig, options: FinetuneOptions) -> None:
        super().__init__(config, options)
        self.aux_heads = 0  # auxiliary heads the student's training forward returns (GoogLeNet: 2)

    def _logits(self, model: nn.Module, what: str, device: torch.device) -> int:
        out = probe(model, self.probe_input(device), what)
        logits = main_logits(out)
        if logits is None or logits.dim() != 2:
            raise GNSurgeonError(f"{what} outputs {describe_output(out)}, not classification logits (N, K)")
        return int(logits.shape[1])

    def check(self, student, teacher, classes, device) -> None:
        logits = self._logits(student, "the checkpoint's model", device)
        if classes > logits:
            raise GNSurgeonError(
                f"data folder {self.options.data} has {classes} classes but the model outputs {logits} logits"
            )
        if teacher is not None:
            theirs = self._logits(teacher, f"--teacher {self.options.teacher}", device)
            if theirs != logits:
                raise GNSurgeonError(f"--teacher {self.options.teacher} outputs {theirs} logits, the student {logits}")

    def loss(self, net, teacher, images, labels, labeled) -> LossParts:
        output = net(images)
        logits = split_logits(output)
        if logits is None:
            raise GNSurgeonError(
                f"the model outputs {describe_output(output)} in training mode, not classification logits "
                "(a tensor, or torchvision's GoogLeNet/Inception outputs)"
            )
        target = None
        if teacher is not None:
            with torch.no_grad():
                target = main_logits(teacher(images)).float()
        ce, kd = self._losses(logits.main.float(), labels, target, labeled)
        loss = ce + self.options.kd_weight * kd
        self.aux_heads = len(logits.aux)
        for aux in logits.aux:  # GoogLeNet/Inception in train mode: the same loss on each aux head, x 0.3
            aux_ce, aux_kd = self._losses(aux.float(), labels, target, labeled)
            loss = loss + AUX_WEIGHT * (aux_ce + self.options.kd_weight * aux_kd)
        return LossParts(loss, ce, kd)

    def _losses(self, logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None, labeled: bool):
        """``(ce, kd)`` of one head's logits: cross-entropy on the labels (0 without), KD from the
        teacher's logits (0 without a teacher)."""
        o, zero = self.options, torch.zeros((), device=logits.device)
        ce = F.cross_entropy(logits, labels, label_smoothing=o.label_smoothing) if labeled else zero
        kd = kl_divergence(logits, target, o.kd_temperature) if target is not None else zero
        return ce, kd

    def run_notes(self) -> list[str]:
        if not self.aux_heads:
            return []
        return [
            f"the model returns {self.aux_heads} auxiliary head(s) in training mode (GoogLeNet/Inception): "
            f"each was trained with the same loss, weighted {AUX_WEIGHT:g} (GoogLeNet's weighting)"
        ]

    def eval_counts(self, student, teacher, images, labels) -> list[float]:
        pred = main_logits(student(images)).argmax(1)
        has_label = labels >= 0
        counts = [len(labels), int(has_label.sum()), int((pred == labels)[has_label].sum()), 0, 0]
        if teacher is not None:
            tpred = main_logits(teacher(images)).argmax(1)
            counts[3] = int((pred == tpred).sum())
            counts[4] = int((tpred == labels)[has_label].sum())
        return counts

    def summarize(self, sums, has_teacher) -> dict:
        images, labelled = sums["images"], sums["labelled"]
        result = {"images": int(images), "top1": 100.0 * sums["correct"] / labelled if labelled else None}
        if has_teacher:
            result["teacher_agreement"] = 100.0 * sums["agree"] / images if images else None
            result["teacher_top1"] = 100.0 * sums["teacher_correct"] / labelled if labelled else None
        return result


class VideoTask(ClassificationTask):
    """Clip classifiers (N, 3, T, H, W) -> (N, K): a classifier's loss and evaluation, per clip,
    on clips read from a folder of videos or of frame folders."""

    kind = "video"

    def dataset(self, root: str, train: bool) -> Dataset:
        o = self.options
        transform = clip_transform(self.config, train, hflip=o.hflip, scale=(o.min_crop_scale, 1.0))
        return ClipFolderData(root, transform, frames=self.config.input_size[1], train=train)


class SegmentationTask(Task):
    """Dense (N, K, H, W) logits, torchvision's ``{"out", "aux"}``: per-pixel KL to the teacher's
    logits (the mean over pixels of :func:`~gnsurgeon.metrics.kl_divergence`, so the loss does not
    grow with the image), plus the aux head's at :data:`SEGMENTATION_AUX_WEIGHT` where both have one.
    No labels: an image folder's classes are not masks."""

    kind = "segmentation"
    uses_labels = False
    needs_teacher = True
    counters = ("images", "pixels", "agree", "kl")

    def _classes(self, model: nn.Module, what: str, device: torch.device) -> int:
        out, _ = dense_logits(probe(model, self.probe_input(device), what))
        if out is None:
            raise GNSurgeonError(f"{what} does not output dense logits (N, K, H, W) or {{'out': ...}}")
        return int(out.shape[1])

    def check(self, student, teacher, classes, device) -> None:
        mine = self._classes(student, "the checkpoint's model", device)
        theirs = self._classes(teacher, f"--teacher {self.options.teacher}", device)
        if mine != theirs:
            raise GNSurgeonError(
                f"--teacher {self.options.teacher} outputs {theirs} classes per pixel, the student {mine}"
            )

    def loss(self, net, teacher, images, labels, labeled) -> LossParts:
        o = self.options
        out, aux = dense_logits(net(images))
        with torch.no_grad():
            target, target_aux = dense_logits(teacher(images))
        kd = per_pixel_kl(out.float(), target.float(), o.kd_temperature)
        if aux is not None and target_aux is not None:
            kd = kd + SEGMENTATION_AUX_WEIGHT * per_pixel_kl(aux.float(), target_aux.float(), o.kd_temperature)
        return LossParts(o.kd_weight * kd, torch.zeros_like(kd), kd)

    def eval_counts(self, student, teacher, images, labels) -> list[float]:
        out, _ = dense_logits(student(images))
        target, _ = dense_logits(teacher(images))
        out, target = out.float(), target.float()
        pixels = out.shape[0] * out.shape[2] * out.shape[3]
        agree = int((out.argmax(1) == target.argmax(1)).sum())
        return [len(out), pixels, agree, per_pixel_kl(out, target).item() * pixels]

    def summarize(self, sums, has_teacher) -> dict:
        pixels = sums["pixels"]
        return {
            "images": int(sums["images"]),
            "teacher_agreement": 100.0 * sums["agree"] / pixels if pixels else None,
            "pixel_kl": sums["kl"] / pixels if pixels else None,
        }


def per_pixel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over images and pixels of KL(teacher || student) per pixel (x T²)."""
    return kl_divergence(student, teacher, temperature) / (student.shape[2] * student.shape[3])
