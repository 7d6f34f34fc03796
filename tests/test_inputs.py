"""Issue 12, the input half: bad inputs, metadata, silent no-ops, and the README's promises.

Each test names the defect it pins down; each failed before its fix. Tiny models only (timm's
test_resnet at 64x64, a hand-built net, timm's test_vit for a model without batch norm).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import timm
import torch
import typer
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import gnsurgeon
from gnsurgeon import GNSurgeonError, GroupPolicy, SourceSpec, load, make_plan, read_checkpoint, save
from gnsurgeon.cli import app, parse_model_kwargs
from gnsurgeon.models import DataConfig, build_model

SMALL = ["--input-size", "3,64,64"]


COMMAND = typer.main.get_command(app)  # converted once: typer converts the app on every invoke (~0.1 s)


def run(*args):
    return CliRunner().invoke(COMMAND, [str(a) for a in args])


def text_of(result) -> str:
    return " ".join((result.output + (result.stderr if result.stderr_bytes is not None else "")).split())


def assert_bad_input(result, *fragments: str) -> str:
    text = text_of(result)
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """test_resnet converted to GN(32) at 64x64, layer4 kept (so a later run has something left)."""
    out = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    result = run("convert", "timm:test_resnet", *SMALL, "--skip", "layer4.*", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def all_gn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gn") / "gn.safetensors"
    assert run("convert", "timm:test_resnet", *SMALL, "-o", out, "-q").exit_code == 0
    return out


# ------------------------------------------------------------ 4. save checks the model against its plan
def test_save_refuses_a_model_that_contradicts_its_plan(tmp_path):
    """The old README: a G=32 plan saved with a C/G=16 model; load rebuilt another model (|Δ| 0.63)."""
    model = timm.create_model("test_resnet")
    plan = make_plan(model, GroupPolicy(groups=32))
    other = gnsurgeon.convert(model, channels_per_group=16)
    path = tmp_path / "m.safetensors"
    with pytest.raises(GNSurgeonError, match=r"layer conv1\.1 of the model contradicts its plan: GroupNorm with"):
        save(path, other, plan, source=SourceSpec("timm", "test_resnet"))
    assert not path.exists()
    with pytest.raises(GNSurgeonError, match="the plan makes it gn"):
        save(path, model, plan, source=None)  # the unconverted model: still BatchNorm2d
    save(path, gnsurgeon.apply_plan(model, plan), plan, source=SourceSpec("timm", "test_resnet"))
    assert load(path) is not None


def test_save_checks_eps_and_missing_layers(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    plan = make_plan(model)
    gn = gnsurgeon.apply_plan(model, plan)
    gn[1].eps = 1e-3
    with pytest.raises(GNSurgeonError, match=r"layer 1 .*eps 0.001, the plan 1e-05"):
        save(tmp_path / "x.safetensors", gn, plan, source=None)
    with pytest.raises(GNSurgeonError, match="names layer 1, which the model does not have"):
        save(tmp_path / "x.safetensors", nn.Sequential(nn.Conv2d(3, 8, 3)), plan, source=None)


# ----------------------------------------------------- 5. a run that changes nothing is said, not recorded
def test_converting_a_gn_checkpoint_again_is_refused(all_gn, tmp_path):
    out = tmp_path / "again.safetensors"
    assert_bad_input(
        run("convert", all_gn, "--groups", "16", "-o", out), "has no batch-norm layer left to convert (15 gn)"
    )
    assert not out.exists()


def test_history_records_only_the_options_that_acted(checkpoint, tmp_path):
    out, report = tmp_path / "b.safetensors", tmp_path / "b.json"
    result = run("convert", checkpoint, "--groups", "8", "--skip", "nomatch*", "-o", out, "--json", report, "-q")
    assert result.exit_code == 0, result.output
    entry = read_checkpoint(out).history[-1]
    assert entry["options"]["policy"]["groups"] == 8
    assert entry["options"]["selection"]["skip"] == []  # asked for, matched nothing: not recorded
    assert json.loads(report.read_text())["warnings"] == ["--skip 'nomatch*' matched no batch-norm layer"]
    # freezing only: the group policy acted on no layer, so the history has none
    frozen = tmp_path / "f.safetensors"
    assert run("convert", checkpoint, "--freeze", "layer4.*", "-o", frozen, "-q").exit_code == 0
    assert "policy" not in read_checkpoint(frozen).history[-1]["options"]


def test_model_without_batch_norm_is_refused(tmp_path):
    out = tmp_path / "vit.safetensors"
    assert_bad_input(run("convert", "timm:test_vit", "-o", out), "timm:test_vit has no batch-norm layer")
    assert not out.exists()
    assert_bad_input(run("convert", "timm:test_vit", "--dry-run"), "nothing to convert")
    result = run("inspect", "timm:test_vit")
    assert result.exit_code == 0 and "convert would refuse" in text_of(result)


def test_every_layer_kept_is_refused():
    assert_bad_input(run("convert", "timm:test_resnet", "--skip", "*", "--dry-run"), "every one stays", "--skip")


# ----------------------------------------------------------------------- silent no-ops: warnings
def test_patterns_that_match_nothing_are_said(tmp_path):
    report = tmp_path / "r.json"
    result = run(
        "convert", "timm:test_resnet", "--only", "layer9.*", "--only", "layer1.*", "--freeze", "fc*",
        "--dry-run", "--json", report,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    warnings = json.loads(report.read_text())["warnings"]
    assert warnings == [
        "--only 'layer9.*' matched no batch-norm layer",
        "--freeze 'fc*' matched no batch-norm layer",
    ]
    assert "warning: --only 'layer9.*' matched no batch-norm layer" in text_of(result)
    assert_bad_input(
        run("convert", "timm:test_resnet", "--only", "layer9.*", "--only", "layer1.*", "--groups", "8", "--strict",
            "--dry-run"),  # fmt: skip
        "--strict: --only 'layer9.*' matched no batch-norm layer",
    )


def test_fold_without_freeze_and_skip_over_freeze_are_said(tmp_path):
    report = tmp_path / "r.json"
    result = run("convert", "timm:test_resnet", "--fold", "--dry-run", "--json", report)
    assert result.exit_code == 0, result.output
    assert any(w.startswith("--fold does nothing here") for w in json.loads(report.read_text())["warnings"])
    result = run(
        "convert", "timm:test_resnet", "--freeze", "layer1.*", "--skip", "layer1.0.*", "--dry-run", "--json", report
    )
    assert result.exit_code == 0, result.output
    (warning,) = json.loads(report.read_text())["warnings"]
    assert warning.startswith("--skip wins over --freeze for 2 layer(s)") and "layer1.0.bn1" in warning
    plan = json.loads(report.read_text())["plan"]["layers"]
    assert {lp["path"]: lp["action"] for lp in plan}["layer1.0.bn1"] == "keep"


def test_inspect_says_conversion_options_do_not_apply_to_a_checkpoint(checkpoint):
    result = run("inspect", checkpoint, "--groups", "8")
    assert result.exit_code == 0 and "--groups: conversion options do not apply" in text_of(result)


# ------------------------------------------------------------------ 8. malformed checkpoint metadata
def with_metadata(source: Path, target: Path, **changes) -> Path:
    """A copy of ``source`` whose ``gnsurgeon.<key>`` metadata is replaced (None deletes it)."""
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
    for key, value in changes.items():
        meta.pop(f"gnsurgeon.{key}", None)
        if value is not None:
            meta[f"gnsurgeon.{key}"] = value if isinstance(value, str) else json.dumps(value)
    save_file(load_file(str(source)), str(target), metadata=meta)
    return target


def test_malformed_plan_is_one_sentence_for_inspect_and_export(checkpoint, tmp_path):
    bad = with_metadata(checkpoint, tmp_path / "bad.safetensors", plan={"layers": "nope"})
    for args in (("inspect", bad), ("export-onnx", bad, "-o", tmp_path / "m.onnx")):
        assert_bad_input(run(*args), f"checkpoint {bad} has a bad gnsurgeon.plan: layers must be a JSON list")


def test_metadata_schema_names_the_place(checkpoint, tmp_path):
    plan = json.loads(read_checkpoint(checkpoint).plan.to_json())
    plan["layers"][2]["groups"] = -4
    bad = with_metadata(checkpoint, tmp_path / "g.safetensors", plan=plan)
    with pytest.raises(GNSurgeonError, match=r"gnsurgeon.plan: layers\[2\].groups must be an integer from 1 to"):
        read_checkpoint(bad)
    plan["layers"][2]["groups"] = 8
    plan["layers"][2]["action"] = "explode"
    bad = with_metadata(checkpoint, tmp_path / "a.safetensors", plan=plan)
    with pytest.raises(GNSurgeonError, match=r"layers\[2\].action must be one of gn, frozen, folded, keep"):
        read_checkpoint(bad)
    bad = with_metadata(checkpoint, tmp_path / "k.safetensors", extra="1")
    with pytest.raises(GNSurgeonError, match="unknown metadata key gnsurgeon.extra"):
        read_checkpoint(bad)
    bad = with_metadata(checkpoint, tmp_path / "d.safetensors", data_config={"input_size": [3, 65536, 65536]})
    with pytest.raises(GNSurgeonError, match="gnsurgeon.data_config: input_size .* more than"):
        read_checkpoint(bad)


def test_load_checks_kept_layers_against_the_plan_too(checkpoint, tmp_path):
    """A kept layer that the model lacks, or that is another kind, loaded without a word."""
    plan = json.loads(read_checkpoint(checkpoint).plan.to_json())
    kept = next(i for i, lp in enumerate(plan["layers"]) if lp["action"] == "keep")
    plan["layers"][kept]["path"] = "no.such.layer"
    bad = with_metadata(checkpoint, tmp_path / "p.safetensors", plan=plan)
    with pytest.raises(GNSurgeonError, match="the plan names layer no.such.layer, which the model rebuilt from"):
        load(bad)
    plan["layers"][kept].update(path="layer4.0.bn1", kind="BatchNorm3d")
    bad = with_metadata(checkpoint, tmp_path / "k.safetensors", plan=plan)
    with pytest.raises(GNSurgeonError, match="layer4.0.bn1 .* the plan keeps a BatchNorm3d, but the model holds"):
        load(bad)


# ------------------------------------------------------------------------- 9. outputs checked first
@pytest.mark.parametrize("command", ["convert", "inspect", "export-onnx", "verify-onnx", "finetune", "run"])
def test_unwritable_json_is_found_before_any_work(command, checkpoint, tmp_path, monkeypatch):
    import gnsurgeon.sources

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the --json path was checked")

    monkeypatch.setattr(gnsurgeon.sources, "open_source", no_work)
    bad_json = tmp_path / "missing" / "r.json"
    args = {
        "convert": ["convert", "timm:test_resnet", "-o", tmp_path / "m.safetensors"],
        "inspect": ["inspect", "timm:test_resnet"],
        "export-onnx": ["export-onnx", checkpoint, "-o", tmp_path / "m.onnx"],
        "verify-onnx": ["verify-onnx", tmp_path / "m.onnx", checkpoint],
        "finetune": ["finetune", checkpoint, "--data", tmp_path, "-o", tmp_path / "f.safetensors"],
        "run": ["run", Path(__file__).parent.parent / "recipes" / "gn-g32.yaml", "timm:test_resnet", "-o", tmp_path],
    }[command]
    assert_bad_input(run(*args, "--json", bad_json), f"--json {bad_json}: folder")
    assert not (tmp_path / "m.safetensors").exists()


def test_output_paths_name_their_option(tmp_path):
    assert_bad_input(run("convert", "timm:test_resnet", "-o", tmp_path / "nodir" / "m.safetensors"), "-o ")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_bad_input(
        run("run", Path(__file__).parent.parent / "recipes" / "gn-g32.yaml", "timm:test_resnet", "-o", blocker),
        f"-o {blocker} exists and is not a folder",
    )
    assert_bad_input(
        run("run", Path(__file__).parent.parent / "recipes" / "gn-g32.yaml", "timm:test_resnet", "-o", blocker / "x"),
        "is a file, so the folder cannot be created",
    )


def test_failed_convert_writes_its_json_report(tmp_path, monkeypatch):
    report = tmp_path / "r.json"
    assert_bad_input(run("convert", "timm:nope", "--dry-run", "--json", report))
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["exit_code"] == 2 and "unknown timm model" in data["error"]
    assert data["command"] == "convert"

    import gnsurgeon.fold

    real = gnsurgeon.fold.frozen_affine_params
    monkeypatch.setattr(gnsurgeon.fold, "frozen_affine_params", lambda bn: (real(bn)[0] * 1.01, real(bn)[1]))
    result = run(
        "convert", "timm:test_resnet", *SMALL, "--freeze", "layer1.*", "--fold", "-o", tmp_path / "m.safetensors",
        "--json", report,
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    data = json.loads(report.read_text())
    assert data["ok"] is False and data["exit_code"] == 1 and "layer1.0.bn1" in data["error"]


def test_successful_reports_say_ok(tmp_path):
    report = tmp_path / "r.json"
    assert run("inspect", "timm:test_resnet", "--json", report).exit_code == 0
    assert json.loads(report.read_text())["ok"] is True


# ------------------------------------------------------------------- 10. README promises, in code
def test_export_and_verify_read_the_recipe_export_section(all_gn, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("export:\n  dynamic_batch: false\n  verify: false\n")
    onnx_file, report = tmp_path / "m.onnx", tmp_path / "e.json"
    result = run("export-onnx", all_gn, "-o", onnx_file, "--recipe", recipe, "--json", report)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["dynamic_batch"] is False and data["input_shape"][0] == 1 and data["verification"] is None
    # the recipe's gn_op meets the flag's opset; a flag overrides the recipe's value
    recipe.write_text("export:\n  gn_op: native\n")
    native = run("export-onnx", all_gn, "-o", onnx_file, "--recipe", recipe, "--opset", "18")
    assert_bad_input(native, "needs --opset 21")
    assert_bad_input(run("export-onnx", all_gn, "-o", onnx_file, "--recipe", recipe, "--gn-op", "x"), "--gn-op 'x'")
    recipe.write_text("export:\n  atol: 0.5\n  stress: false\n")
    result = run("verify-onnx", onnx_file, all_gn, "--recipe", recipe, "--json", report, "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["tolerance"]["atol"] == 0.5
    recipe.write_text("export:\n  atoll: 0.5\n")
    assert_bad_input(run("verify-onnx", onnx_file, all_gn, "--recipe", recipe), "unknown key 'atoll'", str(recipe))


def test_export_and_verify_take_the_architecture_of_a_sourceless_checkpoint(tmp_path):
    arch = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    plan = make_plan(arch)
    path = save(
        tmp_path / "x.safetensors", gnsurgeon.apply_plan(arch, plan), plan, source=None,
        data_config=DataConfig(input_size=(3, 16, 16)),
    )  # fmt: skip
    out = tmp_path / "x.onnx"
    with pytest.raises(GNSurgeonError, match="pass the unconverted architecture as model= to gnsurgeon.load, export"):
        gnsurgeon.export_onnx(str(path), out)
    report = gnsurgeon.export_onnx(str(path), out, model=arch)
    assert report.ok and report.written and out.exists()
    assert gnsurgeon.verify_onnx(out, str(path), model=arch).ok
    with pytest.raises(GNSurgeonError, match="is not a checkpoint"):
        gnsurgeon.export_onnx("timm:test_resnet", out, model=arch)


# ---------------------------------------------------------------------------------- rough edges
def test_model_kwargs_must_be_literals():
    assert parse_model_kwargs("act='relu',drop_rate=0.1,img_size=(64, 64)") == {
        "act": "relu",
        "drop_rate": 0.1,
        "img_size": (64, 64),
    }
    assert_bad_input(
        run("convert", "timm:test_resnet", "--model-kwargs", "drop_rate=0.1,act_layer=relu", "--dry-run"),
        "--model-kwargs act_layer=relu is not a Python literal; quote strings (act_layer='relu')",
    )


def test_pretrained_offline_fails_within_seconds(monkeypatch, tmp_path):
    """Offline, huggingface_hub retried its HEAD request five times (~52 s) before failing."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(GNSurgeonError, match="could not fetch pretrained weights for timm:test_resnet"):
        build_model(SourceSpec("timm", "test_resnet", pretrained=True))
    assert time.perf_counter() - start < 10
    assert constants.HF_HUB_OFFLINE is False  # switched back after the build


def test_pickled_model_as_weights_is_named(tmp_path):
    weights = tmp_path / "full.pth"
    torch.save(timm.create_model("test_resnet"), weights)
    text = assert_bad_input(
        run("convert", "timm:test_resnet", "--weights", weights, "--dry-run"),
        f"weights file {weights} holds a pickled model (timm.models.resnet.",
        "not a state dict: save `model.state_dict()`",
    )
    assert "\x1b" not in text and "Weights only load failed" not in text


def test_wrong_channel_count_in_input_size_is_bad_input():
    assert_bad_input(
        run("convert", "timm:test_resnet", "--input-size", "4,64,64", "--dry-run"),
        "--input-size 4,64,64 does not fit timm:test_resnet",
    )


def test_in_chans_sets_the_probe_channels(tmp_path):
    out = tmp_path / "gray.safetensors"
    result = run("convert", "timm:test_resnet", "--in-chans", "1", "--input-size", "1,64,64", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    spec = SourceSpec("timm", "test_resnet", {"in_chans": 1})
    from gnsurgeon.models import data_config_for

    config = data_config_for(spec, build_model(spec))
    assert config.input_size[0] == 1 and len(config.mean) == len(config.std) == 1


def test_truncated_checkpoint_source_is_called_truncated(all_gn, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(all_gn.read_bytes()[: all_gn.stat().st_size // 2])
    assert_bad_input(run("convert", cut, "--dry-run"), f"checkpoint {cut} is truncated or corrupt")
    assert_bad_input(run("inspect", cut), "is truncated or corrupt")


def test_every_output_kind_is_an_ordinary_file(all_gn, tmp_path):
    """.safetensors came out 0600 under umask 022 (mkstemp's mode) while .onnx and .json were 0644;
    the mode follows the umask (077 gives 0600)."""
    old = os.umask(0o022)
    try:
        ckpt, report, onnx_file = tmp_path / "m.safetensors", tmp_path / "r.json", tmp_path / "m.onnx"
        assert run("convert", "timm:test_resnet", *SMALL, "-o", ckpt, "--json", report, "-q").exit_code == 0
        assert run("export-onnx", all_gn, "-o", onnx_file, "--no-verify").exit_code == 0
        model = build_model(SourceSpec("timm", "test_resnet"))
        plan = make_plan(model)
        converted = gnsurgeon.apply_plan(model, plan)
        api = save(tmp_path / "api.safetensors", converted, plan, source=None)
        os.umask(0o077)
        private = save(tmp_path / "private.safetensors", converted, plan, source=None)
    finally:
        os.umask(old)
    for path in (ckpt, report, onnx_file, api):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
