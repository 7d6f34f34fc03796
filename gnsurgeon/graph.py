"""Who produces each layer's input, and who else reads it: what folding needs to know.

FX cannot trace detection models or timm nets with Python control flow, so the graph is observed
instead of traced: one eager forward pass on a probe input, with

* forward hooks on every module, recording which module returned each tensor (innermost first);
* pre/post hooks on the layers of interest, recording the tensor each one receives and how often it
  is called;
* a :class:`~torch.overrides.TorchFunctionMode` that sees every torch function call (``cat``,
  ``+=``, ``getitem``, in-place ops, ...), recording which calls read each recorded tensor.

A layer's *producer* is the module that returned its input tensor; the producer is *exclusive* when
no call other than the layer itself read that tensor during the whole pass. That catches the cases
where folding is wrong: an output shared with a shortcut (pytorch#104593), a concat in between
(DenseNet), an in-place activation, a producer called twice. Calls that return no tensor (``.shape``,
``.dim()``) are not reads. Everything is recorded on a copy of the model.

The hooks here are not :func:`gnsurgeon.hooks.capture`'s: they record tensor identities on every
module rather than cloned values at a few paths; their removal is :func:`gnsurgeon.hooks.registered`'s.

Stage: observation for fold planning. It imports: hooks only; fold imports it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .hooks import registered


@dataclass
class LayerInput:
    """What one observed layer received: its producer (a module path) or the function that made it."""

    calls: int = 0
    input_id: int | None = None
    input_ndim: int = 0
    producer: str | None = None
    made_by: str = ""  # the torch function that last wrote the input (e.g. "cat"), if any
    other_readers: list[str] = field(default_factory=list)


class _Recorder(TorchFunctionMode):
    def __init__(self, observed: set[str]) -> None:
        super().__init__()
        self.observed = observed
        self.writer: dict[int, tuple[str, str]] = {}  # tensor id -> ("module"|"function"|"input", name)
        self.made_by: dict[int, str] = {}  # tensor id -> the torch function that last wrote it
        self.readers: dict[int, list[str]] = {}  # tensor id -> readers (function names or layer paths)
        self.keep_alive: list[torch.Tensor] = []  # ids stay unique while recorded tensors live
        self.active: list[str] = []  # observed layers currently inside their forward
        self.counter = 0

    def _track(self, t: torch.Tensor) -> None:
        self.keep_alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        out_tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not out_tensors:
            return out  # metadata queries (.shape, .dim()) do not read values
        name = getattr(func, "__name__", str(func))
        self.counter += 1
        reader = self.active[-1] if self.active else f"{name}#{self.counter}"
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) in self.writer:
                self.readers.setdefault(id(t), []).append(reader)
        for t in out_tensors:
            self.writer[id(t)] = ("function", name)
            self.made_by[id(t)] = name
            self._track(t)
        return out


def observe_layer_inputs(model: nn.Module, example, layer_paths: list[str]) -> tuple[dict[str, LayerInput], dict]:
    """Run ``model`` (a copy, eval, no grad) on ``example`` and report each layer's input provenance.

    Returns ``(inputs, calls)``: per observed path a :class:`LayerInput`, and per module path the
    number of times it was called.
    """
    model = copy.deepcopy(model).eval()
    observed = set(layer_paths)
    recorder = _Recorder(observed)
    inputs = {p: LayerInput() for p in layer_paths}
    calls: dict[str, int] = {}
    handles = []

    def pre_hook(path):
        def hook(module, args):
            calls[path] = calls.get(path, 0) + 1
            if path in observed:
                info = inputs[path]
                info.calls += 1
                x = args[0] if args else None
                if isinstance(x, torch.Tensor):
                    info.input_id = id(x)
                    info.input_ndim = x.dim()
                    kind, name = recorder.writer.get(id(x), ("input", "the model input"))
                    info.producer = name if kind == "module" else None
                    info.made_by = recorder.made_by.get(id(x), "the model input")
                    recorder.writer.setdefault(id(x), ("input", "the model input"))
                    recorder._track(x)
                recorder.active.append(path)

        return hook

    def post_hook(path):
        def hook(module, args, output):
            if path in observed and recorder.active and recorder.active[-1] == path:
                recorder.active.pop()
            for t in tree_leaves(output):
                if isinstance(t, torch.Tensor) and recorder.writer.get(id(t), ("",))[0] != "module":
                    recorder.writer[id(t)] = ("module", path)
                    recorder._track(t)

        return hook

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(pre_hook(path)))
            handles.append(module.register_forward_hook(post_hook(path), always_call=True))
    with registered(handles), torch.no_grad(), recorder:
        model(example)
    for path, info in inputs.items():
        if info.input_id is not None:
            info.other_readers = [r for r in recorder.readers.get(info.input_id, []) if r != path]
    return inputs, calls
