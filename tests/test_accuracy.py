"""Issue #17: where GN cannot reproduce BN (measured), the automatic BN* plan under a budget."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from torch import nn

import gnsurgeon
from gnsurgeon import ConvertOptions
from gnsurgeon.calibration import CalibrationOptions, gn_fit_errors, measure_gn_fit
from gnsurgeon.checkpoint import read_checkpoint
from gnsurgeon.conversion import FROZEN_FLOOR
from gnsurgeon.errors import GNSurgeonError
from gnsurgeon.plan import Action, freeze_where_gn_fails, frozen_budget
from gnsurgeon.sources import DataConfig

from .helpers import randomize_bn

CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)


def _stem() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    return randomize_bn(model).eval()


def _batches(contrasts: list[float]):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 16, 16, generator=gen) * c for c in contrasts]
    return lambda: iter(xs)


def test_gn_fit_errors_measure_what_gn_divides_out():
    """A stem BN on images of one contrast is reproduced by GN (+ per-channel affine) almost exactly;
    on images whose contrast varies, BN passes the contrast on and GN divides it out: most of the
    output variance cannot be reproduced, and the measure says so."""
    model = _stem()
    plan = gnsurgeon.make_plan(model, gnsurgeon.GroupPolicy(groups=4))
    same = gn_fit_errors(model, plan, _batches([1.0] * 6))
    varied = gn_fit_errors(model, plan, _batches([0.2, 0.5, 1.0, 2.0, 4.0, 8.0]))
    assert set(same) == set(varied) == {"1"}
    assert same["1"] < 0.05, same
    assert varied["1"] > 0.5, varied


def test_frozen_budget_counts_or_shares():
    assert frozen_budget("10%", 20) == 2
    assert frozen_budget("10%", 9) == 0  # rounded down: a share never exceeds itself
    assert frozen_budget(3, 20) == 3 and frozen_budget("3", 2) == 2 and frozen_budget(0, 20) == 0
    for bad in ("-1", "ten", "120%", "-5%"):
        with pytest.raises(GNSurgeonError, match="--max-frozen"):
            frozen_budget(bad, 20)


def test_the_earliest_failing_layers_within_budget_become_bn_star_with_their_reason():
    model = timm.create_model("test_resnet", num_classes=10)
    plan = gnsurgeon.make_plan(model)
    paths = [lp.path for lp in plan.with_action(Action.GN)]
    errors = dict.fromkeys(paths, 0.01) | {paths[1]: 0.3, paths[3]: 0.6, paths[4]: 0.05, paths[6]: 0.9}
    two = freeze_where_gn_fails(plan, errors, budget=2, floor=0.1)
    frozen = {lp.path: lp for lp in two.with_action(Action.FROZEN)}
    # The default rank keeps the earliest layers above the floor, not the worst: paths[6] fits worst.
    assert set(frozen) == {paths[1], paths[3]}
    assert "40%" in frozen[paths[3]].note and "1 - R² = 0.60" in frozen[paths[3]].note
    assert "earliest" in frozen[paths[3]].note and frozen[paths[3]].groups is None
    worst = freeze_where_gn_fails(plan, errors, budget=2, floor=0.1, rank="fit")
    assert {lp.path for lp in worst.with_action(Action.FROZEN)} == {paths[3], paths[6]}
    # "Earliest" is the order of the measurement (the forward's), not the order of the plan.
    backwards = dict(reversed(errors.items()))
    late = freeze_where_gn_fails(plan, backwards, budget=2, floor=0.1)
    assert {lp.path for lp in late.with_action(Action.FROZEN)} == {paths[6], paths[3]}
    # The floor keeps layers that GN reproduces well as GN, whatever the budget.
    everything = freeze_where_gn_fails(plan, errors, 10, 0.1).with_action(Action.FROZEN)
    assert {lp.path for lp in everything} == {paths[1], paths[3], paths[6]}
    assert not freeze_where_gn_fails(plan, errors, 0, 0.1).with_action(Action.FROZEN)
    assert len(plan.with_action(Action.GN)) == len(paths)  # the input plan is unchanged
    with pytest.raises(ValueError, match="rank"):
        freeze_where_gn_fails(plan, errors, 2, 0.1, rank="random")


class Registered:
    """Two BN layers registered in the opposite order to the one the forward pass runs them in."""

    @staticmethod
    def model() -> nn.Module:
        class Backwards(nn.Module):
            def __init__(self):
                super().__init__()
                self.late = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
                self.early = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))

            def forward(self, x):
                return self.late(torch.relu(self.early(x)))

        return randomize_bn(Backwards()).eval()


def test_gn_fit_errors_come_in_forward_order_not_registration_order():
    model = Registered.model()
    plan = gnsurgeon.make_plan(model, gnsurgeon.GroupPolicy(groups=2))
    assert [lp.path for lp in plan.with_action(Action.GN)] == ["late.1", "early.1"]
    errors = gn_fit_errors(model, plan, lambda: [torch.randn(4, 3, 8, 8)])
    assert list(errors) == ["early.1", "late.1"]


def earliest_failing(errors: dict[str, float], budget: int) -> set[str]:
    """The default BN* rule, written out: the first ``budget`` layers, in the order the forward
    reaches them (``gn_fit_errors``' order), whose 1 - R² is above FROZEN_FLOOR."""
    return set([p for p, e in errors.items() if e > FROZEN_FLOOR][:budget])


@pytest.fixture(scope="module")
def contrast_images(tmp_path_factory):
    """Images whose contrast varies a lot from one to the next (as photos' does)."""
    root = tmp_path_factory.mktemp("contrast")
    gen = torch.Generator().manual_seed(0)
    for i in range(24):
        spread = 8 + 120 * (i % 6) / 5
        pixels = (128 + spread * (torch.rand(32, 32, 3, generator=gen) * 2 - 1)).clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.numpy()).save(root / f"img{i:02d}.png")
    return root


def test_convert_with_max_frozen_keeps_bn_star_where_measured(contrast_images, tmp_path):
    model = randomize_bn(timm.create_model("test_resnet", num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    options = ConvertOptions(
        weights=str(tmp_path / "w.pth"),
        num_classes=10,
        input_size=(3, 32, 32),
        calibrate=str(contrast_images),
        calib_samples=24,
        calib_steps=2,
        calib_final_steps=0,
        max_frozen=2,
    )
    report = gnsurgeon.convert_source("timm:test_resnet", tmp_path / "m.safetensors", options)
    frozen = report.plan.with_action(Action.FROZEN)
    assert len(frozen) == 2 and all("kept as BN*" in lp.note for lp in frozen)
    errors = measure_gn_fit(model, gnsurgeon.make_plan(model), report.data_config, options.calibration())
    assert {lp.path for lp in frozen} == earliest_failing(errors, 2)
    assert gnsurgeon.load(tmp_path / "m.safetensors") is not None
    with pytest.raises(GNSurgeonError, match="--max-frozen needs --calibrate"):
        gnsurgeon.convert_source("timm:test_resnet", tmp_path / "n.safetensors", ConvertOptions(max_frozen="10%"))


def test_calibrating_keeps_the_default_bn_star_budget_and_says_so(contrast_images, tmp_path):
    """The default measured BN* plan (CALIBRATED_MAX_FROZEN, README "Benchmarks": 0.85 -> 0.981 of
    the teacher on regions ResNet-18): on with --calibrate, the earliest of the GN layers that GN
    fails, up to the budget, reported as a default; off with --max-frozen 0 and with --like (the
    target has GN everywhere)."""
    from gnsurgeon.conversion import CALIBRATED_MAX_FROZEN

    model = randomize_bn(timm.create_model("test_resnet", num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    common = dict(weights=str(tmp_path / "w.pth"), num_classes=10, input_size=(3, 32, 32))
    calib = dict(calibrate=str(contrast_images), calib_samples=24, calib_steps=1, calib_final_steps=0)
    report = gnsurgeon.convert_source("timm:test_resnet", None, ConvertOptions(**common, **calib), dry_run=True)
    layers = len(gnsurgeon.make_plan(model).with_action(Action.GN))
    budget = frozen_budget(CALIBRATED_MAX_FROZEN, layers)
    options = ConvertOptions(**calib).calibration()
    errors = measure_gn_fit(model, gnsurgeon.make_plan(model), report.data_config, options)
    earliest = earliest_failing(errors, budget)
    assert budget >= 1 and earliest, (budget, errors)
    assert {lp.path for lp in report.plan.with_action(Action.FROZEN)} == earliest
    assert report.max_frozen["budget"] == CALIBRATED_MAX_FROZEN and report.max_frozen["default"]
    assert set(report.max_frozen["kept"]) == earliest
    off_options = ConvertOptions(**common, **calib, max_frozen=0)
    off = gnsurgeon.convert_source("timm:test_resnet", None, off_options, dry_run=True)
    assert not off.plan.with_action(Action.FROZEN) and off.max_frozen is None
    plain = gnsurgeon.convert_source("timm:test_resnet", None, ConvertOptions(**common), dry_run=True)
    assert not plain.plan.with_action(Action.FROZEN) and plain.max_frozen is None
    assert ConvertOptions(**calib, like="timm:resnet50_gn").frozen_spec() == 0
    assert ConvertOptions(**calib, like="timm:resnet50_gn", max_frozen=2).frozen_spec() == 2


def test_frozen_rank_fit_keeps_the_worst_and_a_bad_rank_is_refused_before_any_work(contrast_images, tmp_path):
    model = randomize_bn(timm.create_model("test_resnet", num_classes=10)).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    common = dict(weights=str(tmp_path / "w.pth"), num_classes=10, input_size=(3, 32, 32))
    calib = dict(calibrate=str(contrast_images), calib_samples=24, calib_steps=1, calib_final_steps=0)
    report = gnsurgeon.convert_source(
        "timm:test_resnet", None, ConvertOptions(**common, **calib, max_frozen=2, frozen_rank="fit"), dry_run=True
    )
    plan = gnsurgeon.make_plan(model)
    errors = measure_gn_fit(model, plan, report.data_config, ConvertOptions(**calib).calibration())
    worst = set(sorted(errors, key=errors.get)[-2:])
    assert min(errors[p] for p in worst) > FROZEN_FLOOR and worst != earliest_failing(errors, 2)
    assert {lp.path for lp in report.plan.with_action(Action.FROZEN)} == worst
    assert report.max_frozen["rank"] == "fit"
    assert all("worst fits" in lp.note for lp in report.plan.with_action(Action.FROZEN))
    with pytest.raises(GNSurgeonError, match="--frozen-rank 'last' is not one of position, fit"):
        gnsurgeon.convert_source("timm:nonexistent_model", None, ConvertOptions(frozen_rank="last"), dry_run=True)
    plain_options = ConvertOptions(**common, frozen_rank="fit")
    plain = gnsurgeon.convert_source("timm:test_resnet", None, plain_options, dry_run=True)
    assert any("--frozen-rank fit changes nothing" in w for w in plain.warnings), plain.warnings


def test_measure_gn_fit_leaves_the_teacher_as_it_was(contrast_images):
    model = randomize_bn(timm.create_model("test_resnet", num_classes=10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = CalibrationOptions(data=str(contrast_images), samples=8, batch_size=4)
    errors = measure_gn_fit(model, gnsurgeon.make_plan(model), CONFIG, options)
    assert errors and all(0 <= e <= 1 for e in errors.values())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_copies_are_jittered_and_the_same_on_every_pass():
    """Every pass (layer fit, block tuning, the cache's re-syncs) must see the same copies, or the
    student's and the original's cached inputs would not line up."""
    from gnsurgeon.calibration import _with_copies

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(3)]
    stream = _with_copies(lambda: iter(batches), CalibrationOptions(copies=2, photometric=0.3))
    first, second = list(stream()), list(stream())
    assert len(first) == 9
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(first[0], batches[0]) and torch.equal(first[3], batches[1])
    for copy in (first[1], first[2]):
        assert copy.shape == batches[0].shape and not torch.allclose(copy, batches[0], atol=1e-3)
    assert not torch.allclose(first[1], first[2])
    off = _with_copies(lambda: iter(batches), CalibrationOptions(copies=0))
    assert len(list(off())) == 3


def test_cli_max_frozen_reaches_the_plan_and_needs_calibrate(contrast_images, tmp_path):
    """The flag is a real option of `convert`: it changes the saved plan, and without --calibrate it is
    refused in one sentence (exit 2) before anything is written."""
    from typer.testing import CliRunner

    from gnsurgeon.cli import app

    base = ["convert", "timm:test_resnet", "--num-classes", "10", "--input-size", "3,32,32"]
    refused = CliRunner().invoke(app, [*base, "--max-frozen", "1", "-o", str(tmp_path / "a.safetensors")])
    assert refused.exit_code == 2 and "--max-frozen needs --calibrate" in refused.output
    assert not (tmp_path / "a.safetensors").exists()
    args = [*base, "--max-frozen", "1", "--calibrate", str(contrast_images), "--calib-samples", "16"]
    args += ["--calib-steps", "1", "--calib-final-steps", "0", "-o", str(tmp_path / "b.safetensors")]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "1 layer(s), budget 1 (--max-frozen)" in " ".join(done.output.split()), done.output
    frozen = read_checkpoint(tmp_path / "b.safetensors").plan.with_action(Action.FROZEN)
    assert len(frozen) == 1 and "kept as BN*" in frozen[0].note
