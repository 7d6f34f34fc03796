"""The training data, reproducible by construction: which images a step sees and how they look.

Exact resumption and a trajectory independent of ``--workers`` and of the number of processes both
come from two rules:

* the sample order of every epoch is :class:`~torch.utils.data.DistributedSampler`'s (seed, epoch),
  so a resumed run skips exactly the micro-batches already consumed (:class:`EpochSampler`,
  :func:`micro_batches`);
* every sample is augmented under its own RNG seed derived from (seed, epoch, index), so an image
  does not depend on which worker loads it or where a run was resumed (:class:`SeededSamples`).

Stage: finetune's input pipeline. It imports :mod:`gnsurgeon.data`, :mod:`gnsurgeon.errors` and
the finetune modules ``options`` and ``tasks`` (which folder a task reads, and how).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..data import ClipFolderData, ImageFolderData, collate_skip_broken
from ..errors import GNSurgeonError
from .options import FinetuneOptions
from .tasks import Task

__all__ = [
    "EpochSampler",
    "Folders",
    "SeededSamples",
    "make_loader",
    "micro_batches",
    "open_folders",
    "sample_seed",
    "seed_all",
]


@dataclass(frozen=True)
class Folders:
    """The training folder (augmented) and the optional validation folder (evaluation transform):
    image folders, or clip folders for video (:meth:`~.tasks.Task.dataset`). ``labeled``: the
    folder has classes *and* the task uses them (segmentation and detection distil only)."""

    train: ImageFolderData | ClipFolderData
    val: ImageFolderData | ClipFolderData | None
    labeled: bool


def open_folders(options: FinetuneOptions, task: Task) -> tuple[Folders, list[str]]:
    """Training and validation folders read as ``task`` reads them; labels must agree. Also returns
    notes (class folders that a dense task does not use as labels)."""
    o = options
    if o.val is not None and not Path(o.val).is_dir():
        raise GNSurgeonError(f"--val folder {o.val} does not exist")
    train = task.dataset(o.data, train=True)
    notes = []
    if task.needs_teacher and not o.teacher:
        raise GNSurgeonError(
            f"a {task.kind} model fine-tunes by distillation from its BN original: give --teacher source "
            "(or --teacher SOURCE --teacher-weights FILE)"
        )
    if train.labeled and not task.uses_labels:
        notes.append(f"the class sub-folders of {o.data} are not labels for a {task.kind} model: distillation only")
    if not train.labeled and not o.teacher:
        raise GNSurgeonError(f"data folder {o.data} has no class sub-folders (no labels): give --teacher to distill")
    if len(train.classes) == 1 and task.uses_labels:  # CE would teach the model that one class, whatever it sees
        only = train.classes[0]
        raise GNSurgeonError(
            f"data folder {o.data} has one class folder ({only}): cross-entropy on one class teaches nothing but "
            f"that class; give two or more class folders, or --data {Path(o.data) / only} --teacher ... to "
            "distill on its images without labels"
        )
    val = task.dataset(o.val, train=False) if o.val else None
    val_classes = val.classes if val else []
    if train.labeled and task.uses_labels and val_classes and val_classes != train.classes:
        raise GNSurgeonError(
            f"--val folder {o.val} has classes {val_classes[:5]}..., the training folder "
            f"{train.classes[:5]}...: they must be the same"
        )
    return Folders(train, val, train.labeled and task.uses_labels), notes


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch``: a function of the three numbers only."""
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
        seed = sample_seed(self.seed, epoch, index)
        if torch.utils.data.get_worker_info() is not None:
            seed_all(seed)
            return self.data[index]
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        try:
            seed_all(seed)
            return self.data[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def seed_all(seed: int) -> None:
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


def make_loader(
    data: Dataset, batch_size: int, workers: int, device: torch.device, sampler, drop_last: bool, seed: int
) -> DataLoader:
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


def micro_batches(loader: DataLoader, sampler: EpochSampler, per_epoch: int, start: int):
    """An endless stream of micro-batches, starting at micro-batch ``start`` of the whole run."""
    micro = start
    while True:
        sampler.epoch, offset = divmod(micro, per_epoch)
        sampler.skip = offset * loader.batch_size
        for batch in loader:
            yield batch
            micro += 1
