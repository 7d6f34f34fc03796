"""The ``convert`` and ``inspect`` commands as library functions.

``convert_source`` runs the whole stage: open the source (build + weights, or a gnsurgeon
checkpoint), plan, apply, check the result on a probe input, save one checkpoint. The CLI only
parses options into :class:`ConvertOptions` and renders the returned :class:`ConvertReport`.

Stage: convert (+ calibrate), the first stage. It imports: calibration, checkpoint, errors, files,
fold, options, plan, probe, provenance, sources, surgery.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .calibration import CalibrationOptions, calibrate
from .checkpoint import history_entry, is_checkpoint, read_checkpoint, save
from .checks import compare_freeze_fold, run_probe
from .errors import GNSurgeonError
from .files import check_output
from .fold import plan_folds
from .options import IMAGES, NOT_IN_RECIPES, build
from .plan import Action, GroupPolicy, LayerPlan, Plan, Selection
from .probe import make_probe_input
from .provenance import rebase_history, relative_to_checkpoint
from .sources import DataConfig, OpenedSource, SourceOptions, open_source
from .surgery import apply_plan, make_plan


@dataclass
class ConvertOptions(SourceOptions):
    """Every option of ``gnsurgeon convert``: how to open the source (the inherited
    :class:`~gnsurgeon.sources.SourceOptions` fields), the group policy, which layers, freezing and
    folding, calibration. Recipes set every field not marked out of them (source options, ``probe``).
    ``calibrate: true`` in a recipe means "on the command's images" (:mod:`gnsurgeon.options`).
    """

    groups: int | None = None
    channels_per_group: int | None = None
    min_group_channels: int = 2
    strict: bool = False
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    include_1d: bool = False
    freeze: list[str] = field(default_factory=list)
    fold: bool = False
    probe: bool = field(default=True, metadata=NOT_IN_RECIPES)
    calibrate: str | None = field(default=None, metadata={IMAGES: "calibrates"})
    calib_samples: int = 256
    calib_method: str = "block"
    calib_steps: int = 150
    calib_final_steps: int = 300
    calib_batch_size: int = 32
    calib_device: str = "auto"
    bn_free: bool = False

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

    @classmethod
    def from_mapping(cls, values: dict, origin: str = "options") -> ConvertOptions:
        return build(cls, values, origin, "convert")


def merge_plans(previous: Plan | None, new: Plan) -> Plan:
    """Entries of ``new`` replace ``previous`` entries that were still ``keep``, and add layers the
    previous plan did not list; everything already converted stays as it was."""
    if previous is None:
        return new
    fresh = new.by_path()
    old = previous.by_path()
    layers = [fresh.get(lp.path, lp) if lp.action == Action.KEEP else lp for lp in previous]
    layers += [lp for lp in new if lp.path not in old]
    return Plan(layers=layers, options=new.options)


def require_bn_free(plan: Plan) -> None:
    """``--bn-free`` (e.g. for DP-SGD, where opacus rejects any batch statistics): no layer may stay BN."""
    kept = plan.with_action(Action.KEEP)
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
    delta, plan = _plans(source, opened, options, policy, selection)
    timings = {"build": round(opened.build_seconds, 4), "plan": round(time.perf_counter() - start, 4)}
    report = ConvertReport(
        str(source), plan, str(output) if output else None, dry_run, data_config=opened.data_config, timings=timings
    )
    if dry_run:
        return report
    start = time.perf_counter()
    changed = Plan(delta.with_action(Action.GN, Action.FROZEN, Action.FOLDED), delta.options)
    converted = apply_plan(opened.model, changed)
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
        _check_result(opened, converted, delta, options, report)
        timings["probe"] = round(time.perf_counter() - start, 4)
    history = rebase_history(opened.history, source, output) + [_history_entry(source, options, delta, report)]
    start = time.perf_counter()
    save(output, converted, plan, source=opened.spec, data_config=opened.data_config, history=history)
    timings["save"] = round(time.perf_counter() - start, 4)
    return report


def _plans(source: str, opened: OpenedSource, options: ConvertOptions, policy, selection) -> tuple[Plan, Plan]:
    """What this run changes (the delta) and the whole model's plan after it, checked against
    ``--calibrate`` (something must become GN) and ``--bn-free`` (nothing may stay BN)."""
    delta = make_plan(opened.model, policy, selection)
    if options.fold:
        delta = plan_folds(opened.model, delta, make_probe_input(opened.data_config, batch=1, seed=options.seed))
    plan = merge_plans(opened.plan, delta)
    if options.calibrate and not delta.with_action(Action.GN):
        raise GNSurgeonError(
            f"--calibrate: this run converts no layer of {source} to GroupNorm; calibration fits new GN "
            "layers against their BN originals, so calibrate while converting from the BN model"
        )
    if options.bn_free:
        require_bn_free(plan)
    return delta, plan


def _check_result(opened: OpenedSource, converted, delta: Plan, options: ConvertOptions, report: ConvertReport):
    """The probe (finite outputs, no selected BN left) and, where BN* was made, the freeze/fold check."""
    report.probe = run_probe(opened.model, converted, opened.data_config, report.plan)
    if delta.with_action(Action.FROZEN, Action.FOLDED):
        example = make_probe_input(opened.data_config, batch=2, seed=options.seed + 1)
        report.fold_check = compare_freeze_fold(opened.model, converted, delta, example)


def _history_entry(source: str, options: ConvertOptions, delta: Plan, report: ConvertReport) -> dict:
    calibration = report.calibration
    return history_entry(
        "convert",
        source=str(source),
        weights=options.weights,
        # the same file relative to the checkpoint's folder: found again from any directory
        weights_file=relative_to_checkpoint(options.weights, report.output) if options.weights else None,
        pretrained=options.pretrained,
        options=delta.options,
        converted=len(delta.with_action(Action.GN)),
        frozen=len(delta.with_action(Action.FROZEN)),
        folded=len(delta.with_action(Action.FOLDED)),
        calibration=(
            {k: calibration[k] for k in ("method", "samples", "holdout", "before", "after", "seconds")}
            if calibration
            else None
        ),
    )


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
