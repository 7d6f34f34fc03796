"""The ``convert`` and ``inspect`` commands as library functions.

``convert_source`` runs the whole stage: open the source (build + weights, or a gnsurgeon
checkpoint), plan, apply, check the result on a probe input, save one checkpoint. The CLI only
parses options into :class:`ConvertOptions` and renders the returned :class:`ConvertReport`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .calibration import CalibrationOptions, calibrate
from .checkpoint import history_entry, is_checkpoint, load, read_checkpoint, save
from .checks import compare_freeze_fold, run_probe
from .errors import GNSurgeonError
from .files import check_output
from .fold import plan_folds
from .plan import GroupPolicy, LayerPlan, Plan, Selection
from .probe import make_probe_input
from .recipes import options_from_mapping
from .sources import DataConfig, SourceSpec, build_model, data_config_for, load_state_dict_strict, read_state_dict
from .surgery import apply_plan, make_plan


@dataclass
class ConvertOptions:
    """Every option of ``gnsurgeon convert``; recipes set the fields listed in :attr:`RECIPE_KEYS`."""

    groups: int | None = None
    channels_per_group: int | None = None
    min_group_channels: int = 2
    strict: bool = False
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    include_1d: bool = False
    freeze: list[str] = field(default_factory=list)
    fold: bool = False
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    in_chans: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    probe: bool = True
    seed: int = 0
    calibrate: str | None = None
    calib_samples: int = 256
    calib_method: str = "block"
    calib_steps: int = 150
    calib_final_steps: int = 300
    calib_batch_size: int = 32
    calib_device: str = "auto"
    bn_free: bool = False

    RECIPE_KEYS = (
        "groups",
        "channels_per_group",
        "min_group_channels",
        "strict",
        "only",
        "skip",
        "include_1d",
        "freeze",
        "fold",
        "calibrate",
        "calib_samples",
        "calib_method",
        "calib_steps",
        "calib_final_steps",
        "calib_batch_size",
        "calib_device",
        "bn_free",
    )

    def policy(self) -> GroupPolicy:
        groups = self.groups
        if groups is None and self.channels_per_group is None:
            groups = 32
        return GroupPolicy(groups, self.channels_per_group, self.min_group_channels, self.strict)

    def selection(self) -> Selection:
        return Selection(tuple(self.only), tuple(self.skip), self.include_1d, tuple(self.freeze))

    def calibration(self) -> CalibrationOptions:
        return CalibrationOptions(
            data=str(self.calibrate),
            samples=self.calib_samples,
            batch_size=self.calib_batch_size,
            method=self.calib_method,
            block_steps=self.calib_steps,
            final_steps=self.calib_final_steps,
            device=self.calib_device,
            seed=self.seed,
        )

    def constructor_kwargs(self) -> dict:
        kwargs = dict(self.model_kwargs)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        if self.in_chans is not None:
            kwargs["in_chans"] = self.in_chans
        return kwargs

    @classmethod
    def from_mapping(cls, values: dict, origin: str = "options") -> ConvertOptions:
        return options_from_mapping(cls, values, "convert", origin)


@dataclass
class OpenedSource:
    """A model ready for surgery, with what is needed to save it again."""

    model: nn.Module
    spec: SourceSpec | None
    data_config: DataConfig
    plan: Plan | None = None  # the plan already applied (checkpoint sources)
    history: list = field(default_factory=list)
    build_seconds: float = 0.0


def open_source(source: str, options: ConvertOptions | None = None) -> OpenedSource:
    """``timm:NAME`` / ``torchvision:NAME`` (+ weights) or a gnsurgeon checkpoint -> model."""
    options = options or ConvertOptions()
    start = time.perf_counter()
    if is_checkpoint(source):
        if options.constructor_kwargs() or options.weights or options.pretrained:
            raise GNSurgeonError(
                f"source {source} is a gnsurgeon checkpoint: constructor options, --weights and "
                "--pretrained do not apply to it"
            )
        info = read_checkpoint(source)
        model = load(source)
        opened = OpenedSource(model, info.source, info.data_config, info.plan, list(info.history))
    else:
        if Path(source).suffix in (".safetensors", ".pth", ".pt", ".bin") or Path(source).exists():
            if not Path(source).exists():
                raise GNSurgeonError(f"source file {source} does not exist")
            raise GNSurgeonError(
                f"source {source} is not a gnsurgeon checkpoint; name the architecture "
                "(timm:NAME or torchvision:NAME) and pass the file with --weights"
            )
        spec = SourceSpec.parse(source, options.constructor_kwargs(), options.pretrained)
        torch.manual_seed(options.seed)  # random-init models are reproducible
        model = build_model(spec)
        if options.weights:
            state = read_state_dict(options.weights)
            load_state_dict_strict(model, state, f"weights file {options.weights}")
        opened = OpenedSource(model, spec, data_config_for(spec, model))
    if options.input_size is not None:
        opened.data_config.input_size = tuple(options.input_size)
    if options.mean is not None:
        opened.data_config.mean = tuple(options.mean)
    if options.std is not None:
        opened.data_config.std = tuple(options.std)
    if options.crop_pct is not None:
        if not 0 < options.crop_pct <= 1:
            raise GNSurgeonError(f"--crop-pct {options.crop_pct} must be in (0, 1]")
        opened.data_config.crop_pct = float(options.crop_pct)
    opened.build_seconds = time.perf_counter() - start
    return opened


def merge_plans(previous: Plan | None, new: Plan) -> Plan:
    """Entries of ``new`` replace ``previous`` entries that were still ``keep``, and add layers the
    previous plan did not list; everything already converted stays as it was."""
    if previous is None:
        return new
    fresh = new.by_path()
    old = previous.by_path()
    layers = [fresh.get(lp.path, lp) if lp.action == "keep" else lp for lp in previous]
    layers += [lp for lp in new if lp.path not in old]
    return Plan(layers=layers, options=new.options)


def require_bn_free(plan: Plan) -> None:
    """``--bn-free`` (e.g. for DP-SGD, where opacus rejects any batch statistics): no layer may stay BN."""
    kept = plan.with_action("keep")
    if kept:
        listed = ", ".join(f"{lp.path} ({lp.note})" for lp in kept[:3])
        raise GNSurgeonError(f"--bn-free: {len(kept)} layer(s) would stay batch norms: {listed}")


# ---------------------------------------------------------------------------------------- report
@dataclass
class ConvertReport:
    """What ``convert`` did: the plan, its summary, the probe result, timings, the output path."""

    source: str
    plan: Plan
    output: str | None = None
    dry_run: bool = False
    probe: dict | None = None
    fold_check: dict | None = None
    calibration: dict | None = None
    timings: dict = field(default_factory=dict)
    data_config: DataConfig | None = None

    @property
    def summary(self) -> dict:
        return self.plan.summary()

    def to_dict(self) -> dict:
        return {
            "command": "convert",
            "gnsurgeon_version": __version__,
            "source": self.source,
            "output": self.output,
            "dry_run": self.dry_run,
            "summary": self.summary,
            "probe": self.probe,
            "fold_check": self.fold_check,
            "calibration": self.calibration,
            "timings_s": self.timings,
            "data_config": self.data_config.to_dict() if self.data_config else None,
            "plan": self.plan.to_dict(),
        }


def convert_source(
    source: str,
    output: str | Path | None,
    options: ConvertOptions | None = None,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertReport:
    """Convert ``source`` and write one checkpoint to ``output`` (nothing is written on ``dry_run``).

    ``progress(done, total)`` follows calibration, the one long step (see :func:`calibrate`).
    """
    options = options or ConvertOptions()
    policy, selection = options.policy(), options.selection()  # validate options before slow work
    if options.calibrate:
        options.calibration().check()
    if not dry_run:
        if output is None:
            raise GNSurgeonError("an output file is required (-o OUT.safetensors), or use --dry-run")
        output = check_output(output, ".safetensors")
    opened = open_source(source, options)
    start = time.perf_counter()
    delta = make_plan(opened.model, policy, selection)
    if options.fold:
        delta = plan_folds(opened.model, delta, make_probe_input(opened.data_config, batch=1, seed=options.seed))
    plan = merge_plans(opened.plan, delta)
    if options.calibrate and not delta.with_action("gn"):
        raise GNSurgeonError(
            f"--calibrate: this run converts no layer of {source} to GroupNorm; calibration fits new GN "
            "layers against their BN originals, so calibrate while converting from the BN model"
        )
    if options.bn_free:
        require_bn_free(plan)
    timings = {"build": round(opened.build_seconds, 4), "plan": round(time.perf_counter() - start, 4)}
    report = ConvertReport(
        str(source), plan, str(output) if output else None, dry_run, data_config=opened.data_config, timings=timings
    )
    if dry_run:
        return report
    start = time.perf_counter()
    converted = apply_plan(opened.model, Plan(delta.with_action("gn", "frozen", "folded"), delta.options))
    timings["convert"] = round(time.perf_counter() - start, 4)
    if options.calibrate:
        start = time.perf_counter()
        converted, calibration = calibrate(
            opened.model, converted, delta, opened.data_config, options.calibration(), progress
        )
        report.calibration = calibration.to_dict()
        timings["calibrate"] = round(time.perf_counter() - start, 4)
    if options.probe:
        start = time.perf_counter()
        report.probe = run_probe(opened.model, converted, opened.data_config, plan)
        if delta.with_action("frozen", "folded"):
            example = make_probe_input(opened.data_config, batch=2, seed=options.seed + 1)
            report.fold_check = compare_freeze_fold(opened.model, converted, delta, example)
        timings["probe"] = round(time.perf_counter() - start, 4)
    history = opened.history + [
        history_entry(
            "convert",
            source=str(source),
            weights=options.weights,
            pretrained=options.pretrained,
            options=delta.options,
            converted=len(delta.with_action("gn")),
            frozen=len(delta.with_action("frozen")),
            folded=len(delta.with_action("folded")),
            calibration=(
                {k: report.calibration[k] for k in ("method", "samples", "holdout", "before", "after", "seconds")}
                if report.calibration
                else None
            ),
        )
    ]
    start = time.perf_counter()
    save(output, converted, plan, source=opened.spec, data_config=opened.data_config, history=history)
    timings["save"] = round(time.perf_counter() - start, 4)
    return report


@dataclass
class InspectReport:
    """Every normalization layer of a source or checkpoint, with what conversion would do/did."""

    source: str
    plan: Plan
    is_checkpoint: bool
    data_config: DataConfig
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "command": "inspect",
            "gnsurgeon_version": __version__,
            "source": self.source,
            "is_checkpoint": self.is_checkpoint,
            "summary": self.plan.summary(),
            "data_config": self.data_config.to_dict(),
            "history": self.history,
            "plan": self.plan.to_dict(),
        }


def inspect_source(source: str, options: ConvertOptions | None = None) -> InspectReport:
    """The stored plan of a checkpoint, or the plan ``convert`` would make for a model source."""
    options = options or ConvertOptions()
    if is_checkpoint(source):
        info = read_checkpoint(source)
        return InspectReport(str(source), info.plan, True, info.data_config, info.history)
    opened = open_source(source, options)
    plan = make_plan(opened.model, options.policy(), options.selection())
    if options.fold:
        plan = plan_folds(opened.model, plan, make_probe_input(opened.data_config, batch=1, seed=options.seed))
    return InspectReport(str(source), plan, False, opened.data_config)


def layer_rows(plan: Plan) -> list[dict]:
    """Flat rows for tables and JSON: path, kind, C, action, G, C/G, eps, act, note."""
    rows = []
    for lp in plan:
        row = asdict(lp)
        row["channels_per_group"] = lp.channels_per_group
        rows.append(row)
    return rows


__all__ = [
    "ConvertOptions",
    "ConvertReport",
    "InspectReport",
    "LayerPlan",
    "convert_source",
    "inspect_source",
    "make_probe_input",
    "open_source",
    "run_probe",
]
