"""The checkpoint metadata schema: every ``gnsurgeon.*`` key checked in one place before it is used.

A checkpoint is a file someone hands you. Its metadata decides what gets built (a library, a model
name, constructor kwargs), which layers are replaced and how (the plan), and how big the probe
inputs are (the data config), so a damaged or hostile value must stop at the door with one sentence
naming the key and the file, never as a traceback from deep inside a stage (``{"layers": "nope"}``
used to reach ``inspect`` and ``export-onnx`` as a ``TypeError``). :func:`parse_metadata` is that
door: it decodes the JSON of every key, checks types, ranges and allowed values (the
:class:`~gnsurgeon.plan.Action` enum, positive integers, known keys only) and returns plain
Python values that the dataclasses (``SourceSpec``, ``Plan``, ``DataConfig``) can be built from
without further checks.

Limits are generous for real models and small enough that nothing a file says can make a stage
allocate absurd memory: at most 2^24 channels per layer, 2^27 values per probe sample.

Stage: persistence, read side (no torch). It imports: errors, models (the libraries), plan (Action).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

from .errors import GNSurgeonError
from .models import LIBRARIES, DataConfig, SourceSpec
from .plan import Action, LayerPlan

PREFIX = "gnsurgeon."
KEYS = ("format", "version", "source", "plan", "data_config", "history")
REQUIRED = ("format", "source", "plan", "data_config")
TASKS = ("classification", "segmentation", "detection", "video", "optical_flow", "quantization")
MAX_CHANNELS = 1 << 24
MAX_INPUT_VALUES = 1 << 27
MAX_TEXT = 10_000


class Bad(ValueError):
    """A schema violation: where (``layers[3].groups``) and what is wrong with it."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where} {problem}" if where else problem)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value, where: str, low: int = 1, high: int = MAX_CHANNELS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Bad(where, f"must be an integer from {low} to {high}, got {_show(value)}")
    return value


def _number(value, where: str, low: float, high: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value <= high:
        raise Bad(where, f"must be a number from {low:g} to {high:g}, got {_show(value)}")
    return float(value)


def _text(value, where: str, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value) or len(value) > MAX_TEXT:
        raise Bad(where, f"must be a{'' if empty else ' non-empty'} string, got {_show(value)}")
    return value


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise Bad(where, f"must be true or false, got {_show(value)}")
    return value


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise Bad(where, f"must be a JSON object, got {_show(value)}")
    return value


def _object(value, where: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    _mapping(value, where)
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise Bad(where, f"has unknown field {unknown[0]!r} (known: {', '.join(known)})")
    missing = [k for k in required if k not in value]
    if missing:
        raise Bad(where, f"lacks the field {missing[0]!r}")
    return value


def _list(value, where: str, lengths: tuple[int, ...] | None = None) -> list:
    if not isinstance(value, list) or (lengths is not None and len(value) not in lengths):
        size = f" of {' or '.join(map(str, lengths))} items" if lengths else ""
        raise Bad(where, f"must be a JSON list{size}, got {_show(value)}")
    return value


def check_source(value) -> dict | None:
    """``gnsurgeon.source``: null (saved with ``source=None``) or a :class:`SourceSpec`."""
    if value is None:
        return None
    known = tuple(f.name for f in fields(SourceSpec))
    data = _object(value, "", known, ("library", "name"))
    if data["library"] not in LIBRARIES:
        raise Bad("library", f"must be one of {', '.join(LIBRARIES)}, got {_show(data['library'])}")
    _text(data["name"], "name", empty=False)
    for key in _mapping(data.get("kwargs", {}), "kwargs"):
        if not key.isidentifier():
            raise Bad("kwargs", f"has a key that is not a Python name: {_show(key)}")
    _bool(data.get("pretrained", False), "pretrained")
    return data


def _check_layer(raw, where: str) -> dict:
    known = tuple(f.name for f in fields(LayerPlan))
    data = _object(raw, where, known, ("path", "kind", "channels", "eps", "affine"))
    _text(data["path"], f"{where}.path", empty=False)
    _text(data["kind"], f"{where}.kind", empty=False)
    channels = _int(data["channels"], f"{where}.channels")
    _number(data["eps"], f"{where}.eps", 0.0, 1.0)
    _bool(data["affine"], f"{where}.affine")
    action = data.get("action", Action.KEEP.value)
    if not isinstance(action, str) or action not in {a.value for a in Action}:
        known_actions = ", ".join(a.value for a in Action)
        raise Bad(f"{where}.action", f"must be one of {known_actions}, got {_show(action)}")
    groups = data.get("groups")
    if groups is not None or action == Action.GN.value:
        _int(groups, f"{where}.groups", 1, channels)
        if channels % groups:
            raise Bad(f"{where}.groups", f"({groups}) must divide its {channels} channels")
    for name in ("rule", "note", "act"):
        _text(data.get(name, ""), f"{where}.{name}")
    producer = data.get("producer")
    if producer is not None or action == Action.FOLDED.value:
        _text(producer, f"{where}.producer", empty=False)
    return data


def check_plan(value) -> dict:
    """``gnsurgeon.plan``: ``{"layers": [LayerPlan fields...], "options": {...}}``, paths unique."""
    data = _object(value, "", ("layers", "options"), ("layers",))
    layers = _list(data["layers"], "layers")
    seen = set()
    for i, raw in enumerate(layers):
        layer = _check_layer(raw, f"layers[{i}]")
        if layer["path"] in seen:
            raise Bad(f"layers[{i}].path", f"{_show(layer['path'])} is listed twice")
        seen.add(layer["path"])
    _mapping(data.get("options", {}), "options")
    return data


def check_data_config(value) -> dict:
    """``gnsurgeon.data_config``: a :class:`DataConfig` whose probe input is a sane size."""
    known = tuple(f.name for f in fields(DataConfig))
    data = _object(value, "", known)
    raw_size = _list(data.get("input_size", [3, 224, 224]), "input_size", (3, 4))
    size = [_int(v, "input_size", 1, 1 << 16) for v in raw_size]
    if math.prod(size) > MAX_INPUT_VALUES:
        raise Bad("input_size", f"{size} asks for more than {MAX_INPUT_VALUES} values per sample")
    for key, low in (("mean", -1e6), ("std", 1e-12)):
        values = _list(data.get(key, [0.5]), key, (1, size[0]))
        for v in values:
            _number(v, key, low, 1e6)
    _text(data.get("interpolation", "bilinear"), "interpolation", empty=False)
    _number(data.get("crop_pct", 0.875), "crop_pct", 1e-6, 1.0)
    if data.get("task", "classification") not in TASKS:
        raise Bad("task", f"must be one of {', '.join(TASKS)}, got {_show(data.get('task'))}")
    return data


def check_history(value) -> list:
    """``gnsurgeon.history``: a list of records, each an object naming its ``stage``."""
    for i, entry in enumerate(_list(value, "")):
        _text(_mapping(entry, f"[{i}]").get("stage"), f"[{i}].stage", empty=False)
    return value


_CHECKS = {"source": check_source, "plan": check_plan, "data_config": check_data_config, "history": check_history}


def _decode(meta: dict[str, str], key: str, path) -> object:
    try:
        return json.loads(meta[PREFIX + key])
    except (ValueError, RecursionError):
        raise GNSurgeonError(f"checkpoint {path}: metadata key {PREFIX}{key} is not valid JSON") from None


def parse_metadata(meta: dict[str, str], path, expected_format: str) -> dict:
    """Every ``gnsurgeon.*`` key of ``meta`` decoded and checked: ``{key: value}`` (``version`` a
    string, ``source`` a dict or None, ``plan``/``data_config`` dicts, ``history`` a list).

    Raises :class:`GNSurgeonError` with one sentence naming the key, the place inside it and the
    file: an unknown ``gnsurgeon.*`` key, a missing one, non-JSON, a wrong type or a value out of range.
    """
    for key in meta:
        if key.startswith(PREFIX) and key[len(PREFIX) :] not in KEYS:
            raise GNSurgeonError(f"checkpoint {path}: unknown metadata key {key} (known: {', '.join(KEYS)})")
    for key in REQUIRED:
        if PREFIX + key not in meta:
            raise GNSurgeonError(f"checkpoint {path}: metadata key {PREFIX}{key} is missing")
    if meta[PREFIX + "format"] != expected_format:
        found = meta[PREFIX + "format"]
        found = found if found.isalnum() and len(found) <= 20 else _show(found)
        raise GNSurgeonError(f"checkpoint {path} has format {found}; this gnsurgeon reads {expected_format}")
    out: dict = {"format": expected_format, "version": meta.get(PREFIX + "version", "")}
    for key, check in _CHECKS.items():
        if PREFIX + key not in meta:  # history is optional
            out[key] = []
            continue
        value = _decode(meta, key, path)
        try:
            out[key] = check(value)
        except Bad as exc:
            where = f"{PREFIX}{key}" + (f": {exc}" if str(exc) else "")
            raise GNSurgeonError(f"checkpoint {path} has a bad {where}") from None
    return out


__all__ = ["KEYS", "PREFIX", "parse_metadata"]
