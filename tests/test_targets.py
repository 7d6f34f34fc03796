"""Checkpoints that load where users go next: each test loads the result into the real library's class
(timm, torchvision, OpenMMLab, opacus) and compares outputs, because G is not in a state dict and a
strict load proves nothing about it (the efficientnet_b0_gn trap below)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from gnsurgeon import load, read_checkpoint
from gnsurgeon.cli import app
from gnsurgeon.conversion import ConvertOptions, convert_source
from gnsurgeon.options import resolve
from gnsurgeon.recipes import Recipe
from gnsurgeon.targets import unit_variance

from .helpers import randomize_bn

SMALL = ["--input-size", "3,64,64"]
RECIPES = Path(__file__).parent.parent / "recipes"


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(result) -> None:
    assert result.exit_code == 0, result.output


def bad_input(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text
    return text


def weights_file(model: nn.Module, path: Path) -> Path:
    """The test's own "trained" weights: random init plus BN statistics far from (0, 1)."""
    torch.save(randomize_bn(model).state_dict(), path)
    return path


def features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """layer1..layer4 outputs of a ResNet-shaped model (what a detection backbone / OpenMMLab returns)."""
    seen = []
    hooks = [getattr(model, f"layer{i}").register_forward_hook(lambda m, a, o: seen.append(o)) for i in range(1, 5)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- timm
def test_like_resnet50_gn_loads_strictly_and_matches_bit_for_bit(tmp_path):
    """resnet50 -> --like timm:resnet50_gn -> export-weights --to timm -> the exact timm call users make."""
    weights = weights_file(timm.create_model("resnet50"), tmp_path / "r50.pth")
    ckpt, out = tmp_path / "r50-gn.safetensors", tmp_path / "r50_gn.safetensors"
    result = run("convert", "timm:resnet50", "--weights", weights, *SMALL, "--like", "timm:resnet50_gn", "-o", ckpt)
    ok(result)
    assert "timm:resnet50_gn: G and eps of 53 layer(s) from it, strict load ok, outputs bit-identical" in " ".join(
        result.output.split()
    )
    info = read_checkpoint(ckpt)
    assert {lp.rule for lp in info.plan} == {"like=timm:resnet50_gn"} and {lp.groups for lp in info.plan} == {32}
    assert info.history[-1]["options"]["policy"] == {"like": "timm:resnet50_gn"}
    ours = load(ckpt)

    ok(run("export-weights", ckpt, "--to", "timm", "-o", out))
    # timm loads pretrained_cfg_overlay files with load_state_dict(strict=True) when the class count
    # matches, so this exact call is the strict load.
    theirs = timm.create_model("resnet50_gn", pretrained=True, pretrained_cfg_overlay=dict(file=str(out))).eval()
    with torch.no_grad():
        assert torch.equal(ours(X), theirs(X))


def test_like_efficientnet_b0_gn_takes_c_over_8_and_keeps_the_class_count(tmp_path):
    weights = weights_file(timm.create_model("efficientnet_b0", num_classes=10), tmp_path / "e.pth")
    ckpt, out = tmp_path / "e-gn.safetensors", tmp_path / "e_gn.pth"
    args = ["timm:efficientnet_b0", "--weights", weights, "--num-classes", "10", *SMALL]
    ok(run("convert", *args, "--like", "timm:efficientnet_b0_gn", "-o", ckpt))
    plan = read_checkpoint(ckpt).plan
    assert len(plan) == 49 and all(lp.groups == lp.channels // 8 for lp in plan)
    ours = load(ckpt)

    result = run("export-weights", ckpt, "--to", "timm", "-o", out)  # target read from the checkpoint's history
    ok(result)
    assert "num_classes=10" in result.output  # else timm would drop the classifier (1000 classes by default)
    overlay = dict(file=str(out), num_classes=10)
    theirs = timm.create_model("efficientnet_b0_gn", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    with torch.no_grad():
        assert torch.equal(ours(X), theirs(X))


def test_plain_g32_efficientnet_is_refused_for_efficientnet_b0_gn(tmp_path):
    """The trap: a G <= 32 conversion loads into efficientnet_b0_gn strictly and computes something else."""
    ckpt, out = tmp_path / "e32.safetensors", tmp_path / "e_gn.safetensors"
    ok(run("convert", "timm:efficientnet_b0", *SMALL, "-o", ckpt))
    bad_input(
        run("export-weights", ckpt, "--to", "timm", "-o", out),
        "layer bn1: the checkpoint has G=16 (32 channels), timm:efficientnet_b0_gn uses G=4",
        "G is not in a state dict",
        "--like timm:efficientnet_b0_gn",
    )
    assert not out.exists()
    ours, theirs = load(ckpt), timm.create_model("efficientnet_b0_gn").eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # loads without a word...
    with torch.no_grad():
        assert (ours(X) - theirs(X)).abs().max() > 0.05  # ...and computes something else


def test_like_refuses_targets_that_differ_beyond_norm_layers(tmp_path):
    out = tmp_path / "m.safetensors"
    bad_input(
        run("convert", "timm:resnet26", *SMALL, "--like", "timm:resnet50_gn", "-o", out),
        "--like timm:resnet50_gn: the target differs in more than its norm layers, first at layer layer1.2.conv1",
    )
    bad_input(
        run("convert", "timm:resnet18", *SMALL, "--like", "torchvision:resnet18", "--dry-run"),
        "--like torchvision:resnet18: layer bn1 is a BatchNorm2d there, not a GroupNorm",
    )
    bad_input(
        run("convert", "timm:resnet50", "--like", "timm:resnet50_gn", "--groups", "16", "--dry-run"),
        "--like timm:resnet50_gn takes each layer's G from the target, so it cannot be combined with --groups",
    )
    assert not out.exists()


def test_like_a_checkpoint_takes_its_eps_and_names_the_first_layer_that_computes_otherwise(tmp_path):
    """A gnsurgeon checkpoint is a target too. Its eps (1e-3 here, not the source BN's 1e-5) is taken and
    replayed by load; a target that matches in every tensor but computes otherwise (SiLU for ReLU: no
    parameters) is caught by the output comparison, exit 1, naming the first norm layer it reaches."""
    import gnsurgeon

    model = timm.create_model("resnet18")
    plan = gnsurgeon.make_plan(model)
    for lp in plan:
        lp.eps = 1e-3
    target = tmp_path / "eps.safetensors"
    gnsurgeon.save(target, gnsurgeon.apply_plan(model, plan), plan, source=gnsurgeon.SourceSpec("timm", "resnet18"))
    out = tmp_path / "like.safetensors"
    result = run("convert", "timm:resnet18", *SMALL, "--like", target, "-o", out, "--json", tmp_path / "r.json")
    ok(result)
    like = json.loads((tmp_path / "r.json").read_text())["like"]
    assert like["bit_identical"] and len(like["eps_from_target"]) == 20
    assert {m.eps for m in load(out).modules() if isinstance(m, nn.GroupNorm)} == {1e-3}

    silu = tmp_path / "silu.safetensors"
    ok(run("convert", "timm:resnet18", *SMALL, "--model-kwargs", "act_layer='silu'", "-o", silu))
    result = run("convert", "timm:resnet18", *SMALL, "--like", silu, "-o", tmp_path / "no.safetensors")
    assert result.exit_code == 1, result.output
    assert "loads into the target but computes something else" in result.output
    assert "first at layer1.0.bn1" in " ".join(result.output.split())
    assert not (tmp_path / "no.safetensors").exists()


# ------------------------------------------------------------------------------------ torchvision
def _gn_resnet50(tmp_path) -> Path:
    weights = weights_file(torchvision.models.resnet50(), tmp_path / "tv.pth")
    ckpt = tmp_path / "tv-gn.safetensors"
    ok(run("convert", "torchvision:resnet50", "--weights", weights, *SMALL, "-o", ckpt))
    return ckpt


def test_torchvision_gn_resnet_and_detection_backbone_load_and_match(tmp_path):
    ckpt = _gn_resnet50(tmp_path)
    ours = load(ckpt)
    ok(run("export-weights", ckpt, "--to", "torchvision", "-o", tmp_path / "cls.pth"))
    theirs = torchvision.models.resnet50(norm_layer=lambda c: nn.GroupNorm(32, c)).eval()
    theirs.load_state_dict(torch.load(tmp_path / "cls.pth", weights_only=True))  # strict
    with torch.no_grad():
        assert torch.equal(ours(X), theirs(X))

    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    result = run("export-weights", ckpt, "--to", "torchvision-detection", "-o", tmp_path / "det.pth")
    ok(result)
    state = torch.load(tmp_path / "det.pth", weights_only=True)
    assert all(k.startswith("backbone.body.") for k in state) and "backbone.body.layer1.0.bn1.weight" in state
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=lambda c: nn.GroupNorm(32, c), trainable_layers=5
    )
    detector = FasterRCNN(backbone, num_classes=91).eval()
    loaded = detector.load_state_dict(state, strict=False)
    assert loaded.unexpected_keys == [] and not [k for k in loaded.missing_keys if k.startswith("backbone.body.")]
    with torch.no_grad():
        body = list(detector.backbone.body(X).values())
    assert all(torch.equal(a, b) for a, b in zip(features(ours, X), body, strict=True))


def test_bn_star_goes_out_as_frozen_batch_norm_exactly(tmp_path):
    """BN* (a, b) written as FrozenBatchNorm2d buffers: weight a, bias b, mean 0, var 1 - eps."""
    weights = weights_file(torchvision.models.resnet18(), tmp_path / "r18.pth")
    ckpt, out = tmp_path / "bnstar.safetensors", tmp_path / "det.pth"
    ok(run("convert", "torchvision:resnet18", "--weights", weights, "--freeze", "*", *SMALL, "-o", ckpt))
    ok(run("export-weights", ckpt, "--to", "torchvision-detection", "-o", out))
    state = torch.load(out, weights_only=True)
    ours = load(ckpt)
    assert torch.equal(state["backbone.body.bn1.weight"], ours.bn1.scale)
    assert torch.equal(state["backbone.body.bn1.running_mean"], torch.zeros(64))
    assert torch.equal(state["backbone.body.bn1.running_var"] + 1e-5, torch.ones(64))

    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5
    ).eval()
    backbone.body.load_state_dict({k.removeprefix("backbone.body."): v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        body = list(backbone.body(X).values())
    assert all(torch.equal(a, b) for a, b in zip(features(ours, X), body, strict=True))


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0, 0.1])
def test_unit_variance_is_exact(eps):
    v = unit_variance(eps)
    assert torch.equal(torch.rsqrt(v + eps), torch.ones(()))


# -------------------------------------------------------------------------------------- OpenMMLab
def test_openmmlab_resnet_takes_gn_names_and_one_g(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbones = pytest.importorskip("mmpretrain.models.backbones", reason="mmpretrain not importable")
    weights = weights_file(torchvision.models.resnet18(), tmp_path / "r18.pth")
    ckpt, out = tmp_path / "r18-gn.safetensors", tmp_path / "mm.pth"
    ok(run("convert", "torchvision:resnet18", "--weights", weights, *SMALL, "-o", ckpt))
    result = run("export-weights", ckpt, "--to", "openmmlab", "-o", out)
    ok(result)
    state = torch.load(out, weights_only=True)
    assert "gn1.weight" in state and "layer1.0.gn2.bias" in state and "layer2.0.downsample.1.weight" in state
    assert not any(".bn" in k or k.startswith(("bn", "fc.")) for k in state)
    # What an OpenMMLab config does: norm_cfg + a Pretrained init_cfg, then init_weights().
    config = dict(type="Pretrained", checkpoint=str(out))
    norm_cfg = dict(type="GN", num_groups=32, requires_grad=True)
    theirs = backbones.ResNet(depth=18, norm_cfg=norm_cfg, out_indices=(0, 1, 2, 3), init_cfg=config)
    theirs.init_weights()
    theirs.eval()
    with torch.no_grad():
        mm = list(theirs(X))
    assert all(torch.equal(a, b) for a, b in zip(features(load(ckpt), X), mm, strict=True))

    per_layer = tmp_path / "cpg.safetensors"
    ok(run("convert", "torchvision:resnet18", "--channels-per-group", "16", *SMALL, "-o", per_layer))
    bad_input(
        run("export-weights", per_layer, "--to", "openmmlab", "-o", tmp_path / "no.pth"),
        "OpenMMLab's norm_cfg takes one G per model, but bn1 has G=4",
        "layer2.0.bn1 (G=8)",
    )


def test_export_weights_bad_inputs(tmp_path):
    ckpt = tmp_path / "m.safetensors"
    ok(run("convert", "torchvision:resnet18", *SMALL, "-o", ckpt))
    bad_input(run("export-weights", ckpt, "--to", "keras", "-o", tmp_path / "x.pth"), "--to 'keras' is not a known")
    bad_input(run("export-weights", ckpt, "--to", "openmmlab", "-o", tmp_path / "x.safetensors"), "use .pth")
    bad_input(run("export-weights", ckpt, "--to", "timm", "-o", tmp_path / "x.pth"), "timm has no model 'resnet18_gn'")
    folded = tmp_path / "folded.safetensors"
    ok(run("convert", "torchvision:resnet18", "--freeze", "*", "--fold", *SMALL, "-o", folded))
    bad_input(
        run("export-weights", folded, "--to", "torchvision", "-o", tmp_path / "x.pth"),
        "layer bn1 is folded into its conv",
    )
    assert not list(tmp_path.glob("x.*"))


# ----------------------------------------------------------------------------------------- opacus
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("public")
    gen = torch.Generator().manual_seed(0)
    for i in range(16):
        Image.fromarray((torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
    return root


def _dp_sgd_recipe(source: str, images: Path, out: Path, **flags):
    recipe = Recipe.read(RECIPES / "dp-sgd.yaml")
    fast = {"calib_samples": 16, "calib_batch_size": 8, "calib_steps": 2, "calib_final_steps": 2}
    options = resolve(
        ConvertOptions,
        recipe=recipe,
        section="convert",
        flags={"num_classes": 4, "input_size": (3, 32, 32), **fast, **flags},
        images=str(images),
    )
    return convert_source(source, out, options)


def _dp_sgd_steps(model: nn.Module, mode: str = "hooks", steps: int = 3) -> list[float]:
    from opacus import PrivacyEngine

    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 4, (24,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model.train(),
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        poisson_sampling=False,
    )
    losses = []
    for x, y in list(loader)[:steps]:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(private(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_dp_sgd_recipe_output_validates_and_trains_under_opacus(images, tmp_path):
    pytest.importorskip("opacus")
    from opacus.validators import ModuleValidator

    out = tmp_path / "dp.safetensors"
    report = _dp_sgd_recipe("timm:test_efficientnet", images, out)
    assert report.calibration is not None and report.inplace_off > 0
    assert read_checkpoint(out).plan.options["no_inplace"] is True
    model = load(out)  # the plan replays inplace=False: a user's load gets an opacus-ready model
    assert not [m for m in model.modules() if getattr(m, "inplace", None) is True]
    assert ModuleValidator.validate(model.train(), strict=False) == []
    before = model.conv_stem.weight.detach().clone()
    losses = _dp_sgd_steps(model)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(model.conv_stem.weight, before)  # the private steps moved the weights


def test_in_place_activations_break_opacus_hooks_and_ew_mode_trains_resnets(images, tmp_path):
    """Why no_inplace exists (opacus#828), and the documented way for ResNets, whose own code adds the
    shortcut in place after a norm layer (``x += shortcut``), which no flag can change."""
    pytest.importorskip("opacus")
    inplace = tmp_path / "inplace.safetensors"
    _dp_sgd_recipe("timm:test_efficientnet", images, inplace, no_inplace=False, calibrate=False)
    with pytest.raises(RuntimeError, match="modified inplace"):
        _dp_sgd_steps(load(inplace), steps=1)
    resnet = tmp_path / "resnet.safetensors"
    _dp_sgd_recipe("timm:test_resnet", images, resnet, calibrate=False)
    losses = _dp_sgd_steps(load(resnet), mode="ew")
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_no_inplace_on_a_checkpoint_is_a_change_once_and_nothing_to_do_twice(tmp_path):
    gn, first, second = tmp_path / "gn.safetensors", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ok(run("convert", "timm:test_resnet", *SMALL, "-o", gn))
    result = run("convert", gn, "--no-inplace", "-o", first, "--json", tmp_path / "r.json")
    ok(result)
    assert json.loads((tmp_path / "r.json").read_text())["inplace_off"] > 0  # test_resnet's ReLUs are in place
    assert not any(getattr(m, "inplace", False) for m in load(first).modules())
    again = run("convert", first, "--no-inplace", "-o", second)
    assert again.exit_code == 2 and "no batch-norm layer left to convert" in again.output
    assert not second.exists()
