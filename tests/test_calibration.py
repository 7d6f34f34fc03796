"""Calibration: GN fitted to reproduce the BN original on images, sequentially and deterministically."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from PIL import Image

from gnsurgeon import Selection, apply_plan, load, make_plan
from gnsurgeon.calibration import (
    FINAL_PASS_GROUP_VALUES,
    FINAL_STEPS,
    CalibrationOptions,
    _final_pass,
    _layer_errors,
    _reconstruct_block,
    auto_final_steps,
    calibrate,
    calibration_batches,
    calibration_blocks,
    class_scores,
    smallest_groups,
    untouchable,
)
from gnsurgeon.cli import app
from gnsurgeon.data import BrokenImages
from gnsurgeon.errors import GNSurgeonError
from gnsurgeon.fold import plan_folds
from gnsurgeon.report import calibration_summary
from gnsurgeon.sources import DataConfig

from .helpers import bn_layers

CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)


def _far_from_identity(model):
    """BN statistics far from (0, 1): a plain γ/β copy to GN is then far from the BN function."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in bn_layers(model).values():
            c = m.num_features
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    gen = torch.Generator().manual_seed(0)
    for i in range(40):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
    (root / "broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return _far_from_identity(timm.create_model("test_resnet", num_classes=10))


def _options(images, **kw):
    kw = {"samples": 40, "batch_size": 8, "block_steps": 6, "final_steps": 4, **kw}
    return CalibrationOptions(data=str(images), **kw)


@pytest.mark.parametrize("method", ["layer", "block"])
def test_calibration_moves_gn_towards_bn(teacher, images, method):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    before = copy.deepcopy(teacher.state_dict())
    # Per-layer errors measure the layer and block fits; the end-to-end pass may trade them for the output.
    calibrated, report = calibrate(teacher, student, plan, CONFIG, _options(images, method=method, final_steps=0))
    errors = report.layers
    assert set(errors) == {lp.path for lp in plan}
    mean_before = sum(e["before"] for e in errors.values()) / len(errors)
    mean_after = sum(e["after"] for e in errors.values()) / len(errors)
    assert mean_after < 0.5 * mean_before, (mean_before, mean_after)
    assert report.after["logits_cosine"] > report.before["logits_cosine"]
    # Block tuning never leaves a block worse than its closed-form fit (it is undone otherwise).
    assert all(b["loss_last"] <= b["loss_first"] for b in report.blocks if b["steps"])
    assert bool(report.blocks) == (method == "block")
    assert report.broken_images["count"] == 1 and report.broken_images["first"][0].endswith("broken.png")
    # Neither input model changed.
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(calibrated.layer1[0].bn1.weight, student.layer1[0].bn1.weight)


def test_block_reconstruction_lowers_the_block_error(teacher, images):
    """From a plain γ/β copy there is room to improve: tuning the block must take it."""
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan).eval()
    options = _options(images, block_steps=30)
    fit_data, _, _, _ = calibration_batches(options, CONFIG, BrokenImages())
    result = _reconstruct_block(student, teacher, "layer2", fit_data, options, protected=set())
    assert result["steps"] == 30 and "note" not in result
    assert result["loss_last"] < 0.8 * result["loss_first"], result


def test_end_to_end_pass_lowers_the_logits_divergence(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan).eval()
    options = _options(images, final_steps=16)
    fit_data, _, _, _ = calibration_batches(options, CONFIG, BrokenImages())
    result = _final_pass(student, teacher, fit_data, options, protected=set())
    assert result["steps"] == 16 and "note" not in result
    assert result["loss_last"] < 0.8 * result["loss_first"], result


def test_progress_ticks_once_per_fit_and_step(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    ticks = []
    options = _options(images)
    calibrate(teacher, student, plan, CONFIG, options, progress=lambda done, total: ticks.append((done, total)))
    paths = [lp.path for lp in plan.with_action("gn")]
    blocks = calibration_blocks(student, paths, options.max_block_layers)
    tuned_blocks = [b for b, members in blocks if b not in members]
    total = len(paths) + options.block_steps * len(tuned_blocks) + options.final_steps
    assert ticks == [(done, total) for done in range(1, total + 1)]


def test_a_pass_that_makes_the_model_worse_is_undone(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    reference, _ = calibrate(teacher, student, plan, CONFIG, _options(images, final_steps=0))
    wrecked, report = calibrate(teacher, student, plan, CONFIG, _options(images, final_steps=3, final_lr=10.0))
    assert report.blocks[-1]["note"].startswith("reverted")
    pairs = zip(reference.state_dict().values(), wrecked.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_a_pass_that_cannot_win_stops_early_and_the_same_model_comes_out(teacher, images):
    """final_abort: a pass whose held-out divergence has not fallen half-way through is stopped and
    undone there (the end check would undo it too), and the progress bar still completes."""
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    reference, _ = calibrate(teacher, student, plan, CONFIG, _options(images, final_steps=0))
    ticks = []
    wrecked, report = calibrate(
        teacher,
        student,
        plan,
        CONFIG,
        _options(images, final_steps=30, final_lr=10.0),
        progress=lambda done, total: ticks.append((done, total)),
    )
    final = report.blocks[-1]
    assert final["steps"] == final["stopped_at"] == 15 and final["kept_step"] == 0, final
    assert final["note"].startswith("reverted; stopped after 15 of 30 steps"), final["note"]
    assert "undone: no gain (stopped after 15 steps)" in calibration_summary(report.to_dict())
    pairs = zip(reference.state_dict().values(), wrecked.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert ticks[-1][0] == ticks[-1][1]


def test_the_abort_check_never_changes_a_pass_that_goes_on(teacher, images):
    """Scoring once more at the abort point leaves the kept parameters bit-identical to a run without it."""
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan).eval()
    results = []
    for abort in (0.0, 0.25):
        options = _options(images, final_steps=12, final_abort=abort)
        fit_data, _, _, _ = calibration_batches(options, CONFIG, BrokenImages())
        tuned = copy.deepcopy(student)
        result = _final_pass(tuned, teacher, fit_data, options, protected=set())
        assert result["steps"] == 12 and "note" not in result and "stopped_at" not in result, result
        results.append(tuned.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(*(r.values() for r in results), strict=True))
    with pytest.raises(GNSurgeonError, match="final_abort"):
        CalibrationOptions(data=str(images), final_abort=1.0).check()


def test_same_seed_same_parameters(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    a, _ = calibrate(teacher, student, plan, CONFIG, _options(images))
    b, _ = calibrate(teacher, student, plan, CONFIG, _options(images))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_only_gn_layers_are_calibrated_in_a_freeze_fold_plan(teacher, images):
    x = torch.randn(1, 3, 32, 32)
    plan = plan_folds(teacher, make_plan(teacher, selection=Selection(freeze=("conv1.*", "bn1"))), x)
    student = apply_plan(teacher, plan)
    calibrated, report = calibrate(teacher, student, plan, CONFIG, _options(images))
    assert set(report.layers) == {lp.path for lp in plan.with_action("gn")}
    folded_into = [lp.producer for lp in plan.with_action("folded")]
    assert folded_into
    for path in folded_into:
        assert torch.equal(calibrated.get_submodule(path).weight, student.get_submodule(path).weight)


def test_kept_bn_and_folded_convs_are_never_tuned(teacher, images):
    x = torch.randn(1, 3, 32, 32)
    selection = Selection(freeze=("conv1.*",), skip=("layer4.0.bn1",))
    plan = plan_folds(teacher, make_plan(teacher, selection=selection), x)
    protected = untouchable(plan)
    assert "layer4.0.bn1" in protected and {lp.producer for lp in plan.with_action("folded")} <= protected
    # From a plain γ/β copy the end-to-end pass has room, so it really changes the model ...
    student = apply_plan(teacher, plan).eval()
    before = copy.deepcopy(student.state_dict())
    options = _options(images, final_steps=8)
    fit_data, _, _, _ = calibration_batches(options, CONFIG, BrokenImages())
    result = _final_pass(student, teacher, fit_data, options, protected)
    assert "note" not in result
    assert not torch.equal(student.layer1[0].bn1.weight, before["layer1.0.bn1.weight"])
    # ... except what it must not touch.
    for path in protected:
        for name, tensor in student.get_submodule(path).state_dict().items():
            assert torch.equal(tensor, before[f"{path}.{name}"]), f"{path}.{name}"


def test_blocks_group_a_few_layers_under_their_smallest_ancestor(teacher):
    paths = [lp.path for lp in make_plan(teacher)]
    blocks = dict(calibration_blocks(teacher, paths, max_layers=3))
    assert blocks["layer2"] == ["layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.2"]  # one block per stage here
    assert blocks["conv1"] == ["conv1.1", "conv1.4"]  # the deep stem is a Sequential holding two
    assert blocks["layer3.0.bn1"] == ["layer3.0.bn1"]  # a bottleneck with 4 GN is over the limit of 3
    assert blocks["bn1"] == ["bn1"]


def test_cli_convert_with_calibration(images, tmp_path):
    from typer.testing import CliRunner

    out, report = tmp_path / "m.safetensors", tmp_path / "r.json"
    result = CliRunner().invoke(
        app,
        [
            "convert",
            "timm:test_resnet",
            "--num-classes",
            "10",
            "--input-size",
            "3,32,32",
            "--calibrate",
            str(images),
            "--calib-samples",
            "24",
            "--calib-steps",
            "3",
            "--calib-final-steps",
            "2",
            "-o",
            str(out),
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    cal = json.loads(report.read_text())["calibration"]
    assert cal["samples"] + cal["holdout"] == 24 and cal["method"] == "block"
    assert cal["blocks"][-1]["block"] == "(end to end)" and cal["blocks"][-1]["steps"] == 2
    assert "Calibration (block)" in result.output
    assert load(out) is not None
    result = CliRunner().invoke(
        app,
        ["convert", "timm:test_resnet", "--calibrate", str(tmp_path / "none"), "-o", str(tmp_path / "x.safetensors")],
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    # A checkpoint that is already all GN has nothing left to calibrate against: say so, write nothing.
    again = tmp_path / "again.safetensors"
    result = CliRunner().invoke(app, ["convert", str(out), "--calibrate", str(images), "-o", str(again)])
    assert result.exit_code == 2 and "converts no layer" in result.output and not again.exists()


def test_calibration_device_is_checked_before_any_work(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    with pytest.raises(GNSurgeonError, match="'tpu9' is not a torch device"):
        calibrate(teacher, student, plan, CONFIG, _options(images, device="tpu9"))
    if not torch.cuda.is_available():
        with pytest.raises(GNSurgeonError, match="no CUDA device is available"):
            calibrate(teacher, student, plan, CONFIG, _options(images, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_calibration_on_cuda_matches_the_original_like_on_cpu(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    on_cpu, cpu_report = calibrate(teacher, student, plan, CONFIG, _options(images, device="cpu"))
    on_gpu, gpu_report = calibrate(teacher, student, plan, CONFIG, _options(images, device="cuda"))
    assert next(on_gpu.parameters()).device.type == "cpu"  # returned on the CPU like the input
    assert gpu_report.after["logits_cosine"] > gpu_report.before["logits_cosine"]
    assert abs(gpu_report.after["logits_cosine"] - cpu_report.after["logits_cosine"]) < 0.01


class _TinySegmenter(torch.nn.Module):
    """torchvision segmentation's shape: a dict whose "out" holds (N, classes, H, W) logits."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(), torch.nn.Conv2d(32, 5, 1)
        )

    def forward(self, x):
        return {"out": self.body(x)}


def test_class_scores_rows_per_image_or_pixel():
    assert class_scores(torch.zeros(4, 10)).shape == (4, 10)
    dense = torch.arange(2 * 5 * 3 * 3, dtype=torch.float32).view(2, 5, 3, 3)
    rows = class_scores({"out": dense})
    assert rows.shape == (18, 5) and torch.equal(rows[4], dense[0, :, 1, 1])
    assert class_scores([{"boxes": torch.zeros(0, 4)}]) is None  # a detector's output
    assert class_scores(torch.zeros(4, dtype=torch.long)) is None


def test_segmentation_models_get_the_end_to_end_pass_per_pixel(images):
    torch.manual_seed(0)
    teacher = _far_from_identity(_TinySegmenter())
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    _, report = calibrate(teacher, student, plan, CONFIG, _options(images, final_steps=3))
    assert report.blocks[-1]["block"] == "(end to end)" and report.blocks[-1]["steps"] == 3
    assert report.after["logits_cosine"] > report.before["logits_cosine"]  # per-pixel agreement metrics


def test_block_method_without_tuning_steps_is_the_layer_fit(teacher, images):
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    layer, _ = calibrate(teacher, student, plan, CONFIG, _options(images, method="layer"))
    block, report = calibrate(teacher, student, plan, CONFIG, _options(images, block_steps=0, final_steps=0))
    assert report.blocks == []
    pairs = zip(layer.state_dict().values(), block.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_sampled_layer_errors_track_the_exact_ones(teacher, images):
    """The report compares layers at evenly spaced positions; that must estimate the full comparison."""
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan).eval()
    fit_data, _, _, _ = calibration_batches(_options(images), CONFIG, BrokenImages())
    paths = [lp.path for lp in plan]
    exact = _layer_errors(student, teacher, paths, fit_data, sample=10**9)
    sampled = _layer_errors(student, teacher, paths, fit_data, sample=256)
    for p in paths:
        assert sampled[p] == pytest.approx(exact[p], rel=0.15), p
    assert max(exact.values()) > 0.05  # the copy really is off, so the comparison means something


def test_auto_end_to_end_pass_runs_only_where_gn_groups_hold_few_values(teacher, images):
    """Not given, the end-to-end pass runs where some GN group holds fewer than 512 values per image
    (test_resnet at 32x32: its last maps are 1x1) and is off where every group is large (one 32-channel
    layer at 32x32: 2 channels x 1024 positions), the report saying which and why; a count given runs."""
    plan = make_plan(teacher)
    path, values = smallest_groups(apply_plan(teacher, plan), [lp.path for lp in plan], torch.zeros(2, 3, 32, 32))
    assert values < FINAL_PASS_GROUP_VALUES and auto_final_steps(path, values)[0] == FINAL_STEPS
    torch.manual_seed(0)
    seg = _far_from_identity(_TinySegmenter())
    seg_plan = make_plan(seg)
    auto = _options(images, final_steps=None)
    _, report = calibrate(seg, apply_plan(seg, seg_plan), seg_plan, CONFIG, auto)
    assert report.settings["final_steps"] == 0 and all(b["block"] != "(end to end)" for b in report.blocks)
    why = report.settings["auto"]["final_steps"]
    assert why.startswith("off: every GN group holds 512 values or more (the fewest: 2048, body.1)")
    assert set(report.settings["auto"]) == {"final_steps"} and report.settings["batch_size"] == 8
    assert "end-to-end pass off (auto): every GN group" in calibration_summary(report.to_dict())
    _, forced = calibrate(seg, apply_plan(seg, seg_plan), seg_plan, CONFIG, _options(images, final_steps=3))
    assert forced.blocks[-1]["block"] == "(end to end)" and forced.blocks[-1]["steps"] == 3
    assert forced.settings["auto"] == {} and forced.settings["final_steps"] == 3
