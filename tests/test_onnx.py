"""ONNX export and verification: every GN form (auto's choice recorded in the file), dynamic batch, BN
folding, centring, corrupted graphs, a runtime that breaks the chosen form, bad input.

Exports are the slow part (~5 s each with the dynamo exporter), so each model is exported once per
module and the tests share the files.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from gnsurgeon import load, onnx_export, onnx_lowering, onnx_verify
from gnsurgeon.cli import app
from gnsurgeon.onnx_export import export_model, fold_for_export
from gnsurgeon.onnx_graph import SCOPES_KEY, export_metadata
from gnsurgeon.onnx_lowering import Candidate, LoweringChoice
from gnsurgeon.onnx_verify import VerifyOptions, stress_inputs, verify_model
from gnsurgeon.sources import DataConfig

from .helpers import old_runtime, randomize_bn, spinning_stops

SMALL = ["--input-size", "3,64,64"]
NATIVE_NAN_CASE = "mean 100, std 0.01, batch 1"
ANCHOR = {"decomposed": "InstanceNormalization", "layernorm": "LayerNormalization", "native": "GroupNormalization"}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def text_of(result) -> str:
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return " ".join(text.split())


def assert_bad_input(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    text = text_of(result)
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text


def ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export(tmp: Path, checkpoint: Path, name: str, *extra: str):
    out, report = tmp / f"{name}.onnx", tmp / f"{name}.json"
    result = run("export-onnx", checkpoint, "-o", out, "--json", report, "-q", *extra)
    return result, out, json.loads(report.read_text())


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """timm test_resnet converted to GN, exported decomposed and native (native without --force)."""
    tmp = tmp_path_factory.mktemp("resnet")
    checkpoint = tmp / "gn.safetensors"
    assert run("convert", "timm:test_resnet", *SMALL, "-o", checkpoint, "-q").exit_code == 0
    native = export(tmp, checkpoint, "native", "--gn-op", "native")
    return tmp, checkpoint, export(tmp, checkpoint, "decomposed", "--gn-op", "decomposed"), native


@pytest.fixture(scope="module")
def resnet_ln(resnet):
    """The same checkpoint as the layernorm form, every GN centred in its producer's bias."""
    tmp, checkpoint, _, _ = resnet
    return tmp, checkpoint, export(tmp, checkpoint, "layernorm", "--gn-op", "layernorm", "--center-groups")


@pytest.fixture(scope="module")
def effnet(tmp_path_factory):
    """timm test_efficientnet: BatchNormAct2d becomes GroupNormAct (GN + SiLU in one module); exported
    with the default (auto) and native (--force)."""
    tmp = tmp_path_factory.mktemp("effnet")
    checkpoint = tmp / "gn.safetensors"
    assert run("convert", "timm:test_efficientnet", *SMALL, "-o", checkpoint, "-q").exit_code == 0
    native = export(tmp, checkpoint, "native", "--gn-op", "native", "--force")
    return tmp, checkpoint, export(tmp, checkpoint, "auto"), native


def _layers_ok(data: dict) -> dict[str, bool]:
    return {row["path"]: row["ok"] for row in data["verification"]["layers"]}


# ------------------------------------------------------------------------------- both GN forms
def test_resnet_decomposed_exports_and_verifies(resnet):
    _, _, (result, out, data), _ = resnet
    assert result.exit_code == 0, result.output
    assert data["written"] and out.exists() and data["opset"] == 18
    counts = ops(out)
    assert counts["InstanceNormalization"] == 15 and "GroupNormalization" not in counts
    assert "BatchNormalization" not in counts
    layers = data["verification"]["layers"]
    assert len(layers) == 15 and all(row["ok"] for row in layers)
    assert {row["form"] for row in layers} == {"decomposed"} and {row["mapped_by"] for row in layers} == {"metadata"}
    assert {row["graph_groups"] == row["groups"] for row in layers} == {True}
    # Every layer saw its real activation and every stress input, at batch 1 and batch 3.
    cases = set(layers[0]["cases"])
    assert {"activation, batch 3", "activation, batch 1", NATIVE_NAN_CASE} <= cases
    assert any("mean 1000" in c for c in cases) and any("near-constant" in c for c in cases)
    stress = layers[0]["cases"][NATIVE_NAN_CASE]
    assert stress["max_abs"] < 0.05 and stress["kappa"] > 1e3  # float32-limited, finite
    for row in data["verification"]["model"]:
        assert row["ok"] and row["max_rel"] < 1e-5 and row["top1_agreement"] == 1.0


def test_resnet_native_fails_the_stress_check_not_the_whole_model(resnet):
    _, _, _, (result, out, data) = resnet
    assert result.exit_code == 1, result.output
    assert not out.exists() and not data["written"]  # nothing written without --force
    text = text_of(result)
    assert "verification failed" in text and "conv1.1" in text and "non-finite" in text and "--force" in text
    assert data["opset"] == 21 and data["op_counts"]["GroupNormalization"] == 15
    # The whole-graph comparison on random inputs passes: only the per-layer stress inputs see it.
    assert all(row["ok"] for row in data["verification"]["model"])
    for row in data["verification"]["layers"]:
        assert row["form"] == "native" and not row["ok"]
        assert row["cases"]["activation, batch 3"]["ok"]
        nan_case = row["cases"][NATIVE_NAN_CASE]
        assert nan_case["max_abs"] is None and nan_case["nonfinite"] > 0 or row.get("note")


def test_resnet_layernorm_with_centring_exports_and_verifies(resnet, resnet_ln, tmp_path):
    _, checkpoint, (result, out, data) = resnet_ln
    assert result.exit_code == 0, result.output
    counts = ops(out)
    assert counts["LayerNormalization"] == 15 and not {"InstanceNormalization", "GroupNormalization"} & set(counts)
    layers = data["verification"]["layers"]
    assert len(layers) == 15 and all(r["ok"] and r["form"] == "layernorm" for r in layers)
    # LayerNormalization's centred variance (onnxruntime 1.32) beats InstanceNormalization's on the stress input.
    decomposed = resnet[2][2]["verification"]["layers"]
    worst = {name: max(r["cases"][NATIVE_NAN_CASE]["max_abs"] for r in rows)
             for name, rows in (("ln", layers), ("in", decomposed))}  # fmt: skip
    assert worst["ln"] < worst["in"]
    # --center-groups: every GN here reads a conv's output alone, so each is centred; exact (float64 drift).
    centring = data["centring"]
    assert len(centring) == 15 and {r["action"] for r in centring} == {"centred"}
    assert all(r["kappa_after"] <= r["kappa_before"] * 1.001 + 1e-3 and r["model_drift"] < 1e-6 for r in centring)
    assert export_metadata(onnx.load(str(out)))["center_groups"] == "15"
    # Without node metadata, the layernorm pattern finds every GN again.
    model = onnx.load(str(out))
    for node in model.graph.node:
        del node.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(model, str(stripped))
    again = run("verify-onnx", stripped, checkpoint, "--json", tmp_path / "r.json", "-q")
    assert again.exit_code == 0, again.output
    rows = json.loads((tmp_path / "r.json").read_text())["layers"]
    assert len(rows) == 15 and {(r["mapped_by"], r["form"]) for r in rows} == {("pattern", "layernorm")}


def test_auto_export_records_its_choice_in_the_file_and_the_report(effnet, tmp_path):
    _, checkpoint, (result, out, data), _ = effnet
    assert result.exit_code == 0, result.output
    lowering = data["lowering"]
    form = data["gn_op"]
    assert lowering["requested"] == "auto" and lowering["form"] == form and lowering["onnxruntime"] == ort.__version__
    passed = {c["form"] for c in lowering["candidates"] if c["passed"]}
    assert form in passed and "native" not in passed  # native: NaN on the stress input
    assert ops(out)[ANCHOR[form]] == 13 and {r["form"] for r in data["verification"]["layers"]} == {form}
    meta = export_metadata(onnx.load(str(out)))
    assert (meta["gn_op"], meta["gn_op_requested"], meta["onnxruntime"]) == (form, "auto", ort.__version__)
    assert meta["gn_op_reason"] == lowering["reason"] and json.loads(meta["gn_op_candidates"]) == lowering["candidates"]
    assert "GN lowering, why" in text_of(result) and f"/ {form} (dynamo exporter)" in text_of(result)
    again = run("verify-onnx", out, checkpoint, "-q", "--json", tmp_path / "v.json")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "v.json").read_text())["exported_with"]["gn_op"] == form


def test_verify_fails_loudly_when_this_runtime_breaks_the_chosen_lowering(resnet_ln, tmp_path, monkeypatch):
    """A file auto made with layernorm on onnxruntime 1.32, checked on a runtime that computes
    LayerNormalization as E[x²] − E[x]² (1.22's behaviour, imitated): exit 1, the lowering, both
    versions and the layers named."""
    _, checkpoint, (_, out, _) = resnet_ln
    model = onnx.load(str(out))
    for prop in model.metadata_props:
        if prop.key == "gnsurgeon.gn_op_requested":
            prop.value = "auto"
    edited = tmp_path / "auto-ln.onnx"
    onnx.save(model, str(edited))
    monkeypatch.setattr(onnx_verify, "runtime_session", old_runtime(onnx_verify.runtime_session))
    monkeypatch.setattr(onnx_verify, "_onnxruntime_version", lambda: "1.22.1")
    result = run("verify-onnx", edited, checkpoint, "-q")
    assert result.exit_code == 1, result.output
    text = text_of(result)
    assert "verification failed: 15 GN layer(s) out of limits (conv1.1, " in text
    chosen = f"chosen by auto with onnxruntime {ort.__version__}"
    assert f"in the layernorm lowering ({chosen}) on onnxruntime 1.22.1" in text
    assert f"verified with onnxruntime {ort.__version__}; re-checked here on onnxruntime 1.22.1" in text
    assert "Traceback" not in text


def test_auto_tries_the_next_form_when_the_models_own_layers_fail_the_first(resnet, tmp_path, monkeypatch):
    """auto's probe passed layernorm, but this model's layers fail it on this runtime (imitated): the
    export falls back to the next form that passed the probe, and says why in report and file."""
    _, checkpoint, _, _ = resnet
    probed = [Candidate("layernorm", 18, True, ms=1.0), Candidate("decomposed", 18, True, ms=2.0)]
    choice = LoweringChoice("auto", "layernorm", "auto: probe", "x", 0, probed)
    monkeypatch.setattr(onnx_export, "choose_lowering", lambda *a, **k: choice)
    # The whole-model timing agrees with the probe here (layernorm first), whatever this machine measures.
    monkeypatch.setattr(onnx_lowering, "time_sessions", lambda *_: {"layernorm": 1.0, "decomposed": 2.0})
    monkeypatch.setattr(onnx_verify, "runtime_session", old_runtime(onnx_verify.runtime_session))
    result, out, data = export(tmp_path, checkpoint, "fallback")
    assert result.exit_code == 0, result.output
    lowering = data["lowering"]
    assert (data["gn_op"], lowering["form"], lowering["rejected"]) == ("decomposed", "decomposed", ["layernorm"])
    assert "layernorm failed the per-layer check on this model (15 layer(s): conv1.1, " in lowering["reason"]
    assert lowering["reason"].endswith("so decomposed")
    assert "InstanceNormalization" in ops(out) and "LayerNormalization" not in ops(out)
    assert export_metadata(onnx.load(str(out)))["gn_op_reason"] == lowering["reason"]


@pytest.mark.parametrize("faster", ["decomposed", "layernorm"])
def test_auto_chooses_by_the_whole_models_time_not_the_probes(resnet, tmp_path, monkeypatch, faster):
    """Both forms passed the probe, which found layernorm faster on one GN; the export times the model
    in each form (here: ``faster`` runs in half the time) and writes that one, exporting each form once."""
    _, checkpoint, _, _ = resnet
    probed = [Candidate("layernorm", 18, True, ms=1.0), Candidate("decomposed", 18, True, ms=2.0)]
    choice = LoweringChoice("auto", "layernorm", "probe", "x", 0, probed)
    monkeypatch.setattr(onnx_export, "choose_lowering", lambda *a, **k: choice)
    timed = []

    def fake_timing(sessions, feed, rounds):
        assert all(spinning_stops(s) for s in sessions.values())  # timed in turn: see test_onnx_lowering
        timed.append((sorted(sessions), {k: v.shape for k, v in feed.items()}, rounds))
        return {form: 10.0 if form == faster else 20.0 for form in sessions}

    exports = []
    real_export = onnx_export.export_model

    def counting_export(model, example, **kwargs):
        exports.append(kwargs["gn_op"])
        return real_export(model, example, **kwargs)

    monkeypatch.setattr(onnx_lowering, "time_sessions", fake_timing)
    monkeypatch.setattr(onnx_export, "export_model", counting_export)
    result, out, data = export(tmp_path, checkpoint, f"timed-{faster}")
    assert result.exit_code == 0, result.output
    assert sorted(exports) == ["decomposed", "layernorm"]  # the chosen form's file is the timed one
    (forms, shapes, _), (_, _, rounds) = timed  # a first turn sizes the timing, then the timed rounds
    assert forms == ["decomposed", "layernorm"] and list(shapes.values()) == [(1, 3, 64, 64)] and 3 <= rounds <= 15
    lowering = data["lowering"]
    assert data["gn_op"] == lowering["form"] == faster
    assert {c["form"]: c["model_ms"] for c in lowering["candidates"]} == {
        form: 10.0 if form == faster else 20.0 for form in ("decomposed", "layernorm")
    }
    assert "then timed on this model (batch 1, " in lowering["reason"]
    ending = f"so {faster}" + ("" if faster == "layernorm" else ", not the probe's layernorm")
    assert lowering["reason"].endswith(ending)
    assert ops(out)[ANCHOR[faster]] and export_metadata(onnx.load(str(out)))["gn_op_reason"] == lowering["reason"]


def test_groupnormact_model_in_both_modes(effnet):
    tmp, checkpoint, (result, out, data), (nresult, nout, ndata) = effnet
    assert result.exit_code == 0, result.output
    layers = data["verification"]["layers"]
    assert len(layers) == 13 and all(row["ok"] for row in layers)
    # GroupNormAct's SiLU is inside the module: its nodes belong to the layer's subgraph.
    assert "Sigmoid" in ops(out)
    assert nresult.exit_code == 1 and nout.exists() and ndata["written"]  # --force wrote it
    assert not any(_layers_ok(ndata).values())
    # verify-onnx re-checks the files the same way, with the same exit codes.
    again = run("verify-onnx", out, checkpoint, "--json", tmp / "v.json")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp / "v.json").read_text())["ok"]
    bad = run("verify-onnx", nout, checkpoint, "-q")
    assert bad.exit_code == 1 and "blocks.0.0.bn1" in text_of(bad)


def test_dynamic_batch_runs_at_batch_1_and_3(resnet):
    tmp, checkpoint, (_, out, _), _ = resnet
    model = load(checkpoint)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------------------------- BN folding
def test_bn_star_model_exports_folded_with_no_batchnorm_nodes(tmp_path):
    checkpoint = tmp_path / "bnstar.safetensors"
    assert run("convert", "timm:test_resnet", *SMALL, "--freeze", "*", "-o", checkpoint, "-q").exit_code == 0
    result, out, data = export(tmp_path, checkpoint, "bnstar")
    assert result.exit_code == 0, result.output
    counts = ops(out)
    assert "BatchNormalization" not in counts
    assert "Mul" not in counts and "Add" in counts  # no BN* affine left: every one is inside a conv
    assert len(data["folds"]) == 15 and {f["action"] for f in data["folds"]} == {"folded"}
    assert data["verification"]["model"][0]["max_rel"] < 1e-5  # folded ONNX vs the BN* model


def test_fold_for_export_folds_plain_batchnorm_exactly():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))).eval()
    x = torch.randn(2, 3, 8, 8)
    folded, rows = fold_for_export(model, x)
    assert rows == [{"path": "1", "action": "folded", "producer": "0", "note": ""}]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(model[1], nn.BatchNorm2d)  # the input model is untouched
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ corrupted ONNX graphs
def _layer_nodes(model, path: str) -> list:
    found = []
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == SCOPES_KEY and path in ast.literal_eval(prop.value):
                found.append(node)
    return found


def test_wrong_epsilon_in_the_graph_fails_and_names_the_layer(resnet, tmp_path):
    _, checkpoint, (_, out, _), _ = resnet
    model = onnx.load(str(out))
    (norm,) = [n for n in _layer_nodes(model, "bn1") if n.op_type == "InstanceNormalization"]
    for attr in norm.attribute:
        if attr.name == "epsilon":
            attr.f = 1e-2
    bad = tmp_path / "eps.onnx"
    onnx.save(model, str(bad))
    result = run("verify-onnx", bad, checkpoint, "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    assert "1 GN layer(s) out of limits (bn1)" in text_of(result)
    row = {r["path"]: r for r in json.loads((tmp_path / "r.json").read_text())["layers"]}["bn1"]
    assert "graph uses eps=0.01, the module eps=1e-05" in row["problems"]
    assert not row["cases"]["activation, batch 3"]["ok"]  # and the numbers show it


def test_wrong_group_count_in_the_graph_fails_and_names_the_layer(resnet, tmp_path):
    _, checkpoint, (_, out, _), _ = resnet
    model = onnx.load(str(out))
    nodes = _layer_nodes(model, "layer1.0.bn1")
    norm = next(n for n in nodes if n.op_type == "InstanceNormalization")
    reshape = next(n for n in nodes if n.op_type == "Reshape" and n.output[0] == norm.input[0])
    wrong = 8  # the module has 16 groups; a consistent graph with 8 (scale/bias resized too)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, wrong, -1], np.int64), "bad_shape"),
            numpy_helper.from_array(np.ones(wrong, np.float32), "bad_scale"),
            numpy_helper.from_array(np.zeros(wrong, np.float32), "bad_bias"),
        ]
    )
    reshape.input[1] = "bad_shape"
    norm.input[1], norm.input[2] = "bad_scale", "bad_bias"
    bad = tmp_path / "groups.onnx"
    onnx.save(model, str(bad))
    result = run("verify-onnx", bad, checkpoint, "--json", tmp_path / "r.json")
    assert result.exit_code == 1, result.output
    assert "(layer1.0.bn1)" in text_of(result)
    data = json.loads((tmp_path / "r.json").read_text())
    assert [r["path"] for r in data["layers"] if not r["ok"]] == ["layer1.0.bn1"]
    row = next(r for r in data["layers"] if r["path"] == "layer1.0.bn1")
    assert "graph uses G=8, the module G=16" in row["problems"]
    assert row["cases"]["activation, batch 3"]["max_abs"] > 1e-2


def test_graph_without_metadata_is_matched_by_pattern(resnet, tmp_path):
    _, checkpoint, (_, out, _), _ = resnet
    model = onnx.load(str(out))
    for node in model.graph.node:
        del node.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(model, str(stripped))
    result = run("verify-onnx", stripped, checkpoint, "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["layers"]) == 15 and {r["mapped_by"] for r in data["layers"]} == {"pattern"}


def test_real_images_are_compared(resnet, tmp_path):
    from PIL import Image

    _, checkpoint, (_, out, _), _ = resnet
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(images / f"{i}.png")
    result = run("verify-onnx", out, checkpoint, "--data", images, "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "r.json").read_text())["model"]
    assert rows[-1]["input"].startswith("images from") and rows[-1]["batch"] == 3
    assert rows[-1]["top1_agreement"] == 1.0


# ------------------------------------------------------------------ hand-built model, library API
class TinyGN(nn.Module):
    """GN on 4-D, GN without affine, and GN on (N, C) features: the three decomposition branches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.gn_plain = nn.GroupNorm(2, 8, affine=False)
        self.gn_flat = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.gn(self.conv(x)))
        x = self.gn_plain(self.conv2(x)).mean((2, 3))
        return self.head(self.gn_flat(x))


def test_hand_built_model_library_api():
    torch.manual_seed(0)
    model = TinyGN().eval()
    with torch.no_grad():
        model.gn.weight.uniform_(0.5, 1.5)
        model.gn_flat.bias.normal_()
    proto = export_model(model, torch.randn(1, 3, 12, 12))
    report = verify_model(proto, model, DataConfig(input_size=(3, 12, 12)), VerifyOptions(batch=2))
    assert report.ok, report.headline()
    assert [r["path"] for r in report.layers] == ["gn", "gn_plain", "gn_flat"]
    assert report.to_dict()["tolerance"]["rtol"] == 1e-6


def test_stress_inputs_are_what_they_claim():
    cases = stress_inputs((8, 4, 4), groups=4, batch=3, seed=0)
    x = cases[NATIVE_NAN_CASE]
    assert x.shape == (1, 8, 4, 4) and abs(x.mean() - 100) < 0.01 and abs(x.std() - 0.01) < 0.005
    offsets = cases["mean 100..300, std 0.01, batch 3"].mean((1, 2, 3))
    torch.testing.assert_close(offsets, torch.tensor([100.0, 200.0, 300.0]), atol=0.01, rtol=0)
    assert abs(cases["mean 1000, std 1, batch 3"].mean() - 1000) < 0.2
    groups = cases["near-constant groups, batch 3"].reshape(3, 4, -1)
    assert (groups[:, 0::2].std(-1) == 0).all() and (groups[:, 1::2].std(-1) < 2e-3).all()


# ---------------------------------------------------------------------------------- bad inputs
def test_bad_options_exit_2_with_one_sentence(resnet, tmp_path):
    _, checkpoint, (_, out, _), _ = resnet
    assert_bad_input(
        run("export-onnx", checkpoint, "-o", tmp_path / "m.onnx", "--gn-op", "native", "--opset", "18"),
        "--gn-op native needs --opset 21",
    )
    assert_bad_input(run("export-onnx", checkpoint, "-o", tmp_path / "m.onnx", "--gn-op", "fused"), "--gn-op 'fused'")
    assert_bad_input(run("export-onnx", checkpoint, "-o", tmp_path / "m.pb"), "must end in .onnx")
    assert_bad_input(run("export-onnx", checkpoint, "-o", tmp_path / "no" / "m.onnx"), "does not exist")
    assert_bad_input(run("export-onnx", checkpoint, "-o", tmp_path / "m.onnx", "--batch", "1"), "--batch must be")
    assert_bad_input(run("verify-onnx", tmp_path / "missing.onnx", checkpoint), "ONNX file", "does not exist")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a protobuf" * 20)
    assert_bad_input(run("verify-onnx", garbage, checkpoint), f"cannot read ONNX file {garbage}")
    assert_bad_input(run("verify-onnx", out, "timm:no_such_net"), "unknown timm model")


def test_model_with_two_inputs_is_refused(resnet, tmp_path):
    _, checkpoint, (_, out, _), _ = resnet
    model = onnx.load(str(out))
    model.graph.input.append(helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    two = tmp_path / "two.onnx"
    onnx.save(model, str(two))
    assert_bad_input(run("verify-onnx", two, checkpoint), "the ONNX model has 2 inputs")
