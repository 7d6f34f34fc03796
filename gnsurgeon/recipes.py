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

from dataclasses import dataclass, field, fields
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


def options_from_mapping(cls, values: dict, what: str, origin: str):
    """Build an options dataclass, naming unknown fields and where they came from."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise GNSurgeonError(f"unknown {what} option(s) {', '.join(unknown)} in {origin}")
    return cls(**values)
