"""The ``convert`` and ``inspect`` commands as library functions.

``convert_source`` runs the whole stage: open the source (build + weights, or a gnsurgeon
checkpoint), plan, apply, check the result on a probe input, save one checkpoint. The CLI only
parses options into :class:`ConvertOptions` and renders the returned :class:`ConvertReport`.

Stage: convert (+ calibrate), the first stage. It imports: calibration, checkpoint, errors, files,
fold, options, plan, probe, provenance, sources, surgery, targets (``--like``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .calibration import CalibrationOptions, calibrate, measure_gn_fit
from .checkpoint import history_entry, is_checkpoint, read_checkpoint, save
from .checks import compare_freeze_fold, run_probe
from .errors import GNSurgeonError
from .files import check_output
from .fold import plan_folds
from .options import IMAGES, NOT_IN_RECIPES, build
from .plan import (
    FROZEN_RANKS,
    MEASURED_BN_STAR,
    Action,
    GroupPolicy,
    LayerPlan,
    Plan,
    Selection,
    freeze_where_gn_fails,
    frozen_budget,
    matches,
)
from .probe import make_probe_input
from .provenance import rebase_history, relative_to_checkpoint
from .sources import DataConfig, OpenedSource, SourceOptions, open_source
from .surgery import NO_INPLACE, apply_plan, make_plan
from .targets import LikeTarget, check_like_structure, compare_like, open_like, plan_like

# A layer stays BN* under --max-frozen only if GN leaves more than this share of its output variance
# unexplained (1 - R² of the closed-form fit): below it, calibration reproduces the layer well.
FROZEN_FLOOR = 0.1

# The BN* budget when --calibrate is given and --max-frozen is not: 40% of the GN layers, the
# earliest that GN measurably fails (plan.FROZEN_RANKS). Measured on the regions photo benchmark
# (README "Benchmarks"), same teachers: a quarter kept ResNet-18's stem and layer1 (5 layers) and
# MobileNetV3-small's stem and first two stages, and left regions ResNet-18 at 0.917 of its teacher
# over three calibration seeds (G=32); 40% adds layer2's first block (8 layers) or the start of
# MobileNetV3's stage 2 (13), took that mean to 0.981, and the fine-tune that follows ends nearer the
# teachers. Against GN everywhere (0.85 of the teacher) the difference is the method's largest lever.
# Without --calibrate there are no images to measure on, so it is off.
CALIBRATED_MAX_FROZEN = "40%"


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
    calib_final_steps: int | None = None  # None: auto (calibration.auto_final_steps)
    calib_batch_size: int = 32
    calib_device: str = "auto"
    calib_cache: str = "auto"  # where calibration keeps block-boundary activations (auto, off, ram, disk)
    calib_cache_mem: str = "50%"  # its memory budget: a size (8G) or a share of the free memory
    # The automatic BN* plan: at most this many of the GN layers (a count, or "10%") stay BN* where GN
    # measurably cannot reproduce them (needs --calibrate: it is measured on those images); 0: off;
    # None: CALIBRATED_MAX_FROZEN with --calibrate, off without it (see frozen_spec).
    max_frozen: int | str | None = None
    frozen_rank: str = "position"  # which failing layers that budget keeps first (plan.FROZEN_RANKS)
    bn_free: bool = False
    like: str | None = None  # take each layer's G and eps from this GN architecture (targets.plan_like)
    no_inplace: bool = False  # in-place activations off, recorded in the plan (opacus, surgery.disable_inplace)

    def policy(self) -> GroupPolicy:
        if self.like and (self.groups is not None or self.channels_per_group is not None):
            raise GNSurgeonError(
                f"--like {self.like} takes each layer's G from the target, so it cannot be combined with "
                "--groups or --channels-per-group (given on the command line or in a recipe)"
            )
        groups = self.groups
        if groups is None and self.channels_per_group is None:
            groups = 32
        return GroupPolicy(groups, self.channels_per_group, self.min_group_channels, self.strict)

    def frozen_spec(self) -> int | str:
        """The BN* budget this run uses: the user's ``--max-frozen``, else ``CALIBRATED_MAX_FROZEN``
        when calibrating, else 0. Off with ``--like`` unless asked: the target architecture has GN
        in every one of those layers, so a BN* layer would not load into it."""
        if self.max_frozen is not None:
            return self.max_frozen
        return CALIBRATED_MAX_FROZEN if self.calibrate and not self.like else 0

    def check_frozen_rank(self) -> None:
        if self.frozen_rank not in FROZEN_RANKS:
            raise GNSurgeonError(f"--frozen-rank {self.frozen_rank!r} is not one of {', '.join(FROZEN_RANKS)}")

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
            cache=self.calib_cache,
            cache_mem=self.calib_cache_mem,
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


def nothing_to_convert(source: str, previous: Plan | None, delta: Plan) -> str | None:
    """Why a run would change no layer (one sentence), or None when it changes some.

    ``convert`` refuses such a run (exit 2) rather than write a checkpoint identical to its input,
    or with an empty plan, and record options that did nothing (a GN checkpoint converted again with
    ``--groups 16`` used to exit 0 with every layer still G=32 and ``"groups": 16`` in its history).
    """
    if delta.with_action(Action.GN, Action.FROZEN, Action.FOLDED):
        return None
    if delta.options.get(NO_INPLACE) and not (previous is not None and previous.options.get(NO_INPLACE)):
        return None  # --no-inplace on a checkpoint that still had in-place activations: a change
    if not len(delta):
        if previous is not None and len(previous):
            done = ", ".join(f"{n} {a}" for a, n in previous.summary()["actions"].items())
            return (
                f"checkpoint {source} has no batch-norm layer left to convert ({done}): options such as "
                "--groups act only on layers that are still batch norms"
            )
        return (
            f"{source} has no batch-norm layer (BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d or timm's "
            "BN+act kinds), so there is nothing to convert"
        )
    reasons = Counter(lp.note for lp in delta)
    why = "; ".join(f"{n} {note}" for note, n in reasons.most_common(2))
    return f"this run converts none of the {len(delta)} batch-norm layer(s) of {source}: every one stays ({why})"


def effective_options(delta: Plan) -> dict:
    """The plan options that acted on this run's layers, for the history: the group policy only when
    some layer became GN, and only the patterns that matched a layer (a record of what was done)."""
    paths = [lp.path for lp in delta]
    selection = {
        key: [p for p in value if any(matches(path, [p]) for path in paths)] if isinstance(value, list) else value
        for key, value in delta.options.get("selection", {}).items()
    }
    out = {"selection": selection}
    if delta.with_action(Action.GN):
        out = {"policy": delta.options.get("policy"), **out}
    return out


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
    like: dict | None = None  # --like: the target, strict load, output comparison
    inplace_off: int | None = None  # --no-inplace: how many modules it turned off (0: none were in place)
    warnings: list[str] = field(default_factory=list)
    # the measured BN* plan when it ran: its budget, whether it was the default, the layers it kept
    max_frozen: dict | None = None

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
            "warnings": self.warnings,
            "summary": self.summary,
            "probe": self.probe,
            "fold_check": self.fold_check,
            "calibration": self.calibration,
            "like": self.like,
            "inplace_off": self.inplace_off,
            "max_frozen": self.max_frozen,
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
    options.check_frozen_rank()
    if options.calibrate:
        options.calibration().check()
    if not dry_run:
        if output is None:
            raise GNSurgeonError("an output file is required (-o OUT.safetensors), or use --dry-run")
        output = check_output(output, ".safetensors")
    opened = open_source(source, options)
    like = open_like(options.like, opened.spec, options.seed) if options.like else None
    start = time.perf_counter()
    delta, plan, warnings, bn_star = _plans(source, opened, options, policy, selection, like)
    timings = {"build": round(opened.build_seconds, 4), "plan": round(time.perf_counter() - start, 4)}
    report = ConvertReport(
        str(source), plan, str(output) if output else None, dry_run, timings=timings, warnings=warnings
    )
    report.data_config = opened.data_config
    report.max_frozen = bn_star
    if dry_run:
        return report
    start = time.perf_counter()
    changed = Plan(delta.with_action(Action.GN, Action.FROZEN, Action.FOLDED), delta.options)
    converted = apply_plan(opened.model, changed)
    timings["convert"] = round(time.perf_counter() - start, 4)
    if like is not None:
        check_like_structure(converted, like, plan)  # before calibration: a mismatch costs seconds
    if changed.options.get(NO_INPLACE):
        report.inplace_off = sum(getattr(m, "inplace", None) is True for m in opened.model.modules())
    surgery_only = converted  # what freeze/fold made, before calibration tunes GN and the convs around it
    if options.calibrate:
        start = time.perf_counter()
        converted, calibration = calibrate(
            opened.model, converted, delta, opened.data_config, options.calibration(), progress
        )
        report.calibration = calibration.to_dict()
        timings["calibrate"] = round(time.perf_counter() - start, 4)
    if options.probe:
        start = time.perf_counter()
        _check_result(opened, converted, surgery_only, delta, options, report)
        timings["probe"] = round(time.perf_counter() - start, 4)
    if like is not None:
        start = time.perf_counter()
        probe = make_probe_input(opened.data_config, batch=2, seed=options.seed + 2)
        report.like = compare_like(opened.model, converted, like, plan, probe)
        timings["like"] = round(time.perf_counter() - start, 4)
    history = rebase_history(opened.history, source, output) + [_history_entry(source, options, delta, report)]
    start = time.perf_counter()
    save(output, converted, plan, source=opened.spec, data_config=opened.data_config, history=history)
    timings["save"] = round(time.perf_counter() - start, 4)
    return report


def measured_bn_star(options: ConvertOptions, delta: Plan) -> dict:
    """What the measured BN* plan did in this run, for the report: a default that changes the model
    says so, with the option that turns it off."""
    kept = [lp.path for lp in delta.with_action(Action.FROZEN) if lp.note.startswith(MEASURED_BN_STAR)]
    return {
        "budget": str(options.frozen_spec()),
        "default": options.max_frozen is None,
        "rank": options.frozen_rank,
        "kept": kept,
    }


def selection_warnings(options: ConvertOptions, delta: Plan) -> list[str]:
    """Options that matched or changed nothing in this run (see :meth:`Selection.warnings`), and
    ``--fold`` with nothing frozen to fold. ``--strict`` makes the first one an error."""
    warnings = options.selection().warnings([lp.path for lp in delta])
    if options.frozen_rank != "position" and not delta.with_action(Action.FROZEN):
        rank = options.frozen_rank
        warnings.append(f"--frozen-rank {rank} changes nothing here: no layer was kept BN* (--max-frozen)")
    if options.fold and not delta.with_action(Action.FROZEN):
        warnings.append("--fold does nothing here: no layer is frozen in this run (--freeze), and only BN* folds")
    if options.strict and warnings:
        raise GNSurgeonError(f"--strict: {warnings[0]}")
    return warnings


def _plans(
    source: str, opened: OpenedSource, options: ConvertOptions, policy, selection, like: LikeTarget | None = None
) -> tuple[Plan, Plan, list, dict | None]:
    """What this run changes (the delta), the whole model's plan after it, the warnings and what the
    measured BN* plan kept (None when it was off), checked:
    something must change (:func:`nothing_to_convert`), ``--calibrate`` needs new GN layers and
    ``--bn-free`` forbids any batch norm left."""
    delta = plan_like(opened.model, like, selection) if like else make_plan(opened.model, policy, selection)
    if options.no_inplace or (opened.plan is not None and opened.plan.options.get(NO_INPLACE)):
        delta.options[NO_INPLACE] = True
    budget = frozen_budget(options.frozen_spec(), len(delta.with_action(Action.GN)))
    if budget and not options.calibrate:
        raise GNSurgeonError("--max-frozen needs --calibrate DIR: where GN fails is measured on those images")
    bn_star = None
    if budget:
        errors = measure_gn_fit(opened.model, delta, opened.data_config, options.calibration())
        delta = freeze_where_gn_fails(delta, errors, budget, FROZEN_FLOOR, options.frozen_rank)
        bn_star = measured_bn_star(options, delta)
    warnings = selection_warnings(options, delta)
    if options.fold and delta.with_action(Action.FROZEN):
        delta = plan_folds(opened.model, delta, make_probe_input(opened.data_config, batch=1, seed=options.seed))
    if options.calibrate and not delta.with_action(Action.GN):
        raise GNSurgeonError(
            f"--calibrate: this run converts no layer of {source} to GroupNorm; calibration fits new GN "
            "layers against their BN originals, so calibrate while converting from the BN model"
        )
    refusal = nothing_to_convert(source, opened.plan, delta)
    if refusal:
        raise GNSurgeonError(refusal)
    plan = merge_plans(opened.plan, delta)
    if options.bn_free:
        require_bn_free(plan)
    return delta, plan, warnings, bn_star


def _check_result(
    opened: OpenedSource, converted, surgery_only, delta: Plan, options: ConvertOptions, report: ConvertReport
):
    """The probe (finite outputs, no selected BN left) on the result and, where BN* was made, the
    freeze/fold check on the model before calibration (which then tunes the GN layers and the convs
    around them, so the result no longer equals "the original with GN applied", by design)."""
    report.probe = run_probe(opened.model, converted, opened.data_config, report.plan)
    if delta.with_action(Action.FROZEN, Action.FOLDED):
        example = make_probe_input(opened.data_config, batch=2, seed=options.seed + 1)
        report.fold_check = compare_freeze_fold(opened.model, surgery_only, delta, example)


def _history_entry(source: str, options: ConvertOptions, delta: Plan, report: ConvertReport) -> dict:
    calibration = report.calibration
    return history_entry(
        "convert",
        source=str(source),
        weights=options.weights,
        # the same file relative to the checkpoint's folder: found again from any directory
        weights_file=relative_to_checkpoint(options.weights, report.output) if options.weights else None,
        pretrained=options.pretrained,
        options=effective_options(delta),
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
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "command": "inspect",
            "gnsurgeon_version": __version__,
            "source": self.source,
            "is_checkpoint": self.is_checkpoint,
            "warnings": self.warnings,
            "summary": self.plan.summary(),
            "data_config": self.data_config.to_dict(),
            "history": self.history,
            "plan": self.plan.to_dict(),
        }


def inspect_source(source: str, options: ConvertOptions | None = None) -> InspectReport:
    """The stored plan of a checkpoint, or the plan ``convert`` would make for a model source."""
    options = options or ConvertOptions()
    options.policy()  # refuses --like with --groups
    if is_checkpoint(source):
        info = read_checkpoint(source)
        defaults = ConvertOptions()
        given = [f"--{n.replace('_', '-')}" for n in _PLAN_FIELDS if getattr(options, n) != getattr(defaults, n)]
        ignored = f"{', '.join(given)}: conversion options do not apply to inspecting a checkpoint (its stored plan)"
        warnings = [ignored] if given else []
        return InspectReport(str(source), info.plan, True, info.data_config, info.history, warnings)
    opened = open_source(source, options)
    if options.like:
        plan = plan_like(opened.model, open_like(options.like, opened.spec, options.seed), options.selection())
    else:
        plan = make_plan(opened.model, options.policy(), options.selection())
    warnings = selection_warnings(options, plan)
    if options.fold and plan.with_action(Action.FROZEN):
        plan = plan_folds(opened.model, plan, make_probe_input(opened.data_config, batch=1, seed=options.seed))
    refusal = nothing_to_convert(str(source), None, plan)
    warnings += [f"convert would refuse: {refusal}"] if refusal else []
    return InspectReport(str(source), plan, False, opened.data_config, warnings=warnings)


# The options that shape a plan; inspecting a checkpoint ignores them (it shows the stored plan).
_PLAN_FIELDS = (
    "groups",
    "channels_per_group",
    "min_group_channels",
    "strict",
    "only",
    "skip",
    "include_1d",
    "freeze",
    "fold",
)


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
