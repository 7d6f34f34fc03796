"""Conversion across a zoo of real timm/torchvision architectures (random init, small inputs)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from gnsurgeon import GroupPolicy, Selection, apply_plan, load, make_plan, save
from gnsurgeon.layers import make_group_norm, norm_kind
from gnsurgeon.sources import SourceSpec

from .helpers import activation_counts, bn_layers, flatten, randomize_bn

# name -> (SourceSpec, probe input shape); inputs are small to keep the suite fast on 2 cores.
ZOO = {
    "tv_resnet18": (SourceSpec("torchvision", "resnet18", {"num_classes": 10}), (2, 3, 64, 64)),
    "tv_mobilenet_v3_small": (SourceSpec("torchvision", "mobilenet_v3_small"), (2, 3, 64, 64)),
    "tv_efficientnet_b0": (SourceSpec("torchvision", "efficientnet_b0"), (2, 3, 64, 64)),
    "tv_shufflenet_v2_x0_5": (SourceSpec("torchvision", "shufflenet_v2_x0_5"), (2, 3, 64, 64)),
    "tv_r3d_18": (SourceSpec("torchvision", "r3d_18", {"num_classes": 5}), (2, 3, 4, 32, 32)),
    "tv_resnet18_frozenbn": (
        SourceSpec("torchvision", "resnet18", {"num_classes": 10, "norm_layer": FrozenBatchNorm2d}),
        (2, 3, 64, 64),
    ),
    "timm_test_resnet": (SourceSpec("timm", "test_resnet"), (2, 3, 64, 64)),
    "timm_test_efficientnet": (SourceSpec("timm", "test_efficientnet"), (2, 3, 64, 64)),
    "timm_mobilenetv3_small_050": (SourceSpec("timm", "mobilenetv3_small_050"), (2, 3, 64, 64)),
    "timm_regnetx_002": (SourceSpec("timm", "regnetx_002"), (2, 3, 64, 64)),
    "timm_rexnet_100": (SourceSpec("timm", "rexnet_100"), (2, 3, 64, 64)),  # C = 19, 27, 61, ...
}
POLICIES = {"g32": GroupPolicy(groups=32), "cpg16": GroupPolicy(groups=None, channels_per_group=16)}


def _build(spec: SourceSpec) -> nn.Module:
    torch.manual_seed(0)
    if spec.library == "timm":
        model = timm.create_model(spec.name, **spec.kwargs)
    else:
        model = torchvision.models.get_model(spec.name, weights=None, **spec.kwargs)
    return randomize_bn(model).eval()


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_model(request):
    spec, shape = ZOO[request.param]
    return request.param, spec, _build(spec), torch.randn(*shape)


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
def test_zoo_conversion(zoo_model, policy_name, tmp_path):
    name, spec, model, x = zoo_model
    policy = POLICIES[policy_name]
    before = copy.deepcopy(model.state_dict())
    types_before = {p: type(m) for p, m in model.named_modules()}

    plan = make_plan(model, policy)
    converted = apply_plan(model, plan).eval()

    # The input model is untouched.
    assert {p: type(m) for p, m in model.named_modules()} == types_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # No selected BN left; each planned layer is a GN with the policy's G, BN's eps and γ/β.
    assert plan.with_action("gn"), name
    originals = bn_layers(model)
    for lp in plan:
        module = converted.get_submodule(lp.path)
        if lp.action == "keep":
            assert lp.kind == "BatchNorm1d"
            continue
        assert norm_kind(module) is None and isinstance(module, nn.GroupNorm), lp.path
        assert module.num_groups == lp.groups == policy.resolve(lp.channels)[0]
        assert module.eps == originals[lp.path].eps
        assert torch.equal(module.weight, originals[lp.path].weight)
        assert torch.equal(module.bias, originals[lp.path].bias)
    assert all(lp.action == "keep" for lp in plan if lp.path in bn_layers(converted))

    # Fused activations survive (timm BatchNormAct2d -> GroupNormAct keeps its act).
    assert activation_counts(converted) == activation_counts(model)

    # Forward works, same output shape, finite.
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert [t.shape for t in flatten(out)] == [t.shape for t in flatten(ref)]
    assert all(torch.isfinite(t).all() for t in flatten(out))

    # save -> load round trip is bit-exact.
    path = tmp_path / f"{name}.safetensors"
    if "norm_layer" in spec.kwargs:  # a class is no JSON: rebuild from the architecture object
        save(path, converted, plan, source=None)
        loaded = load(path, model=model)
    else:
        save(path, converted, plan, source=spec)
        loaded = load(path)
    with torch.no_grad():
        again = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(flatten(again), flatten(out), strict=True))
    assert loaded.state_dict().keys() == converted.state_dict().keys()


def _train_mode_input(kind: str, c: int) -> torch.Tensor:
    shape = {"BatchNorm1d": (1, c, 6), "BatchNorm3d": (1, c, 2, 3, 3)}.get(kind, (1, c, 4, 4))
    return torch.randn(*shape) * 3 + 1


def test_each_replacement_equals_bn_where_they_coincide(zoo_model):
    """BN in training mode at batch 1 normalises each channel over its own (H, W): that is GN with
    G = C. So every replacement, built with G = C, must reproduce its BN (activation included)."""
    name, _, model, _ = zoo_model
    checked = 0
    for path, bn in bn_layers(model).items():
        kind = norm_kind(bn).name
        if kind.startswith("Frozen"):
            continue  # no batch statistics to compare against
        bn = copy.deepcopy(bn).train()
        for sub in ("drop",):
            if hasattr(bn, sub):
                getattr(bn, sub).eval()
        gn = make_group_norm(copy.deepcopy(bn), groups=bn.running_mean.shape[0])
        x = _train_mode_input(kind, bn.running_mean.shape[0])
        with torch.no_grad():
            torch.testing.assert_close(gn(x.clone()), bn(x.clone()), rtol=1e-4, atol=1e-5, msg=path)
        checked += 1
    if "frozenbn" not in name:
        assert checked > 0


def test_batchnorm1d_is_opt_in():
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    head = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16))
    model.extra = head
    plan = make_plan(model)
    assert plan.by_path()["extra.1"].action == "keep"
    assert "opt-in" in plan.by_path()["extra.1"].note
    plan = make_plan(model, selection=Selection(include_1d=True))
    assert plan.by_path()["extra.1"].action == "gn"
    converted = apply_plan(model, plan)
    assert isinstance(converted.extra[1], nn.GroupNorm)
