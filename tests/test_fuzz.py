"""Fuzzing what users hand us: checkpoint metadata and recipe values.

Every ``gnsurgeon.*`` metadata key is removed, replaced by non-JSON, by JSON of the wrong type, and
every field inside it by junk (wrong types, huge and negative numbers, nested containers, unknown
actions); every recipe option of every section gets values of the wrong type. Each case must end in
exit 2 with exactly one ``error:`` line (one sentence), never a traceback. The metadata variants are
written with ``safetensors`` directly onto one tiny checkpoint's tensors.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import typer
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gnsurgeon.cli import app
from gnsurgeon.conversion import ConvertOptions
from gnsurgeon.finetuning import FinetuneOptions
from gnsurgeon.onnx_export import ExportOptions
from gnsurgeon.options import recipe_fields
from gnsurgeon.plan import LayerPlan

# JSON texts that no field of the schema accepts: nested junk, a list, -inf (1e400 overflows), a huge
# and a negative integer (no field takes both; strings and booleans are rejected by type).
JUNK = ['{"nested": [{"junk": 1}]}', "[1, [2, [3]]]", "-1e400", str(10**30), "-5"]
NOT_JSON = ["", "{", "nan?", "[" * 5000 + "]" * 5000, "\x00", "{'single': 'quotes'}"]
WRONG_TYPE = ["1", '"text"', "[]", "null", "true", "1e400"]


COMMAND = typer.main.get_command(app)  # converted once: typer converts the app on every invoke (~0.1 s)


def run(*args):
    return CliRunner().invoke(COMMAND, [str(a) for a in args])


def one_sentence_problem(result, case) -> str | None:
    """Why ``result`` is not exit 2 with one ``error:`` sentence and no traceback (None when it is)."""
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    errors = {line for line in text.splitlines() if line.startswith("error:")}
    if result.exit_code != 2 or "Traceback" in text or len(errors) != 1:
        return f"{case}: exit {result.exit_code}: {(errors or {text[-300:]})}"
    return None


def assert_all_one_sentence(problems: list) -> None:
    problems = [p for p in problems if p]
    assert not problems, f"{len(problems)} case(s):\n" + "\n".join(problems[:20])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint (test_resnet at 64x64, layer4 kept) and its metadata."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "base.safetensors"
    result = run("convert", "timm:test_resnet", "--input-size", "3,64,64", "--skip", "layer4.*", "-o", path, "-q")
    assert result.exit_code == 0, result.output
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    return folder, load_file(str(path)), meta


def layer_cases(meta: dict) -> list[tuple[str, str, str]]:
    """(name, key, JSON text) for every field of a plan entry set to junk, and broken entries."""
    plan = json.loads(meta["gnsurgeon.plan"])
    cases = []
    for f in fields(LayerPlan):
        for junk in JUNK:
            layers = [dict(lp) for lp in plan["layers"]]
            layers[1] = {**layers[1], f.name: "@@"}
            text = json.dumps({**plan, "layers": layers}).replace('"@@"', junk)
            cases.append((f"plan.layers[1].{f.name}={junk[:12]}", "plan", text))
    first = plan["layers"][0]
    broken = {
        "unknown action": {**first, "action": "explode"},
        "groups not dividing": {**first, "groups": 5},
        "gn without groups": {**first, "groups": None},
        "folded without producer": {**first, "action": "folded", "producer": None},
        "unknown field": {**first, "colour": "red"},
        "missing field": {k: v for k, v in first.items() if k != "channels"},
        "empty path": {**first, "path": ""},
    }
    for name, entry in broken.items():
        cases.append((f"plan: {name}", "plan", json.dumps({**plan, "layers": [entry, *plan["layers"][1:]]})))
    cases.append(("plan: duplicate path", "plan", json.dumps({**plan, "layers": [first, first]})))
    for items in ("[1]", "[null]", "[[]]", '["x"]'):
        cases.append((f"plan.layers={items}", "plan", f'{{"layers": {items}, "options": {{}}}}'))
    cases.append(("plan.options=list", "plan", json.dumps({**plan, "options": []})))
    cases.append(("plan: no layers", "plan", json.dumps({"options": {}})))
    return cases


def object_field_cases(meta: dict, key: str) -> list[tuple[str, str, str]]:
    data = json.loads(meta[f"gnsurgeon.{key}"])
    cases = []
    for name in data:
        for junk in JUNK:
            text = json.dumps({**data, name: "@@"}).replace('"@@"', junk)
            cases.append((f"{key}.{name}={junk[:12]}", key, text))
    cases.append((f"{key}: unknown field", key, json.dumps({**data, "colour": "red"})))
    return cases


def metadata_cases(meta: dict) -> list[tuple[str, str, str | None]]:
    cases: list[tuple[str, str, str | None]] = []
    for key in ("format", "source", "plan", "data_config", "history"):
        if key != "history":  # history is optional
            cases.append((f"{key} missing", key, None))
        for text in NOT_JSON + WRONG_TYPE:
            if (key, text) in (("source", "null"), ("format", "1"), ("history", "[]")):
                continue  # valid: a source-less checkpoint (a load case: it needs model=); the format
            cases.append((f"{key}={text[:12]!r}", key, text))
    cases += [("format=2", "format", "2"), ("format long", "format", "x" * 1000)]
    cases += layer_cases(meta) + object_field_cases(meta, "data_config")
    size = json.loads(meta["gnsurgeon.data_config"])
    for name, value in {
        "input_size": [[3, 64], [0, 64, 64], [3, 65536, 65536], [3, -1, 64], [3, 64.5, 64], [3, 2, 4096, 4096, 4096]],
        "mean": [[0.5, 0.5], [], [0.5, "x", 0.5]],
        "std": [[0.0, 0.5, 0.5], [1e400, 1, 1]],
        "crop_pct": [0, 1.5],
        "task": ["sorting", None],
        "interpolation": ["", None],
    }.items():
        for bad in value:
            cases.append((f"data_config.{name}={bad!r:.20}", "data_config", json.dumps({**size, name: bad})))
    for text in ('"x"', "[1]", '[{"no_stage": 1}]', '[{"stage": 5}]', "{}", '[{"stage": ""}]'):
        cases.append((f"history={text}", "history", text))
    cases.append(("unknown key", "extra", "1"))
    return cases


def load_cases(meta: dict) -> list[tuple[str, str, str | None]]:
    """Values the schema accepts but that cannot build or rebuild the model: they reach ``load``."""
    source = json.loads(meta["gnsurgeon.source"])
    plan = json.loads(meta["gnsurgeon.plan"])
    cases = [("source null (needs model=)", "source", "null")]
    for name in ("library", "name", "kwargs", "pretrained"):
        for junk in JUNK:
            text = json.dumps({**source, name: "@@"}).replace('"@@"', junk)
            cases.append((f"source.{name}={junk[:12]}", "source", text))
    for name, value in {
        "library": "keras",
        "name": "../../etc/passwd",
        "kwargs": {"1bad": 1},
    }.items():
        cases.append((f"source.{name}={value!r:.20}", "source", json.dumps({**source, name: value})))
    for kwargs in ({"num_classes": "x"}, {"pretrained": True}, {"no_such_arg": 1}, {"num_classes": 10**30},
                   {"num_classes": [1, [2]]}, {"num_classes": -5}):  # fmt: skip
        cases.append((f"source.kwargs={kwargs!r:.30}", "source", json.dumps({**source, "kwargs": kwargs})))
    gn = next(i for i, lp in enumerate(plan["layers"]) if lp["action"] == "gn")
    kept = next(i for i, lp in enumerate(plan["layers"]) if lp["action"] == "keep")
    for name, change in {
        "path not in model": (gn, {"path": "no.such.layer"}),
        "path of a conv": (gn, {"path": "conv1.0"}),
        "wrong kind": (gn, {"kind": "BatchNorm3d"}),
        "wrong channels": (gn, {"channels": 64, "groups": 8}),
        # A GN entry's eps defines the rebuilt GroupNorm (--like takes eps from a target), so only a kept
        # layer's eps can contradict the tensors' model.
        "wrong eps of a kept layer": (kept, {"eps": 0.5}),
        "kept path missing": (kept, {"path": "nothing.here"}),
        "frozen instead of gn": (gn, {"action": "frozen", "groups": None}),
        "folded into nothing": (gn, {"action": "folded", "producer": "no.such.conv"}),
    }.items():
        index, fields_ = change
        layers = [dict(lp) for lp in plan["layers"]]
        layers[index].update(fields_)
        cases.append((f"plan: {name}", "plan", json.dumps({**plan, "layers": layers})))
    return cases


def write_variant(base, key: str, text: str | None, index: int) -> Path:
    folder, tensors, meta = base
    meta = dict(meta)
    meta.pop(f"gnsurgeon.{key}", None)
    if text is not None:
        meta[f"gnsurgeon.{key}"] = text
    path = folder / f"v{index}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def test_metadata_fuzz_is_always_one_sentence(base):
    cases = metadata_cases(base[2])
    assert len(cases) > 150
    problems = []
    for i, (name, key, text) in enumerate(cases):
        path = write_variant(base, key, text, i)
        result = run("inspect", path)
        problems.append(one_sentence_problem(result, name))
        if str(path) not in result.output:
            problems.append(f"{name}: the file is not named: {result.output[-200:]}")
    assert_all_one_sentence(problems)


def test_metadata_that_passes_the_schema_but_not_the_model_is_one_sentence(base):
    cases = load_cases(base[2])
    problems = []
    for i, (name, key, text) in enumerate(cases):
        path = write_variant(base, key, text, 1000 + i)
        problems.append(one_sentence_problem(run("convert", path, "--dry-run"), name))
    assert_all_one_sentence(problems)


# ------------------------------------------------------------------------------------------ recipes
SECTIONS = {"convert": ConvertOptions, "finetune": FinetuneOptions, "export": ExportOptions}
# YAML values and the Python types they are wrong for whatever else a field accepts.
VALUES = {
    "{a: 1}": (),  # a mapping: no recipe option is one
    "[[1, 2]]": (),  # a list of lists: neither a scalar nor a list of strings
    "not-a-number": (str,),
    "1.5": (float,),
    "true": (bool,),
    "-.inf": (),  # floats must be finite, and nothing else takes a float
}


def accepted_types(cls, key: str) -> set:
    hints = {}
    for klass in (cls, *[f.default_factory for f in fields(cls) if f.name == "checks"]):
        hints.update(typing.get_type_hints(klass))
    hint = hints[key]
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return set(options) | {typing.get_origin(a) for a in options if typing.get_origin(a)}


def recipe_cases():
    for section, cls in SECTIONS.items():
        for key in recipe_fields(cls):
            accepted = accepted_types(cls, key)
            for value, right_for in VALUES.items():
                if not accepted & set(right_for) and not (list in accepted and value == "not-a-number"):
                    yield section, key, value  # (a string where a list goes is a one-item list)


def test_recipe_values_of_the_wrong_type_are_one_sentence(tmp_path):
    checkpoint = tmp_path / "c.safetensors"
    assert run("convert", "timm:test_resnet", "--input-size", "3,64,64", "-o", checkpoint, "-q").exit_code == 0
    commands = {
        "convert": ["convert", "timm:test_resnet", "--dry-run"],
        "finetune": ["finetune", checkpoint, "-o", tmp_path / "f.safetensors"],
        "export": ["export-onnx", checkpoint, "-o", tmp_path / "e.onnx"],
    }
    cases = list(recipe_cases())
    assert len(cases) > 200
    recipe = tmp_path / "r.yaml"
    problems = []
    for section, key, value in cases:
        recipe.write_text(f"{section}:\n  {key}: {value}\n")
        result = run(*commands[section], "--recipe", recipe)
        problems.append(one_sentence_problem(result, f"{section}.{key}: {value}"))
        if key not in result.output or str(recipe) not in result.output:
            problems.append(f"{section}.{key}: {value}: key or file not named: {result.output[-200:]}")
    assert_all_one_sentence(problems)
