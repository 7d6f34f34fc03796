"""BN* (frozen BN) and exact folding into the producing conv/linear."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from gnsurgeon import Plan, Selection, apply_plan, load, make_plan, save
from gnsurgeon.checks import compare_freeze_fold
from gnsurgeon.errors import GNSurgeonError, VerificationError
from gnsurgeon.fold import fold_affine_weights, plan_folds
from gnsurgeon.layers import FrozenBNAffine, make_frozen_affine, norm_kind
from gnsurgeon.sources import SourceSpec, build_model

from .helpers import randomize_bn

FREEZE_ALL = Selection(freeze=("*",))


def _freeze_fold(model, example, selection=FREEZE_ALL):
    plan = plan_folds(model, make_plan(model, selection=selection), example[:1])
    return plan, apply_plan(model, plan).eval()


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def test_bn_star_equals_bn_eval_for_every_rank():
    for bn, shape in [
        (nn.BatchNorm1d(6), (4, 6)),
        (nn.BatchNorm1d(6), (4, 6, 5)),
        (nn.BatchNorm2d(6), (2, 6, 3, 3)),
        (nn.BatchNorm3d(6, eps=0.0), (2, 6, 2, 3, 3)),
    ]:
        randomize_bn(bn).eval()
        frozen = make_frozen_affine(bn)
        x = torch.randn(*shape) * 2 + 0.5
        torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)
        assert list(frozen.parameters()) == []  # nothing trainable


def test_bn_star_keeps_timm_act():
    bn = randomize_bn(BatchNormAct2d(8, act_layer=nn.SiLU)).eval()
    frozen = make_frozen_affine(bn)
    x = torch.randn(2, 8, 4, 4)
    assert isinstance(frozen.act, nn.SiLU)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


def test_resnet18_frozen_and_folded_has_no_norm_left_and_matches_bn():
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    plan, folded = _freeze_fold(model, x)
    assert {lp.action for lp in plan} == {"folded"}
    assert not any(norm_kind(m) or isinstance(m, FrozenBNAffine) for m in folded.modules())
    with torch.no_grad():
        assert _rel(model(x), folded(x)) < 1e-5
    # Convs that had no bias gained one; the input model did not change.
    assert folded.conv1.bias is not None and model.conv1.bias is None


def test_batchnorm_after_concat_stays_frozen_with_reason():
    class DenseBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(8)

        def forward(self, x):
            return self.norm(torch.cat([self.a(x), self.b(x)], 1))

    model = randomize_bn(DenseBlock()).eval()
    x = torch.randn(2, 3, 8, 8)
    plan, frozen = _freeze_fold(model, x)
    assert plan.layers[0].action == "frozen" and plan.layers[0].note == "after concat"
    assert isinstance(frozen.norm, FrozenBNAffine)
    with torch.no_grad():
        assert _rel(model(x), frozen(x)) < 1e-5


def test_conv_output_shared_with_shortcut_is_not_folded_and_stays_exact():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the shortcut reads the conv output too

    model = randomize_bn(Shared()).eval()
    x = torch.randn(2, 4, 8, 8)
    plan, frozen = _freeze_fold(model, x)
    lp = plan.layers[0]
    assert lp.action == "frozen" and lp.note.startswith("producer output shared")
    with torch.no_grad():
        assert _rel(model(x), frozen(x)) < 1e-5
    # Folding anyway would corrupt the shortcut: the check must catch it.
    forced = Plan([lp.__class__(**{**lp.__dict__, "action": "folded", "note": "", "producer": "conv"})])
    with pytest.raises(VerificationError, match="the model output"):
        compare_freeze_fold(model, apply_plan(model, forced), forced, x)


def test_inplace_activation_before_bn_blocks_folding():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.BatchNorm2d(4))).eval()
    plan, _ = _freeze_fold(model, torch.randn(2, 3, 4, 4))
    assert plan.layers[0].action == "frozen" and plan.layers[0].note == "producer is a ReLU, not a conv/linear"


def test_linear_and_depthwise_producers_fold():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, 5),
        nn.BatchNorm1d(5),
    )
    model = randomize_bn(model).eval()
    x = torch.randn(3, 3, 4, 4)
    plan, folded = _freeze_fold(model, x)
    assert [lp.producer for lp in plan] == ["0", "2", "6"]
    with torch.no_grad():
        assert _rel(model(x), folded(x)) < 1e-5


def test_weight_standardised_conv_is_not_folded():
    from timm.layers import StdConv2d

    model = randomize_bn(nn.Sequential(StdConv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    plan, _ = _freeze_fold(model, torch.randn(2, 3, 8, 8))
    assert plan.layers[0].action == "frozen" and "own forward" in plan.layers[0].note


def test_detection_backbone_with_frozen_batchnorm_freezes_and_folds():
    model = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    model = randomize_bn(model).eval()
    backbone = torchvision.models.detection.backbone_utils.BackboneWithFPN(
        model, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}, [256, 512, 1024, 2048], 64
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    plan, folded = _freeze_fold(backbone, x)
    assert len(plan) == 53 and {lp.kind for lp in plan} == {"FrozenBatchNorm2d"}
    assert {lp.action for lp in plan} == {"folded"}
    with torch.no_grad():
        ref, out = backbone(x), folded(x)
    assert max(_rel(ref[k], out[k]) for k in ref) < 1e-5


def test_mixed_freeze_and_gn_plan_round_trips(tmp_path):
    spec = SourceSpec("timm", "test_resnet")
    model = randomize_bn(build_model(spec)).eval()
    x = torch.randn(2, 3, 64, 64)
    selection = Selection(freeze=("conv1.*", "bn1", "layer1.*"))
    plan, converted = _freeze_fold(model, x, selection)
    actions = {lp.path: lp.action for lp in plan}
    assert actions["bn1"] == "folded" and actions["layer1.0.bn1"] == "folded" and actions["layer2.0.bn1"] == "gn"
    save(tmp_path / "m.safetensors", converted, plan, source=spec)
    loaded = load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    assert loaded.conv1[0].bias is not None


def test_freezing_needs_running_statistics():
    from gnsurgeon import GNSurgeonError

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(GNSurgeonError, match="layer 1 has no running statistics"):
        make_plan(model, selection=FREEZE_ALL)


def test_timm_efficientnet_folds_and_keeps_activations():
    model = randomize_bn(timm.create_model("test_efficientnet")).eval()
    x = torch.randn(2, 3, 64, 64)
    plan, folded = _freeze_fold(model, x)
    assert {lp.action for lp in plan} == {"folded"}
    assert sum(isinstance(m, nn.SiLU) for m in folded.modules()) == sum(isinstance(m, nn.SiLU) for m in model.modules())
    with torch.no_grad():
        assert _rel(model(x), folded(x)) < 1e-5


def test_fold_affine_weights_is_the_affine_after_the_conv_and_changes_no_input():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    scale, shift = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    weight_before = conv.weight.detach().clone()
    weight, bias = fold_affine_weights(conv.weight, None, scale, shift)
    assert torch.equal(conv.weight, weight_before)  # tensors in, new tensors out
    assert weight.dtype == bias.dtype == torch.float32 and not isinstance(weight, nn.Parameter)
    x = torch.randn(2, 3, 8, 8)
    affine = conv(x) * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1)
    assert _rel(affine, nn.functional.conv2d(x, weight, bias)) < 1e-6


def test_fold_affine_weights_keeps_the_bias_dtype_and_takes_the_output_axis():
    weight, bias = torch.randn(3, 5, 2, 2), torch.randn(5, dtype=torch.float64)  # (in, out, k, k): transposed
    scale, shift = torch.full((5,), 2.0), torch.ones(5)
    new_weight, new_bias = fold_affine_weights(weight, bias, scale, shift, out_dim=1)
    assert torch.equal(new_weight, weight * 2) and new_bias.dtype == torch.float64
    assert torch.equal(new_bias, bias * 2 + 1)
    with pytest.raises(GNSurgeonError, match="scale has shape"):
        fold_affine_weights(weight, bias, scale, shift, out_dim=0)
    with pytest.raises(GNSurgeonError, match="out_dim 4"):
        fold_affine_weights(weight, bias, scale, shift, out_dim=4)
