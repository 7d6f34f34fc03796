"""What a fine-tuning run did, for people (``gnsurgeon.report.finetune_table``) and for JSON.

Stage: finetune's output. It imports :mod:`gnsurgeon.data` (the unreadable-image record) and
:mod:`gnsurgeon.finetuning.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import __version__
from ..data import BrokenImages
from .settings import RunSettings

__all__ = ["FinetuneReport"]


@dataclass
class FinetuneReport:
    """What ``finetune`` did: the resolved settings, evaluations before/after, speed, files."""

    checkpoint: str
    output: str
    settings: RunSettings
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
    def train_images(self) -> int:
        """Training images used: the folder's files less the unreadable ones met (all, after an epoch)."""
        return self.settings.train_images - int(self.broken_images.get("count", 0))

    @property
    def images_per_s(self) -> float | None:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else None

    def to_dict(self) -> dict:
        return {
            "command": "finetune",
            "gnsurgeon_version": __version__,
            "checkpoint": self.checkpoint,
            "output": self.output,
            "settings": self.settings.to_dict(),
            "train_images": self.train_images,
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
