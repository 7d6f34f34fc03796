"""What the user asks of ``gnsurgeon finetune``: every option, checked before any slow work.

:class:`FinetuneOptions` is the input as given (flags, recipe, Python); what the run makes of it
(learning rate scaled to the batch, steps from epochs, AMP on CUDA) is
:class:`~gnsurgeon.finetuning.settings.RunSettings`. Keeping the two apart lets a recipe say
``lr: null`` ("scale it for me") and the report say which number was used.

Stage: finetune's input. It imports only :mod:`gnsurgeon.errors`, :mod:`gnsurgeon.options` and
:mod:`gnsurgeon.recipes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import GNSurgeonError, VerificationError
from ..options import NOT_IN_RECIPES
from ..recipes import options_from_mapping

__all__ = [
    "BASE_LR",
    "CALIBRATED_LR_FACTOR",
    "DEFAULT_WEIGHT_DECAY",
    "OPTIMIZERS",
    "FinetuneOptions",
    "NonFiniteLossError",
]

OPTIMIZERS = ("sgd", "adamw")
# Base learning rates per 32 images (linear scaling, as in the GN paper: lr = base * N / 32).
BASE_LR = {"sgd": 0.02, "adamw": 4e-4}
# A calibrated checkpoint already agrees with its teacher on most images; the base rate is one for
# training GN out of a plain γ/β copy and throws that away. Measured on the regions benchmark
# (benchmarks/recovery.py, 300 steps at batch 8 from the calibrated checkpoints): SGD at 0.005
# lowered two of four calibrated models (83.25 -> 78.00, 74.25 -> 53.50 top-1), at 0.001 (this
# factor) it raised three and kept the fourth. A plain conversion keeps the base rate.
CALIBRATED_LR_FACTOR = 0.2
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.01}


class NonFiniteLossError(VerificationError):
    """The loss became NaN/inf: the run stopped and the last good training state was kept."""


# Gradient-norm clipping by default. GN on a handful of values per group (a MobileNet's last 1×1/2×2
# maps at small inputs) divides by a small standard deviation, so a batch can give a gradient 10-30×
# the usual norm (benchmarks/grad_norms.py: resnet18 mostly 0.6-4, mobilenetv3_small_100 up to 29),
# and one such step at the fine-tune's rate can wreck a calibrated start: unclipped, a digits
# MobileNetV3 fell from 95.28 to 10.11 top-1 in 300 steps. 5 clips those spikes and leaves ResNet's
# ordinary steps alone (1.0 clipped nearly every ResNet step and cost it up to 3.25 points).
# README "Benchmarks", fine-tune table.
CLIP_GRAD = 5.0


@dataclass
class FinetuneOptions:
    """Every option of ``gnsurgeon finetune``; a recipe's ``finetune`` section sets any field not marked
    ``NOT_IN_RECIPES`` (the folders, files and resume flag belong to the command line).

    ``lr=None`` scales :data:`BASE_LR` linearly with the effective batch (batch x grad_accum x
    processes) / 32, times :data:`CALIBRATED_LR_FACTOR` when the checkpoint was calibrated;
    ``weight_decay=None`` takes :data:`DEFAULT_WEIGHT_DECAY`; ``warmup_steps=None`` is 5% of the run.
    ``amp``/``channels_last`` ``None`` mean "on for CUDA, off for CPU". The training state is
    written every ``checkpoint_every`` steps (if set), every ``checkpoint_minutes`` of wall time,
    and at the end: time-based by default so that short runs of big models do not spend their time
    writing optimizer state. ``resume`` continues from that state when there is one (and starts
    from step 0, saying so, when the run never reached it).
    ``teacher="source"`` distils from the BN model the checkpoint was converted from (its history
    names the source and the weights file). ``train_heads`` (detectors only) also trains the heads
    that conversion did not change, which otherwise stay frozen.
    """

    data: str | None = field(default=None, metadata=NOT_IN_RECIPES)
    val: str | None = field(default=None, metadata=NOT_IN_RECIPES)
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 8
    lr: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    norm_weight_decay: float = 0.0
    warmup_steps: int | None = None
    grad_accum: int = 1
    clip_grad: float | None = CLIP_GRAD  # the gradient's L2 norm is clipped to this; 0 or None: off
    label_smoothing: float = 0.0
    teacher: str | None = None
    teacher_weights: str | None = field(default=None, metadata=NOT_IN_RECIPES)
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
    train_heads: bool = False
    hflip: float = 0.5
    min_crop_scale: float = 0.5
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    eval_batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 5.0
    state: str | None = field(default=None, metadata=NOT_IN_RECIPES)
    metrics: str | None = field(default=None, metadata=NOT_IN_RECIPES)
    resume: bool = field(default=False, metadata=NOT_IN_RECIPES)

    @classmethod
    def from_mapping(cls, values: dict, origin: str = "options") -> FinetuneOptions:
        return options_from_mapping(cls, values, "finetune", origin)

    def validate(self) -> None:
        """Check every option before any slow work; each problem is one sentence naming the option."""
        if self.data is None:
            raise GNSurgeonError("a training folder is required (--data DIR)")
        if self.steps is not None and self.epochs is not None:
            raise GNSurgeonError("give --steps or --epochs, not both")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise GNSurgeonError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.workers < 0:
            raise GNSurgeonError(f"--workers must be 0 or more, got {self.workers}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise GNSurgeonError(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        for name in ("epochs", "lr", "kd_temperature", "checkpoint_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise GNSurgeonError(f"--{name.replace('_', '-')} must be positive, got {value!r}")
        for name in ("weight_decay", "norm_weight_decay", "kd_weight", "momentum", "label_smoothing"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise GNSurgeonError(f"--{name.replace('_', '-')} must be 0 or more, got {value!r}")
        if self.clip_grad is not None and not self.clip_grad >= 0:
            raise GNSurgeonError(f"--clip-grad must be 0 (off) or more, got {self.clip_grad!r}")
        if self.optimizer not in OPTIMIZERS:
            raise GNSurgeonError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise GNSurgeonError(f"--hflip is a probability in [0, 1], got {self.hflip}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise GNSurgeonError(f"--min-crop-scale must be in (0, 1], got {self.min_crop_scale}")
        if self.teacher_weights and not self.teacher:
            raise GNSurgeonError("--teacher-weights needs --teacher SOURCE (the architecture to load them into)")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise GNSurgeonError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")

    def resolved_lr(self, effective_batch: int, calibrated: bool = False) -> float:
        """``lr`` as given, else :data:`BASE_LR` scaled linearly to ``effective_batch`` images per step,
        and by :data:`CALIBRATED_LR_FACTOR` for a ``calibrated`` start (it has less to learn)."""
        if self.lr is not None:
            return self.lr
        return BASE_LR[self.optimizer] * effective_batch / 32 * (CALIBRATED_LR_FACTOR if calibrated else 1.0)

    def resolved_weight_decay(self) -> float:
        """``weight_decay`` as given, else the optimizer's :data:`DEFAULT_WEIGHT_DECAY`."""
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]
