"""Typed verification failures: the report finds layer failures by type, and shows the same sentences."""

from __future__ import annotations

import pytest

from gnsurgeon.onnx_verify import VerifyOptions, VerifyReport
from gnsurgeon.verdicts import CheckerFailure, LayerMismatch, LayerNotFound, ModelMismatch, error_ratio


def test_headline_and_json_from_typed_failures():
    report = VerifyReport("m.onnx", "ckpt", VerifyOptions())
    report.failures += [
        CheckerFailure(reason="bad node"),
        LayerMismatch(layer="bn1", reason="graph uses G=8, the module G=16"),
        ModelMismatch(input="random, batch 1", reason="max abs 1.00e-01 > limit 1.00e-04"),
        LayerNotFound(layer="layer1.bn2"),
        LayerMismatch(layer="bn1", reason="second call"),
    ]
    assert not report.ok and report.failed_layers == ["bn1", "layer1.bn2", "bn1"]
    import onnxruntime

    assert report.headline() == (  # the layer part names the runtime that computed it (#14)
        "onnx.checker rejects the model: bad node; "
        "model output on random, batch 1: max abs 1.00e-01 > limit 1.00e-04; "
        f"2 GN layer(s) out of limits (bn1, layer1.bn2) on onnxruntime {onnxruntime.__version__}; "
        "first: layer bn1: graph uses G=8, the module G=16"
    )
    assert report.to_dict()["failures"][3] == "layer layer1.bn2: no GN subgraph found in the ONNX graph"


def test_error_ratio_ranks_non_finite_and_zero_limits_worst():
    assert error_ratio({"max_abs": 1e-6, "limit": 1e-5}) == pytest.approx(0.1)
    assert error_ratio({"max_abs": None, "limit": 1.0}) == float("inf")
    assert error_ratio({"max_abs": 0.0, "limit": 0.0}) == float("inf")
