"""Which layers a forward in eval mode reaches: one rule for every stage that visits layers one by one.

A model can hold normalization layers that its eval-mode forward never calls: torchvision's
GoogLeNet and Inception3 run their auxiliary heads (``aux1``, ``aux2``, ``AuxLogits``) only in
training mode, and a model may carry modules its ``forward`` does not use. Such a layer has no input
to calibrate on, no node in an exported graph and nothing to verify, and treating it as missing
cost real time: calibration of GoogLeNet died with ``KeyError`` after minutes of work. So
calibration, ONNX export and ONNX verification all ask :func:`reached_layers` (or, when they
already ran a forward with hooks, :func:`split_reached`), leave the unreached layers out before the
slow work, and say so with :func:`unreached_note`.

Stage: a leaf utility. It imports torch and :mod:`gnsurgeon.hooks`.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .hooks import capture, eval_mode

__all__ = ["reached_layers", "split_reached", "unreached_note"]


def split_reached(paths: Iterable[str], ran: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(reached, unreached)``: the ``paths`` in ``ran`` in the order they ran, then the others in
    their given order. ``ran`` lists paths in the order they first ran (a hook capture's keys)."""
    paths = list(paths)
    wanted = set(paths)
    reached = [p for p in dict.fromkeys(ran) if p in wanted]
    done = set(reached)
    return reached, [p for p in paths if p not in done]


def reached_layers(model: nn.Module, x, paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(reached, unreached)`` for one forward of ``model`` on ``x`` in eval mode, without
    gradients: the layers at ``paths`` that ran, in the order they first ran, and those that did not.
    Nothing is recorded but the calls; the model's modes come back as they were."""
    paths = list(paths)
    with eval_mode(model):
        seen = capture(model, x, inputs=paths, transform=lambda *_: None)
    return split_reached(paths, seen.inputs)


def unreached_note(unreached: list[str], what: str = "GN layer(s)", consequence: str = "") -> str:
    """One sentence naming the layers an eval-mode forward does not reach (the first three)."""
    names = ", ".join(unreached[:3]) + (f", ... {len(unreached) - 3} more" if len(unreached) > 3 else "")
    text = f"{len(unreached)} {what} not run by the model in eval mode ({names})"
    return text + (f": {consequence}" if consequence else "")
