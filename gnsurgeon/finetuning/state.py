"""The training state on disk: everything a killed run needs to continue as if it had not stopped.

Model, optimizer, scheduler and loss-scaler states, the step, the global RNG state of every rank
(dropout, drop-path), the evaluation before training, the counters of the report and the unreadable
images met so far. It is written atomically (a crash mid-write keeps the previous state) and read
with ``weights_only=True``, so a state file cannot run code. It also carries the run's trajectory
(:meth:`RunSettings.trajectory`): a resume with options that would change the weights is refused,
naming what differs, instead of silently training a different run.

Stage: finetune's persistence. It imports torch, :mod:`gnsurgeon.errors`, :mod:`gnsurgeon.files` and
:mod:`gnsurgeon.finetuning.settings`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .. import __version__
from ..errors import GNSurgeonError
from ..files import write_atomically
from .settings import RunSettings

__all__ = ["STATE_FORMAT", "TrainingState", "read_state", "rng_state", "set_rng_state"]

STATE_FORMAT = 1


@dataclass
class TrainingState:
    """One training state; the fields are the file's keys after ``format`` and ``gnsurgeon_version``.

    ``rng`` and ``broken`` hold one entry per rank (each rank's RNG state, each rank's unreadable
    image paths), gathered by the caller.
    """

    step: int
    trajectory: dict
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    rng: list[dict]
    before: dict | None
    teacher_eval: dict | None
    images_seen: int
    train_seconds: float
    broken: list[list[str]]

    def to_dict(self) -> dict:
        """The file's content. Shallow on purpose: ``asdict`` would deep-copy every tensor."""
        return {"format": STATE_FORMAT, "gnsurgeon_version": __version__} | {
            f.name: getattr(self, f.name) for f in fields(self)
        }

    def save(self, path: Path) -> None:
        content = self.to_dict()
        write_atomically(path, lambda tmp: torch.save(content, tmp))

    @classmethod
    def read(cls, path: Path) -> TrainingState:
        """The state at ``path`` (see :func:`read_state`); counters missing from it start at 0."""
        state = read_state(path)
        return cls(
            step=int(state["step"]),
            trajectory=state["trajectory"],
            model=state["model"],
            optimizer=state["optimizer"],
            scheduler=state["scheduler"],
            scaler=state.get("scaler") or {},
            rng=state["rng"],
            before=state.get("before"),
            teacher_eval=state.get("teacher_eval"),
            images_seen=int(state.get("images_seen", 0)),
            train_seconds=float(state.get("train_seconds", 0.0)),
            broken=state["broken"],
        )

    def check_resumes(self, settings: RunSettings, path: Path) -> None:
        """Resuming only makes sense with the trajectory the state was written with."""
        diffs = settings.changes_from(self.trajectory)
        if diffs:
            raise GNSurgeonError(
                f"cannot --resume from {path}: it was written with " + "; ".join(diffs[:4]) + " (resume needs the "
                "same training options and data)"
            )


def read_state(path: Path) -> dict:
    """A training state written by :func:`~gnsurgeon.finetuning.finetune`, read with ``weights_only=True``."""
    if not path.is_file():
        raise GNSurgeonError(f"--resume: no training state at {path} (run without --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors
        raise GNSurgeonError(f"cannot read training state {path}: corrupt or not a gnsurgeon state ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise GNSurgeonError(f"{path} is not a gnsurgeon training state (format {STATE_FORMAT})")
    return state


def rng_state(device: torch.device) -> dict:
    """This process's global RNG state: torch CPU, Python, and the CUDA device's when on one."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
