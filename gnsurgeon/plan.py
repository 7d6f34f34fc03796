"""The plan: what happens to every normalization layer, as data.

A :class:`Plan` holds one :class:`LayerPlan` per normalization layer found in a model. It is built
once (:func:`make_plan`), printed by ``inspect``, stored as JSON in the checkpoint, and replayed by
:func:`gnsurgeon.surgery.apply_plan` to rebuild the architecture before tensors are loaded. Later
stages (freeze/fold, calibration, fine-tuning, export) read the plan instead of re-deriving it.

Group policy
------------
The paper's two good defaults are a fixed number of groups (G = 32) and a fixed number of channels
per group (C/G = 16). Both are turned into a *target* group count T (T = G, or T = C / K) and
resolved per layer by one rule:

* admissible group counts are the divisors ``d >= 2`` of C that leave at least
  ``min_group_channels`` channels per group (default 2, so never G = C, i.e. InstanceNorm);
* take the largest admissible ``d <= T`` (groups are never smaller than the policy asks);
* if none is ``<= T`` (C is small for the rule), take the smallest admissible ``d``
  (the largest groups that still leave two or more of them);
* if nothing is admissible (C = 3, 5, 7, ...), use G = 1 (LayerNorm-like) and say so.

Anything other than the exact policy value is a *fallback* and carries a note; ``strict`` turns a
fallback into an error. ``groups=1`` asked explicitly is honoured as LayerNorm.

Stage: data shared by every stage (no model in sight). It imports: errors only.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from .errors import GNSurgeonError


class Action(str, Enum):
    """What happens to one normalization layer.

    A ``str`` enum: ``Action.GN == "gn"``, and JSON (the checkpoint's plan, ``--json`` reports)
    stores the bare value, so the checkpoint format is unchanged by the type.
    """

    GN = "gn"  # replaced by GroupNorm (timm GroupNormAct when the BN carried an activation)
    FROZEN = "frozen"  # BN*: a fixed per-channel affine from the running statistics
    FOLDED = "folded"  # BN* merged into the conv/linear that produces its input
    KEEP = "keep"  # left as it is (skipped, not selected, or opt-in kinds)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class GroupPolicy:
    """How many groups a GroupNorm over C channels gets.

    At most one of ``groups`` / ``channels_per_group`` is set; neither means G = 32, so that
    ``GroupPolicy(channels_per_group=16)`` reads as it says. ``min_group_channels`` is the floor on
    C/G (1 allows InstanceNorm). ``strict`` makes any fallback an error.
    """

    groups: int | None = None
    channels_per_group: int | None = None
    min_group_channels: int = 2
    strict: bool = False

    def __post_init__(self) -> None:
        if self.groups is None and self.channels_per_group is None:
            object.__setattr__(self, "groups", 32)
        if self.groups is not None and self.channels_per_group is not None:
            raise GNSurgeonError("give exactly one group policy: --groups G or --channels-per-group K, not both")
        for name in ("groups", "channels_per_group", "min_group_channels"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise GNSurgeonError(f"option {name} must be a positive integer, got {value!r}")

    @property
    def rule(self) -> str:
        if self.groups is not None:
            return f"groups={self.groups}"
        return f"channels_per_group={self.channels_per_group}"

    def resolve(self, channels: int) -> tuple[int, str]:
        """Return ``(G, note)`` for a layer of ``channels`` channels; note is "" when exact."""
        c = channels
        if self.groups == 1:
            return 1, ""
        target = self.groups if self.groups is not None else c / self.channels_per_group
        admissible = [d for d in _divisors(c) if d >= 2 and c // d >= self.min_group_channels]
        below = [d for d in admissible if d <= target]
        if below:
            g = max(below)
        elif admissible:
            g = min(admissible)
        else:
            g = 1
        if g == target:
            return g, ""
        note = self._fallback_note(c, target, g)
        if self.strict:
            raise GNSurgeonError(f"--strict: {note}")
        return g, note

    def _fallback_note(self, c: int, target: float, g: int) -> str:
        if g == 1:
            return f"no G >= 2 leaves >= {self.min_group_channels} ch/group: G=1 (LayerNorm-like)"
        if self.groups is not None:
            if c % self.groups == 0:
                why = f"G={self.groups} leaves {c // self.groups} ch/group (< {self.min_group_channels})"
            else:
                why = f"{self.groups} groups do not divide C={c}"
        elif target == 1:
            why = f"{self.channels_per_group} ch/group gives G=1 (LayerNorm)"
        elif c % self.channels_per_group == 0:
            why = f"{self.channels_per_group} ch/group gives G={int(target)} (< 2 ch/group floor)"
        else:
            why = f"{self.channels_per_group} ch/group do not divide C={c}"
        return f"{why}: fell back to G={g}"


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass
class LayerPlan:
    """What happens to one normalization layer.

    ``path`` is the module path (``layer1.0.bn1``), ``kind`` the source layer's kind
    (see :data:`gnsurgeon.layers.NORM_KINDS`), ``action`` one of ``gn`` (GroupNorm), ``frozen`` (BN*
    affine), ``folded`` (BN* merged into ``producer``) or ``keep``. ``groups``/``rule``/``note`` say how
    G was chosen and why a fallback or skip happened. ``act`` names a fused activation that is kept.
    """

    path: str
    kind: str
    channels: int
    eps: float
    affine: bool
    action: Action = Action.KEEP
    groups: int | None = None
    rule: str = ""
    note: str = ""
    act: str = ""
    producer: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.action, Action):
            try:
                self.action = Action(self.action)
            except ValueError:
                known = ", ".join(a.value for a in Action)
                raise GNSurgeonError(f"plan entry {self.path!r}: unknown action {self.action!r} ({known})") from None

    @property
    def channels_per_group(self) -> int | None:
        return self.channels // self.groups if self.groups else None

    @property
    def is_fallback(self) -> bool:
        return self.action == Action.GN and bool(self.note)


@dataclass
class Plan:
    """The per-layer plan plus the options that produced it (kept for the record and for replay)."""

    layers: list[LayerPlan] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def by_path(self) -> dict[str, LayerPlan]:
        return {lp.path: lp for lp in self.layers}

    def with_action(self, *actions: Action | str) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.action in actions]

    def summary(self) -> dict:
        """Counts that the CLI prints and the JSON report carries."""
        gn = self.with_action(Action.GN)
        return {
            "layers": len(self.layers),
            "actions": dict(Counter(lp.action.value for lp in self.layers)),
            "converted_by_kind": dict(Counter(lp.kind for lp in gn)),
            "groups_histogram": {str(g): n for g, n in sorted(Counter(lp.groups for lp in gn).items())},
            "fallbacks": [{"path": lp.path, "note": lp.note} for lp in gn if lp.note],
            "kept": [{"path": lp.path, "note": lp.note} for lp in self.with_action(Action.KEEP)],
            "not_folded": [{"path": lp.path, "note": lp.note} for lp in self.with_action(Action.FROZEN) if lp.note],
        }

    def to_dict(self) -> dict:
        layers = [{**asdict(lp), "action": lp.action.value} for lp in self.layers]
        return {"layers": layers, "options": self.options}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        names = {f.name for f in fields(LayerPlan)}
        layers = []
        for raw in data.get("layers", []):
            unknown = set(raw) - names
            if unknown:
                raise GNSurgeonError(f"plan entry {raw.get('path')!r} has unknown fields {sorted(unknown)}")
            layers.append(LayerPlan(**raw))
        return cls(layers=layers, options=dict(data.get("options", {})))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def matches(path: str, patterns: Iterable[str]) -> bool:
    """True when ``path`` matches any glob pattern (``*`` also crosses dots: ``layer1.*``)."""
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


@dataclass(frozen=True)
class Selection:
    """Which layers a conversion touches, and how: glob patterns over module paths.

    Precedence: ``skip`` keeps a layer as it is; ``freeze`` makes it BN* (any kind, BatchNorm1d
    included: a per-channel affine means the same on tokens); otherwise ``only`` and the BatchNorm1d
    opt-in decide whether it becomes GroupNorm.
    """

    only: Sequence[str] = ()
    skip: Sequence[str] = ()
    include_1d: bool = False
    freeze: Sequence[str] = ()

    def action_for(self, path: str, kind: str) -> tuple[Action, str]:
        """``(action, note)`` for a layer: ``keep`` with the reason, ``frozen`` or ``gn``."""
        if matches(path, self.skip):
            return Action.KEEP, "matched by --skip"
        if matches(path, self.freeze):
            return Action.FROZEN, ""
        if self.only and not matches(path, self.only):
            return Action.KEEP, "not matched by --only"
        if kind == "BatchNorm1d" and not self.include_1d:
            return Action.KEEP, "BatchNorm1d is opt-in (--include-1d): on token inputs GN means something else"
        return Action.GN, ""

    def warnings(self, paths: Sequence[str]) -> list[str]:
        """What a user would not see otherwise, given the batch-norm layer ``paths`` this selection
        was applied to: every pattern that matched none of them (a typo selects nothing, silently),
        and the layers both ``--skip`` and ``--freeze`` match (``--skip`` wins: they stay BN)."""
        notes = []
        for option, patterns in (("--only", self.only), ("--skip", self.skip), ("--freeze", self.freeze)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
                    notes.append(f"{option} {pattern!r} matched no batch-norm layer")
        both = [p for p in paths if matches(p, self.skip) and matches(p, self.freeze)]
        if both:
            more = f", ... {len(both) - 3} more" if len(both) > 3 else ""
            notes.append(
                f"--skip wins over --freeze for {len(both)} layer(s) both match, which stay batch norms: "
                f"{', '.join(both[:3])}{more}"
            )
        return notes

def frozen_budget(spec: int | str, layers: int) -> int:
    """How many of ``layers`` a ``--max-frozen`` value allows: a count (``3``) or a share (``"10%"``,
    rounded down); 0 turns the automatic BN* plan off."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(layers * share / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return min(count, layers)
    except ValueError:
        raise GNSurgeonError(f"--max-frozen must be a count (3) or a share of the layers (10%), got {spec!r}") from None


# How a plan entry chosen by the measured BN* plan begins its note (so reports can count them apart
# from the layers the user froze with --freeze).
MEASURED_BN_STAR = "kept as BN* (--max-frozen)"


# Which of the layers GN measurably fails (1 - R² above the floor) the BN* budget keeps first.
# "position": the earliest the forward pass reaches (the default); "fit": the worst own fit. What GN removes
# at the first layers (a photo crop's brightness and contrast) no later layer can restore, whatever
# that layer's own fit; what it removes late, calibration's tuning passes largely compensate. On the
# regions benchmark (README "Benchmarks"), with the same teachers and a 25% budget, the earliest failing quarter took
# the calibrated MobileNetV3-small to 0.954 of its teacher at G=32 (0.986 at 16 channels per group)
# where the worst-fitting quarter (its last, 2×2-map layers) reached 0.731 (0.814); on ResNet-18 at
# G=32 both rules pick the same layers (the stem and layer1).
FROZEN_RANKS = ("position", "fit")


def freeze_where_gn_fails(
    plan: Plan, errors: dict[str, float], budget: int, floor: float, rank: str = "position"
) -> Plan:
    """A copy of ``plan`` in which at most ``budget`` of the GN layers whose measured ``errors`` are
    above ``floor`` become BN* (``frozen``), each with its measured reason in the note: the earliest
    of them (``rank="position"``), or the worst (``rank="fit"``), see ``FROZEN_RANKS``. "Earliest" is
    the order of ``errors``, which :func:`~gnsurgeon.calibration.gn_fit_errors` fills in the order the
    forward pass reaches the layers (not the order a model happens to register its modules in).

    ``errors[path]`` is the share of the BN original's output variance that GN cannot reproduce at that
    layer (1 − R² of the closed-form fit, :func:`gnsurgeon.calibration.gn_fit_errors`): where GN
    removes information the original used (a photo's brightness and contrast at the stem; groups of
    a handful of values on 1×1/2×2 maps), BN*, which keeps it and is as batch-independent as GN, is
    the better layer (Mask R-CNN keeps BN* in the stem for the same reason).
    """
    if rank not in FROZEN_RANKS:
        raise ValueError(f"rank must be one of {FROZEN_RANKS}, got {rank!r}")
    gn = {lp.path for lp in plan.with_action(Action.GN)}
    failing = [path for path, error in errors.items() if path in gn and error > floor]
    if rank == "fit":
        failing.sort(key=lambda path: -errors[path])
    chosen = {p: errors[p] for p in failing[:budget]}
    layers = []
    for lp in plan:
        if lp.path in chosen:
            note = (
                f"{MEASURED_BN_STAR}: GN reproduces only {100 * (1 - chosen[lp.path]):.0f}% of this "
                f"layer's output variance on the calibration images (1 - R² = {chosen[lp.path]:.2f}; "
                f"{'among the earliest such layers' if rank == 'position' else 'among the worst fits'})"
            )
            lp = LayerPlan(**{**asdict(lp), "action": Action.FROZEN, "groups": None, "rule": "", "note": note})
        layers.append(lp)
    return Plan(layers=layers, options=dict(plan.options))
