"""Export a checkpoint or model source to ONNX for onnxruntime, with BN folded and every GN verified.

Defaults are chosen for the deployment that fails quietly otherwise:

* ``--gn-op decomposed`` (default): GN becomes ``Reshape -> InstanceNormalization -> Reshape`` and a
  per-channel affine written as a depthwise 1x1 ``Conv``. InstanceNormalization computes a centred
  variance, so it stays at float32 accuracy where onnxruntime's ``GroupNormalization`` (its function
  body computes E[x²] − E[x]²) returns NaN; every runtime runs it; and onnxruntime fuses the 1x1 conv
  with the activation and residual add that follow, which a ``Mul``/``Add`` affine blocks.
* ``--gn-op native`` emits ``GroupNormalization`` (opset >= 21, the first with per-channel scale);
  the stress check flags onnxruntime's precision problem on it rather than pass it.
* opset 18 for the decomposed form (the widest runtime support; the exporter's own minimum), 21 for
  native.
* a dynamic batch axis: a static export bakes the batch size into the graph.
* every BatchNorm frozen into BN* and folded into the conv/linear that produces its input, where that
  is exact (:mod:`gnsurgeon.fold`); what cannot fold stays a per-channel ``Mul``/``Add``, never a
  ``BatchNormalization`` node.

Stage: export, the last stage before deployment. It imports torch, onnx and onnxscript (the last two
inside functions, to keep ``import gnsurgeon`` light), the fold and surgery modules that prepare the
model, and :mod:`gnsurgeon.onnx_verify`, which checks the result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from . import __version__
from .errors import GNSurgeonError, VerificationError
from .files import check_output, write_atomically
from .fold import fold_into_producer, plan_folds
from .layers import FrozenBNAffine
from .onnx_verify import VerifyOptions, VerifyReport, onnxruntime_message, require_tensor_task, verify_model
from .options import NOT_IN_RECIPES
from .plan import Action, LayerPlan, Plan, Selection
from .probe import make_probe_input
from .sources import SourceOptions, open_source
from .surgery import apply_plan, make_plan, module_paths, replace_module

GN_OPS = ("decomposed", "native")
MIN_OPSET = 18  # torch.onnx's dynamo exporter starts at 18
NATIVE_MIN_OPSET = 21  # GroupNormalization-18 has per-group scale/bias (onnx#5466); 21 fixed it
DEFAULT_OPSET = {"decomposed": 18, "native": 21}


@dataclass
class ExportOptions:
    """Every option of ``gnsurgeon export-onnx`` except the source's (see SourceOptions)."""

    opset: int | None = None  # None: 18 for decomposed, 21 for native
    gn_op: str = "decomposed"
    dynamic_batch: bool = True
    verify: bool = True
    force: bool = field(default=False, metadata=NOT_IN_RECIPES)  # write the file even when verification fails
    checks: VerifyOptions = field(default_factory=VerifyOptions)

    def resolved_opset(self) -> int:
        """The opset to export at, or a GNSurgeonError naming the conflicting option."""
        if self.gn_op not in GN_OPS:
            raise GNSurgeonError(f"--gn-op {self.gn_op!r} is not one of {', '.join(GN_OPS)}")
        opset = self.opset if self.opset is not None else DEFAULT_OPSET[self.gn_op]
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise GNSurgeonError(f"--opset {opset} is outside what the exporter supports ({MIN_OPSET} to {newest})")
        if self.gn_op == "native" and opset < NATIVE_MIN_OPSET:
            raise GNSurgeonError(
                f"--gn-op native needs --opset {NATIVE_MIN_OPSET} or later (GroupNormalization before 21 has "
                f"per-group scale and bias, onnx#5466), got --opset {opset}"
            )
        return opset


@dataclass
class ExportedGraph:
    """The graph ``export-onnx`` produced: how it was written and what ``onnx.checker`` and an op count
    found in it."""

    opset: int
    gn_op: str
    dynamic_batch: bool
    input_shape: list
    group_norms: int = 0
    op_counts: dict = field(default_factory=dict)
    checker: str = ""


@dataclass
class ExportReport:
    """What ``export-onnx`` did: the graph it wrote, what was folded, and the verification."""

    source: str
    output: str
    graph: ExportedGraph
    written: bool = False
    folds: list[dict] = field(default_factory=list)
    verification: VerifyReport | None = None
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verification is None or self.verification.ok

    def to_dict(self) -> dict:
        graph = self.graph
        return {
            "command": "export-onnx",
            "gnsurgeon_version": __version__,
            "source": self.source,
            "output": self.output,
            "written": self.written,
            "ok": self.ok,
            "opset": graph.opset,
            "gn_op": graph.gn_op,
            "dynamic_batch": graph.dynamic_batch,
            "input_shape": graph.input_shape,
            "group_norms": graph.group_norms,
            "folds": self.folds,
            "op_counts": graph.op_counts,
            "checker": graph.checker,
            "timings_s": self.timings,
            "verification": self.verification.to_dict() if self.verification else None,
        }


# -------------------------------------------------------------------------------- BN folding
def _frozen_shim(frozen: FrozenBNAffine) -> SimpleNamespace:
    """A BN with the statistics that make ``frozen_affine_params`` return BN*'s (scale, shift) exactly:
    mean 0, var 1, eps 0, so the fold arithmetic in :mod:`gnsurgeon.fold` applies unchanged."""
    return SimpleNamespace(
        running_mean=torch.zeros_like(frozen.scale),
        running_var=torch.ones_like(frozen.scale),
        weight=frozen.scale,
        bias=frozen.shift,
        eps=0.0,
        drop=frozen.drop,
        act=frozen.act,
    )


def fold_for_export(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` (eval) with every BatchNorm frozen into BN* and every BN* folded into its
    producing conv/linear where that is exact. Returns the copy and one row per BN*: path, action
    (``folded`` or ``frozen``), producer, and why not where it did not fold."""
    plan = make_plan(model, selection=Selection(freeze=("*",)))
    prepared = apply_plan(model, plan).eval()  # a copy even when there is no BN left
    frozen = [(p, m) for p, m in prepared.named_modules() if p and isinstance(m, FrozenBNAffine)]
    if not frozen:
        return prepared, []
    entries = Plan(
        [
            LayerPlan(
                path=p, kind="FrozenBNAffine", channels=m.num_features, eps=m.eps, affine=True, action=Action.FROZEN
            )
            for p, m in frozen
        ]
    )
    decided = plan_folds(prepared, entries, example)
    _, aliases = module_paths(prepared)
    rows = []
    for lp in decided:
        if lp.action == Action.FOLDED:
            module = prepared.get_submodule(lp.path)
            replacement = fold_into_producer(prepared, lp, _frozen_shim(module))
            for path in aliases[id(module)]:
                replace_module(prepared, path, replacement)
        rows.append({"path": lp.path, "action": lp.action, "producer": lp.producer, "note": lp.note})
    return prepared.eval(), rows


# ------------------------------------------------------------------------------------ export
def _gn_decomposed(
    input,  # the aten schema's names: the exporter binds arguments by name
    num_groups: int,
    weight=None,
    bias=None,
    eps: float = 1e-05,
    cudnn_enabled: bool = True,
):
    """``aten.group_norm`` as Reshape -> InstanceNormalization -> Reshape -> depthwise 1x1 Conv.

    Traced by the dynamo exporter (onnxscript ops on symbolic values). The affine is a Conv rather
    than Mul + Add because onnxruntime fuses a constant-weight Conv with the activation and residual
    add after it (one pass instead of three); inputs without spatial axes keep Mul/Add.
    """
    from onnxscript import opset18 as op

    shape = list(input.shape)
    rank, channels, spatial = len(shape), shape[1], shape[2:]
    x = op.Reshape(input, op.Constant(value_ints=[0, num_groups, -1]))
    ones = op.CastLike(op.Constant(value_floats=[1.0] * num_groups), input)
    zeros = op.CastLike(op.Constant(value_floats=[0.0] * num_groups), input)
    x = op.InstanceNormalization(x, ones, zeros, epsilon=eps)
    static = all(isinstance(d, int) for d in [channels, *spatial])
    x = op.Reshape(x, op.Constant(value_ints=[0, channels, *spatial]) if static else op.Shape(input))
    if weight is None and bias is None:
        return x
    if static and rank >= 3:
        if weight is None:
            weight = op.CastLike(op.Constant(value_floats=[1.0] * channels), input)
        kernel = [1] * (rank - 2)
        w = op.Reshape(weight, op.Constant(value_ints=[channels, 1, *kernel]))
        if bias is None:
            return op.Conv(x, w, group=channels, kernel_shape=kernel)
        return op.Conv(x, w, bias, group=channels, kernel_shape=kernel)
    if rank > 2:  # (C,) -> (C, 1, ...) to broadcast over the spatial axes
        axes = op.Constant(value_ints=list(range(1, rank - 1)))
        weight = op.Unsqueeze(weight, axes) if weight is not None else None
        bias = op.Unsqueeze(bias, axes) if bias is not None else None
    # (N, C) inputs (BatchNorm1d turned GN: LeViT, MLP heads) broadcast as they are. An empty axes
    # Constant here made onnx_ir log "Attribute type is ambiguous" once per layer (48 lines on LeViT).
    if weight is not None:
        x = op.Mul(x, weight)
    if bias is not None:
        x = op.Add(x, bias)
    return x


@contextlib.contextmanager
def _quiet_loggers(names: tuple[str, ...] = ("onnx_ir", "onnxscript", "torch.onnx")):
    """The exporter's libraries log warnings per node to stderr (e.g. onnx_ir's "Attribute type is
    ambiguous" for an empty list attribute); the export is verified numerically instead, so they
    are held back to errors for its duration, as its warnings and prints already are."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_model(
    model: nn.Module,
    example: torch.Tensor,
    *,
    opset: int = 18,
    gn_op: str = "decomposed",
    dynamic_batch: bool = True,
):
    """``model`` (eval) -> ``onnx.ModelProto`` with the dynamo exporter; GN as ``gn_op`` asks.

    The batch axis is named ``batch`` and dynamic unless ``dynamic_batch`` is False. Node metadata
    that maps nodes to module paths is kept; stack traces (local file paths) are dropped.
    """
    table = {torch.ops.aten.group_norm.default: _gn_decomposed} if gn_op == "decomposed" else None
    if dynamic_batch and example.shape[0] < 2:
        example = torch.cat([example, example])  # torch.export specialises a size-1 axis to a constant
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with torch.no_grad():
        single = isinstance(model(example), torch.Tensor)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                input_names=["input"],
                output_names=["output"] if single else None,
                custom_translation_table=table,
                verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise many types
        reason = onnxruntime_message(exc)
        raise GNSurgeonError(f"torch.onnx could not export the model at opset {opset}: {reason}") from None
    proto = program.model_proto
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return proto


def _check_graph(proto, gn_op: str, group_norms: int) -> tuple[str, dict]:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise VerificationError(f"the exported model fails onnx.checker: {onnxruntime_message(exc)}") from None
    counts = Counter(n.op_type for n in proto.graph.node)
    if counts.get("BatchNormalization"):
        raise VerificationError(
            f"the exported graph still has {counts['BatchNormalization']} BatchNormalization node(s)"
        )
    native = counts.get("GroupNormalization", 0)
    if gn_op == "decomposed" and native:
        raise VerificationError(f"--gn-op decomposed, yet the graph has {native} GroupNormalization node(s)")
    if gn_op == "native" and group_norms and not native:
        raise VerificationError("--gn-op native, yet the exporter wrote no GroupNormalization node")
    return "passed (full check)", dict(sorted(counts.items()))


def export_onnx(
    source: str,
    output: str | Path,
    options: ExportOptions | None = None,
    source_options: SourceOptions | None = None,
) -> ExportReport:
    """Export ``source`` (``timm:``/``torchvision:`` name or gnsurgeon checkpoint) to ``output``.

    ``source_options`` is a :class:`~gnsurgeon.sources.SourceOptions` for opening the source
    (weights, constructor kwargs, ``input_size``). BN is folded, the graph checked with
    ``onnx.checker``, then verified (``options.verify``). The file is written only when verification
    passes, or with ``options.force``; ``report.ok`` says which.
    """
    options = options or ExportOptions()
    opset = options.resolved_opset()
    output = check_output(output, ".onnx")
    start = time.perf_counter()
    opened = open_source(source, source_options or SourceOptions())
    require_tensor_task(opened.data_config, source)
    reference = opened.model.float().eval()
    timings = {"build": round(time.perf_counter() - start, 3)}

    start = time.perf_counter()
    example = make_probe_input(opened.data_config, batch=1, seed=0)
    prepared, folds = fold_for_export(reference, example)
    group_norms = sum(isinstance(m, nn.GroupNorm) for m in prepared.modules())
    timings["fold"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    proto = export_model(prepared, example, opset=opset, gn_op=options.gn_op, dynamic_batch=options.dynamic_batch)
    timings["export"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    checker, counts = _check_graph(proto, options.gn_op, group_norms)
    timings["check"] = round(time.perf_counter() - start, 3)
    graph = ExportedGraph(
        opset=opset,
        gn_op=options.gn_op,
        dynamic_batch=options.dynamic_batch,
        input_shape=["batch" if options.dynamic_batch else 1, *opened.data_config.input_size],
        group_norms=group_norms,
        op_counts=counts,
        checker=checker,
    )
    report = ExportReport(source=str(source), output=str(output), graph=graph, folds=folds, timings=timings)
    if options.verify:
        start = time.perf_counter()
        report.verification = verify_model(proto, reference, opened.data_config, options.checks, source=str(source))
        report.verification.onnx_file = str(output)
        timings["verify"] = round(time.perf_counter() - start, 3)
    if report.ok or options.force:
        import onnx

        start = time.perf_counter()
        try:
            write_atomically(output, lambda tmp: onnx.save_model(proto, tmp))
        except ValueError as exc:  # protobuf's 2 GB limit
            raise GNSurgeonError(f"cannot write {output}: {onnxruntime_message(exc)}") from None
        report.written = True
        timings["save"] = round(time.perf_counter() - start, 3)
    return report


__all__ = [
    "ExportOptions",
    "ExportReport",
    "ExportedGraph",
    "export_model",
    "export_onnx",
    "fold_for_export",
]
