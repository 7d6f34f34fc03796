"""``gnsurgeon finetune``: training lowers the loss, KD alone works, resume is exact, torchrun works.

Everything runs on CPU with timm's ``test_resnet`` at 32x32 and a few generated images whose class
is their dominant colour (learnable in a few steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import gnsurgeon
from gnsurgeon import ConvertOptions, FinetuneOptions, GNSurgeonError, NonFiniteLossError, load, read_checkpoint
from gnsurgeon.cli import app
from gnsurgeon.finetuning import WarmupCosine, param_groups, read_state
from gnsurgeon.layers import FrozenBNAffine

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FAST = {"workers": 0, "log_every": 1, "eval_batch_size": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine they lose a lot."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_images(folder: Path, classes: int | None, per_class: int, seed: int) -> Path:
    """Noise images whose dominant colour is the class; ``classes=None`` writes a flat folder."""
    rng = np.random.default_rng(seed)
    for c in range(classes or 1):
        sub = folder / f"class{c}" if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            pixels[..., c % 3] += 150
            Image.fromarray(pixels).save(sub / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """Data folders, the BN teacher's weights, a plain GN checkpoint and a mixed GN/BN*/BN one."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    teacher = root / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(teacher))
    common = {"input_size": (3, 32, 32), "num_classes": 3, "weights": str(teacher)}
    gn = root / "gn.safetensors"
    gnsurgeon.convert_source("timm:test_resnet", gn, ConvertOptions(**common))
    mixed = root / "mixed.safetensors"  # BN* in layer1, BatchNorm kept in layer2, dropout before the head
    mixed_options = ConvertOptions(**common, freeze=["layer1.*"], skip=["layer2.*"], model_kwargs={"drop_rate": 0.3})
    gnsurgeon.convert_source("timm:test_resnet", mixed, mixed_options)
    return {
        "root": root,
        "train": write_images(root / "train", 3, 8, seed=0),
        "val": write_images(root / "val", 3, 4, seed=1),
        "flat": write_images(root / "flat", None, 16, seed=2),
        "teacher": teacher,
        "gn": gn,
        "mixed": mixed,
    }


def options(ws, **kwargs) -> FinetuneOptions:
    return FinetuneOptions(**{"data": str(ws["train"]), "val": str(ws["val"]), **FAST, **kwargs})


def train_losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "train"]


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_bad_input(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text


# ------------------------------------------------------------------------------------ training
def test_finetune_lowers_loss_keeps_bn_star_frozen_and_the_plan(ws, tmp_path):
    out = tmp_path / "ft.safetensors"
    before = load(ws["mixed"])
    report = gnsurgeon.finetune(ws["mixed"], out, options(ws, steps=24, lr=0.02))
    losses = train_losses(tmp_path / "ft.metrics.jsonl")
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    assert report.after["top1"] > report.before["top1"]
    assert report.after["images"] == 12 and report.images_seen == 24 * 8

    after = load(out)
    assert read_checkpoint(out).plan.to_dict() == read_checkpoint(ws["mixed"]).plan.to_dict()
    history = read_checkpoint(out).history
    assert [h["stage"] for h in history] == ["convert", "finetune"]
    assert history[-1]["after"]["top1"] == report.after["top1"] and history[-1]["steps"] == 24
    # BN*: buffers only, untouched; kept BatchNorm trains as BN (statistics and γ move); GN trains.
    frozen = [p for p, m in after.named_modules() if isinstance(m, FrozenBNAffine)]
    assert len(frozen) == 2  # layer1.0.bn1, layer1.0.bn2
    for path in frozen:
        for name in ("scale", "shift"):
            assert torch.equal(getattr(after.get_submodule(path), name), getattr(before.get_submodule(path), name))
    bn = after.layer2[0].bn1
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert not torch.equal(bn.running_mean, before.layer2[0].bn1.running_mean)
    assert not torch.equal(bn.weight, before.layer2[0].bn1.weight)
    assert not torch.equal(after.layer3[0].bn1.weight, before.layer3[0].bn1.weight)


def test_weight_decay_is_zero_on_norm_parameters_and_biases(ws):
    model = load(ws["mixed"])
    decay, no_decay = param_groups(model, 1e-4, 0.0)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay_ids}
    assert {"layer3.0.bn1.weight", "layer3.0.bn1.bias", "layer2.0.bn1.weight", "fc.bias"} <= names
    assert all(p.ndim > 1 for p in decay["params"]) and "fc.weight" not in names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    schedule = WarmupCosine(warmup=2, total=10)
    assert [round(schedule(s), 3) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.038]


def test_augmentation_depends_on_seed_epoch_and_index_only(ws):
    from gnsurgeon.data import ImageFolderData, train_transform
    from gnsurgeon.finetuning import SeededSamples

    folder = ImageFolderData(ws["train"], train_transform(read_checkpoint(ws["gn"]).data_config))
    data, other_seed = SeededSamples(folder, seed=0), SeededSamples(folder, seed=1)
    rng = torch.get_rng_state()
    first = data[(3, 0)][0]
    torch.rand(5)  # whatever else draws from the global RNG in between does not matter
    assert torch.equal(first, data[(3, 0)][0])
    assert not torch.equal(first, data[(3, 1)][0]) and not torch.equal(first, other_seed[(3, 0)][0])
    torch.set_rng_state(rng)
    data[(3, 0)]
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's stream is left alone


def test_kd_alone_on_an_unlabeled_folder(ws, tmp_path):
    out = tmp_path / "kd.safetensors"
    opts = options(ws, data=str(ws["flat"]), steps=16, batch_size=4, lr=0.05)
    opts.teacher, opts.teacher_weights = "timm:test_resnet", str(ws["teacher"])
    report = gnsurgeon.finetune(ws["gn"], out, opts)
    assert report.settings.labeled is False and report.settings.teacher == "timm:test_resnet"
    losses = train_losses(tmp_path / "kd.metrics.jsonl")
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert report.after["teacher_agreement"] is not None and report.teacher_eval["top1"] is not None
    assert load(out) is not None


def test_calibrated_checkpoint_fine_tunes_at_the_lower_default_lr(ws, tmp_path):
    """The history's calibration, not the caller, decides the default: a calibrated start gets
    CALIBRATED_LR_FACTOR of the base lr, the plain conversion the base lr (both recorded)."""
    calibrated = tmp_path / "cal.safetensors"
    common = {"input_size": (3, 32, 32), "num_classes": 3, "weights": str(ws["teacher"])}
    cal_options = ConvertOptions(**common, calibrate=str(ws["flat"]), calib_samples=8, calib_method="layer")
    gnsurgeon.convert_source("timm:test_resnet", calibrated, cal_options)
    assert read_checkpoint(calibrated).calibrated and not read_checkpoint(ws["gn"]).calibrated
    runs = {}
    for name, start in (("plain", ws["gn"]), ("calibrated", calibrated)):
        report = gnsurgeon.finetune(start, tmp_path / f"{name}-ft.safetensors", options(ws, steps=1, batch_size=4))
        runs[name] = report.settings
    assert runs["plain"].lr == pytest.approx(0.02 * 4 / 32) and not runs["plain"].calibrated_start
    assert runs["calibrated"].lr == pytest.approx(0.02 * 4 / 32 * 0.2) and runs["calibrated"].calibrated_start
    # the fine-tuned checkpoint keeps the history, so fine-tuning it again is a calibrated start too
    assert read_checkpoint(tmp_path / "calibrated-ft.safetensors").calibrated


def test_unlabeled_folder_needs_a_teacher(ws, tmp_path):
    with pytest.raises(GNSurgeonError, match="no class sub-folders"):
        gnsurgeon.finetune(ws["gn"], tmp_path / "o.safetensors", options(ws, data=str(ws["flat"]), steps=1))


# ------------------------------------------------------------------------------ nothing lost
def test_interrupted_and_resumed_run_ends_with_the_same_weights(ws, tmp_path):
    """Dropout (global RNG), kept BatchNorm (statistics), augmentation (per-sample seeds) all
    replay exactly; the resumed half even loads with a worker process and the first half without."""
    common = {"steps": 7, "batch_size": 4, "checkpoint_every": 2, "seed": 3}
    straight = tmp_path / "straight.safetensors"
    gnsurgeon.finetune(ws["mixed"], straight, options(ws, **common))

    def interrupt(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        gnsurgeon.finetune(ws["mixed"], resumed, options(ws, **common), callback=interrupt)
    assert not resumed.exists()
    assert read_state(tmp_path / "resumed.state.pt")["step"] == 4
    report = gnsurgeon.finetune(ws["mixed"], resumed, options(ws, **common, resume=True, workers=1))
    assert report.resumed_from == 4 and report.steps == 7

    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    assert not torch.equal(a["fc.weight"], load_file(str(ws["mixed"]))["fc.weight"])
    steps = [r["step"] for r in map(json.loads, (tmp_path / "resumed.metrics.jsonl").read_text().splitlines())]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 7]  # eval before, every step once, eval after


def test_resume_refuses_different_options(ws, tmp_path):
    out = tmp_path / "o.safetensors"
    gnsurgeon.finetune(ws["gn"], out, options(ws, val=None, steps=2))
    with pytest.raises(GNSurgeonError, match=r"cannot --resume .* batch_size=8, now 4"):
        gnsurgeon.finetune(ws["gn"], out, options(ws, val=None, steps=2, batch_size=4, resume=True))
    # --resume before any state exists (killed before its first checkpoint, or a restart loop) starts afresh
    report = gnsurgeon.finetune(ws["gn"], tmp_path / "x.safetensors", options(ws, val=None, steps=1, resume=True))
    assert report.resumed_from is None and "no training state at" in report.notes[0]


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(ws, tmp_path, monkeypatch):
    out = tmp_path / "nan.safetensors"
    real, calls = torch.nn.functional.cross_entropy, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at_step_3)
    with pytest.raises(NonFiniteLossError) as info:
        gnsurgeon.finetune(ws["gn"], out, options(ws, val=None, steps=6, checkpoint_every=1))
    message = str(info.value)
    assert "the loss became nan at step 3" in message and "last good training state (step 2)" in message
    assert not out.exists()
    state = read_state(tmp_path / "nan.state.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_cli_nonfinite_loss_exits_1(ws, tmp_path):
    out = tmp_path / "nan.safetensors"
    result = run_cli(
        "finetune", ws["gn"], "--data", ws["train"], "-o", out, "--steps", "4", "--lr", "1e30", "--workers", "0",
        "--log-every", "1", "-q",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "non-finite" in result.output or "loss became" in result.output
    assert "not written" in result.output and not out.exists()


def test_unreadable_images_are_reported_not_fatal(ws, tmp_path):
    data = write_images(tmp_path / "data", 3, 4, seed=5)
    broken = data / "class1" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    out, report_json = tmp_path / "o.safetensors", tmp_path / "r.json"
    result = run_cli(
        "finetune", ws["gn"], "--data", data, "-o", out, "--steps", "2", "--batch-size", "13", "--workers", "1",
        "--json", report_json, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(report_json.read_text())
    assert report["broken_images"] == {"count": 1, "first": [str(broken)]}  # met in both epochs, counted once
    assert report["images_seen"] == 2 * 12
    assert "unreadable images" in result.output and "broken.png" in result.output


# ----------------------------------------------------------------------------------------- CLI
def test_cli_recipe_and_flags(ws, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  steps: 3\n  batch_size: 4\n  optimizer: adamw\n  workers: 0\n  teacher: source\n")
    out, report_json = tmp_path / "o.safetensors", tmp_path / "r.json"
    result = run_cli(
        "finetune", ws["gn"], "--data", ws["train"], "--val", ws["val"], "-o", out, "--recipe", recipe,
        "--batch-size", "2", "--json", report_json,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Fine-tuning" in result.output and "top-1" in result.output
    settings = json.loads(report_json.read_text())["settings"]
    assert (settings["total_steps"], settings["batch_size"], settings["optimizer"]) == (3, 2, "adamw")
    assert settings["lr"] == pytest.approx(4e-4 * 2 / 32) and settings["norm_weight_decay"] == 0.0
    # `teacher: source` is the BN model the checkpoint was converted from, found in its history
    assert settings["teacher_from"] == f"timm:test_resnet + {ws['teacher']}"
    assert read_checkpoint(out).history[-1]["stage"] == "finetune"
    recipe.write_text("finetune:\n  stpes: 3\n")
    assert_bad_input(run_cli("finetune", ws["gn"], "--data", ws["train"], "-o", out, "--recipe", recipe), "'stpes'")


def test_cli_bad_inputs(ws, tmp_path):
    out = tmp_path / "o.safetensors"
    base = ("finetune", ws["gn"], "-o", out)
    data = ("--data", ws["train"])
    assert_bad_input(run_cli(*base), "a training folder is required (--data DIR)")
    assert_bad_input(run_cli("finetune", ws["gn"], *data), "an output file is required")
    assert_bad_input(run_cli(*base, *data, "--steps", "5", "--epochs", "1"), "--steps or --epochs, not both")
    assert_bad_input(run_cli(*base, *data, "--optimizer", "lamb"), "--optimizer must be one of sgd, adamw")
    assert_bad_input(run_cli(*base, "--data", tmp_path / "nope"), f"data folder {tmp_path / 'nope'} does not exist")
    assert_bad_input(run_cli(*base, *data, "--val", tmp_path / "nope"), "--val folder")
    assert_bad_input(run_cli(*base, *data, "--teacher", "timm:test_resnet"), "needs --teacher-weights FILE")
    assert_bad_input(run_cli(*base, *data, "--teacher-weights", ws["teacher"]), "--teacher-weights needs --teacher")
    assert_bad_input(run_cli(*base, *data, "--batch-size", "100"), "has 24 images: fewer than --batch-size 100")
    assert_bad_input(run_cli(*base, *data, "--batch-size", "0"), "--batch-size must be a positive integer")
    assert_bad_input(run_cli("finetune", ws["gn"], *data, "-o", tmp_path / "o.pth"), "must end in .safetensors")
    assert_bad_input(run_cli("finetune", tmp_path / "none.safetensors", *data, "-o", out), "does not exist")
    assert_bad_input(
        run_cli(*base, *data, "--teacher", "timm:resnet18", "--teacher-weights", ws["teacher"]),
        "--teacher timm:resnet18",
        "does not fit the model",
    )
    random_init = tmp_path / "random.safetensors"
    gnsurgeon.convert_source("timm:test_resnet", random_init, ConvertOptions(input_size=(3, 32, 32), num_classes=3))
    assert_bad_input(
        run_cli("finetune", random_init, *data, "-o", out, "--teacher", "source"),
        "--teacher source: checkpoint",
        "randomly initialised timm:test_resnet",
    )
    if not torch.cuda.is_available():
        assert_bad_input(run_cli(*base, *data, "--device", "cuda"), "no CUDA device is available")


# ------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes_gloo_match_one_process_at_twice_the_batch(ws, tmp_path):
    """2 processes x batch 2 x 2 accumulated see, step by step, the same 8 images as 1 process x
    batch 4 x 2 (the DistributedSampler shards one permutation; augmentation is per sample)."""
    single = tmp_path / "single.safetensors"
    gnsurgeon.finetune(ws["gn"], single, options(ws, steps=3, batch_size=4, grad_accum=2, lr=0.05))
    ddp, report_json = tmp_path / "ddp.safetensors", tmp_path / "ddp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "gnsurgeon.cli", "finetune", ws["gn"], "--data", ws["train"], "--val", ws["val"], "-o", ddp,
        "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--lr", "0.05", "--workers", "0", "--log-every", "1",
        "--json", report_json, "-q",
    ]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("Fine-tuning") == 1  # rank 0 prints
    report = json.loads(report_json.read_text())
    assert report["settings"]["world_size"] == 2 and report["settings"]["effective_batch"] == 8
    assert report["after"]["images"] == 12 and report["images_seen"] == 3 * 8  # every image counted once
    a, b = load_file(str(single)), load_file(str(ddp))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-5, worst
    assert not torch.equal(a["fc.weight"], load_file(str(ws["gn"]))["fc.weight"])


# ------------------------------------------------------------------------------------------ GPU
@needs_cuda
def test_cuda_amp_channels_last(ws, tmp_path):
    out = tmp_path / "gpu.safetensors"
    report = gnsurgeon.finetune(ws["mixed"], out, options(ws, steps=4, device="cuda"))
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert report.settings.amp == expected and report.settings.channels_last is True
    assert report.final_loss is not None and np.isfinite(report.final_loss)
    model = load(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@needs_cuda
def test_cuda_compile_and_fp32(ws, tmp_path):
    out = tmp_path / "gpu.safetensors"
    report = gnsurgeon.finetune(ws["gn"], out, options(ws, steps=3, device="cuda", amp=False, compile=True))
    assert report.settings.amp is None and report.settings.compile is True
    assert load(out) is not None
