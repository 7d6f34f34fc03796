"""The ``gnsurgeon`` command line: parse, call one library function, render.

Flags default to ``None`` so that a recipe's values apply unless a flag is given explicitly.
Exit codes: 0 success, 1 a verification failed, 2 bad input (one sentence, no traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .conversion import ConvertOptions, convert_source, inspect_source
from .errors import GNSurgeonError, VerificationError
from .recipes import recipe_section
from .report import console, err_console, fold_table, plan_table, summary_table, write_json
from .sources import parse_floats, parse_input_size, parse_model_kwargs

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
Strict = Annotated[bool | None, typer.Option("--strict/--no-strict", help="Make any group fallback an error.")]
Only = Annotated[list[str] | None, typer.Option("--only", help="Convert only layers matching this glob.")]
Skip = Annotated[list[str] | None, typer.Option("--skip", help="Leave layers matching this glob alone.")]
Include1d = Annotated[bool | None, typer.Option("--include-1d/--no-include-1d", help="Also convert BatchNorm1d.")]
Freeze = Annotated[
    list[str] | None, typer.Option("--freeze", help="Freeze matching layers into BN* (glob; '*' = all).")
]
Fold = Annotated[bool | None, typer.Option("--fold/--no-fold", help="Fold BN* into its conv/linear where exact.")]
Weights = Annotated[Path | None, typer.Option("--weights", help=".safetensors, or .pth/.pt/.bin state dict.")]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="Use the library's own pretrained weights.")]
NumClasses = Annotated[int | None, typer.Option("--num-classes", help="Constructor num_classes.")]
InChans = Annotated[int | None, typer.Option("--in-chans", help="Constructor in_chans (timm).")]
ModelKwargs = Annotated[str | None, typer.Option("--model-kwargs", help="Constructor kwargs: k=v,k2=v2.")]
InputSize = Annotated[str | None, typer.Option("--input-size", help="C,H,W (or C,T,H,W) for probes.")]
Mean = Annotated[str | None, typer.Option("--mean", help="Normalisation mean, comma separated.")]
Std = Annotated[str | None, typer.Option("--std", help="Normalisation std, comma separated.")]
Recipe = Annotated[Path | None, typer.Option("--recipe", help="YAML/TOML recipe; flags override it.")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")]


def _fail(exc: GNSurgeonError) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(1 if isinstance(exc, VerificationError) else 2)


def _build_options(recipe: Path | None, flags: dict) -> ConvertOptions:
    values = recipe_section(recipe, "convert", ConvertOptions.RECIPE_KEYS)
    for key in ("only", "skip"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    given = {k: v for k, v in flags.items() if v is not None and v != []}
    if "groups" in given and "channels_per_group" in values:
        values.pop("channels_per_group")  # a policy flag replaces the recipe's policy
    if "channels_per_group" in given and "groups" in values:
        values.pop("groups")
    values.update(given)
    return ConvertOptions.from_mapping(values, f"recipe {recipe}" if recipe else "options")


def _convert_flags(values: dict) -> dict:
    """The command's raw option values -> ConvertOptions fields (None where the flag was not given)."""
    names = set(ConvertOptions.__dataclass_fields__)
    flags = {k: v for k, v in values.items() if k in names}
    flags["weights"] = str(values["weights"]) if values.get("weights") else None
    flags["pretrained"] = values.get("pretrained") or None
    flags["model_kwargs"] = parse_model_kwargs(values.get("model_kwargs")) or None
    flags["input_size"] = parse_input_size(values.get("input_size"))
    flags["mean"] = parse_floats(values.get("mean"), "--mean")
    flags["std"] = parse_floats(values.get("std"), "--std")
    return flags


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
    weights: Weights = None,
    pretrained: Pretrained = False,
    num_classes: NumClasses = None,
    in_chans: InChans = None,
    model_kwargs: ModelKwargs = None,
    input_size: InputSize = None,
    mean: Mean = None,
    std: Std = None,
    recipe: Recipe = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")] = False,
    no_probe: Annotated[bool, typer.Option("--no-probe", help="Skip the probe-input check.")] = False,
    json_out: JsonOut = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary.")] = False,
) -> None:
    """Rewrite SOURCE from BatchNorm to GroupNorm and save one checkpoint."""
    try:
        flags = _convert_flags(locals())
        options = _build_options(recipe, flags)
        options.probe = not no_probe
        with console.status(f"converting {source} ..."):
            report = convert_source(source, output, options, dry_run=dry_run)
    except GNSurgeonError as exc:
        _fail(exc)
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
    extra["timings (s)"] = ", ".join(f"{k} {v:.3f}" for k, v in report.timings.items())
    extra["output"] = report.output or "(dry run: nothing written)"
    console.print(summary_table(report.summary, extra))
    if json_out:
        try:
            write_json(json_out, report.to_dict())
        except GNSurgeonError as exc:
            _fail(exc)


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
    recipe: Recipe = None,
    json_out: JsonOut = None,
) -> None:
    """Print every normalization layer of SOURCE or CHECKPOINT: kind, C, action, G, C/G, eps, note."""
    try:
        flags = _convert_flags(locals())
        options = _build_options(recipe, flags)
        report = inspect_source(source, options)
    except GNSurgeonError as exc:
        _fail(exc)
    what = "checkpoint" if report.is_checkpoint else "planned conversion of"
    console.print(plan_table(report.plan, f"Normalization layers ({what} {source})"))
    console.print(summary_table(report.plan.summary(), {"data config": report.data_config.to_dict()}))
    if json_out:
        try:
            write_json(json_out, report.to_dict())
        except GNSurgeonError as exc:
            _fail(exc)


# --- calibrate (issue 4) ---


# --- finetune command (issue 5) ---


# --- export-onnx / verify-onnx commands (issue 6) ---


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
