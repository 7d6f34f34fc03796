"""The workflow's rough edges (issue #12): a run folder re-used, Ctrl-C, the teacher's recorded weights,
an output equal to its input, one-class folders, unreadable images, auxiliary weights.

timm's ``test_resnet`` at 32x32 and a few generated images, as in test_finetune.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from typer.testing import CliRunner

import gnsurgeon
from gnsurgeon import ConvertOptions, FinetuneOptions, GNSurgeonError, load, read_checkpoint
from gnsurgeon.cli import app
from gnsurgeon.finetuning import trainer as trainer_module
from tests.test_finetune import write_images

FAST = {"workers": 0, "log_every": 1, "eval_batch_size": 16}
RECIPE = Path(__file__).parent.parent / "recipes" / "gn-g32.yaml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edges")
    torch.manual_seed(0)
    import timm

    teacher = root / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(teacher))
    gn = root / "gn.safetensors"
    options = ConvertOptions(input_size=(3, 32, 32), num_classes=3, weights=str(teacher))
    gnsurgeon.convert_source("timm:test_resnet", gn, options)
    return {"root": root, "teacher": teacher, "gn": gn, "train": write_images(root / "train", 3, 4, seed=0)}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_sentence_exit_2(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text


# ------------------------------------------------------------------------------ gnsurgeon run
def _run(ws, out: Path, *extra: str):
    return cli(
        "run", RECIPE, "timm:test_resnet", "--num-classes", "3", "--input-size", "3,32,32",
        "--weights", ws["teacher"], "--data", ws["train"], "-o", out,
        "--set", "finetune.steps=2", "--set", "finetune.batch_size=4", "--set", "finetune.workers=0", *extra,
    )  # fmt: skip


def test_rerun_into_an_old_run_folder_invalidates_everything_downstream(ws, tmp_path):
    out = tmp_path / "run"
    assert _run(ws, out).exit_code == 0
    # A finished fine-tune's training state (hundreds of MB on real models) does not pile up.
    assert not list(out.glob("finetune-*.state.pt"))
    old_onnx = (out / "model.onnx").stat().st_mtime_ns
    assert set(json.loads((out / "run-state.json").read_text())) == {"convert", "finetune", "export"}

    # Fine-tuning changes, then the export fails (zero tolerance): the old model.onnx and its
    # "done" entry must not survive next to the new fine-tuned checkpoint.
    result = _run(ws, out, "--set", "finetune.lr=0.001", "--set", "export.atol=0", "--set", "export.rtol=0")
    assert result.exit_code == 1, result.output
    assert not (out / "model.onnx").exists(), "the earlier run's model.onnx is still there"
    state = json.loads((out / "run-state.json").read_text())
    assert set(state) == {"convert", "finetune"}  # export is not recorded as done
    assert (out / "finetuned.safetensors").stat().st_mtime_ns > old_onnx
    # The failure names the layer and why, not only "see export.json".
    text = " ".join(result.output.split())
    rows = json.loads((out / "export.json").read_text())["verification"]["layers"]
    first_bad = next(row["path"] for row in rows if not row["ok"])
    assert "GN layer(s) out of limits" in text and f"first: layer {first_bad}: " in text, text
    assert "max abs" in text and "model.onnx not written" in text, text


def test_run_interrupted_in_finetune_resumes_and_then_drops_its_state(ws, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = trainer_module.Trainer._checkpoint

    def interrupt_after_first_state(self, done, final, report, clock):
        original(self, done, final, report, clock)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", interrupt_after_first_state)
    result = _run(ws, out, "--set", "finetune.checkpoint_every=1")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.output and "rerun the same command to resume" in result.output
    assert len(list(out.glob("finetune-*.state.pt"))) == 1  # kept: the rerun continues from it

    monkeypatch.setattr(trainer_module.Trainer, "_checkpoint", original)
    result = _run(ws, out, "--set", "finetune.checkpoint_every=1", "--json", tmp_path / "run.json")
    assert result.exit_code == 0, result.output
    stages = {s["stage"]: s for s in json.loads((tmp_path / "run.json").read_text())["stages"]}
    assert stages["convert"]["status"].startswith("skipped") and stages["finetune"]["status"] == "done"
    assert json.loads((out / "finetune.json").read_text())["resumed_from"] == 1
    assert not list(out.glob("finetune-*.state.pt"))


# ---------------------------------------------------------------------------------- finetune
def test_ctrl_c_in_finetune_exits_130_saying_how_to_resume(ws, tmp_path, monkeypatch):
    def interrupted(self, stream, window):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "_step", interrupted)
    result = cli("finetune", ws["gn"], "--data", ws["train"], "-o", tmp_path / "ft.safetensors", "--workers", "0")
    assert result.exit_code == 130
    assert "interrupted" in result.output and "rerun the same command with --resume" in result.output
    assert "Traceback" not in result.output


def test_finetune_output_equal_to_its_input_is_refused(ws, tmp_path):
    copy = tmp_path / "gn.safetensors"
    copy.write_bytes(ws["gn"].read_bytes())
    before = copy.read_bytes()
    os.chdir(tmp_path)
    try:  # the same file under another spelling
        result = cli("finetune", copy, "--data", ws["train"], "-o", "./gn.safetensors", "--workers", "0")
    finally:
        os.chdir(Path(__file__).parent.parent)
    one_sentence_exit_2(result, "is the input checkpoint", "another file")
    assert copy.read_bytes() == before


def test_a_one_class_folder_is_refused_for_cross_entropy(ws, tmp_path):
    data = write_images(tmp_path / "data", 1, 8, seed=3)
    result = cli("finetune", ws["gn"], "--data", data, "-o", tmp_path / "ft.safetensors", "--workers", "0")
    one_sentence_exit_2(result, "has one class folder (class0)", "two or more class folders", "without labels")
    # ... and distillation on that class folder's images, as the message says, works.
    options = FinetuneOptions(data=str(data / "class0"), teacher="source", steps=1, batch_size=4, **FAST)
    gnsurgeon.finetune(ws["gn"], tmp_path / "kd.safetensors", options)


def test_unreadable_images_are_not_counted_as_used(ws, tmp_path):
    data = write_images(tmp_path / "data", 3, 3, seed=4)
    for name in ("class0/bad.png", "class2/bad.png"):
        (data / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    # finetune: a whole epoch meets every file; the count used excludes the two unreadable ones
    options = FinetuneOptions(data=str(data), epochs=1, **FAST)
    report = gnsurgeon.finetune(ws["gn"], tmp_path / "ft.safetensors", options)
    assert report.settings.train_images == 11 and report.broken_images["count"] == 2
    assert report.train_images == 9 and report.to_dict()["train_images"] == 9
    # calibration: the images used are readable ones (topped up to the number asked), counted as such
    options = ConvertOptions(
        input_size=(3, 32, 32), num_classes=3, weights=str(ws["teacher"]), calibrate=str(data), calib_samples=8,
        calib_method="layer",
    )  # fmt: skip
    cal = gnsurgeon.convert_source("timm:test_resnet", tmp_path / "cal.safetensors", options).calibration
    assert cal["samples"] + cal["holdout"] == 8 and cal["broken_images"]["count"] <= 2
    options.calib_samples = 20  # more than there are: 9 readable used, 2 unreadable reported
    cal = gnsurgeon.convert_source("timm:test_resnet", tmp_path / "cal.safetensors", options).calibration
    assert cal["samples"] + cal["holdout"] == 9 and cal["broken_images"]["count"] == 2


# ------------------------------------------------------------------------ --teacher source
def test_teacher_source_finds_the_weights_relative_to_the_checkpoint(ws, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "out").mkdir(parents=True)
    (project / "bn.safetensors").write_bytes(ws["teacher"].read_bytes())
    monkeypatch.chdir(project)
    options = ConvertOptions(input_size=(3, 32, 32), num_classes=3, weights="bn.safetensors")  # relative to cwd
    gnsurgeon.convert_source("timm:test_resnet", "out/gn.safetensors", options)
    entry = read_checkpoint(project / "out" / "gn.safetensors").history[0]
    assert entry["weights"] == "bn.safetensors" and entry["weights_file"] == "../bn.safetensors"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ft = FinetuneOptions(data=str(ws["train"]), teacher="source", steps=1, batch_size=4, **FAST)
    report = gnsurgeon.finetune(project / "out" / "gn.safetensors", elsewhere / "ft.safetensors", ft)
    assert report.settings.teacher_from.endswith("bn.safetensors")
    # The fine-tuned checkpoint lives elsewhere: its carried history points at the same file.
    carried = read_checkpoint(elsewhere / "ft.safetensors").history[0]["weights_file"]
    assert (elsewhere / carried).resolve() == (project / "bn.safetensors").resolve()
    gnsurgeon.finetune(elsewhere / "ft.safetensors", elsewhere / "ft2.safetensors", ft)


def _with_history(ws, path: Path, entry: dict) -> Path:
    info = read_checkpoint(ws["gn"])
    gnsurgeon.save(path, load(ws["gn"]), info.plan, source=info.source, data_config=info.data_config, history=[entry])
    return path


def test_old_checkpoints_without_weights_file_still_find_their_teacher(ws, tmp_path, monkeypatch):
    (tmp_path / "bn.safetensors").write_bytes(ws["teacher"].read_bytes())
    old = _with_history(ws, tmp_path / "old.safetensors", {"stage": "convert", "source": "timm:test_resnet",
                                                             "weights": "bn.safetensors"})  # fmt: skip
    monkeypatch.chdir(ws["root"])  # not where the weights are: found next to the checkpoint
    ft = FinetuneOptions(data=str(ws["train"]), teacher="source", steps=1, batch_size=4, **FAST)
    gnsurgeon.finetune(old, tmp_path / "ft.safetensors", ft)


@pytest.mark.parametrize("recorded", ["/etc/passwd", "notes.txt", "link.pth"])
def test_teacher_source_opens_only_a_recorded_weights_file(ws, tmp_path, monkeypatch, recorded):
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "link.pth").symlink_to("/etc/passwd")
    hostile = _with_history(ws, tmp_path / "h.safetensors", {"stage": "convert", "source": "timm:test_resnet",
                                                              "weights": recorded})  # fmt: skip
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a) or {})
    ft = FinetuneOptions(data=str(ws["train"]), teacher="source", steps=1, batch_size=4, **FAST)
    with pytest.raises(GNSurgeonError, match="which is not a weights file") as caught:
        gnsurgeon.finetune(hostile, tmp_path / "ft.safetensors", ft)
    assert "\n" not in str(caught.value) and not opened


# ------------------------------------------------------------------------- auxiliary weights
def test_segmentation_weights_with_an_aux_head_hint_the_constructor_option(tmp_path):
    model = torchvision.models.segmentation.fcn_resnet50(num_classes=3, aux_loss=True, weights_backbone=None)
    weights = tmp_path / "fcn.safetensors"
    save_file(model.state_dict(), str(weights))
    result = cli(
        "convert", "torchvision:fcn_resnet50", "--num-classes", "3", "--weights", weights,
        "--input-size", "3,64,64", "--dry-run",
    )  # fmt: skip
    one_sentence_exit_2(result, "aux_classifier.", "--model-kwargs aux_loss=True")
