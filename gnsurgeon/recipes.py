"""Recipes: YAML or TOML files holding the same options as the commands, one section per stage.

.. code-block:: yaml

    convert:
      groups: 32
      min_group_channels: 2
      skip: ["head.*"]

Sections are ``convert``, ``finetune`` and ``export``; a command reads its own section, and
command-line flags override it. Unknown sections and keys are errors naming the key and the file.
"""

from __future__ import annotations

from dataclasses import fields
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


def check_section_keys(section: str, body: dict, allowed: tuple[str, ...], recipe: str | Path) -> None:
    """Unknown keys are errors that name the key, the section and the file."""
    for key in body:
        if key not in allowed:
            raise GNSurgeonError(
                f"unknown key {key!r} in section {section!r} of recipe {recipe} (known: {', '.join(allowed)})"
            )


def options_from_mapping(cls, values: dict, what: str, origin: str):
    """Build an options dataclass, naming unknown fields and where they came from."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise GNSurgeonError(f"unknown {what} option(s) {', '.join(unknown)} in {origin}")
    return cls(**values)


def recipe_section(path: str | Path | None, section: str, allowed: tuple[str, ...]) -> dict:
    """The ``section`` of a recipe, checked against the keys that command accepts."""
    if path is None:
        return {}
    body = read_recipe(path).get(section, {})
    check_section_keys(section, body, allowed, path)
    return dict(body)
