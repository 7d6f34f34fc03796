"""Layer-kind handling: timm act/drop variants, frozen kinds, dtype/device/grad, aliasing, refusals."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d, GroupNormAct, freeze_batch_norm_2d
from timm.layers.norm_act import convert_sync_batchnorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from gnsurgeon import GNSurgeonError, Plan, Selection, apply_plan, convert, make_plan
from gnsurgeon.layers import make_group_norm

from .helpers import randomize_bn


def _act_block(c=16, act=nn.SiLU, drop=None):
    return nn.Sequential(nn.Conv2d(3, c, 3), BatchNormAct2d(c, act_layer=act, drop_layer=drop))


def test_batchnormact_becomes_groupnormact_with_the_same_act_and_drop():
    model = _act_block(drop=nn.Dropout)
    converted = convert(model, groups=4)
    gn = converted[1]
    assert isinstance(gn, GroupNormAct) and gn.num_groups == 4
    assert isinstance(gn.act, nn.SiLU) and isinstance(gn.drop, nn.Dropout)
    assert model[1].act is not gn.act  # the input's modules are not shared with the copy


def test_sync_and_frozen_timm_kinds_are_converted_with_act():
    model = randomize_bn(_act_block(act=nn.Hardswish))
    for variant in (convert_sync_batchnorm(model), freeze_batch_norm_2d(model)):
        plan = make_plan(variant, selection=Selection())
        assert [lp.kind for lp in plan] in (["SyncBatchNormAct"], ["FrozenBatchNormAct2d"])
        converted = apply_plan(variant, plan)
        assert isinstance(converted[1], GroupNormAct) and isinstance(converted[1].act, nn.Hardswish)
        torch.testing.assert_close(converted[1].weight, model[1].weight)


def test_torch_sync_batchnorm_and_frozen_bn_are_converted():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.SyncBatchNorm(8), nn.Conv2d(8, 8, 1), FrozenBatchNorm2d(8))
    plan = make_plan(model)
    assert [lp.kind for lp in plan] == ["SyncBatchNorm", "FrozenBatchNorm2d"]
    converted = apply_plan(model, plan)
    assert isinstance(converted[1], nn.GroupNorm) and isinstance(converted[3], nn.GroupNorm)
    # FrozenBN keeps γ/β as buffers; its GN replacement is meant to be trained.
    assert converted[3].weight.requires_grad
    assert torch.isfinite(converted.eval()(torch.randn(2, 3, 4, 4))).all()


def test_eps_affine_dtype_grad_and_mode_are_carried():
    bn = nn.BatchNorm2d(24, eps=1e-3, dtype=torch.float64)
    bn.weight.requires_grad_(False)
    bn.eval()
    gn = make_group_norm(bn, 12)
    assert gn.eps == 1e-3 and gn.weight.dtype == torch.float64 and gn.weight.device == bn.weight.device
    assert not gn.weight.requires_grad and gn.bias.requires_grad
    assert not gn.training
    plain = make_group_norm(nn.BatchNorm2d(8, affine=False), 4)
    assert plain.weight is None and not plain.affine


def test_zero_init_gamma_is_kept():
    bn = nn.BatchNorm2d(32)
    nn.init.zeros_(bn.weight)
    gn = make_group_norm(bn, 16)
    assert torch.count_nonzero(gn.weight) == 0


def test_shared_module_stays_shared():
    bn = nn.BatchNorm2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), bn, nn.Conv2d(8, 8, 1), bn)
    converted = convert(model, groups=4)
    assert converted[1] is converted[3] and isinstance(converted[1], nn.GroupNorm)


def test_only_and_skip_globs_select_layers():
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)))
    model.add_module("head", nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    plan = make_plan(model, selection=Selection(skip=("head.*",)))
    assert {lp.path: lp.action for lp in plan} == {"stem.1": "gn", "head.1": "keep"}
    plan = make_plan(model, selection=Selection(only=("head.*",)))
    assert {lp.path: lp.action for lp in plan} == {"stem.1": "keep", "head.1": "gn"}
    assert "--only" in plan.by_path()["stem.1"].note


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_scripted_model_is_refused():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)))
    with pytest.raises(GNSurgeonError, match="TorchScript"):
        make_plan(scripted)


def test_plan_for_another_architecture_is_refused():
    plan = make_plan(nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)))
    with pytest.raises(GNSurgeonError, match="layer 1 has 16 channels"):
        apply_plan(nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16)), plan)
    with pytest.raises(GNSurgeonError, match="does not have"):
        apply_plan(nn.Sequential(nn.Conv2d(3, 8, 1)), plan)


def test_plan_json_round_trip():
    model = _act_block()
    plan = make_plan(model)
    again = Plan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert again.layers[0].act == "SiLU"
