"""The ``finetune`` command as a library function: a short, resumable fine-tune of a checkpoint.

After conversion a model must be fine-tuned briefly, usually at the small batch sizes that made the
user leave BN in the first place; GN trains the same at batch 2 as at 32. :func:`finetune` runs that
loop with the known-good recipe (detectron2 / the GN paper): weight decay 0 on normalization
parameters and biases, linear learning-rate scaling with the batch, warmup then cosine decay, and
optionally knowledge distillation from the BN original. BN* layers have no parameters and stay
frozen; layers the plan kept as BatchNorm train as BN normally.

Reproducibility is by construction rather than by hoping the data loader replays:

* the sample order of every epoch is :class:`~torch.utils.data.DistributedSampler`'s (seed, epoch),
  so a resumed run skips exactly the micro-batches already consumed;
* every sample is augmented under its own RNG seed derived from (seed, epoch, index), so the images
  do not depend on which worker loads them, on ``--workers``, or on where a run was resumed;
* the global RNG (dropout, drop-path) is saved and restored per rank with the training state.

A resumed run therefore ends with the same weights, bit for bit on CPU, as an uninterrupted one.
The same entry point runs under ``torchrun`` (DistributedDataParallel; gloo on CPU, NCCL on GPU):
rank 0 writes files and shows progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from . import __version__
from .checkpoint import history_entry, load, read_checkpoint, save
from .data import BrokenImages, ImageFolderData, collate_skip_broken, eval_transform, train_transform
from .devices import resolve_device
from .errors import GNSurgeonError, VerificationError
from .files import check_output, write_atomically
from .metrics import kl_divergence
from .recipes import options_from_mapping
from .report import progress_bar

STATE_FORMAT = 1
OPTIMIZERS = ("sgd", "adamw")
# Base learning rates per 32 images (linear scaling, as in the GN paper: lr = base * N / 32).
BASE_LR = {"sgd": 0.02, "adamw": 4e-4}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.01}
NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm)


class NonFiniteLossError(VerificationError):
    """The loss became NaN/inf: the run stopped and the last good training state was kept."""


@dataclass
class FinetuneOptions:
    """Every option of ``gnsurgeon finetune``; recipes set the fields in :attr:`RECIPE_KEYS`.

    ``lr=None`` scales :data:`BASE_LR` linearly with the effective batch (batch x grad_accum x
    processes) / 32; ``weight_decay=None`` takes :data:`DEFAULT_WEIGHT_DECAY`; ``warmup_steps=None``
    is 5% of the run. ``amp``/``channels_last`` ``None`` mean "on for CUDA, off for CPU". The
    training state is written every ``checkpoint_every`` steps (if set), every
    ``checkpoint_minutes`` of wall time, and at the end: time-based by default so that short runs
    of big models do not spend their time writing optimizer state. ``resume`` continues from that
    state when there is one (and starts from step 0, saying so, when the run never reached it).
    ``teacher="source"`` distils from the BN model the checkpoint was converted from (its history
    names the source and the weights file).
    """

    data: str | None = None
    val: str | None = None
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
    clip_grad: float | None = None
    label_smoothing: float = 0.0
    teacher: str | None = None
    teacher_weights: str | None = None
    kd_temperature: float = 1.0
    kd_weight: float = 1.0
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
    state: str | None = None
    metrics: str | None = None
    resume: bool = False

    RECIPE_KEYS = (
        "steps",
        "epochs",
        "batch_size",
        "lr",
        "optimizer",
        "momentum",
        "weight_decay",
        "norm_weight_decay",
        "warmup_steps",
        "grad_accum",
        "clip_grad",
        "label_smoothing",
        "kd_temperature",
        "kd_weight",
        "hflip",
        "min_crop_scale",
        "seed",
        "device",
        "workers",
        "amp",
        "channels_last",
        "compile",
        "eval_batch_size",
        "log_every",
        "checkpoint_every",
        "checkpoint_minutes",
        "teacher",
    )

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
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise GNSurgeonError(f"--clip-grad must be positive, got {self.clip_grad!r}")
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

    def resolved_lr(self, effective_batch: int) -> float:
        return self.lr if self.lr is not None else BASE_LR[self.optimizer] * effective_batch / 32

    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.optimizer]


@dataclass
class FinetuneReport:
    """What ``finetune`` did: the resolved settings, evaluations before/after, speed, files."""

    checkpoint: str
    output: str
    settings: dict
    before: dict | None = None
    after: dict | None = None
    teacher_eval: dict | None = None
    steps: int = 0
    resumed_from: int | None = None
    final_loss: float | None = None
    images_seen: int = 0
    train_seconds: float = 0.0
    broken_images: dict = field(default_factory=lambda: BrokenImages().to_dict())
    state_path: str | None = None
    metrics_path: str | None = None
    rank: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float | None:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else None

    def to_dict(self) -> dict:
        return {
            "command": "finetune",
            "gnsurgeon_version": __version__,
            "checkpoint": self.checkpoint,
            "output": self.output,
            "settings": self.settings,
            "steps": self.steps,
            "resumed_from": self.resumed_from,
            "before": self.before,
            "after": self.after,
            "teacher": self.teacher_eval,
            "final_loss": self.final_loss,
            "images_seen": self.images_seen,
            "train_seconds": round(self.train_seconds, 3),
            "images_per_s": round(self.images_per_s, 2) if self.images_per_s else None,
            "broken_images": self.broken_images,
            "state": self.state_path,
            "metrics": self.metrics_path,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------ processes
@dataclass
class _Dist:
    """This process's place in a torchrun job (rank 0 of 1 when launched plainly)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all processes (float64, so counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _setup_processes(device: str) -> _Dist:
    """Join the torchrun job when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU); else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank=local_rank)
    owns = False
    if not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), resolved, owns)


# ------------------------------------------------------------------------------------------ data
def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 12_345) % (2**63 - 1)


class SeededSamples(Dataset):
    """``dataset[(index, epoch)]`` augmented under a seed of its own, whoever loads it.

    A worker's RNG stream depends on which samples it happened to load before; seeding per sample
    makes an image a function of (seed, epoch, index) only, which is what exact resumption and a
    trajectory independent of ``--workers`` need. In the main process (``workers=0``) the global
    RNG states are restored afterwards so that dropout sees the same stream either way.
    """

    def __init__(self, data: Dataset, seed: int) -> None:
        self.data = data
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        seed = _sample_seed(self.seed, epoch, index)
        if torch.utils.data.get_worker_info() is not None:
            _seed_all(seed)
            return self.data[index]
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            _seed_all(seed)
            return self.data[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _seed_all(seed: int) -> None:
    """The CPU generators transforms draw from; not CUDA's (torch.manual_seed would reseed dropout)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class EpochSampler(Sampler):
    """DistributedSampler's order for one epoch, from position ``skip``, as ``(index, epoch)`` keys.

    Set :attr:`epoch` and :attr:`skip` before iterating (the loader iterates it in the main
    process, so persistent workers pick the change up).
    """

    def __init__(self, data: Dataset, rank: int, world: int, seed: int) -> None:
        self.inner = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return len(self.inner) - self.skip

    def __iter__(self):
        self.inner.set_epoch(self.epoch)
        for position, index in enumerate(self.inner):
            if position >= self.skip:
                yield index, self.epoch


def _loader(data: Dataset, batch_size: int, workers: int, device: torch.device, sampler, drop_last: bool, seed: int):
    """A DataLoader that never draws from the global RNG (its own generator seeds the workers)."""
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_skip_broken,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def _micro_batches(loader: DataLoader, sampler: EpochSampler, per_epoch: int, start: int):
    """An endless stream of micro-batches, starting at micro-batch ``start`` of the whole run."""
    micro = start
    while True:
        sampler.epoch, offset = divmod(micro, per_epoch)
        sampler.skip = offset * loader.batch_size
        for batch in loader:
            yield batch
            micro += 1


# -------------------------------------------------------------------------------- optimization
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


def _make_optimizer(params: list[dict], options: FinetuneOptions, lr: float) -> torch.optim.Optimizer:
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=options.momentum, nesterov=options.momentum > 0)


def _amp_dtype(options: FinetuneOptions, device: torch.device) -> torch.dtype | None:
    """bf16 where supported (no loss scaling needed), else fp16 with a GradScaler; CPU only if asked."""
    enabled = options.amp if options.amp is not None else device.type == "cuda"
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    proc: _Dist,
    *,
    teacher: nn.Module | None = None,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """Top-1 on the labels and top-1 agreement with the teacher, over this process's shard, summed
    over all processes (each image is counted once)."""
    was_training = model.training
    model.eval()
    counts = [0.0, 0.0, 0.0, 0.0, 0.0]  # images, labelled, correct, agree, teacher correct
    broken = BrokenImages()
    try:
        for images, labels, bad in loader:
            broken.add(bad)
            if images is None:
                continue
            images = _to_device(images, proc.device, channels_last)
            labels = labels.to(proc.device)
            with _autocast(proc.device, amp):
                pred = model(images).argmax(1)
                tpred = teacher(images).argmax(1) if teacher is not None else None
            has_label = labels >= 0
            counts[0] += len(labels)
            counts[1] += int(has_label.sum())
            counts[2] += int((pred == labels)[has_label].sum())
            if tpred is not None:
                counts[3] += int((pred == tpred).sum())
                counts[4] += int((tpred == labels)[has_label].sum())
    finally:
        model.train(was_training)
    images, labelled, correct, agree, tcorrect = proc.sum(counts)
    result = {"images": int(images), "top1": 100.0 * correct / labelled if labelled else None}
    if teacher is not None:
        result["teacher_agreement"] = 100.0 * agree / images if images else None
        result["teacher_top1"] = 100.0 * tcorrect / labelled if labelled else None
    if broken.count:
        result["broken_images"] = broken.count
    return result


def _to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


# -------------------------------------------------------------------------------- state on disk
def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def read_state(path: Path) -> dict:
    """A training state written by :func:`finetune`, read with ``weights_only=True``."""
    if not path.is_file():
        raise GNSurgeonError(f"--resume: no training state at {path} (run without --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors
        raise GNSurgeonError(f"cannot read training state {path}: corrupt or not a gnsurgeon state ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise GNSurgeonError(f"{path} is not a gnsurgeon training state (format {STATE_FORMAT})")
    return state


def _check_same_run(saved: dict, now: dict, path: Path) -> None:
    """Resuming only makes sense with the trajectory the state was written with."""
    diffs = [f"{k}={saved.get(k)!r}, now {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if diffs:
        raise GNSurgeonError(
            f"cannot --resume from {path}: it was written with " + "; ".join(diffs[:4]) + " (resume needs the same "
            "training options and data)"
        )


def _rewind_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (they belong to the interrupted tail)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    write_atomically(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))


class _Window:
    """Loss sums (on the device: no sync per step) and counts since the last log step."""

    def __init__(self, device: torch.device, first: int) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kd
        self.reset(time.perf_counter(), first)

    def add(self, parts: torch.Tensor, images: int) -> None:
        self.sums += parts
        self.micro += 1
        self.images += images

    def reset(self, tick: float, first: int) -> None:
        self.sums.zero_()
        self.micro, self.images, self.tick, self.first = 0, 0, tick, first


class _Metrics:
    """JSON lines, one record per log step (rank 0 only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------- the run
def _open_output(output: str | Path) -> Path:
    return check_output(output, ".safetensors")


def _converted_from(info) -> tuple[str, str | None, bool]:
    """``teacher: source``: the BN model a checkpoint was converted from, per its own history."""
    entry = next((h for h in info.history if h.get("stage") == "convert"), None)
    if entry is None or not entry.get("source"):
        raise GNSurgeonError(
            f"--teacher source: checkpoint {info.path} records no conversion to take the BN original from; "
            "name the teacher (timm:NAME --teacher-weights FILE)"
        )
    if not entry.get("weights") and not entry.get("pretrained"):
        raise GNSurgeonError(
            f"--teacher source: checkpoint {info.path} was converted from randomly initialised "
            f"{entry['source']}, which teaches nothing; pass --teacher-weights FILE"
        )
    return entry["source"], entry.get("weights"), bool(entry.get("pretrained"))


def _open_teacher(options: FinetuneOptions, info) -> tuple[nn.Module, str]:
    """The BN original as a frozen, eval-mode network, and a description of where it came from.

    ``options.teacher`` is convert's SOURCE syntax (``timm:NAME`` + weights, or a checkpoint), or
    ``source``: the model the student checkpoint was converted from.
    """
    from .checkpoint import is_checkpoint
    from .conversion import ConvertOptions, open_source

    kwargs = dict(info.source.kwargs) if info.source else {}
    source, weights = options.teacher, options.teacher_weights
    if source == "source":
        source, recorded, pretrained = _converted_from(info)
        weights = weights or recorded
        convert_options = ConvertOptions(weights=weights, pretrained=pretrained and not weights, model_kwargs=kwargs)
    elif is_checkpoint(source):
        convert_options = ConvertOptions(weights=weights)
    elif not weights:
        raise GNSurgeonError(
            f"--teacher {source} needs --teacher-weights FILE (a randomly initialised teacher teaches nothing), "
            "or pass a gnsurgeon checkpoint (or 'source') as the teacher"
        )
    else:
        convert_options = ConvertOptions(weights=weights, num_classes=kwargs.get("num_classes"))
    try:
        teacher = open_source(source, convert_options).model
    except GNSurgeonError as exc:
        raise GNSurgeonError(f"--teacher {options.teacher}: {exc}") from None
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), source + (f" + {weights}" if weights else "")


@torch.no_grad()
def _num_logits(model: nn.Module, input_size: tuple[int, ...], device: torch.device, what: str) -> int:
    """Run one zero image in eval mode; the output must be classification logits (N, K)."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, *input_size, device=device))
    except Exception as exc:
        raise GNSurgeonError(f"{what} fails on a {tuple(input_size)} input: {exc}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise GNSurgeonError(f"{what} does not output classification logits (N, K); finetune trains classifiers")
    return int(out.shape[1])


@torch.no_grad()
def _all_finite(model: nn.Module) -> bool:
    """One device sync for the whole model (max |w| per tensor: no overflow from summing)."""
    peaks = [p.abs().amax() for p in model.parameters() if p.numel()]
    return bool(torch.isfinite(torch.stack(peaks)).all()) if peaks else True


def finetune(
    checkpoint: str | Path,
    output: str | Path,
    options: FinetuneOptions | None = None,
    *,
    model: nn.Module | None = None,
    progress=None,
    callback=None,
) -> FinetuneReport:
    """Fine-tune the model in ``checkpoint`` on ``options.data`` and save it to ``output``.

    ``model`` is the unconverted architecture for checkpoints saved with ``source=None``.
    ``progress`` is a rich Console to draw a progress bar on (rank 0 only). ``callback(record)`` is
    called with every metrics record (a dict), on every rank. Raises :class:`GNSurgeonError` for
    bad input and :class:`NonFiniteLossError` when the loss stops being finite.
    """
    options = options or FinetuneOptions()
    options.validate()
    output = _open_output(output)
    info = read_checkpoint(checkpoint)
    if info.data_config.task != "classification":
        raise GNSurgeonError(f"checkpoint {checkpoint} is a {info.data_config.task} model; finetune trains classifiers")
    proc = _setup_processes(options.device)
    try:
        return _Run(checkpoint, output, options, info, proc, model, progress, callback).run()
    finally:
        if proc.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class _Run:
    """One fine-tuning run: setup, optional resume, evaluate, train, evaluate, save."""

    def __init__(
        self, checkpoint, output: Path, options: FinetuneOptions, info, proc: _Dist, model, progress, callback
    ):
        self.checkpoint, self.output, self.options, self.info, self.proc = Path(checkpoint), output, options, info, proc
        self.progress, self.callback = (progress if proc.main else None), callback
        self.state_path = Path(options.state) if options.state else output.with_suffix(".state.pt")
        metrics = Path(options.metrics) if options.metrics else output.with_suffix(".metrics.jsonl")
        self.metrics_path = metrics
        self.metrics = _Metrics(metrics if proc.main else None)
        self.broken: dict[str, None] = {}  # this rank's unreadable paths, in order met (an ordered set)
        self.bar_task = None
        self._build(model)

    # --------------------------------------------------------------------------------- setup
    def _build(self, base: nn.Module | None) -> None:
        self._build_data()
        self._build_models(base)
        self._build_schedule()
        self._build_optimizer()

    def _build_data(self) -> None:
        """Training and validation folders, with the checkpoint's transforms; labels must agree."""
        o, config = self.options, self.info.data_config
        if o.val is not None and not Path(o.val).is_dir():
            raise GNSurgeonError(f"--val folder {o.val} does not exist")
        augment = train_transform(config, hflip=o.hflip, scale=(o.min_crop_scale, 1.0))
        self.train_data = ImageFolderData(o.data, augment)
        self.labeled = self.train_data.labeled
        if not self.labeled and not o.teacher:
            raise GNSurgeonError(
                f"data folder {o.data} has no class sub-folders (no labels): give --teacher to distill"
            )
        self.val_data = ImageFolderData(o.val, eval_transform(config)) if o.val else None
        val_classes = self.val_data.classes if self.val_data else []
        if self.labeled and val_classes and val_classes != self.train_data.classes:
            raise GNSurgeonError(
                f"--val folder {o.val} has classes {val_classes[:5]}..., the training folder "
                f"{self.train_data.classes[:5]}...: they must be the same"
            )

    def _build_models(self, base: nn.Module | None) -> None:
        """The student in train mode, the teacher frozen; both must output the same logits."""
        o, device, config = self.options, self.proc.device, self.info.data_config
        self.module = load(self.checkpoint, model=base, device=device).train()
        num_logits = _num_logits(self.module, config.input_size, device, f"checkpoint {self.checkpoint}")
        classes = len(self.train_data.classes)
        if self.labeled and classes > num_logits:
            raise GNSurgeonError(
                f"data folder {o.data} has {classes} classes but the model outputs {num_logits} logits"
            )
        self.teacher = None
        self.teacher_from = None
        if o.teacher:
            self.teacher, self.teacher_from = _open_teacher(o, self.info)
            self.teacher = self.teacher.to(device)
            teacher_logits = _num_logits(self.teacher, config.input_size, device, f"--teacher {o.teacher}")
            if teacher_logits != num_logits:
                raise GNSurgeonError(f"--teacher {o.teacher} outputs {teacher_logits} logits, the student {num_logits}")
        self.amp = _amp_dtype(o, device)
        self.channels_last = o.channels_last if o.channels_last is not None else device.type == "cuda"
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)

    def _build_schedule(self) -> None:
        """Steps per epoch on this process's shard, total steps, warmup, lr: the resolved settings."""
        o, proc = self.options, self.proc
        self.sampler = EpochSampler(self.train_data, proc.rank, proc.world, o.seed)
        self.per_epoch = len(self.sampler.inner) // o.batch_size
        if self.per_epoch == 0:
            raise GNSurgeonError(
                f"data folder {o.data} has {len(self.train_data)} images: fewer than --batch-size {o.batch_size}"
                + (f" x {proc.world} processes" if proc.world > 1 else "")
            )
        if o.steps is not None:
            self.total = o.steps
        else:
            self.total = max(1, math.ceil((o.epochs or 1.0) * self.per_epoch / o.grad_accum))
        warmup = o.warmup_steps if o.warmup_steps is not None else round(0.05 * self.total)
        self.warmup = min(warmup, self.total)
        effective = o.batch_size * o.grad_accum * proc.world
        self.lr = o.resolved_lr(effective)
        self.settings = {
            "train_images": len(self.train_data),
            "labeled": self.labeled,
            "classes": len(self.train_data.classes),
            "total_steps": self.total,
            "batch_size": o.batch_size,
            "grad_accum": o.grad_accum,
            "world_size": proc.world,
            "effective_batch": effective,
            "optimizer": o.optimizer,
            "lr": self.lr,
            "momentum": o.momentum if o.optimizer == "sgd" else None,
            "weight_decay": o.resolved_weight_decay(),
            "norm_weight_decay": o.norm_weight_decay,
            "warmup_steps": self.warmup,
            "schedule": "linear warmup + cosine to 0",
            "clip_grad": o.clip_grad,
            "label_smoothing": o.label_smoothing,
            "teacher": o.teacher,
            "teacher_weights": o.teacher_weights,
            "teacher_from": self.teacher_from,
            "kd_temperature": o.kd_temperature if o.teacher else None,
            "kd_weight": o.kd_weight if o.teacher else None,
            "hflip": o.hflip,
            "min_crop_scale": o.min_crop_scale,
            "seed": o.seed,
            "amp": str(self.amp).replace("torch.", "") if self.amp else None,
            "device": str(proc.device),
            "channels_last": self.channels_last,
            "compile": o.compile,
        }

    def _build_optimizer(self) -> None:
        """Optimizer over the trainable parameters (two decay groups), schedule, scaler, wrappers."""
        o, proc = self.options, self.proc
        groups = param_groups(self.module, self.settings["weight_decay"], o.norm_weight_decay)
        self.settings["params"] = {"decay": len(groups[0]["params"]), "no_decay": len(groups[1]["params"])}
        self.optimizer = _make_optimizer(groups, o, self.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(self.warmup, self.total))
        self.scaler = torch.amp.GradScaler(proc.device.type, enabled=self.amp == torch.float16)
        self.train_model: nn.Module = self.module
        if proc.world > 1:
            has_bn = any(isinstance(m, _BatchNorm) for m in self.module.modules())
            self.train_model = nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                forward_sync_buffers=has_bn,  # only kept BatchNorm layers have statistics to keep in sync
            )
        if o.compile:
            self.train_model = torch.compile(self.train_model)

    def _trajectory(self) -> dict:
        """The settings that decide the weights; resuming requires them unchanged."""
        skip = ("device", "channels_last", "compile", "params")
        return {k: v for k, v in self.settings.items() if k not in skip}

    # ------------------------------------------------------------------------------- running
    def run(self) -> FinetuneReport:
        o, proc = self.options, self.proc
        report = FinetuneReport(
            str(self.checkpoint),
            str(self.output),
            self.settings,
            state_path=str(self.state_path),
            metrics_path=str(self.metrics_path),
            rank=proc.rank,
        )
        torch.manual_seed(o.seed + proc.rank)
        random.seed(o.seed + proc.rank)
        start_step = 0
        if o.resume and self.state_path.is_file():
            start_step = self._resume(report)
        else:
            if o.resume:  # a run that never reached its first checkpoint restarts, and says so
                report.notes.append(f"--resume: no training state at {self.state_path} yet, started from step 0")
            if proc.main and self.metrics_path.exists():
                self.metrics_path.unlink()
            report.before, report.teacher_eval = self._evaluate("before", 0, with_teacher_top1=True)
        self.before, self.teacher_eval = report.before, report.teacher_eval
        self._train(start_step, report)
        report.after, _ = self._evaluate("after", self.total)
        report.broken_images = self._gather_broken()
        if proc.main:
            self._save_output(report)
        proc.barrier()
        return report

    def _resume(self, report: FinetuneReport) -> int:
        state = read_state(self.state_path)
        _check_same_run(state["trajectory"], self._trajectory(), self.state_path)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"][self.proc.rank], self.proc.device)
        report.before, report.teacher_eval = state.get("before"), state.get("teacher_eval")
        report.resumed_from = int(state["step"])
        report.images_seen = int(state.get("images_seen", 0))
        report.train_seconds = float(state.get("train_seconds", 0.0))
        self.broken = dict.fromkeys(state["broken"][self.proc.rank])
        if self.proc.main:
            _rewind_metrics(self.metrics_path, report.resumed_from)
        return report.resumed_from

    def _evaluate(self, when: str, step: int, with_teacher_top1: bool = False) -> tuple[dict | None, dict | None]:
        if self.val_data is None:
            return None, None
        proc = self.proc
        shard = list(range(proc.rank, len(self.val_data), proc.world))
        loader = _loader(
            self.val_data, self.options.eval_batch_size, min(self.options.workers, 2), proc.device, shard, False, 0
        )
        result = evaluate(
            self.module, loader, proc, teacher=self.teacher, amp=self.amp, channels_last=self.channels_last
        )
        teacher_eval = None
        if self.teacher is not None:
            teacher_eval = {"top1": result.pop("teacher_top1")}
            if not with_teacher_top1:
                teacher_eval = None
        self.metrics.write({"event": "eval", "when": when, "step": step, **result})
        return result, teacher_eval

    def _train(self, start_step: int, report: FinetuneReport) -> None:
        o, proc = self.options, self.proc
        loader = _loader(
            SeededSamples(self.train_data, o.seed), o.batch_size, o.workers, proc.device, self.sampler, True, o.seed
        )
        stream = _micro_batches(loader, self.sampler, self.per_epoch, start_step * o.grad_accum)
        window = _Window(proc.device, start_step + 1)
        last_good, last_save = None, time.perf_counter()
        started = window.tick
        bar = self._progress_bar(start_step)
        try:
            for step in range(start_step, self.total):
                for k in range(o.grad_accum):
                    images, labels, bad = next(stream)
                    self.broken.update(dict.fromkeys(bad))
                    sync = self._no_sync() if proc.world > 1 and k < o.grad_accum - 1 else contextlib.nullcontext()
                    with sync:
                        window.add(*self._micro_step(images, labels))
                self._optimizer_step()
                done = step + 1
                if bar is not None:
                    bar.update(completed=done)
                final = done == self.total
                every = o.checkpoint_every is not None and done % o.checkpoint_every == 0
                if not (done % o.log_every == 0 or every or final):
                    continue
                # Rank 0's clock decides time-based checkpoints; the sum tells every rank.
                timer = proc.main and time.perf_counter() - last_save >= 60 * o.checkpoint_minutes
                record, timer_due = self._flush(window, done, report, last_good, float(timer))
                if final or every or timer_due:
                    if not _all_finite(self.module):
                        raise self._nonfinite("the weights became non-finite", done, done, last_good)
                    seconds = report.train_seconds + time.perf_counter() - started
                    if final:  # the run's own time ends here; the last save is bookkeeping
                        report.train_seconds, started = seconds, None
                    self._write_state(done, report, seconds)
                    last_good, last_save = done, time.perf_counter()
                if self.callback is not None:
                    self.callback(record)
            report.steps = self.total
        finally:
            if started is not None:
                report.train_seconds += time.perf_counter() - started
            if bar is not None:
                bar.stop()
            del stream, loader

    def _flush(self, window: _Window, done: int, report: FinetuneReport, last_good, timer: float):
        """Sum the log window over processes, check the loss, write one metrics record."""
        now = time.perf_counter()
        totals = self.proc.sum([*window.sums.tolist(), window.micro, window.images, timer])
        loss, ce, kd = (v / max(1.0, totals[3]) for v in totals[:3])
        if not math.isfinite(loss):
            raise self._nonfinite(f"the loss became {loss}", window.first, done, last_good)
        report.images_seen += int(totals[4])
        report.final_loss = loss
        record = {
            "event": "train",
            "step": done,
            "epoch": round(done * self.options.grad_accum / self.per_epoch, 4),
            "loss": loss,
            "lr": self.step_lr,
            "images_per_s": totals[4] / max(now - window.tick, 1e-9),
        }
        if self.labeled and self.teacher is not None:
            record.update(ce=ce, kd=kd)
        self.metrics.write(record)
        if self.progress is not None and self.bar_task is not None:
            stats = f"loss {loss:.4f}  lr {record['lr']:.2e}  {record['images_per_s']:.0f} img/s"
            self.bar_task.update(stats=stats)
        window.reset(now, done + 1)
        return record, totals[5] > 0

    def _no_sync(self):
        ddp = self.train_model
        ddp = getattr(ddp, "_orig_mod", ddp)  # torch.compile wrapper
        return ddp.no_sync()

    def _micro_step(self, images, labels) -> tuple[torch.Tensor, int]:
        """Forward + backward of one micro-batch; returns (loss, ce, kd) detached and the image count."""
        o, proc = self.options, self.proc
        weight = 1.0
        if images is None:  # every image unreadable: a zero-weighted step keeps processes in lockstep
            images = torch.zeros(o.batch_size, *self.info.data_config.input_size)
            labels = torch.zeros(o.batch_size, dtype=torch.long)
            weight = 0.0
        n = int(weight) * len(labels)
        images = _to_device(images, proc.device, self.channels_last)
        labels = labels.to(proc.device, non_blocking=True)
        zero = torch.zeros((), device=proc.device)
        with _autocast(proc.device, self.amp):
            logits = self.train_model(images)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
        logits = logits.float()
        ce = F.cross_entropy(logits, labels, label_smoothing=o.label_smoothing) if self.labeled else zero
        kd = zero
        if teacher_logits is not None:
            kd = kl_divergence(logits, teacher_logits.float(), o.kd_temperature)
        loss = ce + o.kd_weight * kd
        self.scaler.scale(loss * (weight / o.grad_accum)).backward()
        return torch.stack([loss.detach(), ce.detach(), kd.detach()]).double() * weight, n

    def _optimizer_step(self) -> None:
        if self.options.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.options.clip_grad)
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used, for the log
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _nonfinite(self, what: str, first: int, step: int, last_good: int | None) -> NonFiniteLossError:
        """The loss is checked once per log window: name the window and what survived."""
        window = f"at step {step}" if first == step else f"between steps {first} and {step}"
        kept = (
            f"the last good training state (step {last_good}) is kept in {self.state_path}"
            if last_good is not None
            else "no training state had been written yet"
        )
        return NonFiniteLossError(
            f"{what} {window}: stopped, {self.output} not written; {kept}; lower --lr (or set --clip-grad) "
            "and run again"
        )

    def _write_state(self, step: int, report: FinetuneReport, train_seconds: float) -> None:
        rng = self.proc.gather(_rng_state(self.proc.device))
        broken = self.proc.gather(list(self.broken))
        if not self.proc.main:
            return
        state = {
            "format": STATE_FORMAT,
            "gnsurgeon_version": __version__,
            "step": step,
            "trajectory": self._trajectory(),
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng,
            "before": self.before,
            "teacher_eval": self.teacher_eval,
            "images_seen": report.images_seen,
            "train_seconds": train_seconds,
            "broken": broken,
        }
        write_atomically(self.state_path, lambda tmp: torch.save(state, tmp))

    def _gather_broken(self) -> dict:
        """Unreadable images over all processes, each path once (ranks meet the same file in
        different epochs): the count and the first few paths."""
        unique = dict.fromkeys(path for paths in self.proc.gather(list(self.broken)) for path in paths)
        merged = BrokenImages()
        merged.add(list(unique))
        return merged.to_dict()

    def _save_output(self, report: FinetuneReport) -> None:
        entry = history_entry(
            "finetune",
            checkpoint=str(self.checkpoint),
            data=self.options.data,
            val=self.options.val,
            settings=self.settings,
            steps=report.steps,
            resumed_from=report.resumed_from,
            before=report.before,
            after=report.after,
            teacher=report.teacher_eval,
            final_loss=report.final_loss,
        )
        save(
            self.output,
            self.module,
            self.info.plan,
            source=self.info.source,
            data_config=self.info.data_config,
            history=list(self.info.history) + [entry],
        )

    def _progress_bar(self, start: int):
        if self.progress is None:
            return None
        self.bar_task = progress_bar(self.progress, "finetune", total=self.total, completed=start, transient=False)
        return self.bar_task


__all__ = [
    "FinetuneOptions",
    "FinetuneReport",
    "NonFiniteLossError",
    "evaluate",
    "finetune",
    "param_groups",
]
