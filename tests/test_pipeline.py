"""`gnsurgeon run`: every shipped recipe end to end on a tiny model, and resuming finished stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from gnsurgeon import load
from gnsurgeon.cli import app
from gnsurgeon.layers import norm_kind

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
# Small budgets so that every recipe runs in seconds; the recipes' own values stay as shipped.
FAST = {
    "finetune": ["steps=2", "batch_size=2", "workers=0"],
    "convert": ["calib_samples=8", "calib_steps=2", "calib_final_steps=2"],
}


def _fast(recipe: Path) -> list[str]:
    text = recipe.read_text()
    return [
        arg
        for section, items in FAST.items()
        if f"{section}:" in text
        for i in items
        for arg in ("--set", f"{section}.{i}")
    ]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for label in range(3):
        (root / str(label)).mkdir()
        for i in range(4):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / str(label) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A "pretrained" BN model to start from (distillation refuses a random teacher)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "bn.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Frame folders in one sub-folder per class: what the video recipe fine-tunes on."""
    root = tmp_path_factory.mktemp("clips")
    gen = torch.Generator().manual_seed(1)
    for label in range(3):
        for clip in range(2):
            folder = root / str(label) / f"clip{clip}"
            folder.mkdir(parents=True)
            for frame in range(3):
                pixels = (torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{frame:03d}.png")
    return root


TASK_SOURCES = {  # recipe -> the task it names, as a small torchvision model with saved BN weights
    "video-3d": ("mc3_18", {"num_classes": 3}, "3,2,16,16"),
    "detection-bnstar-gn": ("fasterrcnn_resnet50_fpn", {"num_classes": 3, "min_size": 64, "max_size": 64}, "3,64,64"),
}


@pytest.fixture(scope="module")
def task_weights(tmp_path_factory):
    """BN weights (statistics randomised, as trained ones would be) for each recipe's own task."""
    from safetensors.torch import save_file

    from gnsurgeon.models import SourceSpec, build_model
    from tests.helpers import randomize_bn

    root = tmp_path_factory.mktemp("task-weights")
    paths = {}
    for stem, (name, kwargs, _) in TASK_SOURCES.items():
        torch.manual_seed(0)
        paths[stem] = root / f"{name}.safetensors"
        save_file(randomize_bn(build_model(SourceSpec("torchvision", name, kwargs))).state_dict(), str(paths[stem]))
    return paths


def _run(recipe: Path, out: Path, images: Path, weights: Path, *extra: str, task_weights=None, clips=None):
    data = images
    if recipe.stem in TASK_SOURCES:
        name, kwargs, size = TASK_SOURCES[recipe.stem]
        kw = ",".join(f"{k}={v}" for k, v in kwargs.items())
        source = [f"torchvision:{name}", "--model-kwargs", kw, "--input-size", size]
        source += ["--weights", task_weights[recipe.stem]]
        data = clips if recipe.stem == "video-3d" else images
    else:
        source = ["timm:test_resnet", "--num-classes", "3", "--input-size", "3,32,32"]
        source += ["--weights", str(weights)]
    args = ["run", str(recipe), *source, "--data", str(data), "--val", str(data), "-o", str(out)]
    args += [*_fast(recipe), *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_runs_end_to_end(recipe, images, weights, task_weights, clips, tmp_path):
    """Each recipe on the task it names: the detection recipe on a Faster R-CNN (BN* folded in the
    stem and layer1, features distilled on images), the video recipe on an mc3_18 (clips from frame
    folders), the others on a classifier."""
    out = tmp_path / "run"
    result = _run(recipe, out, images, weights, "--json", tmp_path / "run.json", task_weights=task_weights, clips=clips)
    assert result.exit_code == 0, result.output
    text = recipe.read_text()
    stages = [s["stage"] for s in json.loads((tmp_path / "run.json").read_text())["stages"]]
    expected = [name for name in ("convert", "finetune", "export") if f"\n{name}:" in "\n" + text]
    assert stages == expected
    last = out / ("finetuned.safetensors" if "finetune:" in text else "converted.safetensors")
    model = load(last)
    if "bn_free: true" in text or "freeze" not in text:
        assert not any(norm_kind(m) for m in model.modules())
    if "export" in expected:
        assert (out / "model.onnx").is_file() and json.loads((out / "export.json").read_text())["ok"]
    if recipe.stem in TASK_SOURCES:
        report = json.loads((out / "finetune.json").read_text())
        task = "video" if recipe.stem == "video-3d" else "detection"
        assert report["settings"]["task"] == task and report["steps"] == 2
        assert report["after"]["teacher_agreement"] is not None or report["after"]["feature_cosine"] is not None


def test_rerun_skips_finished_stages(images, weights, tmp_path):
    recipe = next(r for r in RECIPES if r.stem == "gn-g32")
    out = tmp_path / "run"
    assert _run(recipe, out, images, weights).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = _run(recipe, out, images, weights, "--json", str(tmp_path / "again.json"))
    assert result.exit_code == 0, result.output
    statuses = {s["stage"]: s["status"] for s in json.loads((tmp_path / "again.json").read_text())["stages"]}
    assert set(statuses.values()) == {"skipped (already done)"}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before} == before
    # A changed option re-runs that stage and the ones after it, not the ones before.
    result = _run(recipe, out, images, weights, "--set", "finetune.lr=0.001", "--json", str(tmp_path / "third.json"))
    assert result.exit_code == 0, result.output
    statuses = {s["stage"]: s["status"] for s in json.loads((tmp_path / "third.json").read_text())["stages"]}
    assert statuses == {"convert": "skipped (already done)", "finetune": "done", "export": "done"}


def test_unknown_recipe_key_names_key_and_file(images, weights, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("convert:\n  groups: 32\nfinetune:\n  stepz: 3\n")
    result = _run(recipe, tmp_path / "out", images, weights)
    assert result.exit_code == 2
    assert "unknown key 'stepz'" in result.output and str(recipe) in result.output.replace("\n", "")
