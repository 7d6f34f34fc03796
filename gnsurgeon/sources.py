"""Where models come from: ``timm:NAME`` / ``torchvision:NAME`` (+ weights file), or a gnsurgeon checkpoint.

Every command that takes a SOURCE (convert, inspect, export-onnx, verify-onnx, run, finetune's
teacher) opens it here, with one :class:`SourceOptions`: the weights file, the constructor options
and the data-config overrides. A new source option is one field here and one flag in the CLI.

Building an architecture from a spec, reading weights files and data configs is the leaf
:mod:`gnsurgeon.models`, which checkpoints rebuild models with; its names are re-exported here, where
the rest of the package has always found them.

Stage: opening a source, first in every stage. It imports: checkpoint, errors, hooks, models, options,
plan, probe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import is_checkpoint, load, read_checkpoint
from .errors import GNSurgeonError, first_line
from .hooks import eval_mode
from .models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIBRARIES,
    DataConfig,
    SourceSpec,
    build_model,
    data_config_for,
    load_state_dict_strict,
    read_state_dict,
)
from .options import NOT_IN_RECIPES
from .plan import Plan
from .probe import make_probe_input, model_device, move_to

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass
class SourceOptions:
    """How to open a source: weights, constructor options, and overrides of its data config.

    None of these belong in a recipe (a recipe is shared; weights files and class counts are the
    user's), so every field is marked out of recipes. ``seed`` makes randomly initialised models
    reproducible.
    """

    weights: str | None = field(default=None, metadata=NOT_IN_RECIPES)
    pretrained: bool = field(default=False, metadata=NOT_IN_RECIPES)
    num_classes: int | None = field(default=None, metadata=NOT_IN_RECIPES)
    in_chans: int | None = field(default=None, metadata=NOT_IN_RECIPES)
    model_kwargs: dict = field(default_factory=dict, metadata=NOT_IN_RECIPES)
    input_size: tuple[int, ...] | None = field(default=None, metadata=NOT_IN_RECIPES)
    mean: tuple[float, ...] | None = field(default=None, metadata=NOT_IN_RECIPES)
    std: tuple[float, ...] | None = field(default=None, metadata=NOT_IN_RECIPES)
    crop_pct: float | None = field(default=None, metadata=NOT_IN_RECIPES)
    seed: int = field(default=0, metadata=NOT_IN_RECIPES)

    def constructor_kwargs(self) -> dict:
        kwargs = dict(self.model_kwargs)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        if self.in_chans is not None:
            kwargs["in_chans"] = self.in_chans
        return kwargs

    def apply_to(self, config: DataConfig) -> None:
        """Override the model's own data config where an option was given."""
        if self.input_size is not None:
            config.input_size = tuple(self.input_size)
        if self.mean is not None:
            config.mean = tuple(self.mean)
        if self.std is not None:
            config.std = tuple(self.std)
        if self.crop_pct is not None:
            if not 0 < self.crop_pct <= 1:
                raise GNSurgeonError(f"--crop-pct {self.crop_pct} must be in (0, 1]")
            config.crop_pct = float(self.crop_pct)


@dataclass
class OpenedSource:
    """A model ready for surgery, with what is needed to save it again."""

    model: nn.Module
    spec: SourceSpec | None
    data_config: DataConfig
    plan: Plan | None = None  # the plan already applied (checkpoint sources)
    history: list = field(default_factory=list)
    build_seconds: float = 0.0


def _open_checkpoint(source: str, options: SourceOptions, model: nn.Module | None) -> OpenedSource:
    if options.constructor_kwargs() or options.weights or options.pretrained:
        raise GNSurgeonError(
            f"source {source} is a gnsurgeon checkpoint: constructor options, --weights and "
            "--pretrained do not apply to it"
        )
    info = read_checkpoint(source)
    return OpenedSource(load(source, model=model), info.source, info.data_config, info.plan, list(info.history))


def _open_spec(source: str, options: SourceOptions) -> OpenedSource:
    path = Path(source)
    if path.suffix in WEIGHTS_SUFFIXES or path.exists():
        if not path.exists():
            raise GNSurgeonError(f"source file {source} does not exist")
        if path.suffix == ".safetensors" and path.is_file():
            read_checkpoint(path)  # says why it is not one: truncated or corrupt, or no gnsurgeon metadata
        raise GNSurgeonError(
            f"source {source} is not a gnsurgeon checkpoint; name the architecture "
            "(timm:NAME or torchvision:NAME) and pass the file with --weights"
        )
    spec = SourceSpec.parse(source, options.constructor_kwargs(), options.pretrained)
    torch.manual_seed(options.seed)  # random-init models are reproducible
    model = build_model(spec)
    if options.weights:
        state = read_state_dict(options.weights)
        load_state_dict_strict(model, state, f"weights file {options.weights}")
    return OpenedSource(model, spec, data_config_for(spec, model))


def open_source(source: str, options: SourceOptions | None = None, *, model: nn.Module | None = None) -> OpenedSource:
    """``timm:NAME`` / ``torchvision:NAME`` (+ weights) or a gnsurgeon checkpoint -> model.

    ``options`` may be any :class:`SourceOptions`, :class:`~gnsurgeon.ConvertOptions` included.
    ``model`` is the unconverted architecture of a checkpoint saved with ``source=None`` (see
    :func:`gnsurgeon.load`); it is not modified, and it applies to checkpoints only.
    """
    options = options or SourceOptions()
    start = time.perf_counter()
    if is_checkpoint(source):
        opened = _open_checkpoint(source, options, model)
    elif model is not None:
        raise GNSurgeonError(
            f"model= is the architecture of a checkpoint saved with source=None; {source} is not a checkpoint"
        )
    else:
        opened = _open_spec(source, options)
    options.apply_to(opened.data_config)
    if options.input_size is not None:
        check_input_size(opened.model, opened.data_config, source)
    opened.build_seconds = time.perf_counter() - start
    return opened


def check_input_size(model: nn.Module, config: DataConfig, source: str) -> None:
    """One forward pass at batch 1 on the ``--input-size`` the user gave, before any work: a wrong
    channel count or a map too small for the model's strides is a bad input (exit 2, the option
    named), not a failed check of the converted model (exit 1) after the work."""
    x = make_probe_input(config, batch=1)
    try:
        with torch.no_grad(), eval_mode(model):
            model(move_to(x, model_device(model)))
    except Exception as exc:  # whatever the model raises on a shape it cannot take
        size = ",".join(map(str, config.input_size))
        raise GNSurgeonError(f"--input-size {size} does not fit {source}: {first_line(exc)}") from None


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LIBRARIES",
    "DataConfig",
    "OpenedSource",
    "SourceOptions",
    "SourceSpec",
    "build_model",
    "data_config_for",
    "load_state_dict_strict",
    "open_source",
    "read_state_dict",
]
