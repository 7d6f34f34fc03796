"""Model outputs read as logits: one reading, shared by every place that needs a model's logits.

What a classifier returns is not always a tensor. torchvision's GoogLeNet and Inception3 built with
``aux_logits`` return a namedtuple in train mode (``GoogLeNetOutputs(logits, aux_logits2,
aux_logits1)``, ``InceptionOutputs(logits, aux_logits)``) and a tensor in eval mode; torchvision's
segmentation models return ``{"out": ..., "aux": ...}``; Hugging Face style outputs carry
``.logits``. Reading each of these by hand in each stage is how ``finetune`` once died with
"'GoogLeNetOutputs' object has no attribute 'float'": :func:`split_logits` is the one place that
knows them, and fine-tuning (training and evaluation), calibration's class scores and the
fine-tune's logits check all call it.

The auxiliary heads' loss weight, :data:`AUX_WEIGHT` = 0.3 per head, is GoogLeNet's (Szegedy et al.
2015: "the losses of the auxiliary classifiers were weighted by 0.3"); the heads do not run in eval
mode, so they never change the exported or evaluated model, but training them keeps them in step
with the trunk they read from.

Stage: a leaf utility. It imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AUX_WEIGHT", "Logits", "describe_output", "main_logits", "split_logits"]

AUX_WEIGHT = 0.3


@dataclass(frozen=True)
class Logits:
    """A model output as its main logits and the logits of its auxiliary heads (train mode only)."""

    main: torch.Tensor
    aux: tuple[torch.Tensor, ...] = ()


def _tensors(values) -> tuple[torch.Tensor, ...]:
    return tuple(v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point())


def split_logits(output) -> Logits | None:
    """``output`` as :class:`Logits`, or None when it holds no logits this module knows.

    Known: a floating tensor; anything with a tensor ``.logits`` (torchvision's namedtuples, whose
    other tensor fields are auxiliary logits; ``None`` fields, e.g. Inception3 without its aux head,
    are skipped); a dict with a tensor ``"out"`` (torchvision segmentation, ``"aux"`` auxiliary) or
    ``"logits"``. A plain tuple or list is not guessed at: which element is the main output is the
    model's convention, not a rule.
    """
    if isinstance(output, torch.Tensor):
        return Logits(output) if output.is_floating_point() else None
    main = getattr(output, "logits", None)
    if isinstance(main, torch.Tensor):
        fields = getattr(output, "_fields", ())  # a namedtuple's other fields are its aux heads
        return Logits(main, _tensors(getattr(output, f) for f in fields if f != "logits"))
    if isinstance(output, dict):
        key = "out" if isinstance(output.get("out"), torch.Tensor) else "logits"
        if isinstance(output.get(key), torch.Tensor):
            return Logits(output[key], _tensors([output.get("aux")]))
    return None


def main_logits(output) -> torch.Tensor | None:
    """The main logits of ``output`` (see :func:`split_logits`), or None."""
    logits = split_logits(output)
    return logits.main if logits is not None else None


def describe_output(output) -> str:
    """A short description of an output, for an error message: ``GoogLeNetOutputs``, ``tuple of 2``."""
    if isinstance(output, torch.Tensor):
        return f"a {output.dtype} tensor of shape {tuple(output.shape)}"
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"
