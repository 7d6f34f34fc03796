"""The equivalence checks that ``convert`` runs on its result before anything is saved.

:func:`run_probe` compares the converted model with its original on one probe input: the same
output structure and shapes, finite values, and no selected layer still a batch norm; it reports how
far the function moved (cosine of the outputs) before any training. :func:`compare_freeze_fold`
holds freezing and folding to a stricter standard: BN* and its fold are exact rewrites of BN in
eval mode, so the converted model must match the original, with only its GN layers applied, to
float32 rounding at every frozen/folded layer and on the output.

Why a module of their own: a check rebuilds a reference model with :func:`~gnsurgeon.surgery.apply_plan`,
and surgery applies folds, so a check living in ``fold.py`` made fold and surgery import each other.
Here the arrows point one way: checks -> surgery -> fold.

Stage: verification after surgery. It imports: errors, hooks, layers, metrics, plan, probe, sources,
surgery (nothing imports it but the stage runners, e.g. conversion).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .errors import VerificationError
from .hooks import capture, eval_mode
from .layers import FrozenBNAffine, norm_kind
from .metrics import max_errors
from .models import DataConfig
from .plan import Action, Plan
from .probe import flatten_outputs, make_probe_input, model_device, move_to
from .surgery import apply_plan

__all__ = ["FOLD_RTOL", "compare_freeze_fold", "run_probe"]

# Relative error (max |Δ| / max |reference|) that float32 rounding explains after folding: each fold
# rounds W·a once (~6e-8 relative); through a deep network this stays well below 1e-5 (resnet50:
# ~1e-6). Anything above 1e-4 means the folded model computes something else.
FOLD_RTOL = 1e-4

# The module type each action leaves at a layer's path (a folded layer leaves its act, or Identity).
_REPLACED_BY: dict[Action, type] = {Action.GN: nn.GroupNorm, Action.FROZEN: FrozenBNAffine}


@torch.no_grad()
def run_probe(original: nn.Module, converted: nn.Module, config: DataConfig, plan: Plan) -> dict:
    """Compare original and converted on one probe input (eval mode); raise if the result is broken.

    Checks: the same output structure and shapes (detection outputs, whose box counts depend on
    the weights, only by structure), finite outputs, and no converted layer still a batch norm.
    Reports the cosine similarity of the outputs: how far the function moved before any training.
    Both models come back in the train/eval modes they had.
    """
    x = make_probe_input(config)
    try:
        with eval_mode(original, converted):
            ref = flatten_outputs(original(move_to(x, model_device(original))))
            out = flatten_outputs(converted(move_to(x, model_device(converted))))
    except Exception as exc:
        raise VerificationError(f"probe forward on input {tuple(config.input_size)} failed: {exc}") from None
    detection = config.task == "detection"
    problems, cosines = _output_problems(ref, out, detection)
    leftover = _leftover_batch_norms(converted, plan)
    if leftover:
        problems.append(f"{len(leftover)} selected layer(s) are still batch norms ({', '.join(leftover[:3])})")
    if problems:
        raise VerificationError("converted model failed its probe check: " + "; ".join(problems))
    return {
        "input_size": list(config.input_size),
        "outputs": [{"name": n, "shape": list(t.shape)} for n, t in out],
        # Detection outputs hold as many boxes as the weights find: compare their structure only.
        "compared": "structure" if detection else "shapes",
        "finite": True,
        "output_cosine": min(cosines) if cosines else None,
    }


def _output_problems(
    ref: list[tuple[str, torch.Tensor]], out: list[tuple[str, torch.Tensor]], detection: bool
) -> tuple[list[str], list[float]]:
    """(what is wrong with the converted outputs, the cosine of each comparable output pair)."""
    problems = []
    if [name for name, _ in ref] != [name for name, _ in out]:
        problems.append("output structure differs from the original")
    cosines = []
    for (name, a), (_, b) in zip(ref, out, strict=False):
        if not detection and a.shape != b.shape:
            problems.append(f"{name} has shape {tuple(b.shape)}, original {tuple(a.shape)}")
        if b.is_floating_point() and not torch.isfinite(b).all():
            problems.append(f"{name} has non-finite values")
        if not detection and a.shape == b.shape and a.is_floating_point() and a.numel():
            cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
            cosines.append(float(cos))
    return problems, cosines


def _leftover_batch_norms(converted: nn.Module, plan: Plan) -> list[str]:
    """Paths the plan converts that still hold a batch norm (or not the module the action makes)."""
    leftover = []
    for lp in plan.with_action(Action.GN, Action.FROZEN, Action.FOLDED):
        module = converted.get_submodule(lp.path)
        expected = _REPLACED_BY.get(lp.action)
        if norm_kind(module) is not None or (expected is not None and not isinstance(module, expected)):
            leftover.append(lp.path)
    return leftover


def compare_freeze_fold(model: nn.Module, converted: nn.Module, plan: Plan, example, rtol: float = FOLD_RTOL) -> dict:
    """Compare ``converted`` with ``model`` where only GN was applied (BN kept, eval mode).

    Per frozen/folded layer and on the final output: max abs and max relative difference. Raises
    :class:`VerificationError` naming the layers when any relative difference exceeds ``rtol``.
    """
    touched = plan.with_action(Action.FROZEN, Action.FOLDED)
    reference_plan = Plan(
        [dataclasses.replace(lp, action=Action.KEEP) if lp in touched else lp for lp in plan], plan.options
    )
    reference = apply_plan(model, reference_plan)
    paths = [lp.path for lp in touched]
    ref_layers, ref_out = _layer_outputs(reference, paths, example)
    new_layers, new_out = _layer_outputs(converted, paths, example)
    layers = {}
    for lp in touched:
        if lp.path in ref_layers and lp.path in new_layers:
            layers[lp.path] = {"action": lp.action, **max_errors(ref_layers[lp.path], new_layers[lp.path])}
    output = _output_errors(ref_out, new_out)
    bad = [p for p, e in layers.items() if e["max_rel"] > rtol]
    if output is not None and output["max_rel"] > rtol:
        bad.append("the model output")
    result = {"rtol": rtol, "layers": layers, "output": output}
    if bad:
        raise VerificationError(
            f"freeze/fold changed the model beyond float32 rounding (rtol {rtol:g}) at: {', '.join(bad[:5])}"
        )
    return result


def _layer_outputs(model: nn.Module, paths: list[str], example) -> tuple[dict[str, torch.Tensor], Any]:
    """What each module at ``paths`` returned (its last call) and the model's output: one forward in
    eval mode, without gradients; the model's modes come back as they were."""
    with eval_mode(model):
        seen = capture(model, example, outputs=paths)
    return {path: outs[-1] for path, outs in seen.outputs.items()}, seen.result


def _output_errors(ref_out, new_out) -> dict | None:
    """The largest max-abs/max-rel errors over the floating outputs; None when the structures differ."""
    ref_flat, new_flat = flatten_outputs(ref_out), flatten_outputs(new_out)
    if [(n, t.shape) for n, t in ref_flat] != [(n, t.shape) for n, t in new_flat]:
        return None
    errs = [max_errors(a, b) for (_, a), (_, b) in zip(ref_flat, new_flat, strict=True) if a.is_floating_point()]
    if not errs:
        return None
    return {k: max(e[k] for e in errs) for k in ("max_abs", "max_rel")}
