"""Verify an ONNX model against its PyTorch source: the whole model, then every GroupNorm on its own.

Whole-graph comparisons on well-centred random inputs miss what breaks GN in deployment, so the
check has two levels:

1. **Whole model**: onnxruntime vs PyTorch (eval) on random inputs at batch 1 and batch > 1 (the
   dynamic batch axis must really work) and on real images when a folder is given: max abs / relative
   error and top-1 agreement.
2. **Every GN layer**: its subgraph is located in the ONNX graph (a native ``GroupNormalization``
   node, the ``Reshape -> InstanceNormalization -> Reshape -> affine`` decomposition, or anything else
   the exporter's ``pkg.torch.onnx.name_scopes`` metadata attributes to the module), mapped back to
   the module path, cut out into a model of its own and run in onnxruntime on the exact tensor
   PyTorch fed that layer (cloned before any in-place op can change it) and on stress inputs: a mean
   offset of 100 with std 0.01, mean 1000 with std 1, near-constant groups, at batch 1 and batch > 1.
   onnxruntime's native GroupNormalization computes the variance as E[x²] − E[x]² and returns NaN on
   the first of these; the InstanceNormalization form does not.

Tolerances, from float32 rounding (unit roundoff u = 6e-8):

* whole model: ``max|onnx − torch| <= atol + model_rtol · max|torch|``, model_rtol 1e-4 as in the
  freeze/fold check: float32 through a deep network gives ~1e-6 (resnet50 GN: 8e-7).
* one GN layer: ``max|onnx − torch| <= atol + rtol · κ · √m · max|torch|``, rtol 1e-6 (~17 u). κ is
  the conditioning of the input, max over groups of |mean| / sqrt(var + eps) (at least 1): ``x − mean``
  cancels κ-fold, so no float32 GN does better (PyTorch's own is 2e-4 relative off float64 at mean
  100 / std 0.01, κ = 1e4). √m is the typical growth of float32 summation error over a group of m
  values (onnxruntime's InstanceNormalization sums sequentially: ~2 u · κ · √m measured on groups of
  25088). Real activations (κ ~ 1) show errors ~1e-6 against limits of 1e-5 to 1e-3; eps off by 2x
  (1e-5 -> 2e-5) already fails the activation and near-constant inputs, a wrong G fails everything, and
  native GroupNormalization gives NaN or O(1) errors on the stress inputs.
"""

from __future__ import annotations

import ast
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import GNSurgeonError
from .options import NOT_IN_RECIPES
from .probe import flatten_outputs, make_probe_input
from .sources import DataConfig

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-6
DEFAULT_MODEL_RTOL = 1e-4


@dataclass
class VerifyOptions:
    """How ``verify-onnx`` (and the check after ``export-onnx``) compares onnxruntime with PyTorch."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL  # per GN layer, scaled by kappa * sqrt(group size)
    model_rtol: float = DEFAULT_MODEL_RTOL  # whole-model outputs
    batch: int = 3  # the batch > 1 used for whole-model and stress inputs
    data: str | None = field(default=None, metadata=NOT_IN_RECIPES)  # image folder for real inputs
    max_images: int = 8
    stress: bool = True
    seed: int = field(default=0, metadata=NOT_IN_RECIPES)

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "model_rtol"):
            value = getattr(self, name)
            if not value >= 0:
                raise GNSurgeonError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        if self.batch < 2:
            raise GNSurgeonError(f"--batch must be at least 2 (it is the batch > 1 that is checked), got {self.batch}")
        if self.max_images < 1:
            raise GNSurgeonError(f"--max-images must be at least 1, got {self.max_images}")


@dataclass
class VerifyReport:
    """Everything the verification found; ``ok`` is False when any comparison exceeded its limit."""

    onnx_file: str | None
    source: str | None
    options: VerifyOptions
    input_shape: list = field(default_factory=list)
    dynamic_batch: bool = True
    opset: int | None = None
    checker: str = ""
    model_checks: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failed_layers(self) -> list[str]:
        return [row["path"] for row in self.layers if not row["ok"]]

    def headline(self) -> str:
        """What failed, in one line: every failing layer by name, the first reason in full."""
        parts = [f for f in self.failures if not f.startswith("layer ")]
        layers = list(dict.fromkeys(self.failed_layers))
        if layers:
            names = ", ".join(layers[:10]) + (f", ... {len(layers) - 10} more" if len(layers) > 10 else "")
            first = next(f for f in self.failures if f.startswith("layer "))
            parts.append(f"{len(layers)} GN layer(s) out of limits ({names}); first: {first}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        opts = self.options
        return {
            "command": "verify-onnx",
            "gnsurgeon_version": __version__,
            "onnx_file": self.onnx_file,
            "source": self.source,
            "ok": self.ok,
            "failures": self.failures,
            "notes": self.notes,
            "tolerance": {
                "atol": opts.atol,
                "rtol": opts.rtol,
                "model_rtol": opts.model_rtol,
                "layer_rule": "max|onnx - torch| <= atol + rtol * kappa * sqrt(group size) * max|torch|",
                "model_rule": "max|onnx - torch| <= atol + model_rtol * max|torch|",
            },
            "input_shape": self.input_shape,
            "dynamic_batch": self.dynamic_batch,
            "opset": self.opset,
            "checker": self.checker,
            "model": self.model_checks,
            "layers": self.layers,
            "timings_s": self.timings,
        }


# ------------------------------------------------------------------------------------ ONNX graph
@dataclass
class GNSubgraph:
    """The nodes of one GN call in the ONNX graph, between one input tensor and one output tensor."""

    path: str
    nodes: list
    entry: str
    exit: str
    form: str  # native | decomposed | other
    mapped_by: str  # metadata | pattern
    graph_groups: int | None = None
    graph_eps: float | None = None


class _Graph:
    """Index over a graph: producers, consumers, constants (initializers and what folds from them)."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

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
        self._numpy = numpy_helper
        types = {}
        for vi in (*graph.input, *graph.value_info, *graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
        self.elem_type = types

    def value(self, name: str):
        """The numpy value of a constant tensor, or None when it is not a plain constant."""
        if name in self.initializers:
            return self._numpy.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self._numpy.to_array(attr.t)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
        return None

    def constant_closure(self, names) -> list:
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


def _scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return []
            return [str(v) for v in value] if isinstance(value, (list, tuple)) else []
    return []


def _components(nodes: list, graph: _Graph) -> list[list]:
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


def _boundary(nodes: list, graph: _Graph) -> tuple[list[str], list[str]]:
    """``(entries, exits)``: activation tensors read from outside, tensors read outside or returned."""
    inside = {id(n) for n in nodes}
    produced = {o for n in nodes for o in n.output if o}
    entries = []
    for n in nodes:
        for name in n.input:
            if name and name not in produced and name not in graph.constant and name not in entries:
                entries.append(name)
    exits = []
    for name in (o for n in nodes for o in n.output if o):
        outside = any(id(c) not in inside for c in graph.consumers.get(name, []))
        if (outside or name in graph.outputs) and name not in exits:
            exits.append(name)
    return entries, exits


def _describe(sub: GNSubgraph, graph: _Graph) -> None:
    """Fill in the form (native / decomposed / other) and the G and eps the graph really uses."""
    ops = {n.op_type: n for n in sub.nodes}
    if "GroupNormalization" in ops:
        node = ops["GroupNormalization"]
        sub.form = "native"
        for attr in node.attribute:
            if attr.name == "num_groups":
                sub.graph_groups = int(attr.i)
            elif attr.name == "epsilon":
                sub.graph_eps = float(attr.f)
        if sub.graph_eps is None:
            sub.graph_eps = 1e-5  # the operator's default
    elif "InstanceNormalization" in ops:
        node = ops["InstanceNormalization"]
        sub.form = "decomposed"
        sub.graph_eps = next((float(a.f) for a in node.attribute if a.name == "epsilon"), 1e-5)
        reshape = graph.producer.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape":
            shape = graph.value(reshape.input[1])
            if shape is not None and shape.ndim == 1 and len(shape) >= 2 and int(shape[1]) > 0:
                sub.graph_groups = int(shape[1])
    else:
        sub.form = "other"


def _by_metadata(graph: _Graph, calls: dict[str, int]) -> dict[str, list[GNSubgraph]]:
    paths = set(calls)
    assigned: dict[str, list] = defaultdict(list)
    for node in graph.nodes:
        owner = next((s for s in reversed(_scopes(node)) if s in paths), None)
        if owner is not None:
            assigned[owner].append(node)
    found: dict[str, list[GNSubgraph]] = {}
    for path, nodes in assigned.items():
        subs = []
        for piece in _components(nodes, graph):
            entries, exits = _boundary(piece, graph)
            if len(entries) != 1 or len(exits) != 1:
                continue
            sub = GNSubgraph(path, piece, entries[0], exits[0], "other", "metadata")
            _describe(sub, graph)
            subs.append(sub)
        if subs:
            found[path] = subs
    return found


def _affine_tail(graph: _Graph, name: str) -> tuple[list, str]:
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


def _by_pattern(graph: _Graph) -> list[GNSubgraph]:
    """Native nodes and Reshape -> InstanceNormalization -> Reshape -> affine chains, in graph order."""
    subs = []
    for node in graph.nodes:
        if node.op_type == "GroupNormalization":
            sub = GNSubgraph("", [node], node.input[0], node.output[0], "native", "pattern")
        elif node.op_type == "InstanceNormalization":
            head = graph.producer.get(node.input[0])
            users = graph.consumers.get(node.output[0], [])
            if head is None or head.op_type != "Reshape" or len(users) != 1 or users[0].op_type != "Reshape":
                continue
            back = users[0]
            extra = [graph.producer[i] for i in back.input[1:] if i in graph.producer and i not in graph.constant]
            tail, exit_name = _affine_tail(graph, back.output[0])
            nodes = [head, node, *[e for e in extra if e.op_type == "Shape"], back, *tail]
            sub = GNSubgraph("", nodes, head.input[0], exit_name, "decomposed", "pattern")
        else:
            continue
        _describe(sub, graph)
        subs.append(sub)
    return subs


def locate_group_norms(
    model, calls: dict[str, int], graph: _Graph | None = None
) -> tuple[dict[str, list[GNSubgraph]], list[str]]:
    """Map every GN module call (``calls``: path -> times called, in call order) to its ONNX subgraph.

    Node metadata written by the dynamo exporter names the module of each node; files without it
    (other exporters, edited graphs) are matched by pattern, in graph order against call order.
    Returns ``(found, notes)``.
    """
    graph = graph or _Graph(model)
    found = _by_metadata(graph, calls)
    notes = []
    missing = [p for p in calls if p not in found]
    if missing:
        used = {id(n) for subs in found.values() for s in subs for n in s.nodes}
        spare = [s for s in _by_pattern(graph) if not any(id(n) in used for n in s.nodes)]
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


def extract_subgraph(model, sub: GNSubgraph, rank: int, graph: _Graph | None = None):
    """A standalone ONNX model computing ``sub``: input = the GN's input, output = its output."""
    from onnx import TensorProto, helper

    graph = graph or _Graph(model)
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


# ------------------------------------------------------------------------------------- numerics
def group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, group) ``(mean, var)`` of ``x`` (float32, biased variance)."""
    var, mean = torch.var_mean(x.detach().float().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, var


def kappa(stats: tuple[torch.Tensor, torch.Tensor], eps: float) -> float:
    """Conditioning of GN on an input with these group stats: max |mean| / sqrt(var + eps), at least 1."""
    mean, var = stats
    return max(1.0, float((mean.abs() / torch.sqrt(var + eps)).max()))


def compare(out: np.ndarray, ref: np.ndarray, limit_scale: float, atol: float, rtol: float) -> dict:
    """Max abs / relative error of ``out`` vs ``ref``; ok when max abs <= atol + rtol·limit_scale·max|ref|."""
    out, ref = np.asarray(out), np.asarray(ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    limit = atol + rtol * limit_scale * scale
    if out.shape != ref.shape:
        return {"ok": False, "problem": f"shape {list(out.shape)}, expected {list(ref.shape)}", "limit": limit}
    nonfinite = int(out.size - np.isfinite(out).sum()) if out.size else 0
    if nonfinite:
        return {"ok": False, "max_abs": None, "max_rel": None, "nonfinite": nonfinite, "limit": limit}
    diff = float(np.abs(out - ref).max()) if out.size else 0.0
    return {
        "ok": diff <= limit,
        "max_abs": diff,
        "max_rel": diff / scale if scale > 0 else diff,
        "limit": limit,
    }


def stress_inputs(shape: tuple[int, ...], groups: int, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs that break naive variance formulas; ``shape`` is one sample's (C, ...) shape.

    Offsets differ per sample at batch > 1 so that statistics mixed across the batch (a batch size
    baked into a reshape) show up too.
    """
    gen = torch.Generator().manual_seed(seed)

    def noise(n: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=gen)

    per_sample = (1,) * len(shape)
    offsets = 100.0 * torch.arange(1, batch + 1, dtype=torch.float32).view(batch, *per_sample)
    channels = shape[0]
    # One level per (sample, group); odd groups wiggle by 1e-3 (variance below eps), even ones are constant.
    levels = torch.rand(batch, groups, 1, generator=gen) * 8 - 4
    wiggle = torch.zeros(batch, groups, 1)
    wiggle[:, 1::2] = 1e-3
    near = levels + wiggle * torch.randn(batch, groups, channels // groups * math.prod(shape[1:]), generator=gen)
    return {
        "mean 100, std 0.01, batch 1": 100 + 0.01 * noise(1),
        f"mean 100..{100 * batch}, std 0.01, batch {batch}": offsets + 0.01 * noise(batch),
        f"mean 1000, std 1, batch {batch}": 1000 + noise(batch),
        f"near-constant groups, batch {batch}": near.reshape(batch, *shape),
    }


def _session(model_or_path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported per check, not logged to stderr
    if threads:
        options.intra_op_num_threads = threads
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnxruntime_message(exc: BaseException) -> str:
    """The informative part of an onnx/onnxruntime exception message: after "Status Message:", without
    the C++ source location, last line (where onnxruntime puts the reason)."""
    text = str(exc).strip()
    if "Status Message:" in text:
        text = text.split("Status Message:", 1)[1]
        text = text.split(") ", 1)[1] if ".h:" in text.split(") ", 1)[0] else text  # drop the C++ location
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text[:240]


# ---------------------------------------------------------------------------------- PyTorch side
def group_norm_modules(model: nn.Module) -> dict[str, nn.GroupNorm]:
    """Every GN module (timm GroupNormAct included: it applies its act too) by path."""
    return {p: m for p, m in model.named_modules() if p and isinstance(m, nn.GroupNorm)}


def capture_inputs(model: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[dict[str, list], object]:
    """Run ``model`` on ``x``; return what each module in ``paths`` received, per call, cloned before
    anything can mutate it (in-place activations, ``+=``), and the model's output."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    for path in paths:

        def hook(_module, args, path=path):
            if args and isinstance(args[0], torch.Tensor):
                seen[path].append(args[0].detach().clone())

        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return dict(seen), out


# ------------------------------------------------------------------------------------ the checks
def _onnx_input(model) -> tuple[str, list]:
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


def _input_shape(dims: list, config: DataConfig, report: VerifyReport) -> tuple[int, ...]:
    size = tuple(config.input_size)
    if len(dims) != len(size) + 1:
        raise GNSurgeonError(
            f"the ONNX input has rank {len(dims)}, but the model's data config expects {len(size) + 1} "
            f"(N, {', '.join(map(str, size))})"
        )
    shape = tuple(d if isinstance(d, int) and d > 0 else s for d, s in zip(dims[1:], size, strict=True))
    if shape != size:
        report.notes.append(f"input size {list(shape)} taken from the ONNX file (data config says {list(size)})")
    return shape


def _load_images(options: VerifyOptions, config: DataConfig) -> torch.Tensor:
    from .data import ImageFolderData, collate_skip_broken, eval_transform

    dataset = ImageFolderData(options.data, eval_transform(config), limit=options.max_images, seed=options.seed)
    images, _, broken = collate_skip_broken([dataset[i] for i in range(len(dataset))])
    if images is None:
        raise GNSurgeonError(f"no readable image in {options.data} ({len(broken)} broken)")
    return images


def _top1(out: np.ndarray, ref: np.ndarray) -> float | None:
    if out.ndim != 2 or out.shape[1] < 2 or out.shape != ref.shape:
        return None
    return float((out.argmax(1) == ref.argmax(1)).mean())


def _check_model(session, input_name: str, refs: list[np.ndarray], name: str, x: torch.Tensor, opts) -> dict:
    row: dict = {"input": name, "batch": int(x.shape[0])}
    try:
        outs = session.run(None, {input_name: x.numpy()})
    except Exception as exc:  # onnxruntime raises its own exception types
        row.update(ok=False, problem=f"onnxruntime failed: {onnxruntime_message(exc)}")
        return row
    if len(outs) != len(refs):
        row.update(ok=False, problem=f"{len(outs)} ONNX outputs, PyTorch returns {len(refs)}")
        return row
    results = [compare(o, r, 1.0, opts.atol, opts.model_rtol) for o, r in zip(outs, refs, strict=True)]
    worst = max(results, key=_badness)
    row.update({k: worst[k] for k in ("max_abs", "max_rel", "limit", "nonfinite", "problem") if k in worst})
    row["ok"] = all(r["ok"] for r in results)
    row["top1_agreement"] = _top1(np.asarray(outs[0]), refs[0])
    return row


def _badness(result: dict) -> float:
    if result.get("max_abs") is None:
        return float("inf")
    return result["max_abs"] / result["limit"] if result["limit"] > 0 else float("inf")


def _layer_cases(activation: torch.Tensor, groups: int, opts: VerifyOptions, dynamic: bool, cache: dict) -> dict:
    """``{name: (input, group stats)}`` for one layer: what PyTorch fed it (at its batch and at batch 1),
    then the stress inputs, shared by layers of the same shape (building them is the slow part)."""
    stats = group_stats(activation, groups)
    cases = {f"activation, batch {activation.shape[0]}": (activation, stats)}
    if activation.shape[0] > 1:
        cases["activation, batch 1"] = (activation[:1], (stats[0][:1], stats[1][:1]))
    if opts.stress:
        key = (tuple(activation.shape[1:]), groups)
        if key not in cache:
            if len(cache) >= 6:  # a network cycles through a few shapes; keep memory bounded
                cache.pop(next(iter(cache)))
            inputs = stress_inputs(key[0], groups, opts.batch, opts.seed)
            cache[key] = {name: (x, group_stats(x, groups)) for name, x in inputs.items()}
        cases.update(cache[key])
    if not dynamic:  # a fixed batch axis: every input cut (or repeated) to the batch the file was made for
        fixed = activation.shape[0]
        cases = {
            name.replace(f"batch {x.shape[0]}", f"batch {fixed}"): _to_batch(x, stats, fixed)
            for name, (x, stats) in cases.items()
        }
    return cases


def _to_batch(x: torch.Tensor, stats: tuple, batch: int) -> tuple[torch.Tensor, tuple]:
    index = torch.arange(batch) % x.shape[0]
    return x[index], (stats[0][index], stats[1][index])


def _check_layer(graph: _Graph, sub: GNSubgraph, module: nn.GroupNorm, cases: dict, opts: VerifyOptions) -> dict:
    row: dict = {
        "path": sub.path,
        "form": sub.form,
        "mapped_by": sub.mapped_by,
        "channels": module.num_channels,
        "groups": module.num_groups,
        "eps": module.eps,
        "graph_groups": sub.graph_groups,
        "graph_eps": sub.graph_eps,
        "cases": {},
        "problems": [],
    }
    if sub.graph_groups is not None and sub.graph_groups != module.num_groups:
        row["problems"].append(f"graph uses G={sub.graph_groups}, the module G={module.num_groups}")
    if sub.graph_eps is not None and np.float32(sub.graph_eps) != np.float32(module.eps):
        row["problems"].append(f"graph uses eps={sub.graph_eps:.3g}, the module eps={module.eps:.3g}")
    if module.weight is not None and not module.weight.detach().any():
        row["note"] = "gamma = 0: the output is beta whatever the normalization computes"
    first = next(iter(cases.values()))[0]
    try:
        session = _session(extract_subgraph(graph.model, sub, first.dim(), graph))
    except Exception as exc:  # onnxruntime raises its own exception types
        row["problems"].append(f"its subgraph does not load in onnxruntime: {onnxruntime_message(exc)}")
        row["ok"] = False
        return row
    group_size = first[0].numel() // module.num_groups
    for name, (x, stats) in cases.items():
        x = x.contiguous()
        with torch.inference_mode():
            ref = module(x).float().numpy()
        k = kappa(stats, module.eps)
        try:
            out = session.run(None, {sub.entry: x.numpy()})[0]
        except Exception as exc:
            row["cases"][name] = {"ok": False, "problem": f"onnxruntime failed: {onnxruntime_message(exc)}", "kappa": k}
            continue
        result = compare(out, ref, k * math.sqrt(group_size), opts.atol, opts.rtol)
        result["kappa"] = k
        row["cases"][name] = result
    bad = [name for name, r in row["cases"].items() if not r["ok"]]
    row["ok"] = not bad and not row["problems"]
    row["failed_cases"] = bad
    return row


def _describe_failure(row: dict) -> str:
    parts = list(row["problems"])
    for name in row.get("failed_cases", []):
        r = row["cases"][name]
        if r.get("problem"):
            parts.append(f"{name}: {r['problem']}")
        elif r.get("max_abs") is None:
            parts.append(f"{name}: {r['nonfinite']} non-finite output(s) (NaN/inf) from onnxruntime")
        else:
            parts.append(f"{name}: max abs {r['max_abs']:.2e} > limit {r['limit']:.2e}")
    more = f" (and {len(parts) - 2} more)" if len(parts) > 2 else ""
    return f"layer {row['path']}: " + "; ".join(parts[:2]) + more


def verify_model(
    model,
    reference: nn.Module,
    config: DataConfig,
    options: VerifyOptions | None = None,
    *,
    onnx_file: str | None = None,
    source: str | None = None,
) -> VerifyReport:
    """Run the whole-model and per-GN-layer checks of ``model`` (an ``onnx.ModelProto``) against
    ``reference`` (the PyTorch model it should compute, put in eval mode here)."""
    import onnx

    options = options or VerifyOptions()
    reference = reference.float().eval()
    report = VerifyReport(onnx_file, source, options)
    report.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    start = time.perf_counter()
    try:
        onnx.checker.check_model(onnx_file if onnx_file else model, full_check=True)
        report.checker = "passed (full check)"
    except Exception as exc:  # ValidationError, InferenceError, ...
        report.checker = f"failed: {onnxruntime_message(exc)}"
        report.failures.append(f"onnx.checker rejects the model: {onnxruntime_message(exc)}")
    input_name, dims = _onnx_input(model)
    report.dynamic_batch = not isinstance(dims[0], int) or dims[0] <= 0
    shape = _input_shape(dims, config, report)
    report.input_shape = [dims[0] if not report.dynamic_batch else "batch", *shape]
    try:
        session = _session(onnx_file if onnx_file else model)
    except Exception as exc:
        raise GNSurgeonError(f"onnxruntime cannot load the ONNX model: {onnxruntime_message(exc)}") from None
    report.timings["load"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    static = None if report.dynamic_batch else dims[0]
    cfg = DataConfig(**{**config.to_dict(), "input_size": shape})
    batches = [1, options.batch] if static is None else [static]
    inputs = [(f"random, batch {b}", make_probe_input(cfg, batch=b, seed=options.seed + b)) for b in batches]
    if static is not None:
        report.notes.append(f"the ONNX input has a fixed batch of {static}: other batch sizes are not checked")
    if options.data:
        images = _load_images(options, cfg)
        if static is None or len(images) >= static:
            images = images if static is None else images[:static]
            inputs.append((f"images from {options.data}, batch {len(images)}", images))
        else:
            report.notes.append(f"{len(images)} image(s) cannot fill the fixed batch of {static}: images not checked")
    modules = group_norm_modules(reference)
    captured: dict[str, list[torch.Tensor]] = {}
    for i, (name, x) in enumerate(inputs):
        # The last input (real images when given, else the batch > 1) also records what each GN layer
        # receives: realistic activations for the per-layer check, at no extra forward pass.
        paths = list(modules) if i == len(inputs) - 1 else []
        captured, out = capture_inputs(reference, x, paths)
        refs = [t.float().numpy() for _, t in flatten_outputs(out)]
        row = _check_model(session, input_name, refs, name, x, options)
        report.model_checks.append(row)
        if not row["ok"]:
            why = row.get("problem") or (
                f"{row['nonfinite']} non-finite output(s)"
                if row.get("max_abs") is None
                else f"max abs {row['max_abs']:.2e} > limit {row['limit']:.2e}"
            )
            report.failures.append(f"model output on {name}: {why}")
    report.timings["model"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    calls = {p: len(captured[p]) for p in modules if p in captured}
    graph = _Graph(model)
    found, notes = locate_group_norms(model, calls, graph)
    report.notes.extend(notes)
    cache: dict = {}
    for path in calls:
        subs = found.get(path, [])
        for call, activation in enumerate(captured[path]):
            if call >= len(subs):
                missing = "no GN subgraph found in the ONNX graph"
                report.layers.append({"path": path, "ok": False, "problems": [missing]})
                report.failures.append(f"layer {path}: {missing}")
                continue
            cases = _layer_cases(activation, modules[path].num_groups, options, report.dynamic_batch, cache)
            row = _check_layer(graph, subs[call], modules[path], cases, options)
            if len(captured[path]) > 1:
                row["call"] = call
            report.layers.append(row)
            if not row["ok"]:
                report.failures.append(_describe_failure(row))
    unused = [p for p in modules if p not in calls]
    if unused:
        report.notes.append(f"{len(unused)} GN module(s) not called on the probe input: {', '.join(unused[:3])}")
    report.timings["layers"] = round(time.perf_counter() - start, 3)
    return report


def verify_onnx(
    onnx_file: str | Path,
    source: str,
    options: VerifyOptions | None = None,
    source_options=None,
) -> VerifyReport:
    """Check an existing ONNX file against the checkpoint or model source it should compute.

    ``source_options`` is a :class:`~gnsurgeon.conversion.ConvertOptions` for the source (weights,
    constructor kwargs, input size). Returns the report; ``report.ok`` is False when a check failed.
    """
    import onnx

    from .conversion import ConvertOptions, open_source

    options = options or VerifyOptions()
    path = Path(onnx_file)
    if not path.is_file():
        raise GNSurgeonError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError, missing external data
        raise GNSurgeonError(f"cannot read ONNX file {path}: {onnxruntime_message(exc)}") from None
    opened = open_source(source, source_options or ConvertOptions())
    _require_tensor_task(opened.data_config, source)
    return verify_model(model, opened.model, opened.data_config, options, onnx_file=str(path), source=str(source))


def _require_tensor_task(config: DataConfig, source: str) -> None:
    if config.task == "detection":
        raise GNSurgeonError(
            f"{source} is a detection model (a list of images in, boxes out); ONNX export and "
            "verification support models that take one image tensor"
        )


# ------------------------------------------------------------------------------------- rendering
def _fmt(value, spec: str = ".2e") -> str:
    return "-" if value is None else format(value, spec)


def model_table(report: VerifyReport):
    from rich.table import Table

    table = Table(title="Whole model: onnxruntime vs PyTorch", header_style="bold")
    for name in ("input", "max abs", "max rel", "limit", "top-1 agree", "status"):
        table.add_column(name, justify="left" if name in ("input", "status") else "right")
    for row in report.model_checks:
        status = "[green]ok[/]" if row["ok"] else f"[red]FAIL[/] {row.get('problem', '')}".strip()
        if row.get("nonfinite"):
            status = f"[red]FAIL[/] {row['nonfinite']} non-finite"
        top1 = row.get("top1_agreement")
        table.add_row(
            row["input"],
            _fmt(row.get("max_abs")),
            _fmt(row.get("max_rel")),
            _fmt(row.get("limit")),
            "-" if top1 is None else f"{top1:.0%}",
            status,
        )
    return table


def layer_table(report: VerifyReport):
    from rich.table import Table

    table = Table(title="Every GroupNorm: its ONNX subgraph in onnxruntime vs PyTorch", header_style="bold")
    for name in ("layer", "form", "G", "eps", "activation max abs", "worst stress input", "max abs", "limit", "status"):
        table.add_column(name, justify="left" if name in ("layer", "form", "worst stress input", "status") else "right")
    for row in report.layers:
        cases = row.get("cases", {})
        act = [r for n, r in cases.items() if n.startswith("activation")]
        stress = {n: r for n, r in cases.items() if not n.startswith("activation")}
        act_err = max((float("inf") if r.get("max_abs") is None else r["max_abs"] for r in act), default=None)
        worst_name = max(stress, key=lambda n: _badness(stress[n]), default=None)
        worst = stress.get(worst_name, {})
        if row["ok"]:
            status = "[green]ok[/]"
        elif row.get("problems"):
            status = "[red]FAIL[/] " + "; ".join(row["problems"])
        else:
            status = f"[red]FAIL[/] {len(row.get('failed_cases', []))} input(s)"
        eps = row.get("graph_eps") if row.get("graph_eps") is not None else row.get("eps")
        groups = row.get("graph_groups") if row.get("graph_groups") is not None else row.get("groups")
        worst_abs = worst.get("max_abs")
        table.add_row(
            row["path"] + (f" #{row['call']}" if "call" in row else ""),
            row.get("form", "-"),
            str(groups if groups is not None else "-"),
            _fmt(eps, ".0e"),
            "NaN/inf" if act_err == float("inf") else _fmt(act_err),
            worst_name or "-",
            "NaN/inf" if worst and worst_abs is None else _fmt(worst_abs),
            _fmt(worst.get("limit")),
            status,
        )
    return table
