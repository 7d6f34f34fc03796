"""The command line: happy paths, recipes, and every bad input exiting 2 with one clear sentence."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from gnsurgeon import load, read_checkpoint
from gnsurgeon.cli import app

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
SMALL = ["--input-size", "3,64,64"]


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def assert_bad_input(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in " ".join(text.split()), text


def test_convert_writes_checkpoint_and_json(tmp_path):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    result = run("convert", "timm:test_resnet", *SMALL, "-o", out, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["summary"]["actions"] == {"gn": 15}
    assert data["probe"]["finite"] and data["probe"]["input_size"] == [3, 64, 64]
    assert data["summary"]["converted_by_kind"] == {"BatchNorm2d": 15}
    assert len(data["summary"]["fallbacks"]) == 10  # C=16/32/48 cannot take 32 groups
    model = load(out)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert "Summary" in result.output and "fell back to G=16" in result.output


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    result = run(
        "convert", "timm:test_efficientnet", "--dry-run", "--channels-per-group", "16", "-o", tmp_path / "m.safetensors"
    )
    assert result.exit_code == 0, result.output
    assert "blocks.0.0.bn1" in result.output and "BatchNormAct2d" in result.output
    assert list(tmp_path.iterdir()) == []


def test_inspect_checkpoint_and_source(tmp_path):
    out = tmp_path / "m.safetensors"
    assert run("convert", "torchvision:resnet18", *SMALL, "-o", out).exit_code == 0
    result = run("inspect", out, "--json", tmp_path / "i.json")
    assert result.exit_code == 0, result.output
    assert "layer4.1.bn2" in result.output
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["is_checkpoint"] and data["summary"]["actions"] == {"gn": 20}
    result = run("inspect", "torchvision:mobilenet_v3_small")
    assert result.exit_code == 0 and "features.0.1" in result.output


def test_weights_file_nested_and_prefixed_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet")
    state = {"module." + k: v for k, v in source.state_dict().items()}
    weights = tmp_path / "w.pth"
    torch.save({"state_dict": state, "epoch": 3}, weights)
    out = tmp_path / "m.safetensors"
    result = run("convert", "timm:test_resnet", *SMALL, "--weights", weights, "-o", out)
    assert result.exit_code == 0, result.output
    model = load(out)
    assert torch.equal(model.layer1[0].bn1.weight, source.layer1[0].bn1.weight)
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert read_checkpoint(out).history[-1]["weights"] == str(weights)


def test_checkpoint_source_converts_what_was_kept(tmp_path):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run("convert", "timm:test_resnet", *SMALL, "--skip", "layer4.*", "-o", first).exit_code == 0
    assert {lp.action for lp in read_checkpoint(first).plan if lp.path.startswith("layer4")} == {"keep"}
    result = run("convert", first, "--groups", "8", "-o", second)
    assert result.exit_code == 0, result.output
    info = read_checkpoint(second)
    assert {lp.action for lp in info.plan} == {"gn"}
    assert {lp.groups for lp in info.plan if lp.path.startswith("layer4")} == {8}
    assert len(info.history) == 2
    a, b = load(first), load(second)
    assert torch.equal(a.layer1[0].bn1.weight, b.layer1[0].bn1.weight)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "calibrate:" not in r.read_text()], ids=lambda p: p.stem)
def test_shipped_recipes_convert(recipe, tmp_path):
    out = tmp_path / "m.safetensors"
    result = run("convert", "timm:test_efficientnet", *SMALL, "--recipe", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    assert load(out) is not None


def test_flags_override_recipe(tmp_path):
    result = run(
        "convert",
        "timm:test_resnet",
        "--recipe",
        RECIPES[0].parent / "gn-cpg16.yaml",
        "--groups",
        "4",
        "--dry-run",
        "--json",
        tmp_path / "r.json",
    )
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "r.json").read_text())["plan"]["options"]["policy"]
    assert options["groups"] == 4 and options["channels_per_group"] is None


# ---------------------------------------------------------------------------------- bad inputs
def test_unknown_model():
    assert_bad_input(
        run("convert", "timm:resnet_does_not_exist", "--dry-run"), "unknown timm model 'resnet_does_not_exist'"
    )
    assert_bad_input(run("convert", "torchvision:nope", "--dry-run"), "unknown torchvision model 'nope'")
    assert_bad_input(run("convert", "keras:resnet", "--dry-run"), "not timm:NAME")


def test_corrupt_and_truncated_weights(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    assert_bad_input(
        run("convert", "timm:test_resnet", "--weights", garbage, "--dry-run"), f"cannot read weights file {garbage}"
    )
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert_bad_input(
        run("convert", "timm:test_resnet", "--weights", truncated, "--dry-run"), f"cannot read weights file {truncated}"
    )
    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(100)}, str(st))
    st.write_bytes(st.read_bytes()[:-50])
    assert_bad_input(run("convert", "timm:test_resnet", "--weights", st, "--dry-run"), "not a valid safetensors file")
    assert_bad_input(
        run("convert", "timm:test_resnet", "--weights", tmp_path / "missing.pth", "--dry-run"), "does not exist"
    )


def test_wrong_architecture_weights(tmp_path):
    weights = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(weights))
    result = run("convert", "timm:test_resnet", "--weights", weights, "--dry-run")
    assert_bad_input(result, "does not fit the model", "missing key", "unexpected key", "shape mismatch")


def test_both_policies():
    assert_bad_input(
        run("convert", "timm:test_resnet", "--groups", "32", "--channels-per-group", "16", "--dry-run"), "not both"
    )


def test_unwritable_output(tmp_path):
    assert_bad_input(run("convert", "timm:test_resnet", "-o", tmp_path / "nodir" / "m.safetensors"), "does not exist")
    assert_bad_input(
        run("convert", "timm:test_resnet", *SMALL, "-o", "/proc/m.safetensors"), "cannot write /proc/m.safetensors"
    )
    assert_bad_input(run("convert", "timm:test_resnet", "-o", tmp_path / "m.pth"), "must end in .safetensors")


def test_strict_turns_fallback_into_error():
    assert_bad_input(
        run("convert", "timm:test_resnet", "--strict", "--dry-run"),
        "layer conv1.1",
        "--strict",
        "32 groups do not divide C=16",
    )


def test_bad_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  groups: 32\n  gropus: 16\n")
    assert_bad_input(
        run("convert", "timm:test_resnet", "--recipe", recipe, "--dry-run"), "unknown key 'gropus'", str(recipe)
    )
    recipe.write_text("convrt:\n  groups: 32\n")
    assert_bad_input(
        run("convert", "timm:test_resnet", "--recipe", recipe, "--dry-run"), "unknown recipe section 'convrt'"
    )


def test_pretrained_offline_fails_clearly(monkeypatch):
    assert_bad_input(
        run("convert", "timm:resnet18", "--pretrained", "--dry-run"),
        "could not fetch pretrained weights for timm:resnet18",
        "--weights FILE",
    )

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert_bad_input(
        run("convert", "torchvision:resnet18", "--pretrained", "--dry-run"),
        "could not fetch pretrained weights for torchvision:resnet18",
    )


def test_bad_model_kwargs_and_sizes():
    assert_bad_input(run("convert", "timm:test_resnet", "--model-kwargs", "drop_rate", "--dry-run"), "not key=value")
    assert_bad_input(run("convert", "timm:test_resnet", "--input-size", "3,abc", "--dry-run"), "--input-size")
    assert_bad_input(
        run("convert", "timm:test_resnet", "--model-kwargs", "no_such_arg=1", "--dry-run"),
        "could not build timm:test_resnet",
    )


def test_non_checkpoint_file_as_source(tmp_path):
    st = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(2)}, str(st))
    assert_bad_input(run("convert", st, "--dry-run"), "is not a gnsurgeon checkpoint", "--weights")


@pytest.mark.parametrize(
    "source, extra",
    [
        ("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", ["--model-kwargs", "min_size=96,max_size=96"]),
        ("torchvision:lraspp_mobilenet_v3_large", ["--num-classes", "3"]),
    ],
)
def test_detection_and_segmentation_models(source, extra, tmp_path):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    result = run("convert", source, *extra, "--input-size", "3,96,96", "-o", out, "--json", report, "-q")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["summary"]["actions"]["gn"] > 40
    model = load(out)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        x = torch.rand(3, 96, 96)
        y = model([x]) if "rcnn" in source else model(x[None])
    assert y is not None


def test_freeze_and_fold_report_per_layer_differences(tmp_path):
    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    result = run(
        "convert",
        "torchvision:resnet18",
        *SMALL,
        "--recipe",
        RECIPES[0].parent / "detection-bnstar-gn.yaml",
        "-o",
        out,
        "--json",
        report,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["summary"]["actions"] == {"folded": 5, "gn": 15}
    check = data["fold_check"]
    assert set(check["layers"]) == {"bn1", "layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"}
    assert all(e["max_rel"] < 1e-5 for e in check["layers"].values())
    assert "Freeze/fold check" in result.output
    plan = read_checkpoint(out).plan.by_path()
    assert plan["layer1.0.bn1"].producer == "layer1.0.conv1"
    assert plan["layer2.0.bn1"].action == "gn"


def test_freeze_without_fold_keeps_bn_star(tmp_path):
    out = tmp_path / "m.safetensors"
    result = run("convert", "timm:test_resnet", *SMALL, "--freeze", "*", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    model = load(out)
    from gnsurgeon.layers import FrozenBNAffine

    frozen = [m for m in model.modules() if isinstance(m, FrozenBNAffine)]
    assert len(frozen) == 15
    assert all(not list(m.parameters()) for m in frozen)  # BN* has nothing an optimizer could move


def test_bad_fold_exits_1_and_names_the_layers(tmp_path, monkeypatch):
    import gnsurgeon.fold

    real = gnsurgeon.fold.frozen_affine_params

    def off_by_one_percent(bn):
        a, b = real(bn)
        return a * 1.01, b

    monkeypatch.setattr(gnsurgeon.fold, "frozen_affine_params", off_by_one_percent)
    out = tmp_path / "m.safetensors"
    result = run("convert", "timm:test_resnet", *SMALL, "--freeze", "layer1.*", "--fold", "-o", out)
    assert result.exit_code == 1, result.output
    assert "beyond float32 rounding" in result.output and "layer1.0.bn1" in result.output
    assert not out.exists()


def test_bn_free_refuses_plans_that_keep_batch_norms():
    model = "torchvision:mobilenet_v3_small"
    assert_bad_input(
        run("convert", "timm:test_resnet", "--skip", "bn1", "--bn-free", "--dry-run"),
        "--bn-free: 1 layer(s) would stay batch norms: bn1 (matched by --skip)",
    )
    assert run("convert", model, "--bn-free", "--dry-run").exit_code == 0


def test_recipe_that_calibrates_needs_images():
    recipe = RECIPES[0].parent / "dp-sgd.yaml"
    assert_bad_input(
        run("convert", "timm:test_resnet", "--recipe", recipe, "--dry-run"),
        "calibrates (calibrate: true): give the images with --calibrate DIR",
    )


def test_calib_cache_flags_reach_calibration_and_bad_values_are_one_sentence(tmp_path):
    """--calib-cache / --calib-cache-mem are checked before any model is built, naming the flag."""
    out = tmp_path / "m.safetensors"
    bad_mode = run("convert", "timm:test_resnet", *SMALL, "--calibrate", tmp_path, "--calib-cache", "tape", "-o", out)
    assert_bad_input(bad_mode, "--calib-cache 'tape'")
    bad_size = run(
        "convert", "timm:test_resnet", *SMALL, "--calibrate", tmp_path, "--calib-cache-mem", "lots", "-o", out
    )
    assert bad_size.exit_code == 2 and "lots" in bad_size.output
    assert not out.exists()
