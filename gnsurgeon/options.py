"""One way from a recipe, its ``--set`` overrides and the command-line flags to a typed options object.

Every command and ``run`` build their options with :func:`resolve`. Precedence, lowest first: the
recipe's section, then each ``--set SECTION.KEY=VALUE`` in the order given, then the flags given on
the command line (a flag that is None, or an empty list, was not given). Two rules live here and
nowhere else:

* exclusive pairs (:data:`EXCLUSIVE`: ``groups``/``channels_per_group``, ``steps``/``epochs``): a
  value from a higher layer replaces its rival from a lower one, so ``--groups 8`` over a recipe's
  ``channels_per_group: 16`` means G = 8 rather than "give one, not both"; both in the same layer
  stay, and the options' own check rejects them.
* a field marked with :data:`IMAGES` metadata (convert's ``calibrate``) holding ``true`` means "the
  images this command was given" (``run --data``); ``false`` means off. Recipes are shared between
  machines, image folders are not, so a recipe says *whether*, the command line says *where*.

Which keys a recipe section may hold is derived from the dataclass, never listed by hand: every
field, except those whose metadata has ``"recipe": False`` (weights files, output paths, what
belongs to one command line: :data:`NOT_IN_RECIPES`); a field whose default is another options
dataclass (``ExportOptions.checks``) takes its recipe keys from the same flat section. An unknown
key is an error naming the key, the section and the file (or the ``--set`` it came from).

Stage: options, before any stage runs. It imports: errors, recipes; never torch, so that the CLI
can import it at startup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType

from .errors import GNSurgeonError
from .recipes import Recipe, options_from_mapping

RECIPE = "recipe"  # field metadata key: False keeps a field out of recipes
IMAGES = "images"  # field metadata key: the verb for "`true` means the command's images" errors
NOT_IN_RECIPES = MappingProxyType({RECIPE: False})
EXCLUSIVE = (("groups", "channels_per_group"), ("steps", "epochs"))
RIVALS = {a: b for pair in EXCLUSIVE for a, b in (pair, pair[::-1])}


def nested_options(cls) -> dict[str, type]:
    """Fields whose default is another options dataclass, built from the same flat section."""
    return {
        f.name: f.default_factory
        for f in fields(cls)
        if f.default_factory is not MISSING and is_dataclass(f.default_factory)
    }


def recipe_fields(cls) -> tuple[str, ...]:
    """The keys a recipe section for ``cls`` may hold: its fields, less those marked out of recipes."""
    nested = nested_options(cls)
    own = [f.name for f in fields(cls) if f.metadata.get(RECIPE, True) and f.name not in nested]
    return tuple(own) + tuple(key for sub in nested.values() for key in recipe_fields(sub))


def check_keys(cls, values: Mapping, section: str, origin: str) -> None:
    """Unknown keys are errors that name the key, the section and where it came from."""
    allowed = recipe_fields(cls)
    for key in values:
        if key not in allowed:
            raise GNSurgeonError(
                f"unknown key {key!r} in section {section!r} of {origin} (known: {', '.join(allowed)})"
            )


def given(flags: Mapping | None) -> dict:
    """The flags that were given: None and empty lists/dicts are not; paths become strings."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in (flags or {}).items()
        if value is not None and not (isinstance(value, (list, tuple, dict)) and not value)
    }


def merge(layers: Sequence[Mapping]) -> dict:
    """Later layers win; a key set by a later layer drops its exclusive rival set by an earlier one."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            rival = RIVALS.get(key)
            if rival is not None and rival not in layer:
                out.pop(rival, None)
            out[key] = value
    return out


def _images_fields(cls) -> dict[str, str]:
    return {f.name: f.metadata[IMAGES] for f in fields(cls) if IMAGES in f.metadata}


def apply_images(cls, values: dict, images: str | None, images_flag: str, origin: str) -> dict:
    """``true`` in an images field means ``images`` (an error naming ``images_flag`` without them);
    ``false`` means the field's default (off)."""
    out = dict(values)
    for name, verb in _images_fields(cls).items():
        if out.get(name) is True:
            if not images:
                raise GNSurgeonError(f"{origin} {verb} ({name}: true): give the images with {images_flag}")
            out[name] = str(images)
        elif out.get(name) is False:
            out.pop(name)
    return out


def build(cls, values: Mapping, origin: str = "options", what: str | None = None):
    """``cls`` from flat ``values``: nested options take their own keys; a string where a list is
    expected is a one-item list (``skip: "head.*"``); unknown keys name ``origin``."""
    values = dict(values)
    for f in fields(cls):
        if f.default_factory is list and isinstance(values.get(f.name), str):
            values[f.name] = [values[f.name]]
    for name, sub in nested_options(cls).items():
        if name not in values:  # given whole (ExportOptions(checks=...)), its flat keys would be unknown
            mine = {k: values.pop(k) for k in [f.name for f in fields(sub)] if k in values}
            values[name] = build(sub, mine, origin, what)
    return options_from_mapping(cls, values, what or cls.__name__, origin)


def resolve(
    cls,
    *,
    recipe: Recipe | None = None,
    section: str | None = None,
    flags: Mapping | None = None,
    images: str | None = None,
    images_flag: str = "--data DIR",
):
    """The options of one stage: ``recipe``'s ``section`` < its ``--set`` overrides < ``flags``.

    ``images`` is what ``true`` in an images field (``calibrate: true``) stands for; ``images_flag``
    is the flag to name when it is missing (``--data DIR`` for run, ``--calibrate DIR`` for convert).
    """
    layers = recipe.layers(section) if recipe is not None and section is not None else []
    for values, where in layers:
        check_keys(cls, values, section, where)
    origin = recipe.origin if recipe is not None else "options"
    values = merge([values for values, _ in layers] + [given(flags)])
    return build(cls, apply_images(cls, values, images, images_flag, origin), origin, section)
