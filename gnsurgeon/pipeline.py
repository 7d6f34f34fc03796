"""The whole workflow from one recipe: convert (+ calibrate) -> finetune -> export-onnx (verified).

``run_recipe`` runs the stages a recipe has sections for, writes each stage's artifact and JSON
report into one output folder, and records what it finished in ``run-state.json``. Re-running the
same command skips every stage whose inputs and options are unchanged and whose artifact is still
there, so an interrupted run resumes from the last finished stage (and finetune itself resumes
from its last periodic state).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .checkpoint import read_checkpoint
from .conversion import ConvertOptions, convert_source
from .errors import GNSurgeonError, VerificationError
from .files import write_text_atomically
from .recipes import check_section_keys, read_recipe

# Keys of the recipe's ``export`` section: ExportOptions fields, then VerifyOptions fields.
EXPORT_KEYS = ("opset", "gn_op", "dynamic_batch", "verify")
VERIFY_KEYS = ("atol", "rtol", "model_rtol", "batch", "max_images", "stress")
_EXCLUSIVE = {"steps": "epochs", "epochs": "steps", "groups": "channels_per_group", "channels_per_group": "groups"}
SOURCE_KEYS = (
    "weights",
    "pretrained",
    "num_classes",
    "in_chans",
    "model_kwargs",
    "input_size",
    "mean",
    "std",
    "crop_pct",
)


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


def apply_overrides(sections: dict[str, dict], overrides: list[str]) -> dict[str, dict]:
    """``section.key=value`` strings (values as YAML scalars) on top of the recipe's sections."""
    import yaml

    out = {k: dict(v) for k, v in sections.items()}
    for item in overrides:
        target, sep, raw = item.partition("=")
        section, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise GNSurgeonError(f"--set {item!r} is not SECTION.KEY=VALUE (e.g. finetune.steps=100)")
        if section not in ("convert", "finetune", "export"):
            raise GNSurgeonError(f"--set {item!r}: unknown section {section!r} (convert, finetune, export)")
        if section not in out:
            raise GNSurgeonError(f"--set {item!r}: the recipe has no {section!r} section to override")
        out[section][key] = yaml.safe_load(raw)
        rival = _EXCLUSIVE.get(key)
        if rival:  # e.g. --set finetune.steps=100 replaces the recipe's `epochs`
            out[section].pop(rival, None)
    return out


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
        return f"{report.get('steps', '?')} steps"
    if name == "export":
        verification = report.get("verification") or {}
        layers = len(verification.get("layers") or [])
        return f"verified in onnxruntime: whole model + {layers} GN layers" if report.get("ok") else "NOT verified"
    return ""


def run_recipe(
    recipe: str | Path,
    source: str,
    outdir: str | Path,
    *,
    data: str | None = None,
    val: str | None = None,
    source_options: dict | None = None,
    overrides: list[str] | None = None,
    stage_callback=None,
    progress=None,
) -> RunReport:
    """Run every stage ``recipe`` has a section for on ``source``; artifacts go to ``outdir``.

    ``progress``: a rich Console on which calibration and fine-tuning draw progress bars.
    """
    from .finetune import FinetuneOptions, finetune
    from .onnx_export import ExportOptions, export_onnx
    from .onnx_verify import VerifyOptions
    from .report import step_progress, write_json

    recipe = str(recipe)
    sections = apply_overrides(read_recipe(recipe), overrides or [])
    source_options = {k: v for k, v in (source_options or {}).items() if v is not None}
    check_section_keys("convert", sections.get("convert", {}), ConvertOptions.RECIPE_KEYS, recipe)
    check_section_keys("finetune", sections.get("finetune", {}), FinetuneOptions.RECIPE_KEYS, recipe)
    check_section_keys("export", sections.get("export", {}), EXPORT_KEYS + VERIFY_KEYS, recipe)
    bad_source = set(source_options) - set(SOURCE_KEYS)
    if bad_source:
        raise GNSurgeonError(f"unknown source option(s) {', '.join(sorted(bad_source))}")
    if "finetune" in sections and not data:
        raise GNSurgeonError(f"recipe {recipe} fine-tunes: give the training images with --data DIR")

    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise GNSurgeonError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "run-state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    report = RunReport(recipe, source, str(out))

    def stage(name: str, fingerprint: str, artifact: Path, work) -> None:
        done = state.get(name, {})
        if done.get("fingerprint") == fingerprint and artifact.exists():
            report.stages.append({**done, "status": "skipped (already done)"})
            return
        if stage_callback:
            stage_callback(name)
        start = time.perf_counter()
        result = work()
        entry = {
            "stage": name,
            "fingerprint": fingerprint,
            "artifact": str(artifact),
            "report": str(out / f"{name}.json"),
            "seconds": round(time.perf_counter() - start, 2),
            "result": stage_result(name, result.to_dict()),
        }
        write_json(out / f"{name}.json", result.to_dict())
        state[name] = entry
        write_text_atomically(state_path, json.dumps(state, indent=2))
        report.stages.append({**entry, "status": "done"})

    # 1. convert (and calibrate: `calibrate: true` in the recipe means "on the --data images")
    convert_body = dict(sections.get("convert", {}))
    if convert_body.get("calibrate") is True:
        if not data:
            raise GNSurgeonError(f"recipe {recipe} calibrates: give the images with --data DIR")
        convert_body["calibrate"] = data
    elif convert_body.get("calibrate") is False:
        convert_body.pop("calibrate")
    convert_options = ConvertOptions.from_mapping({**convert_body, **source_options}, f"recipe {recipe}")
    converted = out / "converted.safetensors"
    convert_fp = _fingerprint(source, convert_options.__dict__, _file_id(convert_options.weights))

    def convert():
        with step_progress(f"converting {source}", enabled=progress is not None) as tick:
            return convert_source(source, converted, convert_options, progress=tick)

    stage("convert", convert_fp, converted, convert)
    last, last_fp = converted, convert_fp

    # 2. finetune (`teacher: source` distils from the BN original the checkpoint records)
    if "finetune" in sections:
        body = dict(sections["finetune"])
        finetuned = out / "finetuned.safetensors"
        ft_fp = _fingerprint(last_fp, body, data, val)
        # The training state is named by its inputs: a re-run with other options starts afresh,
        # an interrupted run with the same options resumes where it stopped.
        ft_options = FinetuneOptions(
            **body,
            data=data,
            val=val,
            state=str(out / f"finetune-{ft_fp}.state.pt"),
            metrics=str(out / "finetune-metrics.jsonl"),
            resume=True,
        )
        stage("finetune", ft_fp, finetuned, lambda: finetune(last, finetuned, ft_options, progress=progress))
        last, last_fp = finetuned, ft_fp

    # 3. export-onnx with verification (a failed verification stops the run with exit 1)
    if "export" in sections:
        body = sections["export"]
        # Real images check the export too, where the model eats images (not video clips).
        image_model = len(read_checkpoint(last).data_config.input_size) == 3
        images = (val or data) if image_model else None
        checks = VerifyOptions(**{k: body[k] for k in VERIFY_KEYS if k in body}, data=images)
        ex_options = ExportOptions(**{k: body[k] for k in EXPORT_KEYS if k in body}, checks=checks)
        onnx_path = out / "model.onnx"
        ex_fp = _fingerprint(last_fp, body, val or data)

        def export():
            result = export_onnx(str(last), onnx_path, ex_options)
            if not result.ok:
                write_json(out / "export.json", result.to_dict())
                raise VerificationError(f"ONNX verification failed; see {out / 'export.json'}")
            return result

        stage("export", ex_fp, onnx_path, export)
    return report
