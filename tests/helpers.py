"""Small shared helpers for tests (models with known structure, output flattening)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from gnsurgeon.layers import norm_kind


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {p: m for p, m in model.named_modules() if p and norm_kind(m) is not None}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial γ/β and running statistics, as a trained model would have."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bn_layers(model).values():
            c = m.running_mean.shape[0]
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


def activation_counts(model: nn.Module) -> dict[str, int]:
    acts = (
        nn.ReLU,
        nn.ReLU6,
        nn.SiLU,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.GELU,
        nn.LeakyReLU,
        nn.Sigmoid,
        nn.Mish,
        nn.ELU,
    )
    counts: dict[str, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, acts):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten(v)]
    return []


class OldRuntime:
    """An onnxruntime session that computes LayerNormalization as E[x²] − E[x]², like 1.22: NaN
    wherever the input's mean is large next to its spread (here: mean |x| > 50)."""

    def __init__(self, session) -> None:
        self.session = session

    def run(self, names, feed):
        outs = self.session.run(names, feed)
        x = next(iter(feed.values()))
        return [np.full_like(o, np.nan) for o in outs] if np.abs(x).mean() > 50 else outs

    def __getattr__(self, name):
        return getattr(self.session, name)


def old_runtime(real):
    """``runtime_session`` as on onnxruntime 1.22: sessions of graphs with LayerNormalization break."""

    def make(model_or_path, threads: int = 0, **kwargs):
        session = real(model_or_path, threads, **kwargs)
        proto = onnx.load(model_or_path) if isinstance(model_or_path, str) else model_or_path
        uses_ln = any(n.op_type == "LayerNormalization" for n in proto.graph.node)
        return OldRuntime(session) if uses_ln else session

    return make


def spinning_stops(session) -> bool:
    """Whether an onnxruntime session stops its threads spinning when a run ends."""
    try:
        return session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    except Exception:  # onnxruntime raises when the entry was never set
        return False
