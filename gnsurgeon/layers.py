"""Normalization layer kinds we recognise, and the GroupNorm that replaces each.

Kinds are told apart with ``isinstance`` in a fixed order, most specific first, so subclasses are
handled on purpose: timm's ``BatchNormAct2d`` *is* a ``BatchNorm2d`` but also applies ``.drop`` and
``.act``; replacing it by a plain ``nn.GroupNorm`` would silently delete the activation (33 SiLUs in
efficientnet_b0). Those layers become timm ``GroupNormAct`` with the original ``drop``/``act`` modules
moved over. torchvision's ``FrozenBatchNorm2d`` is not a ``_BatchNorm`` at all (its weights are
buffers) and is matched by its own type.

Stage: the layer vocabulary that planning, surgery, folding and the checks share. It imports:
errors only (and timm/torchvision for their layer types).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, SyncBatchNormAct
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops.misc import FrozenBatchNorm2d

from .errors import GNSurgeonError


@dataclass(frozen=True)
class NormKind:
    """A normalization layer type we know: its name in plans, and whether it carries act/drop."""

    name: str
    cls: type
    has_act: bool = False


# Most specific first: the first isinstance match wins.
NORM_KINDS: tuple[NormKind, ...] = (
    NormKind("SyncBatchNormAct", SyncBatchNormAct, has_act=True),
    NormKind("BatchNormAct2d", BatchNormAct2d, has_act=True),
    NormKind("FrozenBatchNormAct2d", FrozenBatchNormAct2d, has_act=True),
    NormKind("FrozenBatchNorm2d", FrozenBatchNorm2d),
    NormKind("SyncBatchNorm", nn.SyncBatchNorm),
    NormKind("BatchNorm3d", nn.BatchNorm3d),
    NormKind("BatchNorm2d", nn.BatchNorm2d),
    NormKind("BatchNorm1d", nn.BatchNorm1d),
)

# Layers that are already batch-independent; ``inspect`` lists them so users see the whole picture.
GROUP_NORM_TYPES = (nn.GroupNorm,)


def norm_kind(module: nn.Module) -> NormKind | None:
    """The kind of a batch-norm-like module, or None for anything else."""
    for kind in NORM_KINDS:
        if isinstance(module, kind.cls):
            return kind
    if isinstance(module, _BatchNorm):
        # An unknown _BatchNorm subclass (e.g. a LazyBatchNorm) is still a batch norm: refuse to guess.
        return NormKind(type(module).__name__, type(module))
    return None


def num_channels(module: nn.Module) -> int:
    """Channel count of a BN-like module, from its statistics or affine tensors."""
    for name in ("running_mean", "weight"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.parameter.UninitializedTensorMixin):
            return int(t.shape[0])
    n = getattr(module, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    raise GNSurgeonError(f"{type(module).__name__} has no channel count yet (lazy or uninitialised)")


def has_affine(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def describe_act(module: nn.Module) -> str:
    """Short name of a fused activation (and drop) kept on replacement, '' when there is none."""
    parts = []
    for attr in ("drop", "act"):
        sub = getattr(module, attr, None)
        if isinstance(sub, nn.Module) and not isinstance(sub, nn.Identity):
            parts.append(type(sub).__name__)
    return "+".join(parts)


def _reference_tensor(module: nn.Module) -> torch.Tensor:
    for name in ("weight", "running_mean", "bias", "running_var"):
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor):
            return t
    raise GNSurgeonError(f"{type(module).__name__} has neither affine parameters nor running statistics")


def make_group_norm(bn: nn.Module, groups: int) -> nn.GroupNorm:
    """A GroupNorm that takes ``bn``'s place: same C, eps, γ/β, dtype, device, mode and requires_grad.

    Layers with a fused activation (timm ``*Act`` kinds) become ``GroupNormAct`` holding the very same
    ``drop`` and ``act`` modules. γ/β are copied (not reset): BN's learned scale and shift are the best
    starting point we have, and zero-initialised γ on residual branches stays zero.
    """
    kind = norm_kind(bn)
    if kind is None:
        raise GNSurgeonError(f"{type(bn).__name__} is not a batch-norm layer")
    channels = num_channels(bn)
    if channels % groups:
        raise GNSurgeonError(f"{groups} groups do not divide {channels} channels")
    ref = _reference_tensor(bn)
    affine = has_affine(bn)
    factory = {"device": ref.device, "dtype": ref.dtype}
    if kind.has_act:
        gn: nn.GroupNorm = GroupNormAct(
            channels, num_groups=groups, eps=bn.eps, affine=affine, apply_act=False, **factory
        )
        gn.drop, gn.act = fused_act_modules(bn)
    else:
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=affine, **factory)
    if affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        # FrozenBatchNorm keeps γ/β as buffers; the GN that replaces it is meant to train.
        if isinstance(bn.weight, nn.Parameter):
            gn.weight.requires_grad_(bn.weight.requires_grad)
            gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def has_running_stats(module: nn.Module) -> bool:
    return isinstance(getattr(module, "running_mean", None), torch.Tensor) and isinstance(
        getattr(module, "running_var", None), torch.Tensor
    )


def frozen_affine_params(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """BN*'s per-channel ``(a, b)``: a = γ / sqrt(running_var + eps), b = β − a · running_mean.

    Computed in float64 so that folding them into a producer adds no rounding of its own.
    """
    if not has_running_stats(bn):
        raise GNSurgeonError(f"{type(bn).__name__} has no running statistics to freeze")
    var, mean = bn.running_var.detach().double(), bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if has_affine(bn) else torch.ones_like(var)
    beta = bn.bias.detach().double() if has_affine(bn) else torch.zeros_like(mean)
    a = gamma * torch.rsqrt(var + bn.eps)
    return a, beta - a * mean


class FrozenBNAffine(nn.Module):
    """BN*: a batch norm frozen into the per-channel affine ``y = a·x + b`` (then drop, act).

    This is the layer detection fine-tuning uses at 1-2 images per GPU (Mask R-CNN, detectron2's
    ``FrozenBatchNorm2d``): the pre-training statistics are folded in, nothing is estimated from the
    batch, and nothing is trainable (``scale``/``shift`` are buffers), so an optimizer cannot move it.
    Unlike torchvision's and timm's frozen layers it works for any input rank (1d tokens, 2d, 3d video)
    and keeps timm's fused ``drop``/``act``. ``eps`` is recorded for reference only: it is already in
    ``scale``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("scale", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("shift", torch.zeros(num_features, device=device, dtype=dtype))
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = x * self.scale.view(shape) + self.shift.view(shape)
        return self.act(self.drop(x))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_frozen_affine(bn: nn.Module) -> FrozenBNAffine:
    """The BN* that takes ``bn``'s place: its running statistics and γ/β folded into (a, b)."""
    a, b = frozen_affine_params(bn)
    ref = _reference_tensor(bn)
    frozen = FrozenBNAffine(num_channels(bn), float(bn.eps), device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        frozen.scale.copy_(a)
        frozen.shift.copy_(b)
    frozen.drop, frozen.act = fused_act_modules(bn)
    frozen.train(bn.training)
    return frozen


def fused_act_modules(bn: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The ``(drop, act)`` a timm *Act norm applies after normalising (Identity for plain BN)."""
    drop = getattr(bn, "drop", None)
    act = getattr(bn, "act", None)
    return (
        drop if isinstance(drop, nn.Module) else nn.Identity(),
        act if isinstance(act, nn.Module) else nn.Identity(),
    )
