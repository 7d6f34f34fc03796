"""Rendering: rich tables for people, JSON files for machines, progress for both, for every command.

Every table is here, and nothing here decides anything: each one lays out a report another module
computed (a plan, a fold check, a calibration, a fine-tune, an ONNX export or verification). Progress
goes to stderr: a bar on a terminal, plain lines now and then in a log (:func:`progress_bar`). The CLI
imports this module to answer ``--help``, so it stays light.

Stage: rendering, after (or alongside) every stage. It imports rich and the light modules
:mod:`gnsurgeon.plan`, :mod:`gnsurgeon.files` and :mod:`gnsurgeon.verdicts`; never torch, onnx or
onnxruntime (the report types it renders are named for type checkers only).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from .files import write_text_atomically
from .plan import Action, Plan
from .verdicts import error_ratio

if TYPE_CHECKING:  # annotations only: importing them at run time would load torch
    from .onnx_export import ExportReport
    from .onnx_verify import VerifyReport

if TYPE_CHECKING:  # for the annotation only: rendering does not need torch loaded
    from .finetuning import FinetuneReport

if TYPE_CHECKING:  # annotation only, as above
    from .targets import ExportWeightsReport

# Wide enough for the plan table when output is piped (rich falls back to 80 columns).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

_ACTION_STYLE = {"gn": "green", "frozen": "cyan", "folded": "blue", "keep": "dim"}


def plan_table(plan: Plan, title: str = "Normalization layers") -> Table:
    table = Table(title=title, show_lines=False, header_style="bold")
    for name in ("path", "kind", "C", "action", "G", "C/G", "eps", "act"):
        table.add_column(name, justify="right" if name in ("C", "G", "C/G", "eps") else "left", no_wrap=True)
    table.add_column("note", overflow="fold")
    for lp in plan:
        style = _ACTION_STYLE.get(lp.action, "")
        note = "; ".join(filter(None, [lp.note, f"into {lp.producer}" if lp.producer else ""]))
        table.add_row(
            lp.path,
            lp.kind,
            str(lp.channels),
            f"[{style}]{lp.action}[/]",
            str(lp.groups or ""),
            str(lp.channels_per_group or ""),
            f"{lp.eps:g}",
            lp.act,
            f"[yellow]{note}[/]" if lp.is_fallback else note,
        )
    return table


def summary_table(summary: dict, extra: dict | None = None) -> Table:
    table = Table(title="Summary", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("normalization layers", str(summary["layers"]))
    table.add_row("actions", _pairs(summary["actions"]))
    table.add_row("converted by kind", _pairs(summary["converted_by_kind"]) or "none")
    table.add_row("G histogram", _pairs(summary["groups_histogram"], "G=") or "none")
    table.add_row("fallbacks", str(len(summary["fallbacks"])))
    if summary.get("not_folded"):
        reasons: dict[str, int] = {}
        for item in summary["not_folded"]:
            reasons[item["note"]] = reasons.get(item["note"], 0) + 1
        table.add_row("frozen, not folded (why)", "; ".join(f"{n} {r}" for r, n in reasons.items()))
    kept = summary["kept"]
    reasons = {}
    for item in kept:
        reasons[item["note"] or "kept"] = reasons.get(item["note"] or "kept", 0) + 1
    table.add_row("kept (why)", "; ".join(f"{n} {r}" for r, n in reasons.items()) or "none")
    for key, value in (extra or {}).items():
        table.add_row(key, str(value))
    return table


def fold_table(check: dict) -> Table:
    table = Table(title="Freeze/fold check (vs BN in eval mode)", header_style="bold")
    for name in ("layer", "action", "max abs", "max rel"):
        table.add_column(name, justify="left" if name in ("layer", "action") else "right")
    rows = [(path, e) for path, e in check["layers"].items()]
    if check["output"]:
        rows.append(("(model output)", {"action": "", **check["output"]}))
    for path, e in rows:
        table.add_row(path, e["action"], f"{e['max_abs']:.2e}", f"{e['max_rel']:.2e}")
    return table


def calibration_table(cal: dict) -> Table:
    table = Table(title=f"Calibration ({cal['method']}): relative error of each GN vs its BN", header_style="bold")
    for name in ("layer", "before", "after"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for path, e in cal["layers"].items():
        table.add_row(path, f"{e['before']:.3g}", f"{e['after']:.3g}")
    return table


def duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``: as a person reads a log."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class PlainProgress:
    """Progress for a log file or CI, where a redrawn bar shows nothing until it ends: one line at
    the start, then one whenever another tenth of the work is done or ``every_seconds`` have passed
    since the last line, and one when the work is complete."""

    def __init__(
        self, console: Console, description: str, total: int | None = None, completed: int = 0, **timing
    ) -> None:
        self.console, self.description = console, description
        self.total, self.completed, self.stats = total, completed, ""
        self.every_seconds: float = timing.get("every_seconds", 30.0)
        self.clock: Callable[[], float] = timing.get("clock", time.monotonic)
        self.started = self.last_time = self.clock()
        self.last_tenth = self._tenth()
        console.print(f"{description} ...", highlight=False, soft_wrap=True)

    def _tenth(self) -> int | None:
        return None if not self.total else int(10 * self.completed / self.total)

    def update(self, completed: int | None = None, total: int | None = None, stats: str | None = None) -> None:
        self.total = self.total if total is None else total
        self.completed = self.completed if completed is None else completed
        self.stats = self.stats if stats is None else stats
        if completed is None:
            return  # new stats alone are shown with the next line
        now, tenth = self.clock(), self._tenth()
        if tenth != self.last_tenth or now - self.last_time >= self.every_seconds:
            self.last_time, self.last_tenth = now, tenth
            self.console.print(self.line(now), highlight=False, soft_wrap=True)

    def line(self, now: float) -> str:
        done = (
            f"{self.completed}/{self.total} ({100 * self.completed / self.total:.0f}%)"
            if self.total
            else (f"{self.completed} done")
        )
        elapsed = now - self.started
        text = f"{self.description}: {done}, {duration(elapsed)}"
        if self.total and 0 < self.completed < self.total:
            text += f", about {duration(elapsed * (self.total - self.completed) / self.completed)} left"
        return text + (f"; {self.stats}" if self.stats else "")

    def stop(self) -> None:
        """Nothing to clear: every line printed stays in the log."""


class BarProgress:
    """A rich progress bar, redrawn in place on a terminal; ``transient`` bars vanish when done."""

    def __init__(
        self, console: Console, description: str, total: int | None = None, completed: int = 0, transient: bool = True
    ) -> None:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        extra = (TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
        self.bar = Progress(*columns, *extra, console=console, transient=transient)
        self.task = self.bar.add_task(description, total=total, completed=completed, stats="")
        self.bar.start()

    def update(self, completed: int | None = None, total: int | None = None, stats: str | None = None) -> None:
        fields = {} if stats is None else {"stats": stats}
        self.bar.update(self.task, completed=completed, total=total, **fields)

    def stop(self) -> None:
        self.bar.stop()


def progress_bar(
    console: Console, description: str, total: int | None = None, completed: int = 0, transient: bool = True
) -> PlainProgress | BarProgress:
    """A progress display for long work on ``console``: a bar on a terminal, plain lines now and then
    anywhere else (a log file, CI), so that a long calibration or fine-tune shows it is alive.
    Both have ``update(completed=, total=, stats=)`` and ``stop()``."""
    if console.is_terminal and not console.is_dumb_terminal:
        return BarProgress(console, description, total, completed, transient)
    return PlainProgress(console, description, total, completed)


@contextmanager
def step_progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """Progress on stderr (see :func:`progress_bar`), driven by a ``progress(done, total)`` callback
    (None if off)."""
    if not enabled:
        yield None
        return
    shown = progress_bar(err_console, description)
    try:
        yield lambda done, total: shown.update(completed=done, total=total)
    finally:
        shown.stop()


def calibration_summary(cal: dict) -> str:
    def fmt(d: dict) -> str:
        if not d:
            return "n/a"
        return f"top-1 agreement {d['top1_agreement']:.1f}%, logits cosine {d['logits_cosine']:.3f}"

    held = f"{cal['holdout']} held-out images" if cal["holdout"] else "the calibration images"
    text = f"{cal['samples']} images, {cal['seconds']:.1f} s; on {held}: "
    text += f"before {fmt(cal['before'])} -> after {fmt(cal['after'])}"
    tuned = [b for b in cal.get("blocks", []) if b.get("steps")]
    blocks = [b for b in tuned if b["block"] != "(end to end)"]
    if blocks:
        undone = sum("reverted" in b.get("note", "") for b in blocks)
        text += f"; {len(blocks)} blocks tuned" + (f" ({undone} undone: no gain)" if undone else "")
    for b in tuned:
        if b["block"] == "(end to end)":
            outcome = "undone: no gain" if "reverted" in b.get("note", "") else f"{b['loss_last']:.3g}"
            if "stopped_at" in b:  # calibration's final_abort ended the pass early
                outcome += f" (stopped after {b['stopped_at']} steps)"
            text += f"; end-to-end logits KL {b['loss_first']:.3g} -> {outcome}"
    auto = (cal.get("settings") or {}).get("auto", {})
    if auto.get("final_steps", "").startswith("off: "):
        text += f"; end-to-end pass off (auto): {auto['final_steps'].removeprefix('off: ')}"
    if cal["broken_images"].get("count"):
        text += f"; {cal['broken_images']['count']} unreadable image(s), e.g. {cal['broken_images']['first'][0]}"
    for note in cal.get("notes", []):
        text += f"; {note}"
    return text + _cache_summary(cal.get("cache") or {})


def _cache_summary(cache: dict) -> str:
    """Where calibration kept its block-boundary activations (see gnsurgeon.activation_cache)."""
    if not cache:
        return ""
    if cache["mode"] == "off":
        return f"; {cache['reason']}"
    where = f"{cache['device']} memory" if cache["mode"] == "ram" else "disk"
    return (
        f"; cache: {cache['dtype']} in {where}, {cache['bytes_cached'] / 2**20:.0f} MiB, "
        f"{cache['resyncs']} re-sync(s) from the images"
    )


FINETUNE_KD = {  # what "KD" is per task (finetuning/tasks.py, detection.py)
    "classification": "KD (T={t:g}, weight {w:g})",
    "video": "KD per clip (T={t:g}, weight {w:g})",
    "segmentation": "per-pixel KD (T={t:g}, weight {w:g})",
    "detection": "backbone/FPN feature matching, + the outputs of heads that train (weight {w:g})",
}


def finetune_eval_text(task: str, result: dict) -> str:
    """One evaluation (before / after) in words, by what the task measures."""

    def pct(value) -> str:
        return f"{value:.2f}%" if value is not None else "-"

    agreement = result.get("teacher_agreement")
    if task == "segmentation":
        text = f"per-pixel agreement with teacher {pct(agreement)}, KL {result.get('pixel_kl') or 0:.4f}"
    elif task == "detection":
        cosine = result.get("feature_cosine")
        text = f"feature cosine {cosine:.4f}" if cosine is not None else "feature cosine -"
        text += f", box agreement {pct(agreement)} ({result.get('teacher_boxes', 0)} teacher boxes)"
    else:
        text = f"top-1 {pct(result.get('top1'))}"
        if "teacher_agreement" in result:
            text += f", agreement with teacher {pct(agreement)}"
    unit = "clips" if task == "video" else "images"
    return text + f" ({result['images']} val {unit})"


def finetune_table(report: FinetuneReport) -> Table:
    """The run at a glance: settings, before/after evaluation, speed, files."""
    s = report.settings
    table = Table(title=f"Fine-tuning ({report.settings.task})", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    steps = f"{report.steps}" + (f" (resumed from {report.resumed_from})" if report.resumed_from is not None else "")
    table.add_row("steps", steps)
    unreadable = report.broken_images["count"]
    table.add_row(
        "data",
        f"{report.train_images} training images" + (f" ({unreadable} unreadable, skipped)" if unreadable else ""),
    )
    table.add_row(
        "batch",
        f"{s.batch_size} x {s.grad_accum} accum x {s.world_size} proc = {s.effective_batch} images/step",
    )
    table.add_row(
        "optimizer",
        f"{s.optimizer} lr {s.lr:.3g}{' (calibrated start)' if s.calibrated_start else ''}, "
        f"wd {s.weight_decay:g} ({s.params.decay} tensors), "
        f"norm/bias wd {s.norm_weight_decay:g} ({s.params.no_decay} tensors), warmup {s.warmup_steps}, "
        f"grad norm clip {f'{s.clip_grad:g}' if s.clip_grad else 'off'}",
    )
    loss = "CE" if s.labeled else ""
    if s.teacher:
        loss = (loss + " + " if loss else "") + FINETUNE_KD.get(s.task, "KD").format(t=s.kd_temperature, w=s.kd_weight)
    table.add_row("loss", f"{loss}: final {report.final_loss:.4f}" if report.final_loss is not None else loss)
    table.add_row("device", f"{s.device}, amp {s.amp or 'off'}, channels_last {s.channels_last}")
    if report.images_per_s:
        table.add_row("speed", f"{report.images_per_s:.1f} images/s ({report.train_seconds:.1f} s training)")

    def pct(value) -> str:
        return f"{value:.2f}%" if value is not None else "-"

    for when, result in (("before", report.before), ("after", report.after)):
        if result:
            table.add_row(when, finetune_eval_text(s.task, result))
    if report.teacher_eval:
        table.add_row("teacher", f"top-1 {pct(report.teacher_eval.get('top1'))}")
    if not report.before and not report.after:
        table.add_row("evaluation", "none (give --val DIR)")
    broken = report.broken_images
    if broken["count"]:
        first = ", ".join(broken["first"])
        table.add_row("unreadable images", f"[yellow]{broken['count']} skipped[/] (first: {first})")
    table.add_row("output", report.output)
    table.add_row("files", f"state {report.state_path}, metrics {report.metrics_path}")
    return table


def run_table(run: dict) -> Table:
    table = Table(title=f"gnsurgeon run {run['recipe']} {run['source']} -> {run['outdir']}", header_style="bold")
    for name in ("stage", "status", "result", "artifact", "seconds"):
        table.add_column(name, justify="right" if name == "seconds" else "left", overflow="fold")
    for st in run["stages"]:
        table.add_row(st["stage"], st["status"], st.get("result", ""), st["artifact"], f"{st['seconds']:.1f}")
    return table


# ------------------------------------------------------------------------- export-onnx / verify-onnx
def _fmt(value, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


def model_table(report: VerifyReport) -> Table:
    """One row per whole-model input: onnxruntime vs PyTorch."""
    table = Table(title="Whole model: onnxruntime vs PyTorch", header_style="bold")
    for name in ("input", "max abs", "max rel", "limit", "top-1 agree", "status"):
        table.add_column(name, justify="left" if name in ("input", "status") else "right")
    for row in report.model_checks:
        status = "[green]ok[/]" if row["ok"] else f"[red]FAIL[/] {row.get('problem', '')}".strip()
        if row.get("nonfinite"):
            status = f"[red]FAIL[/] {row['nonfinite']} non-finite"
        top1 = row.get("top1_agreement")
        table.add_row(
            row["input"],
            _fmt(row.get("max_abs")),
            _fmt(row.get("max_rel")),
            _fmt(row.get("limit")),
            "-" if top1 is None else f"{top1:.0%}",
            status,
        )
    return table


def layer_table(report: VerifyReport, failed_only: bool = False) -> Table:
    """One row per GN layer call: G and eps as the graph has them, the activation's error and the
    worst stress input's (the one furthest over its limit); ``failed_only`` keeps the failing rows."""
    table = Table(title="Every GroupNorm: its ONNX subgraph in onnxruntime vs PyTorch", header_style="bold")
    for name in ("layer", "form", "G", "eps", "activation max abs", "worst stress input", "max abs", "limit", "status"):
        table.add_column(name, justify="left" if name in ("layer", "form", "worst stress input", "status") else "right")
    for row in report.layers:
        if not (row["ok"] and failed_only):
            table.add_row(*_layer_cells(row))
    return table


def _layer_cells(row: dict) -> list[str]:
    cases = row.get("cases", {})
    act = [r for n, r in cases.items() if n.startswith("activation")]
    stress = {n: r for n, r in cases.items() if not n.startswith("activation")}
    act_err = max((float("inf") if r.get("max_abs") is None else r["max_abs"] for r in act), default=None)
    worst_name = max(stress, key=lambda n: error_ratio(stress[n]), default=None)
    worst = stress.get(worst_name, {})
    if row["ok"]:
        status = "[green]ok[/]"
    elif row.get("problems"):
        status = "[red]FAIL[/] " + "; ".join(row["problems"])
    else:
        status = f"[red]FAIL[/] {len(row.get('failed_cases', []))} input(s)"
    eps = row.get("graph_eps") if row.get("graph_eps") is not None else row.get("eps")
    groups = row.get("graph_groups") if row.get("graph_groups") is not None else row.get("groups")
    worst_abs = worst.get("max_abs")
    return [
        row["path"] + (f" #{row['call']}" if "call" in row else ""),
        row.get("form", "-"),
        str(groups if groups is not None else "-"),
        _fmt(eps, ".0e"),
        "NaN/inf" if act_err == float("inf") else _fmt(act_err),
        worst_name or "-",
        "NaN/inf" if worst and worst_abs is None else _fmt(worst_abs),
        _fmt(worst.get("limit")),
        status,
    ]


def render_verification(report: VerifyReport, quiet: bool = False) -> None:
    """Print a verification: the whole-model table, the layer table (only failing layers when
    ``quiet``), the notes, and a one-line verdict when it passed (the CLI reports failures)."""
    console.print(model_table(report))
    if any(not (row["ok"] and quiet) for row in report.layers):
        console.print(layer_table(report, failed_only=quiet))
    for note in report.notes:
        console.print(f"[dim]note:[/] {note}", highlight=False)
    if report.ok:
        console.print(
            f"[green]verified:[/] {len(report.model_checks)} whole-model input(s) and {len(report.layers)} GN layer(s) "
            "within limits",
            highlight=False,
        )


def export_table(report: ExportReport) -> Table:
    """Summary of an export for the terminal."""
    table = Table(title="ONNX export", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    graph = report.graph
    folded = sum(r["action"] == Action.FOLDED for r in report.folds)
    kept = [r for r in report.folds if r["action"] != Action.FOLDED]
    table.add_row("output", report.output + ("" if report.written else "  (not written: verification failed)"))
    table.add_row("opset / GN as", f"{graph.opset} / {graph.gn_op} ({graph.exporter} exporter)")
    if report.lowering is not None and graph.group_norms:
        table.add_row("GN lowering, why", report.lowering.reason)
    size = "dynamic H/W" if graph.dynamic_size else "static H/W"
    batch = f"{'dynamic' if graph.dynamic_batch else 'static'} batch"
    batch = "one image" if graph.exporter == "torchscript" else batch
    table.add_row("input", f"{graph.input_shape} ({batch}, {size})")
    table.add_row("GroupNorm layers", str(graph.group_norms))
    if report.centring:
        table.add_row("GN centred (--center-groups)", centring_summary(report.centring))
    table.add_row("BN folded into conv/linear", f"{folded} of {len(report.folds)}" if report.folds else "none left")
    if kept:
        reasons = Counter(r["note"] for r in kept)
        table.add_row("BN* kept as Mul+Add (why)", "; ".join(f"{n} {r}" for r, n in reasons.items()))
    table.add_row("onnx.checker", graph.checker)
    top = ", ".join(f"{k} {v}" for k, v in sorted(graph.op_counts.items(), key=lambda kv: -kv[1])[:8])
    table.add_row("nodes", top)
    table.add_row("timings (s)", ", ".join(f"{k} {v:.2f}" for k, v in report.timings.items()))
    return table


def like_summary(like: dict) -> str:
    """One line for ``convert --like``: what was matched and how closely the target computes the same."""
    same = "bit-identical" if like["bit_identical"] else f"max abs {like['max_abs']:.2e}, max rel {like['max_rel']:.2e}"
    eps = f"; eps taken from the target at {len(like['eps_from_target'])} layer(s)" if like["eps_from_target"] else ""
    return (
        f"{like['target']}: G and eps of {like['layers_from_target']} layer(s) from it, strict load ok, "
        f"outputs {same}{eps}"
    )


def export_weights_table(report: ExportWeightsReport) -> Table:
    """What ``export-weights`` wrote, how it was proven, and the line that loads it in the target library."""
    table = Table(title=f"Weights for {report.target}", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("output", f"{report.output} ({report.tensors} tensors)")
    table.add_row("norm layers there", _pairs(report.norm_layers) or "not checked")
    if report.dropped:
        table.add_row("dropped", ", ".join(report.dropped))
    if report.verified:
        same = "bit-identical" if report.max_abs == 0 else f"max abs {report.max_abs:.2e}, max rel {report.max_rel:.2e}"
        table.add_row("verified", f"loaded into {report.target} from the file, G/eps per layer match, outputs {same}")
    else:
        table.add_row("verified", "[yellow]no[/]")
    for note in report.notes:
        table.add_row("note", note)
    table.add_row("load it with", report.usage)
    return table


def centring_summary(rows: list[dict]) -> str:
    """``--center-groups`` in one line: how many GN layers were centred, κ before -> after (worst
    layer), the whole model's drift, and why the rest were kept."""
    centred = [r for r in rows if r["action"] == "centred"]
    text = f"{len(centred)} of {len(rows)}"
    if centred:
        before = max(r.get("kappa_before", 1.0) for r in centred)
        after = max(r.get("kappa_after", 1.0) for r in centred)
        drift = rows[0].get("model_drift", 0.0)
        text += f"; kappa on the probe {before:.3g} -> {after:.3g} (worst layer); model drift {drift:.1e}"
    kept = Counter(r["note"] for r in rows if r["action"] != "centred")
    if kept:
        text += "; kept: " + "; ".join(f"{n} {why}" for why, n in kept.items())
    return text


def _pairs(mapping: dict, prefix: str = "") -> str:
    return ", ".join(f"{prefix}{k}: {v}" for k, v in mapping.items())


def write_json(path: str | Path, data: dict) -> Path:
    return write_text_atomically(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
