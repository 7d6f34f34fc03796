"""The GN lowerings and ``auto``: each form computes GN, is found again in a graph without metadata,
and auto's choice on the installed onnxruntime is the fastest form that passes the stress check;
a runtime that breaks a form (onnxruntime 1.22's LayerNormalization, imitated here) makes auto
fall back and verify-onnx fail naming the lowering and the layer.

The probe graphs come from ``onnx.helper`` through the same lowering code the exporters use, so
these tests need no exporter run (milliseconds each).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gnsurgeon import onnx_lowering, onnx_verify
from gnsurgeon.onnx_graph import OnnxGraph, export_metadata, extract_subgraph, locate_group_norms
from gnsurgeon.onnx_lowering import (
    FORMS,
    TIE,
    Candidate,
    LoweringChoice,
    choice_metadata,
    choose_lowering,
    probe_model,
)

from .helpers import old_runtime, spinning_stops

OPSETS = {"decomposed": 18, "layernorm": 18, "native": 21}
NATIVE_NAN_CASE = "mean 100, std 0.01, batch 1"


def gn_module(groups: int = 4, channels: int = 8, affine: bool = True) -> nn.GroupNorm:
    torch.manual_seed(0)
    module = nn.GroupNorm(groups, channels, affine=affine).eval()
    if affine:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_()
    return module


def run(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# ------------------------------------------------------------------------------- the lowerings
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("form", FORMS)
def test_each_lowering_computes_group_norm_and_is_found_by_pattern(form, static):
    module = gn_module()
    model = probe_model(form, OPSETS[form], module, (5, 6), static=static)
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(3, 8, 5, 6)
    with torch.no_grad():
        ref = module(x).numpy()
    np.testing.assert_allclose(run(model, x.numpy()), ref, atol=2e-5, rtol=0)
    # No metadata: the pattern for this lowering finds the whole call, with its G and eps.
    graph = OnnxGraph(model)
    found, notes = locate_group_norms(model, {"gn": 1}, graph)
    (sub,) = found["gn"]
    assert (sub.form, sub.graph_groups, sub.graph_eps, sub.mapped_by) == (form, 4, pytest.approx(1e-5), "pattern")
    assert notes
    assert {n.op_type for n in model.graph.node if n.op_type != "Constant"} <= {n.op_type for n in sub.nodes}
    np.testing.assert_allclose(run(extract_subgraph(model, sub, 4, graph), x.numpy()), ref, atol=2e-5, rtol=0)


def test_layernorm_form_on_the_stress_input_is_exact_where_the_native_form_is_not():
    """The point of the layernorm form on the installed onnxruntime (1.32: centred variance)."""
    module = gn_module(groups=32, channels=64)
    x = onnx_verify.stress_inputs((64, 28, 28), 32, 3, 0)[NATIVE_NAN_CASE]
    with torch.no_grad():
        ref = nn.functional.group_norm(x.double(), 32, module.weight.double(), module.bias.double()).numpy()
    errors = {
        form: float(np.abs(run(probe_model(form, OPSETS[form], module, (28, 28)), x.numpy()) - ref).max())
        for form in FORMS
    }
    assert not np.isfinite(errors["native"])  # E[x²] − E[x]² in float32
    assert errors["layernorm"] < 5e-3 and errors["decomposed"] < 5e-2


# ------------------------------------------------------------------------------------- auto
def test_auto_picks_the_fastest_form_that_passes_on_the_installed_runtime():
    choice = choose_lowering(FORMS, OPSETS, threads=1, rounds=3)
    assert choice.requested == "auto" and choice.onnxruntime == ort.__version__ and choice.threads == 1
    by_form = {c.form: c for c in choice.candidates}
    assert set(by_form) == set(FORMS) and all(c.ms is not None and c.ms > 0 for c in choice.candidates)
    assert not by_form["native"].passed and "non-finite" in by_form["native"].problem
    assert by_form["decomposed"].passed
    picked = by_form[choice.form]
    passing = [c for c in choice.candidates if c.passed]
    assert picked.passed and picked.ms <= min(c.ms for c in passing) * (1 + TIE)
    # Within TIE of the fastest, the most accurate form (lowest stress error / limit) wins, not the
    # first in FORMS: timing noise must not decide between two forms that are equally fast.
    tied = [c for c in passing if c.ms <= min(p.ms for p in passing) * (1 + TIE)]
    assert all(picked.margin <= c.margin for c in tied)
    assert choice.form in choice.reason and "native fails" in choice.reason and ort.__version__ in choice.reason


def test_sessions_timed_in_turn_stop_their_threads_spinning(monkeypatch):
    """Sessions timed round-robin must not leave their threads spinning after a run: at 2 threads
    those spin on the cores the next session runs on, and resnet18's GN / BN ratios came out anywhere
    from 0.83 to 1.76 (README "Latency", timing method). Verification's sessions keep the runtime's
    defaults."""
    seen = []
    real = onnx_lowering.time_sessions
    monkeypatch.setattr(onnx_lowering, "time_sessions", lambda s, *a: seen.extend(s.values()) or real(s, *a))
    choose_lowering(["decomposed", "layernorm"], OPSETS, threads=2, rounds=1)
    assert len(seen) == 2 and all(spinning_stops(s) for s in seen)
    assert not spinning_stops(onnx_verify.runtime_session(probe_model("decomposed", 18, gn_module(), (5, 5)), 2))


def test_auto_falls_back_when_the_runtime_breaks_a_form(monkeypatch):
    monkeypatch.setattr(onnx_lowering, "runtime_session", old_runtime(onnx_verify.runtime_session))
    choice = choose_lowering(("decomposed", "layernorm"), OPSETS, threads=1, rounds=2)
    by_form = {c.form: c for c in choice.candidates}
    assert choice.form == "decomposed"
    assert not by_form["layernorm"].passed and by_form["layernorm"].worst_error is None
    assert "layernorm fails (mean 100" in choice.reason


def test_the_whole_models_time_settles_the_choice_with_the_probes_tie_rule():
    """settle_on_model: the fastest form on the model wins; within TIE of it, the one with the most
    stress margin; a form that failed the probe is never chosen, however fast."""

    def probed():
        return [
            Candidate("decomposed", 18, True, worst_error=8.0, worst_limit=10.0, ms=1.0),
            Candidate("layernorm", 18, True, worst_error=1.0, worst_limit=10.0, ms=2.0),
            Candidate("native", 21, False, problem="NaN", ms=0.5),
        ]

    choice = LoweringChoice("auto", "decomposed", "probe", "x", 2, probed())
    assert choice.settle_on_model({"decomposed": 100.0, "layernorm": 80.0, "native": 1.0}, "3x8x8") == "layernorm"
    assert [c.model_ms for c in choice.candidates] == [100.0, 80.0, None]
    assert choice.reason.endswith("decomposed 100.0 ms; so layernorm, not the probe's decomposed")
    assert choice.fallbacks() == ["decomposed"]
    tie = LoweringChoice("auto", "decomposed", "probe", "x", 2, probed())
    assert tie.settle_on_model({"decomposed": 100.0, "layernorm": 100.0 * (1 + TIE) - 0.1}, "3x8x8") == "layernorm"
    assert "most stress margin" in tie.reason
    clear = LoweringChoice("auto", "layernorm", "probe", "x", 2, probed())
    assert clear.settle_on_model({"decomposed": 50.0, "layernorm": 100.0}, "3x8x8") == "decomposed"
    alone = LoweringChoice("auto", "decomposed", "probe", "x", 2, probed())
    assert alone.settle_on_model({"decomposed": 5.0}, "3x8x8") == "decomposed" and alone.reason == "probe"


def test_metadata_round_trips_through_the_file(tmp_path):
    choice = LoweringChoice("auto", "layernorm", "because", "1.32.0", 2, [])
    model = probe_model("layernorm", 18, gn_module(), (4, 4))
    for key, value in choice_metadata(choice, center_groups="off").items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(tmp_path / "m.onnx"))
    meta = export_metadata(onnx.load(str(tmp_path / "m.onnx")))
    assert meta["gn_op"] == "layernorm" and meta["gn_op_requested"] == "auto" and meta["onnxruntime"] == "1.32.0"
    assert (meta["gn_op_reason"], meta["threads"], meta["center_groups"]) == ("because", "2", "off")
    assert json.loads(meta["gn_op_candidates"]) == []
