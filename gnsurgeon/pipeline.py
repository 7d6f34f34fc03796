"""The whole workflow from one recipe: convert (+ calibrate) -> finetune -> export-onnx (verified).

``run_recipe`` runs the stages a recipe has sections for, writes each stage's artifact and JSON
report into one output folder, and records what it finished in ``run-state.json``. Re-running the
same command skips every stage whose inputs and options are unchanged and whose artifact is still
there, so an interrupted run resumes from the last finished stage (and finetune itself resumes
from its last periodic state). Every stage's options are resolved (:func:`gnsurgeon.options.resolve`)
before the first stage starts, so a typo in the export section costs a second, not a fine-tune.

Stage: the workflow, above every stage. It imports: checkpoint, conversion, errors, files,
finetuning, onnx_export, onnx_verify, options, recipes, report, sources.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from . import __version__
from .checkpoint import read_checkpoint
from .conversion import ConvertOptions, convert_source
from .errors import GNSurgeonError, VerificationError
from .files import write_text_atomically
from .finetuning import FinetuneOptions, finetune
from .onnx_export import ExportOptions, export_onnx
from .options import build, given, merge, resolve
from .recipes import Recipe
from .report import step_progress, write_json
from .sources import SourceOptions


@dataclass
class RunReport:
    """Per stage: what ran (or was skipped as already done), its artifact and report, and time."""

    recipe: str
    source: str
    outdir: str
    stages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "command": "run",
            "gnsurgeon_version": __version__,
            "recipe": self.recipe,
            "source": self.source,
            "outdir": self.outdir,
            "stages": self.stages,
        }


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: str | None) -> list | None:
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def stage_result(name: str, report: dict) -> str:
    """One line per stage for the run table: what the stage achieved, from its report."""
    if name == "convert":
        text = ", ".join(f"{n} {a}" for a, n in report["summary"]["actions"].items())
        cal = report.get("calibration")
        if cal and cal.get("after"):
            text += (
                f"; calibrated: top-1 agreement with BN {cal['before']['top1_agreement']:.1f}% -> "
                f"{cal['after']['top1_agreement']:.1f}% (held-out)"
            )
        return text
    if name == "finetune":
        before, after, teacher = report.get("before") or {}, report.get("after") or {}, report.get("teacher") or {}
        if before.get("top1") is not None and after.get("top1") is not None:
            text = f"val top-1 {before['top1']:.2f}% -> {after['top1']:.2f}%"
            if teacher.get("top1") is not None:
                text += f" (BN teacher {teacher['top1']:.2f}%)"
            return text
        if before.get("teacher_agreement") is not None and after.get("teacher_agreement") is not None:
            task = report["settings"].get("task", "classification")  # agreement per pixel / box F1 (dense tasks)
            b, a = before["teacher_agreement"], after["teacher_agreement"]
            return f"{task}: agreement with the BN teacher {b:.2f}% -> {a:.2f}%"
        return f"{report.get('steps', '?')} steps"
    if name == "export":
        verification = report.get("verification") or {}
        layers = len(verification.get("layers") or [])
        return f"verified in onnxruntime: whole model + {layers} GN layers" if report.get("ok") else "NOT verified"
    return ""




@dataclass
class RunStages:
    """Every stage's options and fingerprint for one run, resolved before the first stage starts.

    A fingerprint covers a stage's inputs (the previous stage's fingerprint, the recipe values with
    their ``--set`` overrides, the image folders) so that a changed option re-runs that stage and
    the ones after it, and nothing before it.
    """

    convert: ConvertOptions
    convert_fp: str
    finetune: FinetuneOptions | None = None
    finetune_fp: str | None = None
    export: ExportOptions | None = None
    export_fp: str | None = None


def _source_options(value: SourceOptions | dict | None) -> SourceOptions:
    """``run_recipe``'s ``source_options``: a SourceOptions, or a dict of its fields (checked)."""
    if value is None:
        return SourceOptions()
    if isinstance(value, SourceOptions):
        return value
    if isinstance(value, dict):
        return build(SourceOptions, given(value), "source_options", "source")
    raise GNSurgeonError(f"source_options must be a SourceOptions or a dict, got {type(value).__name__}")


def resolve_stages(
    recipe: Recipe, source: str, out: Path, data: str | None, val: str | None, source_options: SourceOptions
) -> RunStages:
    """The options of every stage ``recipe`` has a section for (convert always runs), with the
    run's own values on top: the source options, ``--data``/``--val``, the training state's name."""
    source_flags = {f.name: getattr(source_options, f.name) for f in fields(SourceOptions)}
    convert = resolve(ConvertOptions, recipe=recipe, section="convert", flags=source_flags, images=data)
    stages = RunStages(convert, _fingerprint(source, convert.__dict__, _file_id(convert.weights)))
    if recipe.has("finetune"):
        fp = _fingerprint(stages.convert_fp, merge([v for v, _ in recipe.layers("finetune")]), data, val)
        # The training state is named by its inputs: a re-run with other options starts afresh,
        # an interrupted run with the same options resumes where it stopped.
        run_flags = {"state": str(out / f"finetune-{fp}.state.pt"), "metrics": str(out / "finetune-metrics.jsonl")}
        flags = {"data": data, "val": val, "resume": True, **run_flags}
        stages.finetune = resolve(FinetuneOptions, recipe=recipe, section="finetune", flags=flags)
        stages.finetune_fp = fp
        if not data:
            raise GNSurgeonError(f"{recipe.origin} fine-tunes: give the training images with --data DIR")
    if recipe.has("export"):
        stages.export = resolve(ExportOptions, recipe=recipe, section="export")
        last_fp = stages.finetune_fp or stages.convert_fp
        stages.export_fp = _fingerprint(last_fp, merge([v for v, _ in recipe.layers("export")]), val or data)
    return stages


STAGES = ("convert", "finetune", "export")
# What each stage writes into the run folder: its artifact, its report, its own bookkeeping.
STAGE_FILES = {
    "convert": ("converted.safetensors", "convert.json"),
    "finetune": ("finetuned.safetensors", "finetune.json", "finetune-metrics.jsonl", "finetune-*.state.pt"),
    "export": ("model.onnx", "export.json"),
}


class StageRunner:
    """Runs one stage unless ``run-state.json`` says it is done with the same fingerprint and its
    artifact is still there; records it in the run's report and state file when it finishes.

    A stage that runs invalidates itself and every stage after it first: their entries leave
    ``run-state.json`` and their files leave the folder, so a run that fails half-way never leaves
    an earlier run's ``model.onnx`` next to a new fine-tuned checkpoint, or a state file that calls
    it done. Only what lets the running stage resume (``keep``: its training state, its metrics)
    stays."""

    def __init__(self, out: Path, report: RunReport, callback: Callable[[str], None] | None):
        self.out, self.report, self.callback = out, report, callback
        self.state_path = out / "run-state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def invalidate(self, name: str, keep: tuple[Path, ...] = ()) -> list[str]:
        """Forget stage ``name`` and the stages after it: state entries and files (but ``keep``);
        returns the names of the files removed."""
        later = STAGES[STAGES.index(name) :]
        kept = {p.resolve() for p in keep}
        removed = []
        for stage in later:
            for pattern in STAGE_FILES[stage]:
                for path in sorted(self.out.glob(pattern)):
                    if path.is_file() and path.resolve() not in kept:
                        path.unlink()
                        removed.append(path.name)
        if any(self.state.pop(stage, None) is not None for stage in later):
            write_text_atomically(self.state_path, json.dumps(self.state, indent=2))
        return removed

    def run(
        self, name: str, fingerprint: str, artifact: Path, work: Callable[[], object], keep: tuple[Path, ...] = ()
    ) -> None:
        done = self.state.get(name, {})
        if done.get("fingerprint") == fingerprint and artifact.exists():
            self.report.stages.append({**done, "status": "skipped (already done)"})
            return
        if self.callback:
            self.callback(name)
        self.invalidate(name, keep)
        start = time.perf_counter()
        result = work()
        entry = {
            "stage": name,
            "fingerprint": fingerprint,
            "artifact": str(artifact),
            "report": str(self.out / f"{name}.json"),
            "seconds": round(time.perf_counter() - start, 2),
            "result": stage_result(name, result.to_dict()),
        }
        write_json(self.out / f"{name}.json", result.to_dict())
        self.state[name] = entry
        write_text_atomically(self.state_path, json.dumps(self.state, indent=2))
        self.report.stages.append({**entry, "status": "done"})


def _export(checkpoint: Path, onnx_path: Path, options: ExportOptions, images: str | None, show: bool):
    """Export and verify; real images check the export too where the model eats images (not clips).
    A failed verification writes its report and stops the run (exit 1)."""
    image_model = len(read_checkpoint(checkpoint).data_config.input_size) == 3
    options = replace(options, checks=replace(options.checks, data=images if image_model else None))
    with step_progress(f"exporting {checkpoint.name} to ONNX and verifying it", enabled=show):
        result = export_onnx(str(checkpoint), onnx_path, options)
    if not result.ok:
        write_json(onnx_path.parent / "export.json", result.to_dict())
        why = result.verification.headline() if result.verification else "see the report"
        report = onnx_path.parent / "export.json"
        raise VerificationError(f"ONNX verification failed, {onnx_path.name} not written: {why} (report: {report})")
    return result


def _finetune(start: Path, finetuned: Path, options: FinetuneOptions, progress):
    """Fine-tune; once the stage has finished its training state (~ the model + optimizer, hundreds
    of MB) only served resuming, so it goes (it stays when the stage fails or is interrupted)."""
    result = finetune(start, finetuned, options, progress=progress)
    state = Path(options.state)
    if state.is_file():
        state.unlink()
        result.notes.append(f"training state {state.name} removed: the stage finished")
    return result


def run_recipe(
    recipe: str | Path,
    source: str,
    outdir: str | Path,
    *,
    data: str | None = None,
    val: str | None = None,
    source_options: SourceOptions | dict | None = None,
    overrides: list[str] | None = None,
    stage_callback: Callable[[str], None] | None = None,
    progress=None,
) -> RunReport:
    """Run every stage ``recipe`` has a section for on ``source``; artifacts go to ``outdir``.

    ``source_options``: how to open ``source`` (weights, constructor options, input size), as
    :class:`~gnsurgeon.SourceOptions` or a dict of its fields. ``overrides``: ``SECTION.KEY=VALUE``
    strings, as ``--set``. ``progress``: a rich Console on which calibration and fine-tuning show
    progress (bars on a terminal, plain lines in a log).
    """
    parsed = Recipe.read(recipe, list(overrides or []))
    out = Path(outdir)
    stages = resolve_stages(parsed, source, out, data, val, _source_options(source_options))
    if out.exists() and not out.is_dir():
        raise GNSurgeonError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    report = RunReport(str(recipe), source, str(out))
    runner = StageRunner(out, report, stage_callback)
    converted = out / "converted.safetensors"

    def convert():
        with step_progress(f"converting {source}", enabled=progress is not None) as tick:
            return convert_source(source, converted, stages.convert, progress=tick)

    runner.run("convert", stages.convert_fp, converted, convert)
    last = converted
    if stages.finetune is not None:  # `teacher: source` distils from the BN original the checkpoint records
        finetuned, start = out / "finetuned.safetensors", last
        resumable = (Path(stages.finetune.state), Path(stages.finetune.metrics))  # an interrupted run continues
        runner.run(
            "finetune",
            stages.finetune_fp,
            finetuned,
            lambda: _finetune(start, finetuned, stages.finetune, progress),
            keep=resumable,
        )
        last = finetuned
    if stages.export is not None:
        onnx_path, start = out / "model.onnx", last
        show = progress is not None
        runner.run(
            "export", stages.export_fp, onnx_path, lambda: _export(start, onnx_path, stages.export, val or data, show)
        )
    return report
