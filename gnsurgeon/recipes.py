"""Recipes: YAML or TOML files holding the same options as the commands, one section per stage.

.. code-block:: yaml

    convert:
      groups: 32
      min_group_channels: 2
      skip: ["head.*"]

Sections are ``convert``, ``finetune`` and ``export``; a command reads its own section, ``run``
reads them all, and ``--set SECTION.KEY=VALUE`` overrides one value. This module only reads: the
file into a :class:`Recipe`, the ``--set`` strings into :class:`Override` s. Which keys a section
may hold, and how a recipe, its overrides and the flags combine, is :mod:`gnsurgeon.options`.

Stage: input parsing, before any stage runs. It imports: errors (PyYAML and tomllib when a file is
read), and never torch: the CLI reads recipes at startup.
"""

from __future__ import annotations

import contextlib
import math
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

from .errors import GNSurgeonError

SECTIONS = ("convert", "finetune", "export")


def read_recipe(path: str | Path) -> dict[str, dict]:
    """Parse a recipe file into ``{section: {key: value}}``; only the sections are checked here."""
    path = Path(path)
    if not path.is_file():
        raise GNSurgeonError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            raise GNSurgeonError(f"recipe {path} must be .yaml, .yml or .toml")
    except GNSurgeonError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise GNSurgeonError(f"recipe {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise GNSurgeonError(f"recipe {path} must be a mapping of sections ({', '.join(SECTIONS)})")
    for section, body in data.items():
        if section not in SECTIONS:
            raise GNSurgeonError(f"unknown recipe section {section!r} in {path} (known: {', '.join(SECTIONS)})")
        if not isinstance(body, dict):
            raise GNSurgeonError(f"recipe section {section!r} in {path} must be a mapping")
    return data


@dataclass(frozen=True)
class Override:
    """One ``--set SECTION.KEY=VALUE``: the value parsed as a YAML scalar, the text kept for errors."""

    section: str
    key: str
    value: object
    text: str

    @classmethod
    def parse(cls, text: str) -> Override:
        import yaml

        target, sep, raw = text.partition("=")
        section, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise GNSurgeonError(f"--set {text!r} is not SECTION.KEY=VALUE (e.g. finetune.steps=100)")
        if section not in SECTIONS:
            raise GNSurgeonError(f"--set {text!r}: unknown section {section!r} ({', '.join(SECTIONS)})")
        return cls(section, key, yaml.safe_load(raw), text)


@dataclass
class Recipe:
    """A recipe file's sections and the ``--set`` overrides given with it, in the order given.

    The overrides stay separate from the sections so that :func:`gnsurgeon.options.resolve` applies
    them as layers above the file (one layer each, in order: a later ``--set`` wins over an
    earlier one, exclusive pairs included).
    """

    path: Path
    sections: dict[str, dict] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        """Read ``path`` and parse ``overrides``; an override of a section the recipe lacks is an error."""
        recipe = cls(Path(path), read_recipe(path), [Override.parse(text) for text in overrides])
        for item in recipe.overrides:
            if item.section not in recipe.sections:
                raise GNSurgeonError(
                    f"--set {item.text!r}: the recipe has no {item.section!r} section to override"
                )
        return recipe

    @property
    def origin(self) -> str:
        return f"recipe {self.path}"

    def has(self, section: str) -> bool:
        return section in self.sections

    def layers(self, section: str) -> list[tuple[dict, str]]:
        """``(values, where they came from)`` for ``section``, lowest precedence first."""
        layers = [(dict(self.sections.get(section, {})), self.origin)]
        layers += [({o.key: o.value}, f"--set {o.text}") for o in self.overrides if o.section == section]
        return layers


_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), str: ("a string", "strings")}


def conform(hint, value):
    """``value`` checked against a field's type ``hint`` (and converted where YAML is ambiguous), or
    a TypeError saying what was expected.

    Recipes are YAML/TOML, so a typo in a value arrives as the wrong type (``groups: "32x"``,
    ``skip: {a: 1}``) and used to surface as a traceback wherever the value was first used. Floats
    accept integers and numeric strings: YAML 1.1 reads ``1e-4`` (no dot) as a string.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        wanted = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return conform(arg, value)
            except TypeError as exc:
                wanted.append(str(exc))
        raise TypeError(" or ".join(wanted + (["null"] if type(None) in args else [])))
    if hint is float:
        number = value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
            return float(number)
        raise TypeError("a finite number")
    if hint in _NAMES:
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise TypeError(_NAMES[hint][0])
    if origin in (list, tuple) and args:
        item = args[0]
        if isinstance(value, (list, tuple)):
            try:
                items = [conform(item, v) for v in value]
            except TypeError:
                items = None
            if items is not None:
                return items if origin is list else tuple(items)
        raise TypeError(f"a list of {_NAMES.get(item, ('', 'numbers'))[1]}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise TypeError("a mapping")
    if isinstance(hint, type) and is_dataclass(hint) and not isinstance(value, hint):
        raise TypeError(f"a {hint.__name__}")
    return value


def options_from_mapping(cls, values: dict, what: str, origin: str):
    """Build an options dataclass, naming unknown fields, values of the wrong type, and where they came
    from; range checks are the dataclass's own."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise GNSurgeonError(f"unknown {what} option(s) {', '.join(unknown)} in {origin}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = conform(hints[key], value)
        except TypeError as exc:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise GNSurgeonError(f"{what} option {key} in {origin} must be {exc}, got {shown}") from None
    return cls(**checked)
