"""The evaluation before and after fine-tuning on the ``--val`` folder, as the task measures it:
top-1 and agreement with the teacher for classifiers and clip models, per-pixel agreement for
segmentation, feature cosine and box agreement for detection (:meth:`~.tasks.Task.eval_counts`).

Each process evaluates its own shard (every ``world``-th image) and the counts are summed, so each
image is counted once however many processes run. The model is evaluated in eval mode and handed
back in the modes it came in.

Stage: finetune's evaluation. It imports :mod:`gnsurgeon.data`, :mod:`gnsurgeon.hooks` and the
finetune modules ``models``, ``monitoring``, ``processes``, ``sampling``, ``settings`` and ``tasks``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import BrokenImages
from ..hooks import eval_mode
from .models import Models
from .monitoring import MetricsLog
from .processes import Processes, autocast, to_device
from .sampling import make_loader
from .settings import RunSettings
from .tasks import Task

__all__ = ["Validation", "evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    proc: Processes,
    task: Task,
    *,
    teacher: nn.Module | None = None,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """The task's measures (:meth:`~.tasks.Task.summarize`) over this process's shard, summed over
    all processes (each image is counted once)."""
    counts = [0.0] * len(task.counters)
    broken = BrokenImages()
    with eval_mode(model):
        for images, labels, bad in loader:
            broken.add(bad)
            if images is None:
                continue
            images = to_device(images, proc.device, channels_last)
            labels = labels.to(proc.device)
            with autocast(proc.device, amp):
                batch = task.eval_counts(model, teacher, images, labels)
            counts = [a + float(b) for a, b in zip(counts, batch, strict=True)]
    result = task.summarize(dict(zip(task.counters, proc.sum(counts), strict=True)), teacher is not None)
    if broken.count:
        result["broken_images"] = broken.count
    return result


class Validation:
    """The run's evaluations: the ``--val`` folder sharded over processes, one metrics record each."""

    def __init__(
        self, data: Dataset | None, proc: Processes, batch_size: int, workers: int, settings: RunSettings, task: Task
    ) -> None:
        self.data = data
        self.proc = proc
        self.batch_size = batch_size
        self.workers = min(workers, 2)
        self.amp = settings.amp_dtype
        self.channels_last = settings.channels_last
        self.task = task

    def run(
        self, models: Models, log: MetricsLog, when: str, step: int, with_teacher_top1: bool = False
    ) -> tuple[dict | None, dict | None]:
        """``(result, teacher)``: the student's evaluation (None without ``--val``) and, when asked
        and there is a teacher with labels to score, the teacher's own top-1 (it does not change, so
        once is enough)."""
        if self.data is None:
            return None, None
        proc = self.proc
        shard = list(range(proc.rank, len(self.data), proc.world))
        loader = make_loader(self.data, self.batch_size, self.workers, proc.device, shard, False, 0)
        result = evaluate(
            models.student,
            loader,
            proc,
            self.task,
            teacher=models.teacher,
            amp=self.amp,
            channels_last=self.channels_last,
        )
        teacher_eval = None
        if "teacher_top1" in result:
            teacher_eval = {"top1": result.pop("teacher_top1")}
            if not with_teacher_top1:
                teacher_eval = None
        log.write({"event": "eval", "when": when, "step": step, **result})
        return result, teacher_eval
