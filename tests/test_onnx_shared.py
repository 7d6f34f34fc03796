"""Two GN layers that normalise the same tensor (issue #12): LeViT's ``head.bn`` and ``head_dist.bn``.

Converted with ``--include-1d``, both are GN over one pooled feature with the same G and eps. The
dynamo exporter keeps one copy of identical computations, so the graph holds 51
InstanceNormalizations for LeViT's 52 GN layers: with distinct affines, one Reshape ->
InstanceNormalization -> Reshape shared by two affine tails; with equal affines (the initial
γ = 1, β = 0), one subgraph for both. The verifier mapped those to the wrong layers and refused a
correct export. A full levit_128s export takes ~60 s on 2 cores, so the head is rebuilt here from
timm's own ``NormLinear`` on a tiny trunk: the same modules, the same forward, the same graph.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from timm.models.levit import NormLinear
from torch import nn

import gnsurgeon
from gnsurgeon.models import DataConfig
from gnsurgeon.onnx_export import export_model
from gnsurgeon.onnx_graph import locate_group_norms
from gnsurgeon.onnx_verify import verify_model
from gnsurgeon.plan import GroupPolicy, Selection


class DistilledHead(nn.Module):
    """LeViT-distilled's eval forward after its trunk: (head(x) + head_dist(x)) / 2 on pooled features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.BatchNorm2d(16), nn.Hardswish())
        self.head = NormLinear(16, 5)
        self.head_dist = NormLinear(16, 5)

    def forward(self, x):
        x = self.stem(x).mean(dim=(-2, -1))
        return (self.head(x) + self.head_dist(x)) / 2


def _gn_model(distinct_affines: bool) -> nn.Module:
    torch.manual_seed(0)
    model = DistilledHead().eval()
    plan = gnsurgeon.make_plan(model, GroupPolicy(groups=4), Selection(include_1d=True))
    gn = gnsurgeon.apply_plan(model, plan).eval()
    if distinct_affines:  # as trained weights would be
        with torch.no_grad():
            for head in (gn.head, gn.head_dist):
                head.bn.weight.uniform_(0.5, 1.5)
                head.bn.bias.uniform_(-0.5, 0.5)
    return gn


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def exported() -> dict:
    """Per case, the GN model, its export (one each: exporting is the slow part) and what was logged."""
    out = {}
    for distinct in (True, False):
        model, records = _gn_model(distinct), _Records()
        logging.getLogger().addHandler(records)
        try:
            proto = export_model(model, torch.randn(1, 3, 16, 16))
        finally:
            logging.getLogger().removeHandler(records)
        out[distinct] = (model, proto, records.messages)
    return out


@pytest.mark.parametrize("distinct_affines", [True, False], ids=["shared-normalisation", "merged-layers"])
def test_layers_sharing_one_normalisation_both_verify(distinct_affines, exported):
    model, proto, logged = exported[distinct_affines]
    # (N, C) GN layers used to emit an empty-list Constant: one "Attribute type is ambiguous" each.
    assert not [m for m in logged if "ambiguous" in m]
    instance_norms = sum(n.op_type == "InstanceNormalization" for n in proto.graph.node)
    assert instance_norms == 2  # stem.1, and ONE for head.bn + head_dist.bn: the exporter merged them

    report = verify_model(proto, model, DataConfig(input_size=(3, 16, 16)))
    assert report.ok, report.headline()
    rows = {row["path"]: row for row in report.layers}
    assert set(rows) == {"stem.1", "head.bn", "head_dist.bn"}
    for path in ("head.bn", "head_dist.bn"):  # each checked against its own module, every input in limits
        assert rows[path]["ok"] and rows[path]["graph_groups"] == 4 and len(rows[path]["cases"]) >= 5
    how = rows["head_dist.bn"]["mapped_by"]
    assert ("shared with head.bn" if distinct_affines else "merged into head.bn") in how


def test_shared_normalisation_subgraphs_hold_each_layers_own_affine(exported):
    _, proto, _ = exported[True]
    found, _ = locate_group_norms(proto, {"head.bn": 1, "head_dist.bn": 1})
    head, dist = found["head.bn"][0], found["head_dist.bn"][0]
    assert head.entry == dist.entry  # both start from the pooled feature
    assert head.exit != dist.exit  # and end at their own affine's output
    params = {p.name for p in proto.graph.initializer}
    reads = {s.path: {i for n in s.nodes for i in n.input if i in params} for s in (head, dist)}
    assert any("head_dist" in name for name in reads["head_dist.bn"]), reads
    assert not any("head_dist" in name for name in reads["head.bn"]), reads


def test_a_merged_layer_is_served_only_by_the_same_function(exported):
    """A layer without nodes of its own passes only where another layer computes its exact function:
    with another eps, ``head_dist.bn`` is not what the graph computes, and it fails by name."""
    model, proto, _ = exported[False]
    model = copy.deepcopy(model)
    model.head_dist.bn.eps = 1e-2
    report = verify_model(proto, model, DataConfig(input_size=(3, 16, 16)))
    assert "head_dist.bn" in report.failed_layers and "head.bn" not in report.failed_layers
