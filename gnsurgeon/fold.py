"""Fold BN* into the conv/linear that produces its input, only where that is exactly equivalent.

BN* is ``y = a·x + b`` per channel. When ``x = W * u + c`` comes straight from a conv or linear
layer whose output nothing else reads, ``y = (a·W) * u + (a·c + b)``: scale each output channel's
weights by ``a`` and the bias likewise. :func:`plan_folds` decides where that holds, from an observed
forward pass (:mod:`gnsurgeon.graph`), and writes the reason into the plan where it does not.
The arithmetic is split as in torch's ``torch/nn/utils/fusion.py``: :func:`fold_affine_weights`
works on tensors only (float64, then cast back; its inputs are never changed), and
:func:`fold_into_producer` is the thin module-level wrapper that finds the producer, refuses what
is not exact and writes the folded tensors into it. Nothing is guessed: a layer whose producer
cannot be established stays BN*. Whether a folded model still computes the original function is
checked in :mod:`gnsurgeon.checks`, which imports this module (never the other way round).

Stage: plan refinement and the fold arithmetic that :func:`gnsurgeon.surgery.apply_plan` calls.
It imports: errors, graph, layers, plan (never surgery or checks, which import it).
"""

from __future__ import annotations

import dataclasses

import torch
from timm.layers import Conv2dSame
from torch import nn
from torch.nn.utils import parametrize

from .errors import GNSurgeonError
from .graph import observe_layer_inputs
from .layers import frozen_affine_params, fused_act_modules
from .plan import Action, LayerPlan, Plan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Forwards that are linear in the weights; timm's TF-"SAME" conv pads its input, then runs a plain conv.
_PLAIN_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward, Conv2dSame.forward}


def unfoldable_reason(producer: nn.Module, channels: int, input_ndim: int) -> str:
    """Why folding into ``producer`` would not be exact, or "" when it is."""
    name = type(producer).__name__
    if not isinstance(producer, (*_CONVS, nn.Linear)):
        return f"producer is a {name}, not a conv/linear"
    if type(producer).forward not in _PLAIN_FORWARDS:
        return f"producer {name} has its own forward (e.g. weight standardisation)"
    if parametrize.is_parametrized(producer) or producer._forward_pre_hooks or producer._forward_hooks:
        return f"producer {name} has hooks or parametrizations on its weights"
    out = producer.out_channels if isinstance(producer, _CONVS) else producer.out_features
    if out != channels:
        return f"producer has {out} output channels, the layer {channels}"
    if isinstance(producer, nn.Linear) and input_ndim != 2:
        return "linear output is not (N, C): its features are not the normalized channel axis"
    return ""


def _reason_for_missing_producer(made_by: str) -> str:
    if made_by in ("cat", "concat", "concatenate", "stack"):
        return "after concat"
    if made_by in ("add", "__add__", "__iadd__", "add_", "__radd__"):
        return "after add (residual stream)"
    if made_by == "the model input":
        return "no producer found (reads the model input)"
    return f"no producer found (input made by {made_by})"


def plan_folds(model: nn.Module, plan: Plan, example) -> Plan:
    """Return a plan in which every ``frozen`` layer that folds exactly becomes ``folded``.

    ``model`` is the model the plan applies to (before surgery); ``example`` a probe input. Layers
    that stay ``frozen`` get the reason in their note.
    """
    frozen = [lp.path for lp in plan if lp.action == Action.FROZEN]
    if not frozen:
        return plan
    seen, calls = observe_layer_inputs(model, example, frozen)
    modules = dict(model.named_modules())
    claimed: set[str] = set()
    layers = []
    for lp in plan:
        if lp.action != Action.FROZEN:
            layers.append(lp)
            continue
        info = seen[lp.path]
        reason = ""
        if info.calls == 0:
            reason = "not reached by the probe input"
        elif info.calls > 1:
            reason = f"layer is called {info.calls} times per forward"
        elif info.producer is None:
            reason = _reason_for_missing_producer(info.made_by)
        else:
            reason = unfoldable_reason(modules[info.producer], lp.channels, info.input_ndim)
            if reason.startswith("producer is a") and info.made_by in ("cat", "concat", "stack"):
                reason = "after concat"
        if not reason and info.other_readers:
            readers = ", ".join(sorted({r.split("#")[0] for r in info.other_readers}))
            reason = f"producer output shared (also read by {readers})"
        elif not reason and calls.get(info.producer, 0) != 1:
            reason = f"producer {info.producer} is called {calls.get(info.producer, 0)} times per forward"
        elif not reason and info.producer in claimed:
            reason = f"producer {info.producer} already takes another layer"
        if reason:
            layers.append(dataclasses.replace(lp, note=reason, producer=None))
        else:
            claimed.add(info.producer)
            layers.append(dataclasses.replace(lp, action=Action.FOLDED, note="", producer=info.producer))
    return Plan(layers=layers, options={**plan.options, "fold": True})


def fold_affine_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    out_dim: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight', bias')`` of a conv/linear followed by the per-channel affine ``y = scale·x + shift``:
    ``weight' = scale·weight`` along ``out_dim`` (the output-channel axis, 0 for conv/linear),
    ``bias' = scale·bias + shift`` (``bias`` None counts as zeros).

    Computed in float64 and cast back, so a fold adds one rounding of its own and no more: the new
    weight has ``weight``'s dtype, the new bias ``bias``'s (``weight``'s when there was none). New
    tensors on ``weight``'s device; no input is changed.
    """
    if not -weight.dim() <= out_dim < weight.dim():
        raise GNSurgeonError(f"out_dim {out_dim} is not an axis of a {weight.dim()}-d weight")
    channels = weight.shape[out_dim]
    for name, t in (("scale", scale), ("shift", shift), ("bias", bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise GNSurgeonError(f"{name} has shape {tuple(t.shape)}, the weight {channels} output channels")
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    a, b = scale.to(weight.device, torch.float64), shift.to(weight.device, torch.float64)
    with torch.no_grad():
        new_weight = weight.detach().double() * a.view(shape)
        old_bias = bias.detach().double() if bias is not None else torch.zeros_like(a)
        new_bias = a * old_bias + b
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return new_weight.to(weight.dtype), new_bias.to(bias_dtype)


def fold_into_producer(model: nn.Module, lp: LayerPlan, bn: nn.Module) -> nn.Module:
    """Merge ``bn``'s BN* affine into ``lp.producer`` (in ``model``, in place); return what replaces
    ``bn``: its fused ``drop``/``act`` (or Identity). A conv without bias gains one.

    The producer keeps its parameter objects; only their values change (under ``no_grad``).
    """
    if not lp.producer:
        raise GNSurgeonError(f"layer {lp.path} is planned as folded but names no producer")
    try:
        producer = model.get_submodule(lp.producer)
    except AttributeError:
        raise GNSurgeonError(f"layer {lp.path} folds into {lp.producer}, which the model does not have") from None
    reason = unfoldable_reason(producer, lp.channels, 2 if isinstance(producer, nn.Linear) else 4)
    if reason:
        raise GNSurgeonError(f"layer {lp.path} cannot fold into {lp.producer}: {reason}")
    scale, shift = frozen_affine_params(bn)
    weight, bias = fold_affine_weights(producer.weight, producer.bias, scale, shift)
    with torch.no_grad():
        producer.weight.copy_(weight)
        if producer.bias is None:
            producer.bias = nn.Parameter(bias, requires_grad=producer.weight.requires_grad)
        else:
            producer.bias.copy_(bias)
    drop, act = fused_act_modules(bn)
    if isinstance(drop, nn.Identity):
        return act
    return nn.Sequential(drop, act)
