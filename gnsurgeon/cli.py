"""The ``gnsurgeon`` command line: parse, resolve options, call one library function, render.

Flags default to ``None`` so that a recipe's values apply unless a flag is given explicitly; every
command builds its options with :func:`gnsurgeon.options.resolve` (recipe < ``--set`` < flags).
Exit codes: 0 success, 1 a verification failed, 2 bad input (one sentence, no traceback).

The stage modules (torch, timm, onnx) are imported inside the command that needs them, the one
place in the package where imports are lazy: ``gnsurgeon --help`` and a mistyped flag answer at
once instead of after seconds of imports.

Stage: the command line, above everything. It imports: errors, options, recipes, report at startup;
conversion, finetuning, onnx_export, onnx_verify, pipeline, sources inside the commands.
"""

from __future__ import annotations

import ast
import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import GNSurgeonError, VerificationError
from .files import check_output, check_output_dir
from .options import resolve
from .recipes import Recipe
from .report import (
    calibration_summary,
    calibration_table,
    console,
    err_console,
    export_table,
    export_weights_table,
    finetune_table,
    fold_table,
    like_summary,
    plan_table,
    render_verification,
    run_table,
    step_progress,
    summary_table,
    write_json,
)

app = typer.Typer(
    name="gnsurgeon",
    help="BatchNorm -> GroupNorm surgery on timm/torchvision models, with weights kept and results verified.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# ------------------------------------------------------------------------------------ shared options
Source = Annotated[str, typer.Argument(help="timm:NAME, torchvision:NAME, or a gnsurgeon checkpoint.")]
Groups = Annotated[int | None, typer.Option("--groups", help="Fixed number of groups G (default 32).")]
Cpg = Annotated[int | None, typer.Option("--channels-per-group", help="Fixed channels per group K.")]
MinCpg = Annotated[
    int | None, typer.Option("--min-group-channels", help="Floor on C/G (default 2; 1 allows InstanceNorm).")
]
Strict = Annotated[
    bool | None,
    typer.Option("--strict/--no-strict", help="Make any group fallback, or option matching nothing, an error."),
]
Only = Annotated[list[str] | None, typer.Option("--only", help="Convert only layers matching this glob.")]
Skip = Annotated[list[str] | None, typer.Option("--skip", help="Leave layers matching this glob alone.")]
Include1d = Annotated[bool | None, typer.Option("--include-1d/--no-include-1d", help="Also convert BatchNorm1d.")]
Freeze = Annotated[
    list[str] | None, typer.Option("--freeze", help="Freeze matching layers into BN* (glob; '*' = all).")
]
Fold = Annotated[bool | None, typer.Option("--fold/--no-fold", help="Fold BN* into its conv/linear where exact.")]
Calibrate = Annotated[
    Path | None, typer.Option("--calibrate", help="Image folder: fit GN so the model matches its BN original.")
]
CalibSamples = Annotated[int | None, typer.Option("--calib-samples", help="Images used to calibrate (256).")]
CalibMethod = Annotated[
    str | None,
    typer.Option("--calib-method", help="block (default: layer fit, block tuning, end-to-end pass) or layer."),
]
CalibSteps = Annotated[int | None, typer.Option("--calib-steps", help="Reconstruction steps per block (150).")]
CalibFinalSteps = Annotated[
    int | None,
    typer.Option(
        "--calib-final-steps",
        help="End-to-end logits-matching steps (0: off). Default: 300 where some GN group holds fewer than "
        "512 values per image (C/G x H x W), else off.",
    ),
]
CalibDevice = Annotated[
    str | None, typer.Option("--calib-device", help="Where to calibrate: auto (CUDA when present), cpu, cuda:N.")
]
CalibCache = Annotated[
    str | None,
    typer.Option("--calib-cache", help="Block activations: auto (RAM, float16, disk, else stream), off, ram, disk."),
]
CalibCacheMem = Annotated[
    str | None, typer.Option("--calib-cache-mem", help="Cache budget: a size (8G) or share of free memory (50%).")
]
MaxFrozen = Annotated[
    str | None,
    typer.Option(
        "--max-frozen",
        help="Keep up to this many GN layers (3, or 10%) as BN* where GN measurably fails (needs --calibrate; "
        "default 40% with it, 0 turns it off).",
    ),
]
FrozenRank = Annotated[
    str | None,
    typer.Option(
        "--frozen-rank",
        help="Which failing layers --max-frozen keeps: position (the earliest, default) or fit (the worst).",
    ),
]
BnFree = Annotated[
    bool | None, typer.Option("--bn-free/--no-bn-free", help="Fail unless no batch norm of any kind remains.")
]
Like = Annotated[
    str | None,
    typer.Option("--like", help="Take each layer's G and eps from this GN model (timm:resnet50_gn), then verify."),
]
NoInplace = Annotated[
    bool | None,
    typer.Option("--no-inplace/--inplace", help="Turn in-place activations off (opacus' per-sample gradients)."),
]
Weights = Annotated[Path | None, typer.Option("--weights", help=".safetensors, or .pth/.pt/.bin state dict.")]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="Use the library's own pretrained weights.")]
NumClasses = Annotated[int | None, typer.Option("--num-classes", help="Constructor num_classes.")]
InChans = Annotated[int | None, typer.Option("--in-chans", help="Constructor in_chans (timm).")]
ModelKwargs = Annotated[str | None, typer.Option("--model-kwargs", help="Constructor kwargs: k=v,k2=v2.")]
InputSize = Annotated[str | None, typer.Option("--input-size", help="C,H,W (or C,T,H,W) for probes.")]
Mean = Annotated[str | None, typer.Option("--mean", help="Normalisation mean, comma separated.")]
Std = Annotated[str | None, typer.Option("--std", help="Normalisation std, comma separated.")]
CropPct = Annotated[float | None, typer.Option("--crop-pct", help="Eval center-crop fraction (data config).")]
RecipePath = Annotated[Path | None, typer.Option("--recipe", help="YAML/TOML recipe; flags override it.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")]


def _interrupted(how: str) -> None:
    """Ctrl-C in a long command: exit 130 (128 + SIGINT, as shells expect) saying how to go on."""
    err_console.print(f"[bold yellow]interrupted[/] — {how}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _fail(exc: GNSurgeonError, json_out: Path | None = None, command: str = "") -> None:
    """Print the one-sentence error and exit (1: a check failed, 2: bad input); with ``--json``, the
    report file says so too: ``{"command", "ok": false, "exit_code", "error"}``."""
    code = 1 if isinstance(exc, VerificationError) else 2
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    if json_out is not None:
        failure = {"command": command, "gnsurgeon_version": __version__, "ok": False, "exit_code": code}
        with contextlib.suppress(GNSurgeonError):
            write_json(json_out, {**failure, "error": str(exc)})
    raise typer.Exit(code)


@contextlib.contextmanager
def _reporting(command: str, json_out: Path | None, resume_hint: str | None = None):
    """Run a command's body: ``--json`` is checked before anything else (a typo costs a second, not
    a calibration), and every GNSurgeonError inside becomes one sentence, an exit code and, with
    ``--json``, a failure report (the same file a success writes, with ``"ok": false``). With
    ``resume_hint``, Ctrl-C exits 130 saying how to continue."""
    try:
        checked = check_output(json_out, option="--json") if json_out is not None else None
    except GNSurgeonError as exc:
        _fail(exc)
    try:
        yield
    except GNSurgeonError as exc:
        _fail(exc, checked, command)
    except KeyboardInterrupt:
        if resume_hint is None:
            raise
        _interrupted(resume_hint)


def _write_report(json_out: Path | None, data: dict) -> None:
    """The success report: every command's JSON says ``"ok"`` (true unless the report says otherwise)."""
    if json_out is not None:
        write_json(json_out, {"ok": True, **data} if "ok" not in data else data)


def parse_model_kwargs(text: str | None) -> dict:
    """``"drop_rate=0.1,img_size=(160,160),act='relu'"`` -> dict. Values are Python literals, strings
    quoted: an unquoted ``act=relu`` is an error naming the key rather than a string that some
    constructors take and others reject much later (at the probe, after ``--dry-run`` said ok)."""
    if not text:
        return {}
    items, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    out = {}
    for item in filter(None, (i.strip() for i in items)):
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier():
            raise GNSurgeonError(f"--model-kwargs item {item!r} is not key=value")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise GNSurgeonError(
                f"--model-kwargs {key}={raw} is not a Python literal; quote strings ({key}={raw!r})"
            ) from None
    return out


def parse_floats(text: str | None, option: str, length: int | None = None) -> tuple[float, ...] | None:
    """``"0.5,0.5,0.5"`` (or ``3x224x224``) -> floats; None when the flag was not given."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise GNSurgeonError(f"{option} {text!r} is not a comma-separated list of numbers") from None
    if not values or (length is not None and len(values) != length):
        raise GNSurgeonError(f"{option} {text!r} needs {length or 'some'} comma-separated numbers")
    return values


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    values = parse_floats(text, "--input-size")
    if values is None:
        return None
    if len(values) not in (3, 4) or any(v < 1 or v != int(v) for v in values):
        raise GNSurgeonError(f"--input-size {text!r} must be C,H,W (or C,T,H,W for video) positive integers")
    return tuple(int(v) for v in values)


def _source_flags(values: dict) -> dict:
    """The source flags (weights, constructor options, data-config overrides) as SourceOptions
    fields, their strings parsed; a flag that was not given is None."""
    return {
        "weights": values.get("weights"),
        "pretrained": values.get("pretrained") or None,
        "num_classes": values.get("num_classes"),
        "in_chans": values.get("in_chans"),
        "model_kwargs": parse_model_kwargs(values.get("model_kwargs")),
        "input_size": parse_input_size(values.get("input_size")),
        "mean": parse_floats(values.get("mean"), "--mean"),
        "std": parse_floats(values.get("std"), "--std"),
        "crop_pct": values.get("crop_pct"),
    }


def _picked(cls, values: dict) -> dict:
    """The command's option values that are fields of the options dataclass ``cls``."""
    return {k: v for k, v in values.items() if k in cls.__dataclass_fields__}


def _recipe(path: Path | None) -> Recipe | None:
    return Recipe.read(path) if path is not None else None


@app.command()
def convert(
    source: Source,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output .safetensors.")] = None,
    groups: Groups = None,
    channels_per_group: Cpg = None,
    min_group_channels: MinCpg = None,
    strict: Strict = None,
    only: Only = None,
    skip: Skip = None,
    include_1d: Include1d = None,
    freeze: Freeze = None,
    fold: Fold = None,
    calibrate: Calibrate = None,
    calib_samples: CalibSamples = None,
    calib_method: CalibMethod = None,
    calib_steps: CalibSteps = None,
    calib_final_steps: CalibFinalSteps = None,
    calib_device: CalibDevice = None,
    calib_cache: CalibCache = None,
    calib_cache_mem: CalibCacheMem = None,
    max_frozen: MaxFrozen = None,
    frozen_rank: FrozenRank = None,
    bn_free: BnFree = None,
    like: Like = None,
    no_inplace: NoInplace = None,
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    model_kwargs: ModelKwargs = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    crop_pct: CropPct = None,
    recipe: RecipePath = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")] = False,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Skip the probe-input check.")] = False,
    json_out: JsonOut = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary.")] = False,
) -> None:
    """Rewrite SOURCE from BatchNorm to GroupNorm and save one checkpoint."""
    values = dict(locals())
    with _reporting("convert", json_out):
        if output is not None and not dry_run:
            check_output(output, ".safetensors", option="-o")
        source_flags = _source_flags(values)
        from .conversion import ConvertOptions, convert_source

        flags = {**_picked(ConvertOptions, values), **source_flags, "probe": not no_probe}
        options = resolve(
            ConvertOptions, recipe=_recipe(recipe), section="convert", flags=flags, images_flag="--calibrate DIR"
        )
        with step_progress(f"converting {source}", enabled=not quiet) as progress:
            report = convert_source(source, output, options, dry_run=dry_run, progress=progress)
    _print_warnings(report.warnings)
    if not quiet or dry_run:
        console.print(plan_table(report.plan, f"Plan for {source}"))
    extra = {}
    if report.probe:
        cos = report.probe["output_cosine"]
        compared = report.probe["compared"]
        extra["probe"] = f"ok: output {compared} equal, outputs finite, no selected BN left" + (
            f" (output cosine vs original {cos:.4f})" if cos is not None else ""
        )
    if report.fold_check:
        if not quiet:
            console.print(fold_table(report.fold_check))
        out = report.fold_check["output"]
        extra["freeze/fold check"] = f"ok: within rtol {report.fold_check['rtol']:g}" + (
            f" (output max abs {out['max_abs']:.2e}, max rel {out['max_rel']:.2e})" if out else ""
        )
    if report.calibration:
        cal = report.calibration
        if not quiet:
            console.print(calibration_table(cal))
        extra["calibration"] = calibration_summary(cal)
    if report.like:
        extra["like"] = like_summary(report.like)
    if report.max_frozen:
        mf = report.max_frozen
        how = "the default with --calibrate; --max-frozen 0 keeps GN everywhere" if mf["default"] else "--max-frozen"
        first = "earliest" if mf["rank"] == "position" else "worst fit"
        extra[f"BN* where GN fails ({first} first)"] = f"{len(mf['kept'])} layer(s), budget {mf['budget']} ({how})"
    if report.inplace_off is not None:
        extra["in-place activations"] = f"{report.inplace_off} turned off" if report.inplace_off else "none were on"
    extra["timings (s)"] = ", ".join(f"{k} {v:.3f}" for k, v in report.timings.items())
    extra["output"] = report.output or "(dry run: nothing written)"
    console.print(summary_table(report.summary, extra))
    with _reporting("convert", json_out):
        _write_report(json_out, report.to_dict())


def _print_warnings(warnings: list[str]) -> None:
    """Options that matched or changed nothing: one line each on stderr (and in the JSON report)."""
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


@app.command()
def inspect(
    source: Source,
    groups: Groups = None,
    channels_per_group: Cpg = None,
    min_group_channels: MinCpg = None,
    strict: Strict = None,
    only: Only = None,
    skip: Skip = None,
    include_1d: Include1d = None,
    freeze: Freeze = None,
    fold: Fold = None,
    weights: Weights = None,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    model_kwargs: ModelKwargs = None,
    recipe: RecipePath = None,
    json_out: JsonOut = None,
) -> None:
    """Print every normalization layer of SOURCE or CHECKPOINT: kind, C, action, G, C/G, eps, note."""
    values = dict(locals())
    with _reporting("inspect", json_out):
        source_flags = _source_flags(values)
        from .conversion import ConvertOptions, inspect_source

        flags = {**_picked(ConvertOptions, values), **source_flags}
        options = resolve(
            ConvertOptions, recipe=_recipe(recipe), section="convert", flags=flags, images_flag="--calibrate DIR"
        )
        report = inspect_source(source, options)
    _print_warnings(report.warnings)
    what = "checkpoint" if report.is_checkpoint else "planned conversion of"
    console.print(plan_table(report.plan, f"Normalization layers ({what} {source})"))
    console.print(summary_table(report.plan.summary(), {"data config": report.data_config.to_dict()}))
    with _reporting("inspect", json_out):
        _write_report(json_out, report.to_dict())


# --- finetune command (issue 5) ---


@app.command("finetune")
def finetune_command(
    checkpoint: Annotated[Path, typer.Argument(help="A gnsurgeon checkpoint (.safetensors).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output .safetensors.")] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Training images/clips: class folders, or flat.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Validation images, evaluated before and after.")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: 1 epoch).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Epochs instead of --steps.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per step per process (8).")] = None,
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak lr (default: 0.02 sgd / 4e-4 adamw x batch / 32; x 0.2 if calibrated)."),
    ] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="sgd (default) or adamw.")] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum (0.9, Nesterov).")] = None,
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="On weights (1e-4 sgd, 0.01 adamw).")
    ] = None,
    norm_weight_decay: Annotated[
        float | None, typer.Option("--norm-weight-decay", help="On norm γ/β and biases (0).")
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", help="Linear warmup (5% of steps).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per step (1).")] = None,
    clip_grad: Annotated[float | None, typer.Option("--clip-grad", help="Clip the gradient norm (5; 0: off).")] = None,
    label_smoothing: Annotated[float | None, typer.Option("--label-smoothing", help="CE smoothing (0).")] = None,
    teacher: Annotated[
        str | None,
        typer.Option("--teacher", help="KD teacher: timm:/torchvision:NAME, a checkpoint, or 'source'."),
    ] = None,
    teacher_weights: Annotated[
        Path | None, typer.Option("--teacher-weights", help="The teacher's weights file.")
    ] = None,
    kd_temperature: Annotated[float | None, typer.Option("--kd-temperature", help="KD temperature T (1).")] = None,
    kd_weight: Annotated[float | None, typer.Option("--kd-weight", help="KD loss weight next to CE (1).")] = None,
    train_heads: Annotated[
        bool | None,
        typer.Option("--train-heads/--freeze-heads", help="Detection: also train heads conversion did not change."),
    ] = None,
    hflip: Annotated[float | None, typer.Option("--hflip", help="Horizontal flip probability (0.5).")] = None,
    min_crop_scale: Annotated[
        float | None, typer.Option("--min-crop-scale", help="Random resized crop scale floor (0.5).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for order, augmentation, init (0).")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (default), cpu or cuda.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="Data loader worker processes (2).")] = None,
    amp: Annotated[bool | None, typer.Option("--amp/--no-amp", help="Mixed precision (default: on for CUDA).")] = None,
    channels_last: Annotated[
        bool | None, typer.Option("--channels-last/--no-channels-last", help="NHWC (default: on for CUDA).")
    ] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    eval_batch_size: Annotated[int | None, typer.Option("--eval-batch-size", help="Evaluation batch (64).")] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="Steps per metrics line (10).")] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option("--checkpoint-every", help="Write the training state every N steps.")
    ] = None,
    checkpoint_minutes: Annotated[
        float | None, typer.Option("--checkpoint-minutes", help="...and every M minutes (5); always at the end.")
    ] = None,
    state: Annotated[Path | None, typer.Option("--state", help="Training state file (OUT.state.pt).")] = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", help="Metrics JSON lines (OUT.metrics.jsonl).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the training state, if any.")] = False,
    recipe: RecipePath = None,
    json_out: JsonOut = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Fine-tune CHECKPOINT on an image or clip folder: classifiers and video models with labels and/or
    distillation from the BN original, segmentation and detection models by distillation alone."""
    import os

    values = dict(locals())
    main_rank = int(os.environ.get("RANK", "0")) == 0
    # Ctrl-C keeps the training state written last: --resume continues from it (rank 0 says so).
    hint = "rerun the same command with --resume (it continues from the last training state saved)"
    with _reporting("finetune", json_out if main_rank else None, hint if main_rank else None):
        if output is None:
            raise GNSurgeonError("an output file is required (-o OUT.safetensors)")
        check_output(output, ".safetensors", option="-o")
        from .finetuning import FinetuneOptions, finetune

        flags = _picked(FinetuneOptions, values)
        options = resolve(FinetuneOptions, recipe=_recipe(recipe), section="finetune", flags=flags)
        report = finetune(checkpoint, output, options, progress=None if quiet else err_console)
    if not main_rank:
        return
    for note in report.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(finetune_table(report))
    with _reporting("finetune", json_out):
        _write_report(json_out, report.to_dict())


# --- export-onnx / verify-onnx commands (issue 6) ---
DataDir = Annotated[Path | None, typer.Option("--data", help="Image folder: also compare on real images.")]
MaxImages = Annotated[int | None, typer.Option("--max-images", help="Images used from --data (8).")]
Batch = Annotated[int | None, typer.Option("--batch", help="The batch > 1 checked (whole model and stress inputs; 3).")]
Atol = Annotated[float | None, typer.Option("--atol", help="Absolute error allowed everywhere (1e-5).")]
Rtol = Annotated[
    float | None, typer.Option("--rtol", help="Per-GN-layer relative error, scaled by kappa*sqrt(group size) (1e-6).")
]
ModelRtol = Annotated[
    float | None, typer.Option("--model-rtol", help="Relative error allowed on whole-model outputs (1e-4).")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only failing layers and the summary.")]
ExportRecipe = Annotated[
    Path | None, typer.Option("--recipe", help="YAML/TOML recipe: its export section; flags override it.")
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="onnxruntime threads for the checks and auto's timing (0: its default)."),
]


def _onnx_options(values: dict, recipe: Path | None):
    """ExportOptions (with its nested VerifyOptions) from the recipe's ``export`` section and the flags.

    verify-onnx takes the ``checks`` part: the same section, so that a recipe's tolerances apply to
    a file checked later exactly as they did at export.
    """
    from .onnx_export import ExportOptions
    from .onnx_verify import VerifyOptions

    flags = {**_picked(VerifyOptions, values), **_picked(ExportOptions, values)}
    return resolve(ExportOptions, recipe=_recipe(recipe), section="export", flags=flags)


def _source_options(source_flags: dict):
    """SourceOptions from :func:`_source_flags`' parsed values."""
    from .sources import SourceOptions

    return resolve(SourceOptions, flags=source_flags)


def _verification_failed(report, extra: str = "") -> None:
    err_console.print(f"[bold red]verification failed:[/] {report.headline()}{extra}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@app.command("export-onnx")
def export_onnx_command(
    source: Source,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default 18, 21 for native GN).")] = None,
    gn_op: Annotated[
        str | None,
        typer.Option(
            "--gn-op",
            help="auto (default: the fastest form the installed onnxruntime computes exactly), decomposed "
            "(InstanceNormalization), layernorm (LayerNormalization over the groups) or native (GroupNormalization).",
        ),
    ] = None,
    dynamic_batch: Annotated[
        bool | None, typer.Option("--dynamic-batch/--static-batch", help="Dynamic batch axis (default) or batch 1.")
    ] = None,
    dynamic_size: Annotated[
        bool | None,
        typer.Option(
            "--dynamic-size/--static-size", help="Dynamic H and W (default for segmentation and detection models)."
        ),
    ] = None,
    center_groups: Annotated[
        bool | None,
        typer.Option(
            "--center-groups", help="Subtract each GN's per-group input mean in its producer's bias, where exact."
        ),
    ] = None,
    threads: Threads = None,
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    model_kwargs: ModelKwargs = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    data: DataDir = None,
    max_images: MaxImages = None,
    batch: Batch = None,
    atol: Atol = None,
    rtol: Rtol = None,
    model_rtol: ModelRtol = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the verification (not recommended).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write OUT.onnx even when verification fails.")] = False,
    recipe: ExportRecipe = None,
    json_out: JsonOut = None,
    quiet: Quiet = False,
) -> None:
    """Export SOURCE or CHECKPOINT to ONNX (BN folded, GN as asked) and verify it in onnxruntime."""
    values = {**dict(locals()), "verify": False if no_verify else None, "force": force or None}
    with _reporting("export-onnx", json_out):
        check_output(output, ".onnx", option="-o")
        source_flags = _source_flags(values)
        from .onnx_export import export_onnx

        options = _onnx_options(values, recipe)
        with step_progress(f"exporting {source}"):
            report = export_onnx(source, output, options, _source_options(source_flags))
        _write_report(json_out, report.to_dict())
    if report.verification is not None:
        render_verification(report.verification, quiet)
    console.print(export_table(report))
    if not report.ok:
        extra = "" if report.written else f" ({output} was not written; --force writes it anyway)"
        _verification_failed(report.verification, extra)


@app.command("verify-onnx")
def verify_onnx_command(
    onnx_file: Annotated[Path, typer.Argument(help="The .onnx file to check.")],
    source: Source,
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    model_kwargs: ModelKwargs = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    data: DataDir = None,
    max_images: MaxImages = None,
    batch: Batch = None,
    atol: Atol = None,
    rtol: Rtol = None,
    model_rtol: ModelRtol = None,
    threads: Threads = None,
    recipe: ExportRecipe = None,
    json_out: JsonOut = None,
    quiet: Quiet = False,
) -> None:
    """Check ONNX_FILE against SOURCE or CHECKPOINT: whole model, then every GroupNorm with stress inputs."""
    values = dict(locals())
    with _reporting("verify-onnx", json_out):
        source_flags = _source_flags(values)
        from .onnx_verify import verify_onnx

        options = _onnx_options(values, recipe).checks
        with step_progress(f"verifying {onnx_file}"):
            report = verify_onnx(onnx_file, source, options, _source_options(source_flags))
        _write_report(json_out, report.to_dict())
    render_verification(report, quiet)
    console.print(f"onnx.checker: {report.checker}; opset {report.opset}; input {report.input_shape}", highlight=False)
    if not report.ok:
        _verification_failed(report)


# --- export-weights: a plain state dict in a target library's layout (issue 15) ---
@app.command("export-weights")
def export_weights_command(
    checkpoint: Annotated[Path, typer.Argument(help="A gnsurgeon checkpoint (.safetensors).")],
    to: Annotated[
        str, typer.Option("--to", help="timm, torchvision, torchvision-detection (backbone.body.) or openmmlab.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors, or .pth for torch.load.")],
    target: Annotated[
        str | None, typer.Option("--target", help="Target model name (default: the source's, timm's NAME_gn).")
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """Write CHECKPOINT as a plain state dict that loads into a target library's model, verified there."""
    try:
        from .targets import export_weights

        with step_progress(f"writing {checkpoint} for {to}"):
            report = export_weights(checkpoint, to, output, target=target)
        if json_out:
            write_json(json_out, report.to_dict())
    except GNSurgeonError as exc:
        _fail(exc)
    console.print(export_weights_table(report))


# --- run: the whole workflow from a recipe (issue 7) ---
@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (YAML/TOML) with convert/finetune/export sections.")],
    source: Source,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder for every stage's artifacts.")],
    data: Annotated[Path | None, typer.Option("--data", help="Training / calibration images.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Validation images (ImageFolder).")] = None,
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    model_kwargs: ModelKwargs = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    crop_pct: CropPct = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value: SECTION.KEY=VALUE (repeatable).")
    ] = None,
    json_out: JsonOut = None,
) -> None:
    """Run convert (+ calibrate) -> finetune -> export-onnx as RECIPE says; resumes finished stages."""
    values = dict(locals())
    # Ctrl-C: finished stages are recorded, an interrupted fine-tune keeps its state.
    hint = "rerun the same command to resume (finished stages are skipped, fine-tuning continues)"
    with _reporting("run", json_out, hint):
        check_output_dir(output, option="-o")
        source_flags = _source_flags(values)
        from .pipeline import run_recipe

        report = run_recipe(
            recipe,
            source,
            output,
            data=str(data) if data else None,
            val=str(val) if val else None,
            source_options=_source_options(source_flags),
            overrides=list(set_ or []),
            stage_callback=lambda name: console.rule(f"[bold]{name}"),
            progress=err_console,
        )
    table = run_table(report.to_dict())
    console.print(table)
    with _reporting("run", json_out):
        _write_report(json_out, report.to_dict())


def _version(value: bool) -> None:
    if value:
        console.print(f"gnsurgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    """gnsurgeon: BN -> GN model surgery."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
