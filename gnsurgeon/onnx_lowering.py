"""How GroupNorm is written into ONNX: each lowering written once for every graph writer, and ``auto``,
which picks the lowering the installed onnxruntime computes exactly and fastest.

Why more than one lowering (onnxruntime CPU, measured with 1.32.0 and 1.22.1):

* ``decomposed``: ``Reshape (N, G, -1) -> InstanceNormalization -> Reshape -> affine``. Its variance
  is centred in every version (7e-3 max error at mean 100 / std 0.01 on 1x256x56x56, G = 32, against
  float64), but the kernel is a serial loop over N·G rows (``instance_norm.cc``): threads do not
  help it, so its share of a model's time grows with the thread count.
* ``layernorm``: ``Reshape (N, G, -1) -> LayerNormalization(axis=2) -> Reshape -> affine``. The
  kernel runs its rows in parallel (``layer_norm_impl.cc``). onnxruntime 1.32 centres the variance
  (3.7e-4 on the same input, 20x better than InstanceNormalization); 1.22 computes E[x²] − E[x]²
  and returns NaN there. The scale input has the full normalized size (C/G·H·W ones): onnxruntime
  1.22 refuses a broadcast ``[1]`` scale and 1.32 runs that path 2.5x slower.
* ``native``: ``GroupNormalization`` (opset 21, per-channel scale). onnxruntime has no CPU kernel
  for it (onnxruntime#24538) and expands its function body, E[x²] − E[x]²: NaN on the stress inputs.

The affine after the reshape is a depthwise 1x1 ``Conv`` where the channel count is known, because
onnxruntime fuses a constant-weight Conv with the activation and residual add that follow (one pass
instead of three); ``Mul``/``Add`` otherwise.

Whether a runtime computes a lowering exactly is a property of that runtime's version, so the
default, ``auto``, asks the runtime that is installed: it writes each candidate for one small GN
(64 channels, 32 groups, 56x56: a ResNet stage-1 layer), runs verification's stress inputs through it
(:func:`gnsurgeon.onnx_verify.stress_inputs`, the per-layer tolerance) and a short interleaved timing
at the thread count asked, and picks the fastest that passes. Within :data:`TIE` of the fastest, the
candidate with the most margin on the stress inputs wins: timing noise must not decide between two
forms when one is clearly more accurate. The one-GN timing overstates the difference on a whole
model, where convs dominate and the NCHWc reorders around every GN weigh the same in both forms (at
1 thread the probe has ``decomposed`` 25 % faster; resnet18's two files differ by 2 %, resnet50's by
6 %; README "Latency"), so ``export-onnx`` then exports the model in each form that passed and
times the files themselves (:func:`settle_by_timing`, sessions made with ``timed=True``); the
probe's timing decides only where no model is timed (detection files, one passing form). The
choice, its reason and the onnxruntime version go into the file's metadata
(:func:`choice_metadata`); :meth:`LoweringChoice.fallbacks` lists what ``export-onnx`` tries next
when the model's own layers fail the chosen form.

One lowering, three writers: :func:`lower_group_norm` calls ``emit(op_type, *inputs, **attributes)``
once per node; the dynamo exporter (onnxscript ops, :func:`dynamo_translation`), the TorchScript
exporter (``g.op``, :func:`torchscript_symbolic`: detection models, which torch.export cannot trace)
and a plain ``onnx.helper`` graph (``auto``'s probe, :func:`probe_model`: no exporter run, so it costs
milliseconds) each supply an ``emit``. The file and the probe therefore contain the same nodes.

Stage: export, below :mod:`gnsurgeon.onnx_export`. It imports torch and numpy, onnx and onnxruntime
inside functions, :mod:`gnsurgeon.onnx_verify` (stress inputs, the comparison, sessions) and
:mod:`gnsurgeon.onnx_graph` (the metadata keys).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .onnx_graph import METADATA_PREFIX
from .onnx_verify import (
    VerifyOptions,
    compare,
    group_stats,
    kappa,
    onnxruntime_message,
    runtime_session,
    stress_inputs,
)
from .verdicts import error_ratio

__all__ = [
    "FORMS",
    "PROBE_GROUPS",
    "PROBE_SHAPE",
    "TIE",
    "Candidate",
    "LoweringChoice",
    "choice_metadata",
    "choose_lowering",
    "dynamo_translation",
    "lower_group_norm",
    "probe_candidate",
    "probe_model",
    "settle_by_timing",
    "time_sessions",
    "torchscript_symbolic",
]

FORMS = ("decomposed", "layernorm", "native")
PROBE_SHAPE = (64, 56, 56)  # one sample of auto's probe GN: ResNet stage 1
PROBE_GROUPS = 32
TIE = 0.05  # within 5 % of the fastest, the candidate with the most stress margin wins
# A whole model is timed in each passing form for about this long (each round runs every form three
# times; at least MIN_MODEL_ROUNDS rounds, at most MAX_MODEL_ROUNDS).
MODEL_TIMING_S = 8.0
MIN_MODEL_ROUNDS, MAX_MODEL_ROUNDS = 3, 15
Emit = Callable[..., Any]


# ------------------------------------------------------------------------------- the lowerings
def lower_group_norm(
    emit: Emit,
    x,
    shape: Sequence,
    groups: int,
    eps: float,
    weight=None,
    bias=None,
    *,
    form: str,
    static: bool,
):
    """GN of ``x`` as ``form`` asks, one ``emit`` call per node; returns the output value.

    ``shape`` is x's shape (ints where known); ``static``: the non-batch dims are fixed, so the
    reshapes and LayerNormalization's scale are constants (else computed from ``Shape``).
    """
    channels = shape[1]
    if form == "native":
        scale = weight if weight is not None else _filled(emit, x, 1.0, channels)
        shift = bias if bias is not None else _filled(emit, x, 0.0, channels)
        return emit("GroupNormalization", x, scale, shift, num_groups=groups, epsilon=eps)
    y = emit("Reshape", x, emit("Constant", value_ints=[0, groups, -1]))
    if form == "decomposed":
        ones, zeros = _filled(emit, x, 1.0, groups), _filled(emit, x, 0.0, groups)
        y = emit("InstanceNormalization", y, ones, zeros, epsilon=eps)
    elif form == "layernorm":
        if static:
            scale = _filled(emit, x, 1.0, channels // groups * math.prod(shape[2:]))
        else:  # ones of the group size, whatever H and W are at run time
            scale = emit("Expand", _filled(emit, x, 1.0, 1), emit("Shape", y, start=2))
        y = emit("LayerNormalization", y, scale, axis=2, epsilon=eps)
    else:
        raise ValueError(f"unknown GN lowering {form!r}")
    back = emit("Constant", value_ints=[0, *shape[1:]]) if static else emit("Shape", x)
    return _affine(emit, emit("Reshape", y, back), x, shape, weight, bias)


def _filled(emit: Emit, like, value: float, size: int):
    return emit("CastLike", emit("Constant", value_floats=[value] * size), like)


def _affine(emit: Emit, y, x, shape: Sequence, weight, bias):
    """Per-channel ``y·γ + β``: a depthwise 1x1 Conv where the channel count is known and there are
    spatial axes (onnxruntime fuses it with what follows), else Mul/Add."""
    if weight is None and bias is None:
        return y
    rank, channels = len(shape), shape[1]
    if rank >= 3 and isinstance(channels, int):
        kernel = [1] * (rank - 2)
        w = emit("Reshape", weight if weight is not None else _filled(emit, x, 1.0, channels),
                 emit("Constant", value_ints=[channels, 1, *kernel]))  # fmt: skip
        inputs = (y, w) if bias is None else (y, w, bias)
        return emit("Conv", *inputs, group=channels, kernel_shape=kernel)
    axes = emit("Constant", value_ints=list(range(1, rank - 1))) if rank > 2 else None
    if weight is not None:
        y = emit("Mul", y, emit("Unsqueeze", weight, axes) if rank > 2 else weight)
    if bias is not None:
        y = emit("Add", y, emit("Unsqueeze", bias, axes) if rank > 2 else bias)
    return y


# ---------------------------------------------------------------------------------- the writers
def dynamo_translation(form: str, opset: int):
    """``aten.group_norm`` for the dynamo exporter's ``custom_translation_table``, as ``form``."""
    import onnxscript

    ops = getattr(onnxscript, f"opset{min(opset, 23)}")

    def emit(op_type: str, *inputs, **attributes):
        out = getattr(ops, op_type)(*inputs, **attributes)
        return out[0] if isinstance(out, (tuple, list)) else out

    def group_norm(
        input,  # the aten schema's names: the exporter binds arguments by name
        num_groups: int,
        weight=None,
        bias=None,
        eps: float = 1e-05,
        cudnn_enabled: bool = True,
    ):
        shape = list(input.shape)
        static = all(isinstance(d, int) for d in shape[1:])
        return lower_group_norm(emit, input, shape, num_groups, eps, weight, bias, form=form, static=static)

    return group_norm


def torchscript_symbolic(form: str, dynamic_size: bool):
    """``aten::group_norm`` for the TorchScript exporter (``register_custom_op_symbolic``), as ``form``.
    A trace sees concrete sizes, so H and W count as dynamic whenever ``dynamic_size`` asks."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "i", "v", "v", "f", "b")
    def group_norm(g, input, num_groups, weight, bias, eps, cudnn_enabled):
        def emit(op_type: str, *inputs, **attributes):
            if op_type == "CastLike":  # a Cast of a constant folds at export; a CastLike of one does not
                return g.op("Cast", inputs[0], to_i=_ONNX_DTYPES.get(inputs[1].type().dtype(), 1))
            return g.op(op_type, *inputs, **_torchscript_attributes(op_type, attributes))

        sizes = list(input.type().varyingSizes())
        shape = [None, *[None if dynamic_size and i >= 1 else d for i, d in enumerate(sizes[1:])]]
        static = not dynamic_size and all(isinstance(d, int) for d in shape[1:])
        weight = None if weight.node().mustBeNone() else weight
        bias = None if bias.node().mustBeNone() else bias
        return lower_group_norm(emit, input, shape, num_groups, eps, weight, bias, form=form, static=static)

    return group_norm


_ONNX_DTYPES = {torch.float32: 1, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}  # onnx.TensorProto


def _torchscript_attributes(op_type: str, attributes: dict) -> dict:
    """onnxscript-style attributes as ``g.op`` spells them (``epsilon_f``, ``value_t``, ...)."""
    out = {}
    for key, value in attributes.items():
        if op_type == "Constant" and key in ("value_ints", "value_floats"):
            out["value_t"] = torch.tensor(value, dtype=torch.int64 if key == "value_ints" else torch.float32)
        elif isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
            out[f"{key}_f"] = value
        else:
            out[f"{key}_i"] = value
    return out


class _HelperGraph:
    """An ``emit`` that appends ``onnx.helper`` nodes: auto's probe graphs, written without an exporter."""

    def __init__(self) -> None:
        self.nodes: list = []

    def emit(self, op_type: str, *inputs, **attributes) -> str:
        from onnx import helper

        if op_type == "CastLike":  # the probe is float32 throughout; the exporters fold this cast away too
            return inputs[0]
        name = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attributes))
        return name


def probe_model(form: str, opset: int, module: nn.GroupNorm, spatial: Sequence[int], static: bool = True):
    """A one-GN ONNX model (input ``x``, batch dynamic) computing ``module`` as ``form``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    writer = _HelperGraph()
    shape = [None, module.num_channels, *spatial]
    inits = []
    if module.affine:
        inits = [
            numpy_helper.from_array(module.weight.detach().float().numpy(), "gamma"),
            numpy_helper.from_array(module.bias.detach().float().numpy(), "beta"),
        ]
    weight, bias = ("gamma", "beta") if module.affine else (None, None)
    y = lower_group_norm(
        writer.emit, "x", shape, module.num_groups, module.eps, weight, bias, form=form, static=static
    )
    dims = ["n", *(shape[1:] if static else [shape[1], *[f"d{i}" for i in range(len(spatial))]])]
    graph = helper.make_graph(
        writer.nodes,
        f"gn_{form}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, dims)],
        initializer=inits,
    )
    imports = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=imports, ir_version=onnx.helper.find_min_ir_version_for(imports))


# ------------------------------------------------------------------------------------- auto
@dataclass
class Candidate:
    """One lowering as auto's probe found it in the installed onnxruntime."""

    form: str
    opset: int
    passed: bool
    worst_input: str = ""  # the input furthest over (or closest to) its limit
    worst_error: float | None = None  # its max abs error (None: non-finite output or a failure)
    worst_limit: float | None = None
    problem: str = ""  # why it failed, in words
    ms: float | None = None  # median time of one batch-1 run of the probe GN
    model_ms: float | None = None  # median time of one batch-1 run of the whole model in this form (export)

    @property
    def margin(self) -> float:
        """Worst error / its limit over the probe's inputs (lower: more accurate); inf when failed."""
        if not self.passed or self.worst_error is None or not self.worst_limit:
            return float("inf")
        return self.worst_error / self.worst_limit


@dataclass
class LoweringChoice:
    """Which GN lowering a file uses and why; ``metadata`` is what goes into the ONNX file."""

    requested: str  # auto, or the lowering asked for
    form: str
    reason: str
    onnxruntime: str = ""  # the version the choice (or the verification) was made with
    threads: int = 0  # 0: onnxruntime's default
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # forms the model's own layers failed, in order

    def fallbacks(self) -> list[str]:
        """The other forms that passed the probe, fastest first: what auto tries when the model's own
        GN layers fail the chosen one (they have other shapes and statistics than the probe)."""
        if self.requested != "auto":
            return []
        passing = sorted((c for c in self.candidates if c.passed and c.ms is not None), key=_speed)
        return [c.form for c in passing if c.form != self.form and c.form not in self.rejected]

    def settle_on_model(self, model_ms: dict[str, float], shape: str) -> str:
        """Choose again among the forms that passed, by ``model_ms`` (form -> median ms of one run of
        the whole model in that form, batch 1, input ``shape``), with the probe's rule: the fastest,
        and within :data:`TIE` of it the one with the most stress margin. Returns the form."""
        timed = [c for c in self.candidates if c.passed and c.form in model_ms]
        for c in timed:
            c.model_ms = round(model_ms[c.form], 3)
        if len(timed) < 2:
            return self.form
        fastest = min(c.model_ms for c in timed)
        pick = min((c for c in timed if c.model_ms <= fastest * (1 + TIE)), key=lambda c: (c.margin, c.model_ms))
        times = ", ".join(f"{c.form} {c.model_ms:.1f} ms" for c in sorted(timed, key=lambda c: c.model_ms))
        was = self.form
        self.form = pick.form
        tied = f"; within {TIE:.0%} of the fastest, the one with the most stress margin"
        self.reason += (
            f"; then timed on this model (batch 1, {shape}): {times}{tied if pick.model_ms > fastest else ''}"
            + (f"; so {pick.form}, not the probe's {was}" if pick.form != was else f"; so {pick.form}")
        )
        return self.form

    def reject(self, failure: str) -> str:
        """Drop the current form (its verification failed: ``failure``) for the next fallback; returns it."""
        following = self.fallbacks()[0]
        self.rejected.append(self.form)
        self.reason += f"; {self.form} failed the per-layer check on this model ({failure}), so {following}"
        self.form = following
        return following

    def to_dict(self) -> dict:
        return {**asdict(self), "candidates": [asdict(c) for c in self.candidates]}


def _speed(c: Candidate) -> float:
    """A candidate's time for ordering fallbacks: the whole model's where it was timed, else the probe's."""
    return c.model_ms if c.model_ms is not None else c.ms


def choice_metadata(choice: LoweringChoice, **extra: str) -> dict[str, str]:
    """The ``metadata_props`` that record ``choice`` in the ONNX file (keys under ``gnsurgeon.``)."""
    values = {
        "version": __version__,
        "gn_op": choice.form,
        "gn_op_requested": choice.requested,
        "gn_op_reason": choice.reason,
        "onnxruntime": choice.onnxruntime,
        "threads": str(choice.threads),
        "gn_op_candidates": json.dumps([asdict(c) for c in choice.candidates]),
        **extra,
    }
    return {f"{METADATA_PREFIX}{k}": v for k, v in values.items()}


def _probe_cases(module: nn.GroupNorm, checks) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{name: (input, PyTorch's output, limit scale κ·√m)}`` for the probe GN: a realistic input,
    then verification's stress inputs; built once and shared by every candidate."""
    gen = torch.Generator().manual_seed(checks.seed)
    inputs = {
        f"random, batch {checks.batch}": torch.randn(checks.batch, *PROBE_SHAPE, generator=gen),
        **stress_inputs(PROBE_SHAPE, module.num_groups, checks.batch, checks.seed),
    }
    root_m = math.sqrt(math.prod(PROBE_SHAPE) // module.num_groups)
    cases = {}
    for name, x in inputs.items():
        with torch.inference_mode():
            ref = module(x).numpy()
        cases[name] = (x.numpy(), ref, kappa(group_stats(x, module.num_groups), module.eps) * root_m)
    return cases


def probe_candidate(form: str, opset: int, module: nn.GroupNorm, cases: dict, *, static: bool, threads: int,
                    checks) -> tuple[Candidate, Any]:  # fmt: skip
    """``(Candidate, session or None)``: ``form`` for ``module`` run on ``cases`` (:func:`_probe_cases`)
    in the installed onnxruntime, each compared with PyTorch under the per-layer tolerance."""
    candidate = Candidate(form=form, opset=opset, passed=False)
    try:
        session = runtime_session(probe_model(form, opset, module, PROBE_SHAPE[1:], static), threads, timed=True)
    except Exception as exc:  # onnxruntime raises its own types
        candidate.problem = f"does not load: {onnxruntime_message(exc)}"
        return candidate, None
    worst_ratio = -1.0
    for name, (x, ref, scale) in cases.items():
        try:
            out = session.run(None, {"x": x})[0]
        except Exception as exc:
            candidate.problem = f"{name}: onnxruntime failed ({onnxruntime_message(exc)})"
            return candidate, session
        result = compare(out, ref, scale, checks.atol, checks.rtol)
        ratio = error_ratio(result)
        if ratio > worst_ratio:
            worst_ratio = ratio
            candidate.worst_input, candidate.worst_limit = name, result["limit"]
            candidate.worst_error = result.get("max_abs")
        if not result["ok"] and not candidate.problem:
            err = result.get("max_abs")
            candidate.problem = f"{name}: " + (
                f"{result.get('nonfinite', 0)} non-finite output(s)" if err is None else f"max abs {err:.1e} > limit"
            )
    candidate.passed = not candidate.problem
    return candidate, session


def time_sessions(sessions: dict[str, Any], feed: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median ms of one run of ``feed`` per session, round-robin so that machine drift hits all alike
    (each turn: one untimed run, which wakes this session's threads, then two timed ones). The sessions
    should be made with ``runtime_session(..., timed=True)``, so that one session's spinning threads
    do not slow the next one's runs."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            session.run(None, feed)  # its threads wake up; the previous session's park
            for _ in range(2):
                start = time.perf_counter()
                session.run(None, feed)
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def settle_by_timing(choice: LoweringChoice, sessions: dict[str, Any], x: np.ndarray) -> str:
    """Time ``sessions`` (form -> the whole model in that form) on ``x`` for about
    :data:`MODEL_TIMING_S`, round-robin, and settle ``choice`` by those times
    (:meth:`LoweringChoice.settle_on_model`). Returns the chosen form."""
    feed = {next(iter(sessions.values())).get_inputs()[0].name: x}
    once = time_sessions(sessions, feed, 1)  # a first turn, which also sizes the timing
    rounds = int(MODEL_TIMING_S * 1e3 / (3 * sum(once.values())))
    times = time_sessions(sessions, feed, max(MIN_MODEL_ROUNDS, min(MAX_MODEL_ROUNDS, rounds)))
    return choice.settle_on_model(times, "x".join(str(d) for d in x.shape[1:]))


def choose_lowering(
    forms: Sequence[str],
    opsets: dict[str, int],
    *,
    static: bool = True,
    threads: int = 0,
    checks=None,
    rounds: int = 15,
) -> LoweringChoice:
    """``auto``: probe every lowering in ``forms`` (each at ``opsets[form]``) in the installed
    onnxruntime and pick the fastest that passes the stress check; ``checks`` is a VerifyOptions
    (tolerances, stress batch, seed). With none passing, ``decomposed`` is kept and the reason says
    so (the per-layer verification will then name the layers)."""
    import onnxruntime

    checks = checks or VerifyOptions()
    gen = torch.Generator().manual_seed(checks.seed)  # the caller's global RNG stays as it was
    module = nn.GroupNorm(PROBE_GROUPS, PROBE_SHAPE[0]).eval()
    with torch.no_grad():
        module.weight.copy_(torch.rand(PROBE_SHAPE[0], generator=gen) + 0.5)
        module.bias.copy_(torch.randn(PROBE_SHAPE[0], generator=gen))
    cases = _probe_cases(module, checks)
    probed = [
        probe_candidate(f, opsets[f], module, cases, static=static, threads=threads, checks=checks) for f in forms
    ]
    candidates = [c for c, _ in probed]
    feed = {"x": np.random.default_rng(0).standard_normal((1, *PROBE_SHAPE)).astype(np.float32)}
    timings = time_sessions({c.form: s for c, s in probed if s is not None}, feed, rounds)
    for c in candidates:
        c.ms = round(timings[c.form], 4) if c.form in timings else None
    version = onnxruntime.__version__
    choice = LoweringChoice("auto", "decomposed", "", version, threads, candidates)
    passing = [c for c in candidates if c.passed and c.ms is not None]
    where = f"onnxruntime {version}, {threads or 'default'} thread(s)"
    failed = "; ".join(f"{c.form} fails ({c.problem})" for c in candidates if not c.passed)
    if not passing:
        choice.reason = f"auto: no lowering passed the stress check on {where} ({failed}); decomposed kept"
        return choice
    fastest = min(c.ms for c in passing)
    pick = min((c for c in passing if c.ms <= fastest * (1 + TIE)), key=lambda c: (c.margin, c.ms))
    times = ", ".join(f"{c.form} {c.ms:.3f} ms" for c in sorted(passing, key=lambda c: c.ms))
    shape = "x".join(map(str, PROBE_SHAPE))
    choice.form = pick.form
    choice.reason = (
        f"auto: the fastest lowering that passes the stress check on {where} "
        f"(one GN 1x{shape}, G={PROBE_GROUPS}: {times}"
        + (f"; within {TIE:.0%} of the fastest, the one with the most stress margin wins" if pick.ms > fastest else "")
        + (f"; {failed}" if failed else "")
        + ")"
    )
    return choice
