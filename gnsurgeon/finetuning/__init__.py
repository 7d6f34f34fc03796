"""The ``finetune`` command as a library: a short, resumable fine-tune of a checkpoint.

After conversion a model must be fine-tuned briefly, usually at the small batch sizes that made the
user leave BN in the first place; GN trains the same at batch 2 as at 32. :func:`finetune` runs that
loop, for every kind of model convert accepts (classification, segmentation, detection, video: one
:class:`~.tasks.Task` each, chosen from the model), with the known-good recipe (detectron2 / the
GN paper): weight decay 0 on normalization parameters and biases, linear learning-rate scaling with
the batch, warmup then cosine decay, and optionally knowledge distillation from the BN original.
BN* layers have no parameters and stay frozen; layers the plan kept as BatchNorm train as BN normally.

Reproducibility is by construction rather than by hoping the data loader replays:

* the sample order of every epoch is :class:`~torch.utils.data.DistributedSampler`'s (seed, epoch),
  so a resumed run skips exactly the micro-batches already consumed;
* every sample is augmented under its own RNG seed derived from (seed, epoch, index), so the images
  do not depend on which worker loads them, on ``--workers``, or on where a run was resumed;
* the global RNG (dropout, drop-path) is saved and restored per rank with the training state.

A resumed run therefore ends with the same weights, bit for bit on CPU, as an uninterrupted one.
The same entry point runs under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU):
rank 0 writes files and shows progress.

The modules, in the order a run uses them: ``options`` (what the user asked), ``processes``
(torchrun and the device), ``sampling`` (folders, seeded samples, epoch order), ``models`` (student,
teacher, DDP, and the task they train as: ``tasks``, ``detection``), ``settings`` (everything
resolved, one frozen record), ``optimization`` (decay
groups, schedule, step), ``evaluation``, ``monitoring`` (metrics file, progress), ``state`` (the
resumable training state), ``trainer`` (the run), ``report`` (what it did).

Stage: a stage after conversion; it reads and writes gnsurgeon checkpoints. It imports
:mod:`gnsurgeon.checkpoint`, :mod:`gnsurgeon.conversion` (to open a teacher), :mod:`gnsurgeon.data`
and the leaf utilities; only the CLI, the pipeline and the package root import it (report.py for a
type annotation only).
"""

from .evaluation import evaluate
from .optimization import WarmupCosine, param_groups
from .options import FinetuneOptions, NonFiniteLossError
from .report import FinetuneReport
from .sampling import EpochSampler, SeededSamples
from .settings import ParamCounts, RunSettings, resolve_settings
from .state import TrainingState, read_state
from .trainer import finetune

__all__ = [
    "EpochSampler",
    "FinetuneOptions",
    "FinetuneReport",
    "NonFiniteLossError",
    "ParamCounts",
    "RunSettings",
    "SeededSamples",
    "TrainingState",
    "WarmupCosine",
    "evaluate",
    "finetune",
    "param_groups",
    "read_state",
    "resolve_settings",
]
