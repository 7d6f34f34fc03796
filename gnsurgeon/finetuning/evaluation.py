"""Top-1 before and after fine-tuning, and agreement with the teacher, on the ``--val`` folder.

Each process evaluates its own shard (every ``world``-th image) and the counts are summed, so each
image is counted once however many processes run. The model is evaluated in eval mode and handed
back in the modes it came in.

Stage: finetune's evaluation. It imports :mod:`gnsurgeon.data`, :mod:`gnsurgeon.hooks`,
:mod:`gnsurgeon.outputs` and the finetune modules ``models``, ``monitoring``, ``processes``,
``sampling`` and ``settings``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import BrokenImages, ImageFolderData
from ..hooks import eval_mode
from ..outputs import main_logits
from .models import Models
from .monitoring import MetricsLog
from .processes import Processes, autocast, to_device
from .sampling import make_loader
from .settings import RunSettings

__all__ = ["Validation", "evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    proc: Processes,
    *,
    teacher: nn.Module | None = None,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """Top-1 on the labels and top-1 agreement with the teacher, over this process's shard, summed
    over all processes (each image is counted once)."""
    counts = [0.0, 0.0, 0.0, 0.0, 0.0]  # images, labelled, correct, agree, teacher correct
    broken = BrokenImages()
    with eval_mode(model):
        for images, labels, bad in loader:
            broken.add(bad)
            if images is None:
                continue
            images = to_device(images, proc.device, channels_last)
            labels = labels.to(proc.device)
            with autocast(proc.device, amp):
                pred = main_logits(model(images)).argmax(1)
                tpred = main_logits(teacher(images)).argmax(1) if teacher is not None else None
            has_label = labels >= 0
            counts[0] += len(labels)
            counts[1] += int(has_label.sum())
            counts[2] += int((pred == labels)[has_label].sum())
            if tpred is not None:
                counts[3] += int((pred == tpred).sum())
                counts[4] += int((tpred == labels)[has_label].sum())
    images, labelled, correct, agree, tcorrect = proc.sum(counts)
    result = {"images": int(images), "top1": 100.0 * correct / labelled if labelled else None}
    if teacher is not None:
        result["teacher_agreement"] = 100.0 * agree / images if images else None
        result["teacher_top1"] = 100.0 * tcorrect / labelled if labelled else None
    if broken.count:
        result["broken_images"] = broken.count
    return result


class Validation:
    """The run's evaluations: the ``--val`` folder sharded over processes, one metrics record each."""

    def __init__(
        self, data: ImageFolderData | None, proc: Processes, batch_size: int, workers: int, settings: RunSettings
    ) -> None:
        self.data = data
        self.proc = proc
        self.batch_size = batch_size
        self.workers = min(workers, 2)
        self.amp = settings.amp_dtype
        self.channels_last = settings.channels_last

    def run(
        self, models: Models, log: MetricsLog, when: str, step: int, with_teacher_top1: bool = False
    ) -> tuple[dict | None, dict | None]:
        """``(result, teacher)``: the student's evaluation (None without ``--val``) and, when asked
        and there is a teacher, the teacher's own top-1 (it does not change, so once is enough)."""
        if self.data is None:
            return None, None
        proc = self.proc
        shard = list(range(proc.rank, len(self.data), proc.world))
        loader = make_loader(self.data, self.batch_size, self.workers, proc.device, shard, False, 0)
        result = evaluate(
            models.student, loader, proc, teacher=models.teacher, amp=self.amp, channels_last=self.channels_last
        )
        teacher_eval = None
        if models.teacher is not None:
            teacher_eval = {"top1": result.pop("teacher_top1")}
            if not with_teacher_top1:
                teacher_eval = None
        log.write({"event": "eval", "when": when, "step": step, **result})
        return result, teacher_eval
