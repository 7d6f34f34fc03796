"""Checkpoints that load where users go next: timm's and torchvision's GN models, OpenMMLab, and the
``convert --like`` path that matches a target GN architecture layer for layer.

Why this module: a converted model is a means, and the obvious way to take it elsewhere — load its
state dict into the library's own GN model — is a silent trap, because **G is not in a state dict**.
timm's ``efficientnet_b0_gn`` uses G = C/8; a checkpoint converted with G ≤ 32 loads into it with
"All keys matched successfully" and computes something else (max |Δ| 0.40 on random init, timm
1.0.31). So every way out of here checks each layer's G and eps against the target, loads the
tensors into the real target class strictly, and compares outputs; a difference is refused with the
first layer named.

What the targets look like (timm 1.0.31, torchvision 0.29, mmpretrain 1.2): timm's GN models are
key-compatible with their BN originals once BN's running statistics are gone (resnet50 → resnet50_gn
161/161 keys, G = 32 everywhere; efficientnet_b0 → efficientnet_b0_gn 213/213, G = C/8); torchvision's
ResNet keeps its names under a GroupNorm ``norm_layer`` (its detection models add ``backbone.body.``
and drop ``fc``); OpenMMLab names a norm layer by its type (``bn1`` → ``gn1``, mmcv's
``build_norm_layer``) and takes one G per model (``norm_cfg``). BN* layers go out as the target's
batch norm: γ = a, β = b, running_mean = 0, running_var = 1 − eps, which reproduces ``a·x + b``
exactly (checked, not assumed: :func:`unit_variance`).

Stage: after convert (``--like``) and on any checkpoint (``export-weights``). It imports: checkpoint,
errors, files, hooks, metrics, models, plan, probe, sources, surgery.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint import CheckpointInfo, is_checkpoint, load, read_checkpoint
from .errors import GNSurgeonError, VerificationError, first_line
from .files import check_output, write_atomically
from .hooks import capture, eval_mode
from .metrics import max_errors
from .models import SourceSpec, read_state_dict
from .plan import Action, GroupPolicy, Plan, Selection
from .probe import flatten_outputs, make_probe_input, model_device, move_to
from .sources import SourceOptions, open_source
from .surgery import make_plan

__all__ = [
    "FORMATS",
    "OUTPUT_RTOL",
    "ExportWeightsReport",
    "LikeTarget",
    "check_like_structure",
    "compare_like",
    "export_weights",
    "open_like",
    "plan_like",
    "unit_variance",
]

FORMATS = ("timm", "torchvision", "torchvision-detection", "openmmlab")
# A target computes the same ops in the same order as the converted model, so its outputs agree bit
# for bit (measured: max |Δ| = 0 for every pair in tests/test_targets.py). 1e-5 leaves room for a
# library that reorders a sum, and is far below what a wrong G or eps gives (0.4 on efficientnet_b0).
OUTPUT_RTOL = 1e-5
_WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


# ------------------------------------------------------------------------------------ shared checks
def _module_at(model: nn.Module, path: str, layer: str, target: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise GNSurgeonError(f"layer {layer}: {target} has no module at {path}") from None


def _check_group_norm(lp, module: nn.Module, target: str, remedy: str) -> None:
    """One GN layer of the plan against the target's module there: a GroupNorm with the same G and eps."""
    if not isinstance(module, nn.GroupNorm):
        found = type(module).__name__
        raise GNSurgeonError(f"layer {lp.path} is a GroupNorm in the checkpoint but a {found} in {target}")
    if module.num_groups != lp.groups:
        raise GNSurgeonError(
            f"layer {lp.path}: the checkpoint has G={lp.groups} ({lp.channels} channels), {target} uses "
            f"G={module.num_groups}; G is not in a state dict, so it would load and compute something else{remedy}"
        )
    if float(module.eps) != lp.eps:
        raise GNSurgeonError(
            f"layer {lp.path}: the checkpoint has eps={lp.eps:g}, {target} uses eps={module.eps:g}; "
            f"eps is not in a state dict either{remedy}"
        )


def _layer(key: str) -> str:
    return key.rpartition(".")[0] or key


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def state_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str | None:
    """The first key (in our order, then the target's) that is missing, extra or shaped differently,
    as a phrase that names its layer; None when both load into each other strictly."""
    for key, tensor in ours.items():
        if key not in theirs:
            if not _is_counter(key):
                return f"layer {_layer(key)} ({key} is in the checkpoint, not in the target)"
        elif tuple(tensor.shape) != tuple(theirs[key].shape):
            return (
                f"layer {_layer(key)} ({key} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(theirs[key].shape)} in the target)"
            )
    for key in theirs:
        if key not in ours and not _is_counter(key):
            return f"layer {_layer(key)} ({key} is in the target, not in the checkpoint)"
    return None


def _output_errors(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> dict:
    if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs, strict=True)):
        shapes = [tuple(t.shape) for t in ours], [tuple(t.shape) for t in theirs]
        raise VerificationError(f"the target's outputs {shapes[1]} do not match the checkpoint's {shapes[0]}")
    errs = [max_errors(b, a) for a, b in zip(ours, theirs, strict=True) if a.is_floating_point()]
    return {k: max(e[k] for e in errs) for k in ("max_abs", "max_rel")} if errs else {"max_abs": 0.0, "max_rel": 0.0}


def first_divergent_layer(ours: nn.Module, theirs: nn.Module, pairs: list[tuple[str, str]], x) -> str | None:
    """The first norm layer (in execution order) whose output differs beyond :data:`OUTPUT_RTOL`
    between the two models on ``x``; ``pairs`` maps our paths to the target's."""
    with eval_mode(ours, theirs):
        a = capture(ours, move_to(x, model_device(ours)), outputs=[p for p, _ in pairs])
        b = capture(theirs, move_to(x, model_device(theirs)), outputs=[q for _, q in pairs])
    mapped = dict(pairs)
    for path in a.outputs:
        other = mapped[path]
        if other in b.outputs and max_errors(a.output(path), b.output(other))["max_rel"] > OUTPUT_RTOL:
            return path
    return None


# ---------------------------------------------------------------------------------------- --like
@dataclass
class LikeTarget:
    """The architecture ``convert --like`` matches: its name and a random-init instance."""

    name: str
    model: nn.Module


def open_like(like: str, spec: SourceSpec | None, seed: int = 0) -> LikeTarget:
    """Build ``like`` (``timm:NAME``, ``torchvision:NAME`` or a gnsurgeon checkpoint) with the source's
    constructor kwargs (``num_classes``, ...), random init: no download, only its layers matter."""
    kwargs = dict(spec.kwargs) if spec is not None and not is_checkpoint(like) else {}
    opened = open_source(like, SourceOptions(model_kwargs=kwargs, seed=seed))
    return LikeTarget(str(like), opened.model.eval())


def plan_like(model: nn.Module, like: LikeTarget, selection: Selection) -> Plan:
    """The plan for ``model`` whose every GN layer takes G and eps from the target's layer at the same
    path (rule ``like=NAME``); refused, naming the layer, where the target has no GroupNorm there."""
    plan = make_plan(model, GroupPolicy(groups=1), selection)  # G=1 never falls back; replaced below
    for lp in plan.with_action(Action.GN):
        module = _module_at(like.model, lp.path, lp.path, like.name)
        if not isinstance(module, nn.GroupNorm):
            raise GNSurgeonError(
                f"--like {like.name}: layer {lp.path} is a {type(module).__name__} there, not a GroupNorm "
                "(--like takes G from a GroupNorm architecture: timm's *_gn models, or a gnsurgeon checkpoint)"
            )
        if module.num_channels != lp.channels:
            raise GNSurgeonError(
                f"--like {like.name}: layer {lp.path} has {module.num_channels} channels there, {lp.channels} here"
            )
        lp.groups, lp.eps, lp.rule, lp.note = module.num_groups, float(module.eps), f"like={like.name}", ""
    plan.options["policy"] = {"like": like.name}
    return plan


def check_like_structure(converted: nn.Module, like: LikeTarget, plan: Plan) -> None:
    """Before any slow work (calibration): every GN layer has the target's G and eps (layers converted
    earlier, in a checkpoint source, included), and the state dicts load into each other strictly."""
    remedy = f" (convert from the BN model with --like {like.name})"
    for lp in plan.with_action(Action.GN):
        _check_group_norm(lp, _module_at(like.model, lp.path, lp.path, like.name), f"--like {like.name}", remedy)
    diff = state_difference(converted.state_dict(), like.model.state_dict())
    if diff:
        raise GNSurgeonError(f"--like {like.name}: the target differs in more than its norm layers, first at {diff}")


def compare_like(original: nn.Module, converted: nn.Module, like: LikeTarget, plan: Plan, x) -> dict:
    """Load the converted tensors into the target strictly and compare outputs on ``x`` (eval mode);
    a difference beyond :data:`OUTPUT_RTOL` is a :class:`VerificationError` naming the first layer."""
    like.model.to(model_device(converted)).load_state_dict(converted.state_dict(), strict=True)
    with eval_mode(converted, like.model), torch.no_grad():
        ours = [t for _, t in flatten_outputs(converted(move_to(x, model_device(converted))))]
        theirs = [t for _, t in flatten_outputs(like.model(move_to(x, model_device(converted))))]
    errors = _output_errors(ours, theirs)
    gn = plan.with_action(Action.GN)
    if errors["max_rel"] > OUTPUT_RTOL:
        layer = first_divergent_layer(converted, like.model, [(lp.path, lp.path) for lp in gn], x)
        raise VerificationError(
            f"--like {like.name}: the converted model loads into the target but computes something else "
            f"(output max rel {errors['max_rel']:.1e}), first at {layer or 'the model output'}"
        )
    eps_changed = [
        lp.path
        for lp in gn
        if lp.rule.startswith("like=") and float(getattr(original.get_submodule(lp.path), "eps", lp.eps)) != lp.eps
    ]
    return {
        "target": like.name,
        "layers_from_target": sum(lp.rule.startswith("like=") for lp in gn),
        "strict_load": True,
        **errors,
        "bit_identical": errors["max_abs"] == 0.0,
        "eps_from_target": eps_changed,
    }


# ------------------------------------------------------------------------------------ BN* buffers
def unit_variance(eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A running_var v in ``dtype`` with 1/sqrt(v + eps) == 1 *exactly*, so that a batch norm with
    γ = a, β = b, running_mean = 0, running_var = v computes a·x + b with no rounding of its own.
    1 − eps works for every eps tried (1e-5, 1e-3, 0.1, 0); its float neighbours are the fallback."""
    one = torch.ones((), dtype=dtype)
    first = one - eps
    for v in (first, torch.nextafter(first, one), torch.nextafter(first, -one)):
        if torch.equal(torch.rsqrt(v + eps), one):
            return v
    raise GNSurgeonError(f"no running_var makes 1/sqrt(var + {eps:g}) exactly 1 in {dtype}")


def bn_star_buffers(frozen: nn.Module, target: nn.Module) -> dict[str, torch.Tensor]:
    """A frozen affine (``scale``, ``shift``) as the tensors of the target's batch norm ``target``."""
    scale = frozen.scale.detach()
    var = unit_variance(float(target.eps), scale.dtype)
    out = {
        "weight": scale.clone(),
        "bias": frozen.shift.detach().clone(),
        "running_mean": torch.zeros_like(scale),
        "running_var": torch.full_like(scale, float(var)),
    }
    if "num_batches_tracked" in target.state_dict():  # BatchNorm2d has it, FrozenBatchNorm2d does not
        out["num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------- layouts
@dataclass
class Layout:
    """How one target takes a checkpoint: the target's structure (built on the meta device where it can
    be: its norm layers' G and eps and its key shapes are all that is read from it), how our module
    paths are named there (None: dropped, e.g. ``fc`` in a detection backbone), which outputs to
    compare, and how a user loads the written file (:attr:`reload`, a real build)."""

    name: str
    model: nn.Module | None  # None: the target library is not importable (nothing to verify against)
    usage: str
    reload: Callable[[Path], nn.Module]
    path_map: Callable[[str], str | None] = lambda path: path
    features: tuple[str, ...] = ()  # our module outputs compared; () = the model's own output
    root: str = ""  # the target's submodule the tensors fill and whose outputs are compared (backbone.body)
    theirs: Callable[[nn.Module, object], list] = lambda model, x: [t for _, t in flatten_outputs(model(x))]
    notes: list[str] = field(default_factory=list)


def _base_name(spec: SourceSpec) -> str:
    return spec.name.split(".")[0]


def _kwargs_for(spec: SourceSpec, library: str, allowed: tuple[str, ...]) -> dict:
    """The source's constructor kwargs that the target takes: all of them within one library, else
    only ``allowed`` (``num_classes``...)."""
    if spec.library == library:
        return dict(spec.kwargs)
    return {k: v for k, v in spec.kwargs.items() if k in allowed}


def _like_from_history(info: CheckpointInfo, library: str) -> str | None:
    for entry in reversed(info.history):
        like = ((entry.get("options") or {}).get("policy") or {}).get("like")
        if isinstance(like, str) and like.startswith(f"{library}:"):
            return like.partition(":")[2]
    return None


def _norm_kinds(plan: Plan) -> str:
    """``gn`` when every converted layer is GroupNorm, ``frozen`` when every one is BN*; else refused."""
    touched = [lp for lp in plan if lp.action != Action.KEEP]
    if not touched:
        raise GNSurgeonError("the checkpoint converted no layer: export its source model's own weights instead")
    folded = [lp.path for lp in touched if lp.action == Action.FOLDED]
    if folded:
        raise GNSurgeonError(
            f"layer {folded[0]} is folded into its conv, and a target has a norm layer there: "
            "export a checkpoint converted with --freeze but without --fold"
        )
    first = touched[0]
    for lp in touched[1:]:
        if lp.action != first.action:
            raise GNSurgeonError(
                f"layer {lp.path} is {lp.action} but {first.path} is {first.action}: this target builds every "
                "norm layer from one norm_layer, so the plan must be all GroupNorm or all BN*"
            )
    kept = plan.with_action(Action.KEEP)
    if kept:
        lp = kept[0]
        raise GNSurgeonError(f"layer {lp.path} is still a batch norm ({lp.note}): this target has one norm type")
    return first.action.value


def _group_counts(plan: Plan) -> tuple[dict[int, int], float]:
    """``{C: G}`` and the one eps of a GN plan, for a ``norm_layer`` that only sees C; refused naming
    the layer where two layers of the same C have different G, or eps differs."""
    groups: dict[int, int] = {}
    first = plan.with_action(Action.GN)[0]
    for lp in plan.with_action(Action.GN):
        if groups.setdefault(lp.channels, lp.groups) != lp.groups:
            raise GNSurgeonError(
                f"layer {lp.path} has G={lp.groups} where another layer of {lp.channels} channels has "
                f"G={groups[lp.channels]}: a norm_layer(C) cannot build both"
            )
        if lp.eps != first.eps:
            raise GNSurgeonError(f"layer {lp.path} has eps={lp.eps:g}, {first.path} eps={first.eps:g}: one norm_layer")
    return groups, first.eps


def _gn_factory(plan: Plan) -> tuple[Callable[[int], nn.Module], str]:
    """The ``norm_layer`` that rebuilds the plan's GroupNorms, and how to write it in Python."""
    groups, eps = _group_counts(plan)
    eps_text = "" if eps == 1e-5 else f", eps={eps!r}"
    if len(set(groups.values())) == 1:
        g = next(iter(groups.values()))
        text = f"lambda c: nn.GroupNorm({g}, c{eps_text})"
    else:
        text = f"lambda c: nn.GroupNorm({dict(sorted(groups.items()))}[c], c{eps_text})"
    return (lambda c: nn.GroupNorm(groups[c], c, eps=eps)), text


def _norm_layer(plan: Plan) -> tuple[Callable[[int], nn.Module], str]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    if _norm_kinds(plan) == "gn":
        return _gn_factory(plan)
    return FrozenBatchNorm2d, "torchvision.ops.FrozenBatchNorm2d"


def _read_into(model: nn.Module, path: Path, origin: str) -> nn.Module:
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VerificationError(f"{origin} does not load {path.name} strictly: {first_line(exc)}") from None
    return model


def _timm_layout(info: CheckpointInfo, model: nn.Module, target: str | None) -> Layout:
    import timm

    spec = info.source
    name = target or _like_from_history(info, "timm") or f"{_base_name(spec)}_gn"
    if not timm.is_model(name.split(".")[0]):
        raise GNSurgeonError(f"timm has no model {name!r}: name the GN model with --target NAME")
    kwargs = _kwargs_for(spec, "timm", ("num_classes", "in_chans"))
    with torch.device("meta"):  # structure only (G, eps, key shapes): no weight init, no memory
        built = timm.create_model(name, pretrained=False, **kwargs)
    overlay_extra = {}
    classes = kwargs.get("num_classes")
    if classes is not None and classes != built.pretrained_cfg.get("num_classes"):
        overlay_extra["num_classes"] = classes  # else timm drops the classifier (a different class count)
    rest = {k: v for k, v in kwargs.items() if k != "num_classes" or not overlay_extra}

    def reload(path: Path) -> nn.Module:
        overlay = {"file": str(path), **overlay_extra}
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **rest)

    args = "".join(f", {k}={v!r}" for k, v in overlay_extra.items())
    extra = "".join(f", {k}={v!r}" for k, v in rest.items())
    usage = f'timm.create_model("{name}", pretrained=True, pretrained_cfg_overlay=dict(file=OUT{args}){extra})'
    return Layout(f"timm:{name}", built, usage, reload)


def _torchvision_builder(name: str, norm_layer, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    try:
        return tvm.get_model_builder(name)(weights=None, norm_layer=norm_layer, **kwargs)
    except TypeError as exc:
        raise GNSurgeonError(f"torchvision {name} cannot be built with a norm_layer ({first_line(exc)})") from None


def _torchvision_layout(info: CheckpointInfo, model: nn.Module, target: str | None) -> Layout:
    import torchvision.models as tvm

    name = target or _base_name(info.source)
    if name not in tvm.list_models(module=tvm):
        raise GNSurgeonError(f"torchvision has no classification model {name!r}: name it with --target NAME")
    norm_layer, norm_text = _norm_layer(info.plan)
    kwargs = _kwargs_for(info.source, "torchvision", ("num_classes",))
    with torch.device("meta"):  # structure only, as for timm
        built = _torchvision_builder(name, norm_layer, kwargs)
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    usage = (
        f"model = torchvision.models.{name}(norm_layer={norm_text}{extra}); "
        "model.load_state_dict(torch.load(OUT, weights_only=True))"
    )
    return Layout(
        f"torchvision:{name}",
        built,
        usage,
        lambda path: _read_into(_torchvision_builder(name, norm_layer, kwargs), path, f"torchvision {name}"),
    )


_FPN_BACKBONES = re.compile(r"^(resnet(18|34|50|101|152)|resnext50_32x4d|resnext101_32x8d|wide_resnet(50|101)_2)$")
_FEATURES = ("layer1", "layer2", "layer3", "layer4")


def _fasterrcnn(name: str, norm_layer) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=norm_layer, trainable_layers=5)
    return FasterRCNN(backbone, num_classes=91)


def _load_backbone(name: str, norm_layer, path: Path) -> nn.Module:
    """What a detection user does: build the detector, load the file non-strictly (FPN and heads start
    fresh), then make sure every ``backbone.body.`` tensor came from the file and nothing was ignored."""
    detector = _fasterrcnn(name, norm_layer)
    result = detector.load_state_dict(read_state_dict(path), strict=False)
    body_missing = [k for k in result.missing_keys if k.startswith("backbone.body.") and not _is_counter(k)]
    if result.unexpected_keys or body_missing:
        found = (result.unexpected_keys or body_missing)[0]
        raise VerificationError(f"the detector does not take {path.name} as a backbone: first at {found}")
    return detector


def _detection_layout(info: CheckpointInfo, model: nn.Module, target: str | None) -> Layout:
    name = target or _base_name(info.source)
    if not _FPN_BACKBONES.match(name):
        raise GNSurgeonError(f"{name!r} is not a torchvision detection backbone (resnet18..152, resnext, wide_resnet)")
    norm_layer, norm_text = _norm_layer(info.plan)
    usage = (
        f'backbone = resnet_fpn_backbone(backbone_name="{name}", weights=None, norm_layer={norm_text}, '
        "trainable_layers=5); model = FasterRCNN(backbone, num_classes=91); "
        "model.load_state_dict(torch.load(OUT, weights_only=True), strict=False)  "
        "# fills backbone.body; FPN and heads start fresh"
    )
    with torch.device("meta"):  # structure only, as for timm
        built = _fasterrcnn(name, norm_layer)
    return Layout(
        f"torchvision-detection:{name}",
        built,
        usage,
        lambda path: _load_backbone(name, norm_layer, path),
        path_map=lambda p: None if p == "fc" or p.startswith("fc.") else ("backbone.body." + p if p else None),
        features=_FEATURES,
        root="backbone.body",
        theirs=lambda detector, x: list(detector.backbone.body(x).values()),
        notes=["fc is not part of a detection backbone: dropped"],
    )


_MM_DEPTH = re.compile(r"^resnet(18|34|50|101|152)$")


def _mm_norm_cfg(plan: Plan) -> tuple[dict, str]:
    """OpenMMLab's ``norm_cfg``: one type and one G for the whole backbone."""
    if _norm_kinds(plan) == "frozen":
        return {"type": "BN", "requires_grad": False}, "bn"
    gn = plan.with_action(Action.GN)
    fallbacks = [lp for lp in gn if lp.groups != gn[0].groups]
    if fallbacks:
        listed = ", ".join(f"{lp.path} (G={lp.groups})" for lp in fallbacks[:4])
        more = f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else ""
        raise GNSurgeonError(
            f"OpenMMLab's norm_cfg takes one G per model, but {gn[0].path} has G={gn[0].groups} and "
            f"{listed}{more} differ (per-layer fallbacks): convert with a --groups every layer admits"
        )
    _group_counts(plan)  # one eps
    cfg = {"type": "GN", "num_groups": gn[0].groups, "requires_grad": True}
    if gn[0].eps != 1e-5:
        cfg["eps"] = gn[0].eps
    return cfg, "gn"


def _mm_resnet(depth: int, norm_cfg: dict) -> nn.Module | None:
    try:
        from mmpretrain.models.backbones import ResNet
    except Exception:  # not installed, or broken on this torch: the layout is written unverified
        return None
    extra = {"norm_eval": True} if norm_cfg["type"] == "BN" else {}
    return ResNet(depth=depth, norm_cfg=dict(norm_cfg), out_indices=(0, 1, 2, 3), **extra)


def _mm_reload(depth: int, norm_cfg: dict, path: Path) -> nn.Module:
    from mmengine.runner import load_checkpoint

    backbone = _mm_resnet(depth, norm_cfg)
    try:  # mmengine's own reader, strictly (a Pretrained init_cfg calls it with strict=False)
        load_checkpoint(backbone, str(path), map_location="cpu", strict=True, logger="silent")
    except RuntimeError as exc:
        raise VerificationError(f"mmpretrain ResNet does not load {path.name} strictly: {first_line(exc)}") from None
    return backbone


def _openmmlab_layout(info: CheckpointInfo, model: nn.Module, target: str | None) -> Layout:
    name = target or _base_name(info.source)
    match = _MM_DEPTH.match(name)
    if not match:
        raise GNSurgeonError(f"OpenMMLab export takes a ResNet-18/34/50/101/152 (mmpretrain ResNet), not {name!r}")
    depth = int(match.group(1))
    norm_cfg, abbr = _mm_norm_cfg(info.plan)
    norms = {lp.path for lp in info.plan if lp.action != Action.KEEP}

    def path_map(path: str) -> str | None:
        if path == "fc" or path.startswith("fc."):
            return None
        if path in norms:  # build_norm_layer names a norm by its type: bn1 -> gn1
            head, _, leaf = path.rpartition(".")
            leaf = re.sub(r"^bn(\d+)$", rf"{abbr}\1", leaf)
            return f"{head}.{leaf}" if head else leaf
        return path

    built = _mm_resnet(depth, norm_cfg)
    usage = (
        f"backbone=dict(type='ResNet', depth={depth}, norm_cfg={norm_cfg!r}"
        + (", norm_eval=True" if abbr == "bn" else "")
        + ", init_cfg=dict(type='Pretrained', checkpoint=OUT))"
    )
    layout = Layout(
        f"openmmlab:ResNet-{depth}",
        built,
        usage,
        lambda path: _mm_reload(depth, norm_cfg, path),
        path_map=path_map,
        features=_FEATURES,
        theirs=lambda backbone, x: list(backbone(x)),
        notes=["fc is not part of an OpenMMLab backbone: dropped"],
    )
    if built is None:
        layout.notes.append(
            "not verified: mmpretrain is not importable here (pip install mmengine mmcv-lite mmpretrain); "
            "keys renamed as build_norm_layer names them, G checked against the plan"
        )
    return layout


_LAYOUTS: dict[str, Callable[[CheckpointInfo, nn.Module, str | None], Layout]] = {
    "timm": _timm_layout,
    "torchvision": _torchvision_layout,
    "torchvision-detection": _detection_layout,
    "openmmlab": _openmmlab_layout,
}


# ----------------------------------------------------------------------------------- export-weights
@dataclass
class ExportWeightsReport:
    """What ``export-weights`` wrote and how it was proven: the target, the tensors, the norm layers
    as the target builds them, the output comparison after loading the file as a user would."""

    checkpoint: str
    format: str
    target: str
    output: str
    tensors: int
    norm_layers: dict
    verified: bool
    max_abs: float | None
    max_rel: float | None
    usage: str
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"command": "export-weights", "gnsurgeon_version": __version__, **asdict(self)}


def _check_norm_layers(plan: Plan, layout: Layout, remedy: str) -> dict[str, int]:
    """Every converted layer against the target's module at its path, in plan order (the first
    difference is named): GroupNorm with the same G and eps, or a batch norm where the plan has BN*.
    Returns ``{target norm type: count}``."""
    counts: dict[str, int] = {}
    for lp in plan:
        if lp.action == Action.KEEP:
            continue
        module = _module_at(layout.model, layout.path_map(lp.path) or lp.path, lp.path, layout.name)
        if lp.action == Action.GN:
            _check_group_norm(lp, module, layout.name, remedy)
        elif lp.action == Action.FOLDED:
            _norm_kinds(Plan([lp]))  # raises, naming the folded layer
        elif not isinstance(getattr(module, "running_var", None), torch.Tensor):
            raise GNSurgeonError(
                f"layer {lp.path} is BN* in the checkpoint but a {type(module).__name__} in {layout.name}, "
                "which has no batch-norm buffers to hold it"
            )
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def _stand_in(layout: Layout, path: str, channels: int) -> nn.Module:
    """The target's module at ``path``, or a default BatchNorm2d (eps 1e-5) when there is no target."""
    return layout.model.get_submodule(path) if layout.model is not None else nn.BatchNorm2d(channels)


def _layout_state(model: nn.Module, plan: Plan, layout: Layout) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's tensors under the target's names, BN* layers as the target's batch norm;
    plus the keys the target has no place for (a classifier in a backbone)."""
    frozen = plan.by_path()
    out, dropped = {}, []
    for key, tensor in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        new_path = layout.path_map(path)
        if new_path is None:
            dropped.append(key)
            continue
        lp = frozen.get(path)
        if lp is not None and lp.action == Action.FROZEN:
            if leaf == "scale":
                buffers = bn_star_buffers(model.get_submodule(path), _stand_in(layout, new_path, lp.channels))
                out.update({f"{new_path}.{k}": v.cpu() for k, v in buffers.items()})
            continue
        out[f"{new_path}.{leaf}" if new_path else leaf] = tensor.detach().cpu().contiguous().clone()
    return out, dropped


def _save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _ours(model: nn.Module, layout: Layout, x) -> list[torch.Tensor]:
    if not layout.features:
        return [t for _, t in flatten_outputs(model(x))]
    seen = capture(model, x, outputs=layout.features)
    return [seen.output(path) for path in layout.features]


def _verify_file(model: nn.Module, info: CheckpointInfo, layout: Layout, path: Path, seed: int) -> dict:
    """Load ``path`` into the target as a user would (:attr:`Layout.reload`), compare outputs on a
    probe input; beyond :data:`OUTPUT_RTOL` a :class:`VerificationError` names the first layer."""
    loaded = layout.reload(path)
    loaded.to(model_device(model))  # not chained: mmpretrain's ResNet.train() returns None
    x = move_to(make_probe_input(info.data_config, batch=2, seed=seed), model_device(model))
    with eval_mode(model, loaded), torch.no_grad():
        errors = _output_errors(_ours(model, layout, x), layout.theirs(loaded, x))
    if errors["max_rel"] > OUTPUT_RTOL:
        prefix = layout.root + "." if layout.root else ""
        pairs = [
            (lp.path, layout.path_map(lp.path).removeprefix(prefix)) for lp in info.plan if lp.action != Action.KEEP
        ]
        body = loaded.get_submodule(layout.root) if layout.root else loaded
        layer = first_divergent_layer(model, body, pairs, x)
        raise VerificationError(
            f"{path.name} loads into {layout.name} but computes something else (max rel "
            f"{errors['max_rel']:.1e}), first at {layer or 'the model output'}"
        )
    return errors


def _check_weights_output(output: str | Path, fmt: str) -> Path:
    path = check_output(output, None, "-o")
    if path.suffix not in _WEIGHTS_SUFFIXES:
        raise GNSurgeonError(f"-o {path} must end in one of {', '.join(_WEIGHTS_SUFFIXES)}")
    if fmt == "openmmlab" and path.suffix == ".safetensors":
        raise GNSurgeonError(f"-o {path}: OpenMMLab's load_checkpoint reads torch files; use .pth")
    return path


def export_weights(
    checkpoint: str | Path, fmt: str, output: str | Path, *, target: str | None = None, seed: int = 0
) -> ExportWeightsReport:
    """Write ``checkpoint``'s tensors as a plain state dict in ``fmt``'s layout (one of :data:`FORMATS`)
    and prove it loads there: each layer's G and eps checked against the target (they are not in a
    state dict), keys and shapes compared, the file loaded into the real target class as a user would
    and its outputs compared. ``target`` names the target model (default: the source's name, timm's
    ``NAME_gn``, or the ``--like`` target recorded in the checkpoint). Nothing is written on failure."""
    if fmt not in _LAYOUTS:
        raise GNSurgeonError(f"--to {fmt!r} is not a known format ({', '.join(FORMATS)})")
    output = _check_weights_output(output, fmt)
    info = read_checkpoint(checkpoint)
    if info.source is None:
        raise GNSurgeonError(f"checkpoint {checkpoint} records no source model, so there is no target to match")
    model = load(checkpoint)
    layout = _LAYOUTS[fmt](info, model, target)
    remedy = f" (convert with --like {layout.name})" if fmt == "timm" else ""
    norms = _check_norm_layers(info.plan, layout, remedy) if layout.model is not None else {}
    state, dropped = _layout_state(model, info.plan, layout)
    if layout.model is not None:
        scope = layout.root + "." if layout.root else ""  # a detector's FPN and heads start fresh
        theirs = {k: v for k, v in layout.model.state_dict().items() if k.startswith(scope)}
        diff = state_difference(state, theirs)
        if diff:
            raise GNSurgeonError(f"{layout.name} differs from the checkpoint in more than its norm layers: {diff}")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / output.name
        _save_tensors(state, staged)
        errors = _verify_file(model, info, layout, staged, seed) if layout.model is not None else {}
        write_atomically(output, lambda dst: shutil.copyfile(staged, dst))
    return ExportWeightsReport(
        checkpoint=str(checkpoint),
        format=fmt,
        target=layout.name,
        output=str(output),
        tensors=len(state),
        norm_layers=norms,
        verified=layout.model is not None,
        max_abs=errors.get("max_abs"),
        max_rel=errors.get("max_rel"),
        usage=layout.usage.replace("OUT", repr(str(output))),
        dropped=dropped,
        notes=list(layout.notes),
    )
