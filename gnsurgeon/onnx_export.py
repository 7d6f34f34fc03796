"""Export a checkpoint or model source to ONNX for onnxruntime, with BN folded and every GN verified.

Defaults are chosen for the deployment that fails quietly otherwise:

* ``--gn-op auto`` (default): GN is written the way the installed onnxruntime computes exactly and
  fastest, chosen by running the candidate lowerings of one small GN on verification's stress inputs
  (:mod:`gnsurgeon.onnx_lowering`: ``decomposed`` InstanceNormalization, ``layernorm``
  LayerNormalization over the groups, ``native`` GroupNormalization-21), then, among those that
  pass, by timing the whole model exported in each at the thread count asked (one GN's time does
  not predict a model's). The choice, its reason and the onnxruntime version go into the file's
  metadata and the report; ``verify-onnx`` re-checks the file on the runtime at hand.
* opset 18 for the decomposed and layernorm forms (the widest runtime support; the exporter's own
  minimum), 21 for native (GroupNormalization before 21 has per-group scale and bias, onnx#5466).
* a dynamic batch axis: a static export bakes the batch size into the graph. Segmentation and
  detection models also get dynamic H and W (``--dynamic-size``): they are run at other sizes.
* every BatchNorm frozen into BN* and folded into the conv/linear that produces its input, where that
  is exact (:mod:`gnsurgeon.fold`); what cannot fold stays a per-channel ``Mul``/``Add``, never a
  ``BatchNormalization`` node.
* ``--center-groups`` (off): GN(x − s) = GN(x) for any per-group constant s, so each GN's per-group
  input mean on the probe is subtracted in the producing conv's bias, where the ``--fold`` rule says
  that conv's output goes to the GN alone. It lowers |mean|/std of the activations, which is what
  a runtime computing E[x²] − E[x]² (native GroupNormalization) loses accuracy to.

Exporters: torch.onnx's dynamo exporter for every model that ``torch.export`` traces; detection
models (a list of images in, boxes out) use its TorchScript exporter, because ``torch.export`` stops at
their data-dependent box filtering (``batched_nms``: "Could not guard on data-dependent expression").
Both write GN through the same lowering code.

Stage: export, the last stage before deployment. It imports torch, onnx and onnxscript (the last two
inside functions, to keep ``import gnsurgeon`` light), the fold, hooks and surgery modules that prepare
the model, :mod:`gnsurgeon.onnx_lowering` (the GN forms, auto) and :mod:`gnsurgeon.onnx_verify`,
which checks the result.
"""

from __future__ import annotations

import contextlib
import copy
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
from .fold import fold_affine_weights, fold_into_producer, plan_folds
from .hooks import capture
from .layers import FrozenBNAffine
from .metrics import max_errors
from .onnx_lowering import (
    FORMS,
    LoweringChoice,
    choice_metadata,
    choose_lowering,
    dynamo_translation,
    settle_by_timing,
    torchscript_symbolic,
)
from .onnx_verify import (
    VerifyOptions,
    VerifyReport,
    as_array,
    group_stats,
    kappa,
    onnxruntime_message,
    runtime_session,
    verify_model,
)
from .options import NOT_IN_RECIPES
from .plan import Action, LayerPlan, Plan, Selection
from .probe import flatten_outputs, make_probe_input
from .sources import SourceOptions, open_source
from .surgery import apply_plan, make_plan, module_paths, replace_module
from .verdicts import LayerMismatch

GN_OPS = ("auto", *FORMS)
MIN_OPSET = 18  # torch.onnx's dynamo exporter starts at 18
NATIVE_MIN_OPSET = 21  # GroupNormalization-18 has per-group scale/bias (onnx#5466); 21 fixed it
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter (detection models) writes opsets up to 20
DEFAULT_OPSET = {"auto": 18, "decomposed": 18, "layernorm": 18, "native": 21}
DYNAMIC_SIZE_TASKS = ("segmentation", "detection")  # run at other sizes than the probe's


@dataclass
class ExportOptions:
    """Every option of ``gnsurgeon export-onnx`` except the source's (see SourceOptions)."""

    opset: int | None = None  # None: 18, or 21 for native
    gn_op: str = "auto"  # auto | decomposed | layernorm | native
    dynamic_batch: bool = True
    dynamic_size: bool | None = None  # dynamic H and W; None: for segmentation and detection models
    center_groups: bool = False  # fold each GN's per-group input mean into its producer's bias, where exact
    verify: bool = True
    force: bool = field(default=False, metadata=NOT_IN_RECIPES)  # write the file even when verification fails
    checks: VerifyOptions = field(default_factory=VerifyOptions)

    def validate(self, torchscript: bool = False) -> None:
        """A GNSurgeonError naming the conflicting option, if any; ``torchscript``: the model needs the
        TorchScript exporter (detection), which stops at opset 20."""
        if self.gn_op not in GN_OPS:
            raise GNSurgeonError(f"--gn-op {self.gn_op!r} is not one of {', '.join(GN_OPS)}")
        import onnx

        newest = TORCHSCRIPT_MAX_OPSET if torchscript else onnx.defs.onnx_opset_version()
        opset = self.opset_for(self.gn_op)
        if self.gn_op == "native" and (opset < NATIVE_MIN_OPSET or torchscript):
            why = (
                "detection models export with the TorchScript exporter, which stops at opset 20"
                if torchscript
                else f"got --opset {opset}"
            )
            raise GNSurgeonError(
                f"--gn-op native needs --opset {NATIVE_MIN_OPSET} or later (GroupNormalization before 21 has "
                f"per-group scale and bias, onnx#5466); {why}"
            )
        if not MIN_OPSET <= opset <= newest:
            raise GNSurgeonError(f"--opset {opset} is outside what the exporter supports ({MIN_OPSET} to {newest})")

    def opset_for(self, form: str) -> int:
        """The opset a file with GN as ``form`` is written at: ``--opset``, else 18 (21 for native)."""
        return self.opset if self.opset is not None else DEFAULT_OPSET[form]

    def candidates(self, torchscript: bool = False) -> tuple[str, ...]:
        """The lowerings ``auto`` may pick: native only where its opset (21) is allowed."""
        if torchscript or (self.opset is not None and self.opset < NATIVE_MIN_OPSET):
            return tuple(f for f in FORMS if f != "native")
        return FORMS


@dataclass
class ExportedGraph:
    """The graph ``export-onnx`` produced: how it was written and what ``onnx.checker`` and an op count
    found in it."""

    opset: int
    gn_op: str
    dynamic_batch: bool
    input_shape: list
    dynamic_size: bool = False
    exporter: str = "dynamo"  # dynamo | torchscript (detection models)
    group_norms: int = 0
    op_counts: dict = field(default_factory=dict)
    checker: str = ""


@dataclass
class ExportReport:
    """What ``export-onnx`` did: the graph it wrote, the GN lowering and why, what was folded and
    centred, and the verification."""

    source: str
    output: str
    graph: ExportedGraph
    lowering: LoweringChoice | None = None
    written: bool = False
    folds: list[dict] = field(default_factory=list)
    centring: list[dict] = field(default_factory=list)
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
            "lowering": self.lowering.to_dict() if self.lowering else None,
            "exporter": graph.exporter,
            "dynamic_batch": graph.dynamic_batch,
            "dynamic_size": graph.dynamic_size,
            "input_shape": graph.input_shape,
            "group_norms": graph.group_norms,
            "folds": self.folds,
            "centring": self.centring,
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


# ------------------------------------------------------------------------------ GN centring
def center_groups(model: nn.Module, example) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` (eval) in which each GN's per-group input mean on ``example`` is subtracted in
    the bias of the conv/linear that produces the GN's input. Exact for any shift: GN(x − s) = GN(x)
    when s is constant within each group; done only where ``--fold``'s rule says the producer's output
    goes to that GN alone (:func:`gnsurgeon.fold.plan_folds`), and the shift is written with
    :func:`~gnsurgeon.fold.fold_affine_weights` (float64, one rounding). Returns the copy and one row
    per GN: path, producer, ``centred`` or ``kept`` (and why), the largest shift, and κ (max group
    |mean| / std, verification's conditioning) on ``example`` before and after.
    """
    centred = copy.deepcopy(model).eval()
    gns = {p: m for p, m in centred.named_modules() if p and isinstance(m, nn.GroupNorm)}
    if not gns:
        return centred, []
    plan = Plan(
        [
            LayerPlan(path=p, kind=type(m).__name__, channels=m.num_channels, eps=m.eps, affine=m.affine,
                      action=Action.FROZEN)  # fmt: skip
            for p, m in gns.items()
        ]
    )
    decided = plan_folds(centred, plan, example)
    before = capture(centred, example, inputs=list(gns), grad="inference").inputs
    rows = []
    for lp in decided:
        gn, calls = gns[lp.path], before.get(lp.path, [])
        row = {"path": lp.path, "producer": lp.producer, "action": "kept", "note": lp.note}
        if calls:
            row["kappa_before"] = kappa(group_stats(calls[0].first, gn.num_groups), gn.eps)
        if lp.action == Action.FOLDED and calls:
            shift = group_stats(calls[0].first, gn.num_groups)[0].double().mean(0)  # per group, over samples
            producer = centred.get_submodule(lp.producer)
            channels = gn.num_channels
            _, bias = fold_affine_weights(
                producer.weight, producer.bias, torch.ones(channels, dtype=torch.float64),
                -shift.repeat_interleave(channels // gn.num_groups),
            )  # fmt: skip
            with torch.no_grad():
                if producer.bias is None:
                    producer.bias = nn.Parameter(bias, requires_grad=producer.weight.requires_grad)
                else:
                    producer.bias.copy_(bias)
            row.update(action="centred", note="", max_shift=float(shift.abs().max()))
        rows.append(row)
    after = capture(centred, example, inputs=[r["path"] for r in rows if r["action"] == "centred"], grad="inference")
    for row in rows:
        if row["action"] == "centred":
            gn = gns[row["path"]]
            row["kappa_after"] = kappa(group_stats(after.inputs[row["path"]][0].first, gn.num_groups), gn.eps)
    return centred, rows


def _centring_drift(original: nn.Module, centred: nn.Module, example) -> float:
    """Max relative change of the model's outputs that centring caused, both run in float64: what is
    left is the rounding of the new biases (~1e-7). In float32 the difference would mostly be the
    original's own GN error on badly centred activations, which is what centring removes."""
    as64 = [t.double() for t in example] if isinstance(example, list) else example.double()
    with torch.inference_mode():
        a = flatten_outputs(copy.deepcopy(original).double()(as64))
        b = flatten_outputs(copy.deepcopy(centred).double()(as64))
    return max((max_errors(x, y)["max_rel"] for (_, x), (_, y) in zip(a, b, strict=True)), default=0.0)


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


# ------------------------------------------------------------------------------------ export
def _output_names(model: nn.Module, example) -> list[str] | None:
    """ONNX output names from the model's output structure: ``output`` for one tensor, the dict keys
    (``out``, ``aux``; ``boxes``, ``labels``, ``scores``) where they are unique."""
    with torch.no_grad():
        names = [n for n, _ in flatten_outputs(model(example))]
    if names == ["output"]:
        return names
    short = [n.split(".", 1)[1] if "." in n else n for n in names]
    return short if len(set(short)) == len(short) and all(short) else None


def export_model(
    model: nn.Module,
    example,
    *,
    opset: int = 18,
    gn_op: str = "decomposed",
    dynamic_batch: bool = True,
    dynamic_size: bool = False,
    name: str = "the model",
):
    """``model`` (eval) -> ``onnx.ModelProto``; GN as ``gn_op`` (one of FORMS) asks.

    A tensor ``example`` goes through the dynamo exporter: the batch axis is named ``batch`` and
    dynamic unless ``dynamic_batch`` is False, H and W (the last two axes) are ``height``/``width`` and
    dynamic when ``dynamic_size``; node metadata that maps nodes to module paths is kept, stack traces
    (local file paths) are dropped. A list of images (detection) goes through the TorchScript
    exporter: one image in, dynamic H/W when asked. A model the exporter cannot handle gets one
    GNSurgeonError naming ``name`` and the exporter's reason.
    """
    if isinstance(example, list):
        return _export_torchscript(model, example, opset=opset, gn_op=gn_op, dynamic_size=dynamic_size, name=name)
    if dynamic_batch and example.shape[0] < 2:
        example = torch.cat([example, example])  # torch.export specialises a size-1 axis to a constant
    axes = {0: torch.export.Dim("batch")} if dynamic_batch else {}
    if dynamic_size and example.dim() >= 4:
        axes.update({example.dim() - 2: torch.export.Dim("height"), example.dim() - 1: torch.export.Dim("width")})
    table = {torch.ops.aten.group_norm.default: dynamo_translation(gn_op, opset)}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=(axes,) if axes else None,
                input_names=["input"],
                output_names=_output_names(model, example),
                custom_translation_table=table,
                verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise many types
        raise GNSurgeonError(_export_failure(name, exc, opset, dynamic_size)) from None
    proto = program.model_proto
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return proto


def _export_failure(name: str, exc: BaseException, opset: int, dynamic_size: bool) -> str:
    """One sentence: which model torch.onnx could not export, why, and what to try."""
    reason = onnxruntime_message(exc)
    text = str(exc)
    if "Exception summary" in text:  # torch.onnx's long report: the first exception in its summary is the cause
        causes = [line for line in text.split("Exception summary", 1)[1].splitlines() if line.startswith("<class")]
        if causes:
            kind, _, message = causes[0].partition(">: ")
            reason = f"{kind.rsplit('.', 1)[-1].strip(chr(39))}: {message.strip()}"[:300]
    hint = " (try --static-size: H and W fixed)" if dynamic_size else ""
    return f"torch.onnx could not export {name} at opset {opset}: {reason}{hint}"


def _export_torchscript(model: nn.Module, images: list, *, opset: int, gn_op: str, dynamic_size: bool, name: str):
    """A detection model through torch.onnx's TorchScript exporter (the one torchvision's own ONNX
    tests use): one image ``(C, H, W)`` in, each output of the image's dict a named output."""
    import onnx
    from torch.onnx import register_custom_op_symbolic, unregister_custom_op_symbolic

    if len(images) != 1:
        raise GNSurgeonError(f"{name}: a detection model is exported for one image per run, got {len(images)}")
    names = _output_names(model, images)
    buffer = io.BytesIO()
    register_custom_op_symbolic("aten::group_norm", torchscript_symbolic(gn_op, dynamic_size), opset)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (images,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=names,
                dynamic_axes={"input": {1: "height", 2: "width"}} if dynamic_size else None,
            )
    except Exception as exc:  # the TorchScript exporter raises many types
        raise GNSurgeonError(_export_failure(name, exc, opset, dynamic_size)) from None
    finally:
        unregister_custom_op_symbolic("aten::group_norm", opset)
    return onnx.load_from_string(buffer.getvalue())


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
    if gn_op != "native" and native:
        raise VerificationError(f"--gn-op {gn_op}, yet the graph has {native} GroupNormalization node(s)")
    anchor = {"native": "GroupNormalization", "decomposed": "InstanceNormalization", "layernorm": "LayerNormalization"}
    if group_norms and not counts.get(anchor[gn_op]):
        raise VerificationError(f"--gn-op {gn_op}, yet the exporter wrote no {anchor[gn_op]} node")
    return "passed (full check)", dict(sorted(counts.items()))


def _lowering(options: ExportOptions, group_norms: int, static: bool, torchscript: bool) -> LoweringChoice:
    """The GN form to write: auto's probe of the installed onnxruntime, or the one asked for."""
    import onnxruntime

    threads = options.checks.threads
    if not group_norms:
        form = "decomposed" if options.gn_op == "auto" else options.gn_op
        return LoweringChoice(options.gn_op, form, "the model has no GroupNorm", onnxruntime.__version__, threads)
    if options.gn_op != "auto":
        why = f"asked for (--gn-op {options.gn_op})"
        return LoweringChoice(options.gn_op, options.gn_op, why, onnxruntime.__version__, threads)
    forms = options.candidates(torchscript)
    opsets = {f: options.opset_for(f) for f in forms}
    return choose_lowering(forms, opsets, static=static, threads=threads, checks=options.checks)


def _prepare(opened, options: ExportOptions, report: ExportReport):
    """The model to export (centred if asked, BN folded), the verification reference, the probe input."""
    config = opened.data_config
    reference = opened.model.float().eval()
    example = make_probe_input(config, batch=1, seed=0)
    if options.center_groups:
        probe = make_probe_input(config, batch=1 if config.task == "detection" else 4, seed=1)
        centred, report.centring = center_groups(reference, probe)
        drift = _centring_drift(reference, centred, example)
        for row in report.centring:
            row["model_drift"] = drift  # the whole model's max rel change: exactness, measured
        reference = centred
    prepared, report.folds = fold_for_export(reference, example)
    return prepared, reference, example


def export_onnx(
    source: str,
    output: str | Path,
    options: ExportOptions | None = None,
    source_options: SourceOptions | None = None,
    *,
    model: nn.Module | None = None,
) -> ExportReport:
    """Export ``source`` (``timm:``/``torchvision:`` name or gnsurgeon checkpoint) to ``output``.

    ``source_options`` is a :class:`~gnsurgeon.sources.SourceOptions` for opening the source
    (weights, constructor kwargs, ``input_size``); ``model`` the unconverted architecture of a
    checkpoint saved with ``source=None`` (as for :func:`gnsurgeon.load`). GN is written as
    ``options.gn_op`` says (``auto``: chosen on the installed onnxruntime; when the model's own GN
    layers then fail the per-layer check, the next form that passed auto's probe is exported and
    verified instead, and the reason says so), BN is folded, the graph checked with ``onnx.checker``,
    then verified (``options.verify``). The file is written only when verification passes, or with
    ``options.force``; ``report.ok`` says which.
    """
    options = options or ExportOptions()
    options.validate()
    output = check_output(output, ".onnx")
    start = time.perf_counter()
    opened = open_source(source, source_options or SourceOptions(), model=model)
    config = opened.data_config
    torchscript = config.task == "detection"
    options.validate(torchscript)
    dynamic_size = options.dynamic_size if options.dynamic_size is not None else config.task in DYNAMIC_SIZE_TASKS
    report = ExportReport(source=str(source), output=str(output), graph=ExportedGraph(0, "", False, []))
    report.timings["build"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    prepared, reference, example = _prepare(opened, options, report)
    group_norms = sum(isinstance(m, nn.GroupNorm) for m in prepared.modules())
    report.timings["fold"] = round(time.perf_counter() - start, 3)
    report.graph = ExportedGraph(0, "", options.dynamic_batch and not torchscript, [], dynamic_size,
                                 "torchscript" if torchscript else "dynamo", group_norms)  # fmt: skip
    start = time.perf_counter()
    report.lowering = _lowering(options, group_norms, not dynamic_size, torchscript)
    report.timings["choose"] = round(time.perf_counter() - start, 3)
    exported = _settle_on_model(prepared, example, options, report)
    while True:
        proto = _export_form(prepared, reference, example, config, options, report, exported)
        failure = _layer_failure_summary(report.verification)
        if report.ok or not failure or not report.lowering.fallbacks():
            break
        report.lowering.reject(failure)
    if report.ok or options.force:
        _save(proto, output, report)
    return report


def _export_graph(prepared: nn.Module, example, options: ExportOptions, report, form: str):
    """``prepared`` exported with GN as ``form``, the way ``report.graph`` says (dynamic axes, name)."""
    graph = report.graph
    start = time.perf_counter()
    proto = export_model(prepared, example, opset=options.opset_for(form), gn_op=form,
                         dynamic_batch=graph.dynamic_batch, dynamic_size=graph.dynamic_size,
                         name=report.source)  # fmt: skip
    report.timings["export"] = round(report.timings.get("export", 0) + time.perf_counter() - start, 3)
    return proto


def _settle_on_model(prepared: nn.Module, example, options: ExportOptions, report) -> dict:
    """``auto`` with two or more forms passing its probe: export the model in each and time the files
    (batch 1, the probe input, at ``--threads``), then choose among them by that time
    (:meth:`~gnsurgeon.onnx_lowering.LoweringChoice.settle_on_model`), because one GN's timing does
    not predict a whole model. Returns ``{form: proto}`` so that the chosen form is not exported
    twice. Detection files (the TorchScript exporter, one image per run) keep the probe's choice."""
    choice = report.lowering
    passing = [c.form for c in choice.candidates if c.passed and c.ms is not None]
    if choice.requested != "auto" or len(passing) < 2 or report.graph.exporter != "dynamo":
        return {}
    protos = {form: _export_graph(prepared, example, options, report, form) for form in passing}
    start = time.perf_counter()
    sessions = {form: runtime_session(proto, choice.threads, timed=True) for form, proto in protos.items()}
    settle_by_timing(choice, sessions, as_array(example))
    report.timings["choose"] = round(report.timings.get("choose", 0) + time.perf_counter() - start, 3)
    return protos


def _export_form(prepared: nn.Module, reference: nn.Module, example, config, options: ExportOptions, report,
                 exported: dict):  # fmt: skip
    """Export ``prepared`` with GN as ``report.lowering.form`` (or take it from ``exported``), check
    the graph, record the choice in the file's metadata, verify it against ``reference``; fills
    ``report`` and returns the proto."""
    graph, form = report.graph, report.lowering.form
    proto = exported.pop(form, None)
    if proto is None:  # not timed by auto, or a fallback form
        proto = _export_graph(prepared, example, options, report, form)
    start = time.perf_counter()
    graph.checker, graph.op_counts = _check_graph(proto, form, graph.group_norms)
    report.timings["check"] = round(report.timings.get("check", 0) + time.perf_counter() - start, 3)
    size = list(config.input_size)
    if graph.dynamic_size:
        size[-2:] = ["height", "width"]
    batch = [] if graph.exporter == "torchscript" else ["batch" if graph.dynamic_batch else 1]
    graph.opset, graph.gn_op, graph.input_shape = options.opset_for(form), form, [*batch, *size]
    centred = str(sum(r["action"] == "centred" for r in report.centring)) if options.center_groups else "off"
    for key, value in choice_metadata(report.lowering, center_groups=centred).items():
        proto.metadata_props.add(key=key, value=value)
    if options.verify:
        start = time.perf_counter()
        report.verification = verify_model(proto, reference, config, options.checks, source=report.source)
        report.verification.onnx_file = report.output
        report.timings["verify"] = round(report.timings.get("verify", 0) + time.perf_counter() - start, 3)
    return proto


def _layer_failure_summary(verification: VerifyReport | None) -> str:
    """"3 layer(s): a, b, c" when every failure is a GN layer's (a form the runtime computes badly on
    this model's layers), else "" (a whole-model or checker failure: another form would not help)."""
    if verification is None or verification.ok:
        return ""
    if any(not isinstance(f, LayerMismatch) for f in verification.failures):
        return ""
    layers = list(dict.fromkeys(verification.failed_layers))
    return f"{len(layers)} layer(s): {', '.join(layers[:3])}" + (", ..." if len(layers) > 3 else "")


def _save(proto, output: Path, report: ExportReport) -> None:
    import onnx

    start = time.perf_counter()
    try:
        write_atomically(output, lambda tmp: onnx.save_model(proto, tmp))
    except ValueError as exc:  # protobuf's 2 GB limit
        raise GNSurgeonError(f"cannot write {output}: {onnxruntime_message(exc)}") from None
    report.written = True
    report.timings["save"] = round(time.perf_counter() - start, 3)


__all__ = [
    "GN_OPS",
    "ExportOptions",
    "ExportReport",
    "ExportedGraph",
    "center_groups",
    "export_model",
    "export_onnx",
    "fold_for_export",
]
