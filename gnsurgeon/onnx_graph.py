"""The ONNX side of GN verification: index a graph, find every GroupNorm call in it, read back the G
and eps the graph really uses, and cut each call out as a model of its own.

Why a module of its own: this is pure graph work on an ``onnx.ModelProto``, testable on a hand-built
graph, with no PyTorch model and no runtime involved; :mod:`gnsurgeon.onnx_verify` runs what it finds.

A GN call is found two ways, in this order:

1. **By metadata**: the dynamo exporter writes the module path of every node into its
   ``pkg.torch.onnx.name_scopes`` metadata, so the nodes of a GN module (whatever they are: timm's
   GroupNormAct brings its activation along) are collected by path and split into one connected
   piece per call.
2. **By pattern**, for files without that metadata (other exporters, edited graphs): each GN
   *lowering* the exporters write is one :class:`Lowering` in :data:`LOWERINGS`: the op at its
   centre, a ``match`` that grows the subgraph around it, and a ``read`` that returns its G and eps.
   Pattern matches are assigned to the modules in graph order against call order. A new lowering
   is one more entry there, nothing else: ``native`` (GroupNormalization), ``decomposed``
   (InstanceNormalization) and ``layernorm`` (LayerNormalization over (N, G, C/G·H·W)) are listed.

What ``export-onnx`` decided about the lowering (which one, why, with which onnxruntime) is written
into the model's ``metadata_props`` under :data:`METADATA_PREFIX`; :func:`export_metadata` reads it
back for ``verify-onnx``.

Stage: graph reading for ONNX verification. It imports onnx and numpy (and :mod:`gnsurgeon.errors`),
never torch or onnxruntime. onnx itself is imported inside the functions that build or read protos:
``import gnsurgeon`` must not pay its ~1 s.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import GNSurgeonError

__all__ = [
    "LOWERINGS",
    "METADATA_PREFIX",
    "SCOPES_KEY",
    "GNSubgraph",
    "Lowering",
    "OnnxGraph",
    "extract_subgraph",
    "find_by_metadata",
    "find_by_pattern",
    "export_metadata",
    "locate_group_norms",
    "model_input",
    "model_opset",
    "node_scopes",
    "read_group_norm",
]

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
METADATA_PREFIX = "gnsurgeon."  # model-level metadata_props written by export-onnx
DEFAULT_EPS = 1e-5  # GroupNormalization's and InstanceNormalization's default epsilon


@dataclass
class GNSubgraph:
    """The nodes of one GN call in the ONNX graph, between one input tensor and one output tensor."""

    path: str
    nodes: list
    entry: str
    exit: str
    form: str  # the Lowering's form (native | decomposed | layernorm), or "other" when none matches
    mapped_by: str  # metadata | pattern
    graph_groups: int | None = None
    graph_eps: float | None = None


class OnnxGraph:
    """Index over a graph: producers, consumers, constants (initializers and what folds from them)."""

    def __init__(self, model) -> None:
        self.model = model
        graph = model.graph
        self.nodes = list(graph.node)
        self.order = {id(n): i for i, n in enumerate(self.nodes)}
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.consumers[name].append(n)
        self.outputs = {o.name for o in graph.output}
        self.constant = set(self.initializers) | {t.values.name for t in graph.sparse_initializer}
        for n in self.nodes:  # nodes are topologically sorted in a valid model
            if n.op_type == "Constant" or (
                n.input and all(not i or i in self.constant for i in n.input) and not n.op_type.startswith("Random")
            ):
                self.constant.update(o for o in n.output if o)
        typed = (*graph.input, *graph.value_info, *graph.output)
        self.elem_type = {vi.name: vi.type.tensor_type.elem_type for vi in typed}

    def value(self, name: str) -> np.ndarray | None:
        """The numpy value of a constant tensor, or None when it is not a plain constant."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
        return None

    def constant_closure(self, names: Iterable[str]) -> list:
        """The nodes outside a subgraph that compute the constants it reads (Constant, folded ops)."""
        seen, stack, needed = set(), [n for n in names if n in self.constant], []
        while stack:
            name = stack.pop()
            node = self.producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            needed.append(node)
            stack.extend(i for i in node.input if i)
        return needed


# ----------------------------------------------------------------------------- GN lowerings
Match = tuple[list, str, str]  # (nodes, entry tensor, exit tensor)


@dataclass(frozen=True)
class Lowering:
    """One way an exporter writes GroupNorm.

    ``anchor`` is the op type at its centre; ``match(graph, anchor_node)`` grows the whole subgraph
    around that node (None when the surroundings are not this lowering); ``read(graph, anchor_node)``
    returns the ``(G, eps)`` it computes with (None for what the graph does not say).
    """

    form: str
    anchor: str
    match: Callable[[OnnxGraph, Any], Match | None]
    read: Callable[[OnnxGraph, Any], tuple[int | None, float | None]]


def _match_native(graph: OnnxGraph, node) -> Match:
    """``GroupNormalization``: one node, affine included."""
    return [node], node.input[0], node.output[0]


def _read_native(graph: OnnxGraph, node) -> tuple[int | None, float]:
    groups, eps = None, DEFAULT_EPS
    for attr in node.attribute:
        if attr.name == "num_groups":
            groups = int(attr.i)
        elif attr.name == "epsilon":
            eps = float(attr.f)
    return groups, eps


def _match_decomposed(graph: OnnxGraph, node) -> Match | None:
    """``Reshape -> InstanceNormalization -> Reshape`` (the shape maybe from a ``Shape``), then an
    optional affine tail."""
    head = graph.producer.get(node.input[0])
    users = graph.consumers.get(node.output[0], [])
    if head is None or head.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "Reshape":
        return None
    back = users[0]
    extra = [graph.producer[i] for i in back.input[1:] if i in graph.producer and i not in graph.constant]
    tail, exit_name = _affine_tail(graph, back.output[0])
    return [head, node, *[e for e in extra if e.op_type == "Shape"], back, *tail], head.input[0], exit_name


def _affine_tail(graph: OnnxGraph, name: str) -> tuple[list, str]:
    """After the reshape back: an optional per-channel Mul/Add chain or one depthwise 1x1 Conv."""
    nodes = []
    for _ in range(2):
        users = graph.consumers.get(name, [])
        if len(users) != 1 or name in graph.outputs:
            break
        user = users[0]
        if user.op_type in ("Mul", "Add") and any(i in graph.constant for i in user.input if i != name):
            nodes.append(user)
            name = user.output[0]
        elif user.op_type == "Conv" and not nodes and all(i in graph.constant for i in user.input[1:] if i):
            nodes.append(user)
            return nodes, user.output[0]
        else:
            break
    return nodes, name


def _read_decomposed(graph: OnnxGraph, node) -> tuple[int | None, float]:
    """eps from the InstanceNormalization; G from the channel axis of the Reshape that feeds it."""
    eps = next((float(a.f) for a in node.attribute if a.name == "epsilon"), DEFAULT_EPS)
    reshape = graph.producer.get(node.input[0])
    if reshape is not None and reshape.op_type == "Reshape":
        shape = graph.value(reshape.input[1])
        if shape is not None and shape.ndim == 1 and len(shape) >= 2 and int(shape[1]) > 0:
            return int(shape[1]), eps
    return None, eps


def _match_layernorm(graph: OnnxGraph, node) -> Match | None:
    """``Reshape -> LayerNormalization(axis=2) -> Reshape``, then an optional affine tail; the scale
    may be computed from the reshaped tensor's shape (``Shape -> Expand``: dynamic H/W)."""
    head = graph.producer.get(node.input[0])
    users = graph.consumers.get(node.output[0], [])
    if head is None or head.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "Reshape":
        return None
    axis = next((int(a.i) for a in node.attribute if a.name == "axis"), -1)
    if axis not in (2, -1) or any(o for o in node.output[1:]):
        return None  # not over the groups of a (N, G, -1) reshape, or its statistics are used elsewhere
    feeders = _shape_feeders(graph, node.input[1:], head.output[0])
    if feeders is None:
        return None
    back = users[0]
    extra = _shape_feeders(graph, back.input[1:], head.input[0]) or []
    tail, exit_name = _affine_tail(graph, back.output[0])
    return [head, *feeders, node, *extra, back, *tail], head.input[0], exit_name


_SHAPE_OPS = {"Shape", "Slice", "Gather", "Concat", "Expand", "ConstantOfShape", "Cast", "CastLike", "Unsqueeze"}


def _shape_feeders(graph: OnnxGraph, names, source: str) -> list | None:
    """The non-constant nodes that compute ``names`` from ``source``'s shape (shape arithmetic only),
    or None when something else feeds them."""
    found, stack, seen = [], [n for n in names if n and n not in graph.constant], set()
    while stack:
        node = graph.producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        if node.op_type not in _SHAPE_OPS:
            return None
        seen.add(id(node))
        found.append(node)
        stack.extend(i for i in node.input if i and i != source and i not in graph.constant)
    return sorted(found, key=lambda n: graph.order[id(n)])


def _read_layernorm(graph: OnnxGraph, node) -> tuple[int | None, float]:
    """eps from the LayerNormalization; G from the channel axis of the Reshape that feeds it."""
    eps = next((float(a.f) for a in node.attribute if a.name == "epsilon"), DEFAULT_EPS)
    return _read_decomposed(graph, node)[0], eps


# Most specific first: a subgraph holding several anchors is described by the first lowering listed.
LOWERINGS: tuple[Lowering, ...] = (
    Lowering("native", "GroupNormalization", _match_native, _read_native),
    Lowering("decomposed", "InstanceNormalization", _match_decomposed, _read_decomposed),
    Lowering("layernorm", "LayerNormalization", _match_layernorm, _read_layernorm),
)


def read_group_norm(graph: OnnxGraph, nodes: list) -> tuple[str, int | None, float | None]:
    """``(form, G, eps)`` of the GN computed by ``nodes``: what the graph really uses, to compare with
    the module's. ``("other", None, None)`` when no known lowering's anchor is among them."""
    for lowering in LOWERINGS:
        anchors = [n for n in nodes if n.op_type == lowering.anchor]
        if anchors:
            groups, eps = lowering.read(graph, anchors[-1])
            return lowering.form, groups, eps
    return "other", None, None


def _subgraph(graph: OnnxGraph, path: str, match: Match, mapped_by: str) -> GNSubgraph:
    nodes, entry, exit_name = match
    form, groups, eps = read_group_norm(graph, nodes)
    return GNSubgraph(path, nodes, entry, exit_name, form, mapped_by, groups, eps)


# ------------------------------------------------------------------------------- locating
def node_scopes(node) -> list[str]:
    """The module paths the exporter's metadata puts ``node`` in, outermost first ([] without any)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    return []


def _components(nodes: list, graph: OnnxGraph) -> list[list]:
    """Split nodes into connected pieces (one per call when a module runs twice)."""
    parent = {id(n): id(n) for n in nodes}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    produced = {o: n for n in nodes for o in n.output if o}
    for n in nodes:
        for name in n.input:
            src = produced.get(name)
            if src is not None:
                parent[find(id(n))] = find(id(src))
    groups: dict[int, list] = defaultdict(list)
    for n in nodes:
        groups[find(id(n))].append(n)
    pieces = [sorted(g, key=lambda n: graph.order[id(n)]) for g in groups.values()]
    return sorted(pieces, key=lambda g: graph.order[id(g[0])])


def _boundary(
    nodes: list, graph: OnnxGraph, own: list | None = None, ignore: frozenset[int] = frozenset()
) -> tuple[list[str], list[str]]:
    """``(entries, exits)``: activation tensors read from outside ``nodes``; tensors made by ``own``
    (default: all of ``nodes``) that are returned or read outside by a node not in ``ignore``."""
    inside = {id(n) for n in nodes}
    produced = {o for n in nodes for o in n.output if o}
    entries = []
    for n in nodes:
        for name in n.input:
            if name and name not in produced and name not in graph.constant and name not in entries:
                entries.append(name)
    exits = []
    for name in (o for n in (nodes if own is None else own) for o in n.output if o):
        readers = [c for c in graph.consumers.get(name, []) if id(c) not in inside and id(c) not in ignore]
        if (readers or name in graph.outputs) and name not in exits:
            exits.append(name)
    return entries, exits


def _borrowed(piece: list, graph: OnnxGraph, owner: dict[int, str], path: str) -> list:
    """The nodes of another GN layer that ``piece`` (a call of ``path``) starts from, or [].

    Two layers that normalise the same tensor with the same G and eps (LeViT's ``head.bn`` and
    ``head_dist.bn``, both BatchNorm1d of one pooled feature) are exported once: the exporter's
    common-subexpression pass keeps one Reshape -> InstanceNormalization -> Reshape, scoped to the
    first layer, and the second layer's own nodes are only its affine. Such a piece holds no
    lowering's anchor and reads a tensor made by the other layer's nodes: those nodes, up from that
    tensor, are its normalisation too."""
    anchors = {lowering.anchor for lowering in LOWERINGS}
    if any(n.op_type in anchors for n in piece):
        return []
    inside = {id(n) for n in piece}
    stack = [i for n in piece for i in n.input if i and i not in graph.constant]
    borrowed: dict[int, Any] = {}
    while stack:
        node = graph.producer.get(stack.pop())
        if node is None or id(node) in inside or id(node) in borrowed or owner.get(id(node)) in (None, path):
            continue
        borrowed[id(node)] = node
        stack.extend(i for i in node.input if i and i not in graph.constant)
    return sorted(borrowed.values(), key=lambda n: graph.order[id(n)])


def find_by_metadata(graph: OnnxGraph, paths: Iterable[str]) -> dict[str, list[GNSubgraph]]:
    """``{path: one subgraph per call}`` from the exporter's module metadata: a node belongs to the
    innermost of ``paths`` it is scoped in; pieces without exactly one input and one output are left
    out (they are not a GN call that can run on its own)."""
    paths = set(paths)
    assigned: dict[str, list] = defaultdict(list)
    owner: dict[int, str] = {}
    for node in graph.nodes:
        path = next((s for s in reversed(node_scopes(node)) if s in paths), None)
        if path is not None:
            assigned[path].append(node)
            owner[id(node)] = path
    pieces = [(path, piece) for path, nodes in assigned.items() for piece in _components(nodes, graph)]
    borrowed = [_borrowed(piece, graph, owner, path) for path, piece in pieces]
    # A layer that lends its normalisation is read by the borrower mid-way: not one of its exits.
    borrowers = frozenset(id(n) for (_, piece), lent in zip(pieces, borrowed, strict=True) if lent for n in piece)
    found: dict[str, list[GNSubgraph]] = {}
    for (path, piece), lent in zip(pieces, borrowed, strict=True):
        entries, exits = _boundary(lent + piece, graph, own=piece, ignore=borrowers)
        if len(entries) == 1 and len(exits) == 1:
            how = f"metadata (normalisation shared with {owner[id(lent[0])]})" if lent else "metadata"
            found.setdefault(path, []).append(_subgraph(graph, path, (lent + piece, entries[0], exits[0]), how))
    return found


def find_by_pattern(graph: OnnxGraph) -> list[GNSubgraph]:
    """Every match of a known lowering (:data:`LOWERINGS`), in graph order, with no path yet."""
    subs = []
    for node in graph.nodes:
        for lowering in LOWERINGS:
            match = lowering.match(graph, node) if node.op_type == lowering.anchor else None
            if match is not None:
                subs.append(_subgraph(graph, "", match, "pattern"))
                break
    return subs


def locate_group_norms(
    model, calls: dict[str, int], graph: OnnxGraph | None = None
) -> tuple[dict[str, list[GNSubgraph]], list[str]]:
    """Map every GN module call (``calls``: path -> times called, in call order) to its ONNX subgraph.

    Node metadata written by the dynamo exporter names the module of each node; files without it
    (other exporters, edited graphs) are matched by pattern, in graph order against call order, and
    only when the counts agree (a guess that could pair the wrong layers is not made).
    Returns ``(found, notes)``.
    """
    graph = graph or OnnxGraph(model)
    found = find_by_metadata(graph, calls)
    notes = []
    missing = [p for p in calls if p not in found]
    if missing:
        used = {id(n) for subs in found.values() for s in subs for n in s.nodes}
        spare = [s for s in find_by_pattern(graph) if not any(id(n) in used for n in s.nodes)]
        wanted = [p for p in calls if p in missing for _ in range(calls[p])]
        if len(spare) == len(wanted):
            for path, sub in zip(wanted, spare, strict=True):
                sub.path = path
                found.setdefault(path, []).append(sub)
            notes.append(f"{len(missing)} GN layer(s) matched by pattern in graph order (no module metadata)")
        elif spare:
            notes.append(
                f"{len(spare)} GN pattern(s) in the graph could not be matched to the {len(missing)} unmapped layer(s)"
            )
    return found, notes


# ------------------------------------------------------------------------------ extraction
def extract_subgraph(model, sub: GNSubgraph, rank: int, graph: OnnxGraph | None = None):
    """A standalone ONNX model computing ``sub``: input = the GN's input (``rank`` dynamic axes),
    output = its output, with the constants it reads (initializers, Constant and folded nodes)."""
    from onnx import TensorProto, helper

    graph = graph or OnnxGraph(model)
    consts = graph.constant_closure([i for n in sub.nodes for i in n.input])
    nodes = sorted({id(n): n for n in [*consts, *sub.nodes]}.values(), key=lambda n: graph.order[id(n)])
    names = {i for n in nodes for i in n.input}
    inits = [graph.initializers[n] for n in names if n in graph.initializers]
    elem = graph.elem_type.get(sub.entry, TensorProto.FLOAT) or TensorProto.FLOAT
    dims = [f"d{i}" for i in range(rank)]
    g = helper.make_graph(
        nodes,
        f"gn_{sub.path}",
        [helper.make_tensor_value_info(sub.entry, elem, dims)],
        [helper.make_tensor_value_info(sub.exit, elem, None)],
        initializer=inits,
    )
    out = helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


# ------------------------------------------------------------------------------- the input
def model_input(model) -> tuple[str, list]:
    """``(name, dims)`` of the model's one real input (initializers listed as inputs do not count);
    a dim is an int, or its symbolic name (``"?"`` when unnamed). A GNSurgeonError for other counts."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise GNSurgeonError(
            f"the ONNX model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "gnsurgeon verifies models that take one image tensor"
        )
    shape = inputs[0].type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]
    return inputs[0].name, dims


def model_opset(model) -> int | None:
    """The default-domain opset the model is written for (None when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def export_metadata(model) -> dict[str, str]:
    """What ``export-onnx`` recorded in the model's ``metadata_props`` (the lowering, why, the
    onnxruntime version it was verified with), keys without :data:`METADATA_PREFIX`; {} for files
    written elsewhere."""
    return {
        p.key[len(METADATA_PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)
    }
