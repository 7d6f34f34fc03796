"""Forward hooks and mode switches, written once: the mechanics every stage that looks inside a model
needs (calibration, folding, the equivalence checks, ONNX verification, graph observation).

Why one module: a hand-written hook site has three ways to go wrong, and each was hit once here.
A hook left registered after an exception keeps firing in later forwards (so every registration is
removed in a ``finally``); a tensor captured without ``clone()`` is changed afterwards by in-place ops
(timm ``ReLU(inplace=True)``, ``x += shortcut``); a model switched to ``eval()`` and not switched
back changes the caller's dropout/BN behaviour. :func:`capture` and :func:`eval_mode` get all three
right, and stop the forward early when only a prefix of the model is needed (layer-wise calibration
would otherwise run the whole network for every layer).

Stage: a leaf utility. It imports only torch; every other module may import it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["Call", "Capture", "StopForward", "capture", "detached_clone", "eval_mode", "registered"]


class StopForward(Exception):
    """Raised from a hook once everything asked for is recorded: the rest of the forward is skipped."""


def detached_clone(value: Any) -> Any:
    """``value`` with every tensor in it (nested tuples/lists/dicts too) detached and cloned.

    Clone, not just detach: the caller may read the tensor after later in-place ops of the same
    forward have overwritten its storage.
    """
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


@dataclass
class Call:
    """One call of a watched module: its positional and keyword arguments (cloned)."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def first(self) -> Any:
        """The first positional argument: the activation, for every norm layer and most blocks."""
        return self.args[0] if self.args else None


@dataclass
class Capture:
    """What :func:`capture` saw: per path, one entry per call (a module may run more than once).

    ``inputs`` and ``outputs`` list their paths in the order the modules first ran (calibration
    sorts its layers by execution order that way); a path that did not run has no key.
    """

    inputs: dict[str, list[Call]]
    outputs: dict[str, list[Any]]
    result: Any = None  # the model's output; None when the forward was stopped early
    stopped: bool = False

    def input(self, path: str) -> Any:
        """The first positional argument of the first call of ``path`` (KeyError naming it if none)."""
        calls = self.inputs.get(path)
        if not calls:
            raise KeyError(f"module {path!r} was not called in this forward")
        return calls[0].first

    def output(self, path: str) -> Any:
        """The output of the first call of ``path`` (KeyError naming it if none)."""
        outs = self.outputs.get(path)
        if not outs:
            raise KeyError(f"module {path!r} was not called in this forward")
        return outs[0]


@contextlib.contextmanager
def registered(handles: Iterable[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    """Remove every hook handle on exit, also when the forward raised."""
    handles = list(handles)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def eval_mode(*modules: nn.Module, train: bool = False) -> Iterator[None]:
    """Put ``modules`` in eval mode (or train mode with ``train=True``) and restore each submodule's
    own flag on exit: a model whose parts were deliberately mixed (a frozen backbone in eval inside
    a training model) comes back exactly as it was."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.train(train)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


_GRAD_MODES: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "no_grad": torch.no_grad,
    "inference": torch.inference_mode,
    "grad": contextlib.nullcontext,
}


def capture(
    model: nn.Module,
    x: Any,
    *,
    inputs: Iterable[str] = (),
    outputs: Iterable[str] = (),
    stop_at: str | None = None,
    transform: Callable[[str, nn.Module, Any], Any] | None = None,
    grad: str = "no_grad",
) -> Capture:
    """Run ``model(x)`` once and record what the modules at ``inputs`` received and what the modules
    at ``outputs`` returned, as detached clones.

    ``stop_at``: a path also listed in ``inputs`` and/or ``outputs``; the forward stops as soon as
    that module's records are taken (before it runs when only its input is asked for), so the rest
    of the model costs nothing. ``transform(path, module, first_arg)``, when given, is recorded
    instead of the input's clone (e.g. a normalised, subsampled view, to keep memory small).
    ``grad``: ``no_grad`` (default), ``inference`` or ``grad`` (keeps the autograd graph: nothing is
    detached then). ``x`` is the model's one positional argument (a tensor, or a detector's list),
    or a :class:`Call` to run ``model(*x.args, **x.kwargs)``: one block of a model replayed on the
    arguments it was seen to receive (calibration's cached block boundaries); ``""`` is then a path
    too, the block itself.
    """
    inputs, outputs = list(inputs), list(outputs)
    if stop_at is not None and stop_at not in inputs and stop_at not in outputs:
        raise ValueError(f"stop_at={stop_at!r} must be one of the captured paths")
    keep = (lambda v: v) if grad == "grad" else detached_clone
    seen_in: dict[str, list[Call]] = defaultdict(list)
    seen_out: dict[str, list[Any]] = defaultdict(list)

    def pre(path: str):
        def hook(module, args, kwargs):
            if transform is not None:
                seen_in[path].append(Call((transform(path, module, args[0] if args else None),), {}))
            else:
                seen_in[path].append(Call(keep(tuple(args)), keep(dict(kwargs))))
            if path == stop_at and path not in outputs:
                raise StopForward

        return hook

    def post(path: str):
        def hook(_module, _args, _kwargs, output):
            seen_out[path].append(keep(output))
            if path == stop_at:
                raise StopForward

        return hook

    handles = [model.get_submodule(p).register_forward_pre_hook(pre(p), with_kwargs=True) for p in inputs]
    handles += [model.get_submodule(p).register_forward_hook(post(p), with_kwargs=True) for p in outputs]
    result, stopped = None, False
    with registered(handles), _GRAD_MODES[grad]():
        try:
            result = model(*x.args, **x.kwargs) if isinstance(x, Call) else model(x)
        except StopForward:
            stopped = True
    return Capture(dict(seen_in), dict(seen_out), result, stopped)
