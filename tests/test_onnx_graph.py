"""onnx_graph on hand-built graphs: each GN lowering is found (by metadata and by pattern), its G and
eps are read back, and the extracted subgraph runs on its own.

No exporter involved: the graphs are written node by node, so each test says exactly which graph
shape it covers, and the module's promise (no torch, no onnxruntime) is checked on its source.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gnsurgeon.errors import GNSurgeonError
from gnsurgeon.onnx_graph import (
    SCOPES_KEY,
    OnnxGraph,
    extract_subgraph,
    find_by_pattern,
    locate_group_norms,
    model_input,
    model_opset,
    read_group_norm,
)

C, H, W = 8, 4, 4
PACKAGE = Path(__file__).resolve().parent.parent / "gnsurgeon"


def scoped(node, *scopes: str):
    """``node`` with the dynamo exporter's module metadata (outermost scope first)."""
    node.metadata_props.add(key=SCOPES_KEY, value=repr(["", *scopes]))
    return node


def native_nodes(x: str, y: str, name: str, groups: int, eps: float) -> tuple[list, list]:
    """GroupNormalization-21 (per-channel scale and bias)."""
    inits = [
        numpy_helper.from_array(np.linspace(0.5, 1.5, C).astype(np.float32), f"{name}_scale"),
        numpy_helper.from_array(np.linspace(-1, 1, C).astype(np.float32), f"{name}_bias"),
    ]
    node = helper.make_node(
        "GroupNormalization", [x, f"{name}_scale", f"{name}_bias"], [y], num_groups=groups, epsilon=eps
    )
    return [node], inits


def decomposed_nodes(x: str, y: str, name: str, groups: int, eps: float) -> tuple[list, list]:
    """Reshape -> InstanceNormalization -> Reshape (to Shape(x)) -> Mul -> Add, as torch.onnx writes GN."""
    inits = [
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), f"{name}_groups"),
        numpy_helper.from_array(np.ones(groups, np.float32), f"{name}_ones"),
        numpy_helper.from_array(np.zeros(groups, np.float32), f"{name}_zeros"),
        numpy_helper.from_array(np.linspace(0.5, 1.5, C).astype(np.float32).reshape(C, 1, 1), f"{name}_gamma"),
        numpy_helper.from_array(np.linspace(-1, 1, C).astype(np.float32).reshape(C, 1, 1), f"{name}_beta"),
    ]
    nodes = [
        helper.make_node("Reshape", [x, f"{name}_groups"], [f"{name}_r"]),
        helper.make_node(
            "InstanceNormalization", [f"{name}_r", f"{name}_ones", f"{name}_zeros"], [f"{name}_n"], epsilon=eps
        ),
        helper.make_node("Shape", [x], [f"{name}_shape"]),
        helper.make_node("Reshape", [f"{name}_n", f"{name}_shape"], [f"{name}_b"]),
        helper.make_node("Mul", [f"{name}_b", f"{name}_gamma"], [f"{name}_m"]),
        helper.make_node("Add", [f"{name}_m", f"{name}_beta"], [y]),
    ]
    return nodes, inits


def two_gn_model(metadata: bool = True):
    """input -> gn_a (native, G=4, eps 1e-3) -> Relu -> gn_b (decomposed, G=2, eps 2e-5) -> output."""
    a_nodes, a_inits = native_nodes("input", "a_out", "a", groups=4, eps=1e-3)
    b_nodes, b_inits = decomposed_nodes("relu_out", "output", "b", groups=2, eps=2e-5)
    if metadata:
        a_nodes = [scoped(n, "gn_a") for n in a_nodes]
        b_nodes = [scoped(n, "gn_b") for n in b_nodes]
    relu = helper.make_node("Relu", ["a_out"], ["relu_out"])
    graph = helper.make_graph(
        [*a_nodes, relu, *b_nodes],
        "two_gn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", C, H, W])],
        initializer=[*a_inits, *b_inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


def group_norm(x: np.ndarray, groups: int, eps: float, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    g = x.astype(np.float64).reshape(x.shape[0], groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(x.shape) * gamma.reshape(1, C, 1, 1) + beta.reshape(1, C, 1, 1)


def run(model, name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x})[0]


@pytest.mark.parametrize("metadata", [True, False])
def test_locate_finds_each_lowering_and_reads_g_and_eps_back(metadata):
    model = two_gn_model(metadata)
    found, notes = locate_group_norms(model, {"gn_a": 1, "gn_b": 1})
    (a,), (b,) = found["gn_a"], found["gn_b"]
    assert (a.form, a.graph_groups, a.graph_eps) == ("native", 4, pytest.approx(1e-3))
    assert (b.form, b.graph_groups, b.graph_eps) == ("decomposed", 2, pytest.approx(2e-5))
    assert (a.entry, a.exit) == ("input", "a_out") and (b.entry, b.exit) == ("relu_out", "output")
    assert [n.op_type for n in b.nodes] == ["Reshape", "InstanceNormalization", "Shape", "Reshape", "Mul", "Add"]
    assert {a.mapped_by, b.mapped_by} == {"metadata" if metadata else "pattern"}
    assert bool(notes) == (not metadata)  # the pattern fallback says so


def test_pattern_fallback_refuses_to_guess_when_counts_differ():
    found, notes = locate_group_norms(two_gn_model(metadata=False), {"gn_a": 1})
    assert found == {}
    assert notes == ["2 GN pattern(s) in the graph could not be matched to the 1 unmapped layer(s)"]


def test_a_module_called_twice_gives_one_subgraph_per_call():
    first, inits = native_nodes("input", "mid", "a", groups=4, eps=1e-5)
    relu = helper.make_node("Relu", ["mid"], ["relu_out"])  # another module between the two calls
    second = helper.make_node("GroupNormalization", ["relu_out", "a_scale", "a_bias"], ["output"], num_groups=4)
    graph = helper.make_graph(
        [scoped(first[0], "gn"), relu, scoped(second, "gn")],
        "twice",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", C, H, W])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", C, H, W])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    found, _ = locate_group_norms(model, {"gn": 2})
    assert [(s.entry, s.exit) for s in found["gn"]] == [("input", "mid"), ("relu_out", "output")]
    assert found["gn"][1].graph_eps == pytest.approx(1e-5)  # the operator's default when not written


@pytest.mark.parametrize("path, groups, eps", [("gn_a", 4, 1e-3), ("gn_b", 2, 2e-5)])
def test_extracted_subgraph_runs_on_its_own(path, groups, eps):
    model = two_gn_model()
    graph = OnnxGraph(model)
    found, _ = locate_group_norms(model, {path: 1}, graph)
    (sub,) = found[path]
    standalone = extract_subgraph(model, sub, 4, graph)
    x = np.random.default_rng(0).normal(3, 2, (2, C, H, W)).astype(np.float32)
    gamma, beta = np.linspace(0.5, 1.5, C), np.linspace(-1, 1, C)
    np.testing.assert_allclose(run(standalone, sub.entry, x), group_norm(x, groups, eps, gamma, beta), atol=1e-5)
    assert run(standalone, sub.entry, x[:1]).shape == (1, C, H, W)  # the batch axis stays dynamic


def test_input_opset_and_unknown_forms():
    model = two_gn_model()
    assert model_input(model) == ("input", ["batch", C, H, W]) and model_opset(model) == 21
    relu = [n for n in model.graph.node if n.op_type == "Relu"]
    assert read_group_norm(OnnxGraph(model), relu) == ("other", None, None)
    assert [s.form for s in find_by_pattern(OnnxGraph(model))] == ["native", "decomposed"]
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    with pytest.raises(GNSurgeonError, match="the ONNX model has 2 inputs"):
        model_input(model)


@pytest.mark.parametrize(
    "module, banned",
    [("onnx_graph.py", {"torch", "onnxruntime"}), ("report.py", {"torch", "onnx", "onnxruntime"})],
)
def test_light_modules_do_not_import_heavy_ones(module, banned):
    """onnx_graph stays pure ONNX; report.py is imported for ``--help`` and must not load torch/onnx."""
    tree = ast.parse((PACKAGE / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & banned
