"""The fine-tuning run: :func:`finetune` sets up, resumes or evaluates, trains, evaluates, saves.

:class:`Trainer` owns the order of things and the loop; the mechanics live in its collaborators:
the networks and the task they train as (:class:`~.models.Models`, :mod:`.tasks`: the loss and
the evaluation of classifiers, video, segmentation and detection models), the optimizer, schedule and scaler
(:class:`~.optimization.Optimization`), the data (:mod:`.sampling`), the training state
(:class:`~.state.TrainingState`), the evaluation (:class:`~.evaluation.Validation`) and the metrics
file, loss window, progress bar and save clock (:mod:`.monitoring`). Every setting it trains with
comes from one :class:`~.settings.RunSettings`, resolved once in setup.

The loss is checked once per log window and the weights before every state save: a NaN/inf stops
the run with :class:`NonFiniteLossError`, the output unwritten and the last good state kept.

Stage: finetune's driver. It imports :mod:`gnsurgeon.checkpoint`, :mod:`gnsurgeon.data`,
:mod:`gnsurgeon.errors`, :mod:`gnsurgeon.files`, :mod:`gnsurgeon.provenance` and every other
finetune module.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointInfo, history_entry, read_checkpoint, save
from ..data import BrokenImages
from ..errors import GNSurgeonError
from ..files import check_output
from ..provenance import rebase_history
from .evaluation import Validation
from .models import Models, all_finite
from .monitoring import MetricsLog, ProgressBar, TrainClock, Window
from .optimization import Optimization, count_params, param_groups
from .options import FinetuneOptions, NonFiniteLossError
from .processes import Processes, autocast, setup_processes, to_device
from .report import FinetuneReport
from .sampling import EpochSampler, SeededSamples, make_loader, micro_batches, open_folders
from .settings import resolve_settings
from .state import TrainingState, rng_state, set_rng_state

__all__ = ["RunFiles", "Trainer", "finetune"]


def finetune(
    checkpoint: str | Path,
    output: str | Path,
    options: FinetuneOptions | None = None,
    *,
    model: nn.Module | None = None,
    progress=None,
    callback: Callable[[dict], object] | None = None,
) -> FinetuneReport:
    """Fine-tune the model in ``checkpoint`` on ``options.data`` and save it to ``output``.

    ``model`` is the unconverted architecture for checkpoints saved with ``source=None``.
    ``progress`` is a rich Console to draw a progress bar on (rank 0 only). ``callback(record)`` is
    called with every metrics record (a dict), on every rank. Raises :class:`GNSurgeonError` for
    bad input and :class:`NonFiniteLossError` when the loss stops being finite.
    """
    options = options or FinetuneOptions()
    options.validate()
    output = check_output(output, ".safetensors")
    if Path(output).resolve() == Path(checkpoint).resolve():
        # Refused, not overwritten: the input is what --resume and --teacher source read again.
        raise GNSurgeonError(f"-o {output} is the input checkpoint; write the fine-tuned model to another file")
    info = read_checkpoint(checkpoint)
    if not Path(options.data).is_dir():
        raise GNSurgeonError(f"data folder {options.data} does not exist")
    proc = setup_processes(options.device)
    try:
        trainer = Trainer(RunFiles.of(checkpoint, output, options), options, info, proc, model)
        return trainer.run(progress if proc.main else None, callback)
    finally:
        proc.close()


@dataclass(frozen=True)
class RunFiles:
    """The files of one run: the checkpoint read, the output, the training state and the metrics."""

    checkpoint: Path
    output: Path
    state: Path
    metrics: Path

    @classmethod
    def of(cls, checkpoint: str | Path, output: Path, options: FinetuneOptions) -> RunFiles:
        """``--state``/``--metrics`` where given, else next to the output (OUT.state.pt, OUT.metrics.jsonl)."""
        state = Path(options.state) if options.state else output.with_suffix(".state.pt")
        metrics = Path(options.metrics) if options.metrics else output.with_suffix(".metrics.jsonl")
        return cls(Path(checkpoint), output, state, metrics)


class Trainer:
    """One fine-tuning run. Setup (here) checks everything before any training: the folders, both
    networks, the settings; then :meth:`run` does the rest."""

    def __init__(
        self, files: RunFiles, options: FinetuneOptions, info: CheckpointInfo, proc: Processes, base: nn.Module | None
    ) -> None:
        self.files = files
        self.options = options
        self.info = info
        self.proc = proc
        self.models = Models.open(files.checkpoint, info, options, base, proc.device)
        task = self.models.task
        self.folders, self.notes = open_folders(options, task)
        task.check(self.models.student, self.models.teacher, len(self.folders.train.classes), proc.device)
        self.notes += task.prepare(self.models.student, info.plan, options)
        groups = param_groups(self.models.student, options.resolved_weight_decay(), options.norm_weight_decay)
        self.settings = resolve_settings(
            options,
            task=task.kind,
            train_heads=task.train_heads(),
            train_images=len(self.folders.train),
            classes=len(self.folders.train.classes),
            labeled=self.folders.labeled,
            world_size=proc.world,
            device=proc.device,
            cuda_bf16=proc.device.type == "cuda" and torch.cuda.is_bf16_supported(),
            teacher_from=self.models.teacher_from,
            params=count_params(groups),
            calibrated_start=info.calibrated,
        )
        if self.settings.channels_last:
            self.models.to_channels_last()
        task.channels_last = self.settings.channels_last
        self.optim = Optimization(groups, self.settings, self.models.student, proc.device)
        self.models.wrap(proc, self.settings.compile)
        self.log = MetricsLog(files.metrics if proc.main else None)
        self.validation = Validation(
            self.folders.val, proc, options.eval_batch_size, options.workers, self.settings, task
        )
        self.broken: dict[str, None] = {}  # this rank's unreadable paths, in order met (an ordered set)

    # ------------------------------------------------------------------------------- the run
    def run(self, progress, callback: Callable[[dict], object] | None) -> FinetuneReport:
        """Resume (or evaluate first), train, evaluate, save (rank 0); every rank returns the report."""
        o, proc, files = self.options, self.proc, self.files
        report = FinetuneReport(
            str(files.checkpoint),
            str(files.output),
            self.settings,
            state_path=str(files.state),
            metrics_path=str(files.metrics),
            rank=proc.rank,
            notes=list(self.notes),
        )
        torch.manual_seed(o.seed + proc.rank)
        random.seed(o.seed + proc.rank)
        start_step = 0
        if o.resume and files.state.is_file():
            start_step = self._resume(report)
        else:
            if o.resume:  # a run that never reached its first checkpoint restarts, and says so
                report.notes.append(f"--resume: no training state at {files.state} yet, started from step 0")
            self.log.clear()
            report.before, report.teacher_eval = self.validation.run(self.models, self.log, "before", 0, True)
        with ProgressBar(progress, self.settings.total_steps, start_step) as bar:
            self._train(start_step, report, bar, callback)
        report.after, _ = self.validation.run(self.models, self.log, "after", self.settings.total_steps)
        report.broken_images = merge_broken(proc, self.broken)
        report.notes += self.models.task.run_notes()
        if proc.main:
            self._save_output(report)
        proc.barrier()
        return report

    def _resume(self, report: FinetuneReport) -> int:
        """Load the training state into the run and the report; returns the step it was written at."""
        state = TrainingState.read(self.files.state)
        state.check_resumes(self.settings, self.files.state)
        self.models.student.load_state_dict(state.model)
        self.optim.load_state_dicts(state.optimizer, state.scheduler, state.scaler)
        set_rng_state(state.rng[self.proc.rank], self.proc.device)
        report.before, report.teacher_eval = state.before, state.teacher_eval
        report.resumed_from = state.step
        report.images_seen, report.train_seconds = state.images_seen, state.train_seconds
        self.broken.update(dict.fromkeys(state.broken[self.proc.rank]))
        self.log.rewind(state.step)
        return state.step

    # ------------------------------------------------------------------------------ the loop
    def _train(self, start_step: int, report: FinetuneReport, bar: ProgressBar, callback) -> None:
        """Optimizer steps ``start_step + 1`` to the end: log every ``log_every``, save when due."""
        o, proc, total = self.options, self.proc, self.settings.total_steps
        sampler = EpochSampler(self.folders.train, proc.rank, proc.world, o.seed)
        samples = SeededSamples(self.folders.train, o.seed)
        loader = make_loader(samples, o.batch_size, o.workers, proc.device, sampler, True, o.seed)
        stream = micro_batches(loader, sampler, self.settings.batches_per_epoch, start_step * o.grad_accum)
        window = Window(proc.device, start_step + 1)
        clock = TrainClock(window.tick)
        try:
            for done in range(start_step + 1, total + 1):
                self._step(stream, window)
                bar.advance_to(done)
                final = done == total
                every = o.checkpoint_every is not None and done % o.checkpoint_every == 0
                if not (done % o.log_every == 0 or every or final):
                    continue
                # Rank 0's clock decides time-based checkpoints; the sum tells every rank.
                timer = proc.main and clock.since_save() >= 60 * o.checkpoint_minutes
                record, timer_due = self._flush(window, done, report, clock, float(timer), bar)
                if final or every or timer_due:
                    self._checkpoint(done, final, report, clock)
                if callback is not None:
                    callback(record)
            report.steps = total
        finally:
            report.train_seconds += clock.stop()
            del stream, loader  # the loader's workers go now, even if a traceback keeps this frame alive

    def _step(self, stream: Iterator, window: Window) -> None:
        """One optimizer step over ``grad_accum`` micro-batches (DDP syncs gradients on the last)."""
        accum = self.options.grad_accum
        for k in range(accum):
            images, labels, bad = next(stream)
            self.broken.update(dict.fromkeys(bad))
            skip_sync = self.proc.world > 1 and k < accum - 1
            with self.models.no_sync() if skip_sync else contextlib.nullcontext():
                window.add(*self._micro_step(images, labels))
        self.optim.step()

    def _micro_step(self, images, labels) -> tuple[torch.Tensor, int]:
        """Forward + backward of one micro-batch (the task's loss, :meth:`~.tasks.Task.loss`, under
        autocast); returns (loss, ce, kd) detached and the image count."""
        o, device = self.options, self.proc.device
        weight = 1.0
        if images is None:  # every image unreadable: a zero-weighted step keeps processes in lockstep
            images = torch.zeros(o.batch_size, *self.info.data_config.input_size)
            labels = torch.zeros(o.batch_size, dtype=torch.long)
            weight = 0.0
        n = int(weight) * len(labels)
        images = to_device(images, device, self.settings.channels_last)
        labels = labels.to(device, non_blocking=True)
        models = self.models
        with autocast(device, self.settings.amp_dtype):
            parts = models.task.loss(models.train_model, models.teacher, images, labels, self.settings.labeled)
        self.optim.backward(parts.loss * (weight / o.grad_accum))
        return torch.stack([parts.loss.detach(), parts.ce.detach(), parts.kd.detach()]).double() * weight, n

    def _flush(
        self, window: Window, done: int, report: FinetuneReport, clock: TrainClock, timer: float, bar: ProgressBar
    ) -> tuple[dict, bool]:
        """Sum the log window over processes, check the loss, write one metrics record. Also returns
        whether rank 0's ``timer`` asks for a state save (so that every rank saves together)."""
        now = time.perf_counter()
        totals = self.proc.sum([*window.sums.tolist(), window.micro, window.images, timer])
        loss, ce, kd = (v / max(1.0, totals[3]) for v in totals[:3])
        if not math.isfinite(loss):
            raise nonfinite_error(f"the loss became {loss}", window.first, done, clock.last_good, self.files)
        report.images_seen += int(totals[4])
        report.final_loss = loss
        record = {
            "event": "train",
            "step": done,
            "epoch": round(done * self.options.grad_accum / self.settings.batches_per_epoch, 4),
            "loss": loss,
            "lr": self.optim.step_lr,
            "images_per_s": totals[4] / max(now - window.tick, 1e-9),
        }
        if self.settings.labeled and self.models.teacher is not None:
            record.update(ce=ce, kd=kd)
        self.log.write(record)
        bar.show(f"loss {loss:.4f}  lr {record['lr']:.2e}  {record['images_per_s']:.0f} img/s")
        window.reset(now, done + 1)
        return record, totals[5] > 0

    # ----------------------------------------------------------------------------- the files
    def _checkpoint(self, done: int, final: bool, report: FinetuneReport, clock: TrainClock) -> None:
        """Check the weights, then write the training state (the final save is not training time)."""
        if not all_finite(self.models.student):
            raise nonfinite_error("the weights became non-finite", done, done, clock.last_good, self.files)
        if final:  # the run's own time ends here; the last save is bookkeeping
            report.train_seconds += clock.stop()
            seconds = report.train_seconds
        else:
            seconds = report.train_seconds + clock.elapsed()
        self._write_state(done, report, seconds)
        clock.saved(done)

    def _write_state(self, step: int, report: FinetuneReport, train_seconds: float) -> None:
        """Every rank contributes its RNG state and unreadable paths; rank 0 writes the file."""
        rng = self.proc.gather(rng_state(self.proc.device))
        broken = self.proc.gather(list(self.broken))
        if not self.proc.main:
            return
        state = TrainingState(
            step=step,
            trajectory=self.settings.trajectory(),
            model=self.models.student.state_dict(),
            **self.optim.state_dicts(),
            rng=rng,
            before=report.before,
            teacher_eval=report.teacher_eval,
            images_seen=report.images_seen,
            train_seconds=train_seconds,
            broken=broken,
        )
        state.save(self.files.state)

    def _save_output(self, report: FinetuneReport) -> None:
        """The fine-tuned checkpoint: same plan and source, one more history entry."""
        entry = history_entry(
            "finetune",
            checkpoint=str(self.files.checkpoint),
            data=self.options.data,
            val=self.options.val,
            settings=self.settings.to_dict(),
            steps=report.steps,
            resumed_from=report.resumed_from,
            before=report.before,
            after=report.after,
            teacher=report.teacher_eval,
            final_loss=report.final_loss,
        )
        save(
            self.files.output,
            self.models.student,
            self.info.plan,
            source=self.info.source,
            data_config=self.info.data_config,
            history=rebase_history(self.info.history, self.files.checkpoint, self.files.output) + [entry],
        )


def nonfinite_error(what: str, first: int, step: int, last_good: int | None, files: RunFiles) -> NonFiniteLossError:
    """The loss is checked once per log window: name the window and what survived."""
    window = f"at step {step}" if first == step else f"between steps {first} and {step}"
    kept = (
        f"the last good training state (step {last_good}) is kept in {files.state}"
        if last_good is not None
        else "no training state had been written yet"
    )
    return NonFiniteLossError(
        f"{what} {window}: stopped, {files.output} not written; {kept}; lower --lr (or set --clip-grad) and run again"
    )


def merge_broken(proc: Processes, broken: dict[str, None]) -> dict:
    """Unreadable images over all processes, each path once (ranks meet the same file in different
    epochs): the count and the first few paths."""
    unique = dict.fromkeys(path for paths in proc.gather(list(broken)) for path in paths)
    merged = BrokenImages()
    merged.add(list(unique))
    return merged.to_dict()
