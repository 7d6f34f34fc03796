"""The README's Python API example runs as written (on a tiny model), and its promises hold.

The block is taken from README.md at test time, so an edit that breaks the example (a name that no
longer exists, a save that its plan contradicts) fails here. Only the model name is substituted,
each substitution counted so that a README that stops naming resnet50 is noticed too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gnsurgeon.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def python_api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API\n") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section should hold one python block"
    return blocks[0]


def test_python_api_example_runs_on_a_tiny_model(tmp_path, monkeypatch):
    code = python_api_block()
    substitutions = {'"resnet50"': '"test_resnet"', '"timm:resnet50"': '"timm:test_resnet"'}
    for old, new in substitutions.items():
        assert old in code, f"the README example no longer uses {old}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102 - our own README

    model, gn_model, same, quick = (namespace[k] for k in ("model", "gn_model", "same", "quick"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(same(x), gn_model.eval()(x))  # "gn_model's outputs exactly"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in quick.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # "model is untouched"
    assert namespace["report"].output.endswith(".safetensors")


def test_readme_promises_recipe_on_every_command():
    """"Every command with a recipe section also takes --recipe": each such command's parameters
    include it (run: an argument); export-weights, which the README names as having none, is the one
    command without."""
    text = README.read_text()
    assert "Every command with a recipe section also takes `--recipe`" in text
    assert "`export-weights` has no section" in text
    for command in app.registered_commands:
        if command.name == "export-weights":
            continue
        params = command.callback.__code__.co_varnames
        assert "recipe" in params, f"{command.name or command.callback.__name__} takes no --recipe"


def test_readme_says_calibrate_returns_model_and_report():
    import inspect

    from gnsurgeon import calibrate

    assert "`(calibrated_model, report)`" in README.read_text()
    assert "tuple" in str(inspect.signature(calibrate).return_annotation)


@pytest.mark.parametrize("name", ["load", "export_onnx", "verify_onnx"])
def test_readme_model_keyword_exists(name):
    import inspect

    import gnsurgeon

    assert f"gnsurgeon.{name}(" in README.read_text()
    assert "model" in inspect.signature(getattr(gnsurgeon, name)).parameters
