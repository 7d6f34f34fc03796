"""What a fine-tuning run tells while it runs: the metrics file, the loss window between log steps,
the progress bar, and the clock that decides time-based training-state saves.

The loop must not sync the device every step just to report: losses are summed on the device in a
:class:`Window` and read once per log step. Only rank 0 writes the metrics file and draws the bar;
the other ranks get inert ones, so the loop has no rank tests of its own.

Stage: finetune's reporting while training. It imports torch, :mod:`gnsurgeon.report` (a bar or plain
log lines) and :mod:`gnsurgeon.files`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from ..files import write_atomically
from ..report import progress_bar

__all__ = ["MetricsLog", "ProgressBar", "TrainClock", "Window"]


class Window:
    """Loss sums (on the device: no sync per step) and counts since the last log step."""

    def __init__(self, device: torch.device, first: int) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, ce, kd
        self.micro = 0
        self.images = 0
        self.tick = time.perf_counter()
        self.first = first  # the first optimizer step of the window, for error messages

    def add(self, parts: torch.Tensor, images: int) -> None:
        self.sums += parts
        self.micro += 1
        self.images += images

    def reset(self, tick: float, first: int) -> None:
        self.sums.zero_()
        self.micro, self.images, self.tick, self.first = 0, 0, tick, first


class MetricsLog:
    """JSON lines, one record per log step and per evaluation; ``path=None`` (ranks > 0) writes nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def clear(self) -> None:
        """A fresh run starts a fresh file (records of an earlier run of the same output go)."""
        if self.path is not None and self.path.exists():
            self.path.unlink()

    def rewind(self, step: int) -> None:
        """Drop records past the resumed step (they belong to the interrupted tail)."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
        write_atomically(self.path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in kept)))


class ProgressBar:
    """Progress over the optimizer steps, with the last logged loss, lr and speed: a bar on a
    terminal, plain lines now and then in a log (:func:`gnsurgeon.report.progress_bar`); a context
    manager that shows nothing when ``console`` is None."""

    def __init__(self, console, total: int, start: int) -> None:
        self.console = console
        self.total = total
        self.start = start
        self.shown = None

    def __enter__(self) -> ProgressBar:
        if self.console is not None:
            self.shown = progress_bar(self.console, "finetune", total=self.total, completed=self.start, transient=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.shown is not None:
            self.shown.stop()

    def advance_to(self, done: int) -> None:
        if self.shown is not None:
            self.shown.update(completed=done)

    def show(self, stats: str) -> None:
        if self.shown is not None:
            self.shown.update(stats=stats)


class TrainClock:
    """Training time (what the report's speed is computed from) and when the state was last saved.

    ``started`` is None once the clock is stopped: the final save is bookkeeping, not training.
    """

    def __init__(self, started: float) -> None:
        self.started: float | None = started
        self.last_save = time.perf_counter()
        self.last_good: int | None = None  # the step of the last training state written

    def elapsed(self) -> float:
        """Seconds of training since the clock started (0 once stopped)."""
        return time.perf_counter() - self.started if self.started is not None else 0.0

    def stop(self) -> float:
        seconds = self.elapsed()
        self.started = None
        return seconds

    def since_save(self) -> float:
        return time.perf_counter() - self.last_save

    def saved(self, step: int) -> None:
        self.last_good, self.last_save = step, time.perf_counter()
