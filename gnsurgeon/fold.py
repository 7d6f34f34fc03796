"""Fold BN* into the conv/linear that produces its input, only where that is exactly equivalent.

BN* is ``y = a·x + b`` per channel. When ``x = W * u + c`` comes straight from a conv or linear
layer whose output nothing else reads, ``y = (a·W) * u + (a·c + b)``: scale each output channel's
weights by ``a`` and the bias likewise. :func:`plan_folds` decides where that holds, from an observed
forward pass (:mod:`gnsurgeon.graph`), and writes the reason into the plan where it does not;
:func:`fold_into_producer` does the arithmetic (float64, then cast back). Nothing is guessed: a layer
whose producer cannot be established stays BN*.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import GNSurgeonError
from .graph import observe_layer_inputs
from .layers import frozen_affine_params, fused_act_modules
from .metrics import max_errors
from .plan import LayerPlan, Plan
from .probe import flatten_outputs

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_forwards() -> set:
    forwards = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward}
    try:  # timm's TF-"SAME" conv pads its input, then runs a plain conv: still linear in the weights
        from timm.layers import Conv2dSame

        forwards.add(Conv2dSame.forward)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return forwards


_PLAIN_FORWARDS = _plain_forwards()


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
    frozen = [lp.path for lp in plan if lp.action == "frozen"]
    if not frozen:
        return plan
    seen, calls = observe_layer_inputs(model, example, frozen)
    modules = dict(model.named_modules())
    claimed: set[str] = set()
    layers = []
    for lp in plan:
        if lp.action != "frozen":
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
            layers.append(dataclasses.replace(lp, action="folded", note="", producer=info.producer))
    return Plan(layers=layers, options={**plan.options, "fold": True})


def fold_into_producer(model: nn.Module, lp: LayerPlan, bn: nn.Module) -> nn.Module:
    """Merge ``bn``'s BN* affine into ``lp.producer`` (in ``model``, in place); return what replaces
    ``bn``: its fused ``drop``/``act`` (or Identity). A conv without bias gains one."""
    if not lp.producer:
        raise GNSurgeonError(f"layer {lp.path} is planned as folded but names no producer")
    try:
        producer = model.get_submodule(lp.producer)
    except AttributeError:
        raise GNSurgeonError(f"layer {lp.path} folds into {lp.producer}, which the model does not have") from None
    reason = unfoldable_reason(producer, lp.channels, 2 if isinstance(producer, nn.Linear) else 4)
    if reason:
        raise GNSurgeonError(f"layer {lp.path} cannot fold into {lp.producer}: {reason}")
    a, b = frozen_affine_params(bn)
    weight = producer.weight
    a, b = a.to(weight.device), b.to(weight.device)
    with torch.no_grad():
        w = weight.double() * a.view((-1,) + (1,) * (weight.dim() - 1))
        bias = producer.bias.double() if producer.bias is not None else torch.zeros_like(a)
        new_bias = a * bias + b
        weight.copy_(w.to(weight.dtype))
        if producer.bias is None:
            producer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)
        else:
            producer.bias.copy_(new_bias.to(producer.bias.dtype))
    drop, act = fused_act_modules(bn)
    if isinstance(drop, nn.Identity):
        return act
    return nn.Sequential(drop, act)


# Relative error (max |Δ| / max |reference|) that float32 rounding explains after folding: each fold
# rounds W·a once (~6e-8 relative); through a deep network this stays well below 1e-5 (resnet50:
# ~1e-6). Anything above 1e-4 means the folded model computes something else.
FOLD_RTOL = 1e-4


def _capture(model: nn.Module, paths: list[str], example) -> tuple[dict[str, torch.Tensor], object]:
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)

        def hook(_module, _args, output, path=path):
            outputs[path] = output.detach().clone()  # clone: later in-place ops must not change it

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            final = model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return outputs, final


def compare_freeze_fold(model: nn.Module, converted: nn.Module, plan: Plan, example, rtol: float = FOLD_RTOL) -> dict:
    """Compare ``converted`` with ``model`` where only GN was applied (BN kept, eval mode).

    Per frozen/folded layer and on the final output: max abs and max relative difference. Raises
    :class:`VerificationError` naming the layers when any relative difference exceeds ``rtol``.
    """
    from .errors import VerificationError
    from .surgery import apply_plan

    touched = [lp for lp in plan if lp.action in ("frozen", "folded")]
    reference_plan = Plan(
        [dataclasses.replace(lp, action="keep") if lp in touched else lp for lp in plan], plan.options
    )
    reference = apply_plan(model, reference_plan)
    paths = [lp.path for lp in touched]
    ref_layers, ref_out = _capture(reference, paths, example)
    new_layers, new_out = _capture(converted, paths, example)
    layers = {}
    for lp in touched:
        if lp.path in ref_layers and lp.path in new_layers:
            layers[lp.path] = {"action": lp.action, **max_errors(ref_layers[lp.path], new_layers[lp.path])}
    ref_flat, new_flat = flatten_outputs(ref_out), flatten_outputs(new_out)
    output = None
    if [(n, t.shape) for n, t in ref_flat] == [(n, t.shape) for n, t in new_flat]:
        errs = [max_errors(a, b) for (_, a), (_, b) in zip(ref_flat, new_flat, strict=True) if a.is_floating_point()]
        if errs:
            output = {k: max(e[k] for e in errs) for k in ("max_abs", "max_rel")}
    bad = [p for p, e in layers.items() if e["max_rel"] > rtol]
    if output is not None and output["max_rel"] > rtol:
        bad.append("the model output")
    result = {"rtol": rtol, "layers": layers, "output": output}
    if bad:
        raise VerificationError(
            f"freeze/fold changed the model beyond float32 rounding (rtol {rtol:g}) at: {', '.join(bad[:5])}"
        )
    return result
