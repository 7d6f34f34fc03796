"""Plan and apply surgery on a model. The input model is never mutated.

:func:`make_plan` walks the model, classifies every batch-norm-like layer (see
:mod:`gnsurgeon.layers`) and decides its action; :func:`apply_plan` deep-copies the model and
replaces modules on their parents (``setattr``), which works on models that FX cannot trace
(detection models, timm nets with control flow). A module registered under several paths is
replaced by one new module at all of them, so sharing is preserved.

Stage: planning and surgery, the first stage. It imports: errors, fold (the fold arithmetic),
layers, plan; checks, checkpoint and the stage runners import it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .errors import GNSurgeonError
from .fold import fold_into_producer
from .layers import (
    FrozenBNAffine,
    describe_act,
    has_affine,
    has_running_stats,
    make_frozen_affine,
    make_group_norm,
    norm_kind,
    num_channels,
)
from .plan import Action, GroupPolicy, LayerPlan, Plan, Selection

# Plan option recorded by ``convert --no-inplace`` and replayed by every apply_plan (so gnsurgeon.load).
NO_INPLACE = "no_inplace"


def _refuse_scripted(model: nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise GNSurgeonError(
            "the model is a TorchScript module, whose layers cannot be replaced; "
            "convert the eager nn.Module before scripting it"
        )
    if not isinstance(model, nn.Module):
        raise GNSurgeonError(f"expected a torch.nn.Module, got {type(model).__name__}")


def iter_norm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every batch-norm-like layer, each module once (first path)."""
    for path, module in model.named_modules():
        if path and norm_kind(module) is not None:
            yield path, module


def make_plan(
    model: nn.Module,
    policy: GroupPolicy | None = None,
    selection: Selection | None = None,
) -> Plan:
    """Decide, for every batch-norm-like layer of ``model``, what conversion does to it."""
    _refuse_scripted(model)
    policy = policy or GroupPolicy()
    selection = selection or Selection()
    layers = []
    for path, module in iter_norm_layers(model):
        kind = norm_kind(module)
        lp = LayerPlan(
            path=path,
            kind=kind.name,
            channels=num_channels(module),
            eps=float(module.eps),
            affine=has_affine(module),
            act=describe_act(module),
        )
        lp.action, lp.note = selection.action_for(path, kind.name)
        if lp.action == Action.GN:
            try:
                lp.groups, lp.note = policy.resolve(lp.channels)
            except GNSurgeonError as exc:
                raise GNSurgeonError(f"layer {path}: {exc}") from None
            lp.rule = policy.rule
        elif lp.action == Action.FROZEN and not has_running_stats(module):
            raise GNSurgeonError(f"layer {path} has no running statistics, so it cannot be frozen into BN*")
        layers.append(lp)
    options = {
        "policy": {
            "groups": policy.groups,
            "channels_per_group": policy.channels_per_group,
            "min_group_channels": policy.min_group_channels,
            "strict": policy.strict,
        },
        "selection": {
            "only": list(selection.only),
            "skip": list(selection.skip),
            "include_1d": selection.include_1d,
            "freeze": list(selection.freeze),
        },
    }
    return Plan(layers=layers, options=options)


def _build_replacement(lp: LayerPlan, module: nn.Module, model: nn.Module) -> nn.Module:
    if lp.action == Action.GN:
        gn = make_group_norm(module, lp.groups)
        if lp.eps != gn.eps:  # convert --like: the target architecture's eps, recorded in the plan
            gn.eps = lp.eps
        return gn
    if lp.action == Action.FROZEN:
        return make_frozen_affine(module)
    if lp.action == Action.FOLDED:
        return fold_into_producer(model, lp, module)
    raise GNSurgeonError(f"layer {lp.path}: unknown action {lp.action!r}")


def module_paths(model: nn.Module) -> tuple[dict[str, nn.Module], dict[int, list[str]]]:
    """``({path: module}, {id(module): [every path it is registered under]})``, shared modules included."""
    by_path, aliases = {}, defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        by_path[path] = module
        aliases[id(module)].append(path)
    return by_path, aliases


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` of ``root`` (in place), or raise a one-sentence error naming the layer
    when its parent refuses or silently drops the assignment (ScriptModules, exotic containers)."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    try:
        setattr(parent, child, new)
    except Exception as exc:  # ScriptModules and exotic containers refuse assignment
        raise GNSurgeonError(
            f"layer {path} cannot be replaced: its parent {type(parent).__name__} refused ({exc})"
        ) from None
    if root.get_submodule(path) is not new:
        raise GNSurgeonError(f"layer {path} cannot be replaced: its parent does not keep assigned modules")


def apply_plan(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Return a copy of ``model`` with every layer whose action is not ``keep`` replaced.

    The plan is checked against the model first (path, kind, channels), so a plan replayed on the
    wrong architecture fails with the layer named instead of producing a wrong model.
    """
    _refuse_scripted(model)
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except Exception as exc:
            raise GNSurgeonError(
                f"the model cannot be copied ({exc}); gnsurgeon never edits its input in place"
            ) from None
    by_path, aliases = module_paths(model)
    for lp in plan:
        if lp.action == Action.KEEP:
            continue
        module = by_path.get(lp.path)
        if module is None:
            raise GNSurgeonError(f"plan names layer {lp.path}, which the model does not have")
        kind = norm_kind(module)
        if kind is None or kind.name != lp.kind:
            found = kind.name if kind else type(module).__name__
            raise GNSurgeonError(f"layer {lp.path} is a {found} in the model but a {lp.kind} in the plan")
        if num_channels(module) != lp.channels:
            raise GNSurgeonError(
                f"layer {lp.path} has {num_channels(module)} channels in the model but {lp.channels} in the plan"
            )
        new = _build_replacement(lp, module, model)
        for path in aliases[id(module)]:
            replace_module(model, path, new)
    if plan.options.get(NO_INPLACE):
        disable_inplace(model)
    return model


def disable_inplace(model: nn.Module) -> list[str]:
    """Set ``inplace=False`` on every module that has a boolean ``inplace`` flag (ReLU, SiLU, timm's
    activations, Dropout); return their paths.

    Why: opacus' default per-sample-gradient mode puts a full backward hook on every trainable layer,
    and PyTorch forbids modifying such a layer's output in place, so a GroupNorm followed by
    ``ReLU(inplace=True)`` fails at the first backward (opacus#828). In place is only a memory saving:
    the values computed are the same.
    """
    changed = []
    for path, module in model.named_modules():
        if isinstance(getattr(module, "inplace", None), bool) and module.inplace:
            module.inplace = False
            changed.append(path)
    return changed


def _eps_differs(module: nn.Module, lp: LayerPlan) -> str:
    eps = getattr(module, "eps", None)
    return f"eps {eps:g}, the plan {lp.eps:g}" if isinstance(eps, float) and eps != lp.eps else ""


def plan_mismatch(lp: LayerPlan, module: nn.Module) -> str:
    """How ``module`` contradicts its plan entry ``lp`` ("" when it does not): the module type the
    action leaves at the path (GroupNorm, BN*, the folded layer's act or Identity, or the original
    kind when kept), then its channels, groups and eps."""
    found = type(module).__name__
    kind = norm_kind(module)
    if lp.action == Action.FOLDED:
        folded_away = kind is None and not isinstance(module, (nn.GroupNorm, FrozenBNAffine))
        return "" if folded_away else f"the plan folds it, but the model holds a {found}"
    expected = {Action.GN: nn.GroupNorm, Action.FROZEN: FrozenBNAffine}.get(lp.action)
    if expected is None:  # keep: still the batch norm the plan recorded
        if kind is None or kind.name != lp.kind:
            return f"the plan keeps a {lp.kind}, but the model holds a {found}"
        channels = num_channels(module)
    elif not isinstance(module, expected):
        return f"the plan makes it {lp.action.value} ({expected.__name__}), but the model holds a {found}"
    else:
        channels = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
    if channels != lp.channels:
        return f"{channels} channels in the model, {lp.channels} in the plan"
    if lp.action == Action.GN and module.num_groups != lp.groups:
        return f"GroupNorm with {module.num_groups} groups in the model, G={lp.groups} in the plan"
    return _eps_differs(module, lp)


def check_against_plan(model: nn.Module, plan: Plan, what: str = "the model") -> None:
    """Raise a one-sentence error naming the first layer where ``model`` is not what ``plan`` says.

    A checkpoint stores the tensors and the plan separately and :func:`gnsurgeon.load` rebuilds the
    architecture from the plan: a plan that contradicts the model (built for G=32, applied with
    C/G=16) would load as a different model without a word (max |Δ| 0.63 on resnet50), so
    :func:`gnsurgeon.save` checks before writing, and ``load`` after rebuilding.
    """
    by_path, _ = module_paths(model)
    for lp in plan:
        module = by_path.get(lp.path)
        if module is None:
            raise GNSurgeonError(f"the plan names layer {lp.path}, which {what} does not have")
        problem = plan_mismatch(lp, module)
        if problem:
            raise GNSurgeonError(f"layer {lp.path} of {what} contradicts its plan: {problem}")


def convert(
    model: nn.Module,
    *,
    groups: int | None = None,
    channels_per_group: int | None = None,
    min_group_channels: int = 2,
    strict: bool = False,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
    include_1d: bool = False,
) -> nn.Module:
    """BatchNorm -> GroupNorm on a copy of ``model``; γ/β, eps, act/drop, dtype and device are kept.

    The policy is ``groups`` (default 32) or ``channels_per_group``, not both. For the plan itself
    (to print or save it), call :func:`make_plan` and :func:`apply_plan`.
    """
    if groups is None and channels_per_group is None:
        groups = 32
    policy = GroupPolicy(groups, channels_per_group, min_group_channels, strict)
    plan = make_plan(model, policy, Selection(tuple(only), tuple(skip), include_1d))
    return apply_plan(model, plan)
