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
   the first of these; the InstanceNormalization form does not, nor LayerNormalization in onnxruntime
   1.32 (1.22 does). What a runtime computes is its version's business, so a file is re-checked on
   the runtime at hand: a failing layer is reported with the lowering it uses and, where the file
   says so (:func:`gnsurgeon.onnx_graph.export_metadata`), the onnxruntime version it was chosen with.

Detection models (a list of images in, boxes out) take one image ``(C, H, W)`` per file input; files
whose H and W are dynamic are run at a second size too.

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

Finding and cutting out the GN subgraphs is :mod:`gnsurgeon.onnx_graph`'s; the tables are
:mod:`gnsurgeon.report`'s; failures are typed (:mod:`gnsurgeon.verdicts`).

Stage: verification of an ONNX file, after export. It imports torch, numpy, onnx and onnxruntime (the
last two inside functions, to keep ``import gnsurgeon`` light), :mod:`gnsurgeon.onnx_graph`,
:mod:`gnsurgeon.hooks`, :mod:`gnsurgeon.metrics`, :mod:`gnsurgeon.reach`, and the source/data modules
that open the model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import ImageFolderData, collate_skip_broken, eval_transform
from .errors import GNSurgeonError
from .hooks import capture
from .metrics import max_errors
from .models import DataConfig
from .onnx_graph import (
    GNSubgraph,
    OnnxGraph,
    export_metadata,
    extract_subgraph,
    locate_group_norms,
    model_input,
    model_opset,
)
from .options import NOT_IN_RECIPES
from .probe import flatten_outputs, make_probe_input
from .reach import split_reached, unreached_note
from .sources import SourceOptions, open_source
from .verdicts import CheckerFailure, LayerMismatch, LayerNotFound, ModelMismatch, VerifyFailure, error_ratio

__all__ = [
    "CheckerFailure",
    "LayerMismatch",
    "LayerNotFound",
    "ModelMismatch",
    "VerifyFailure",
    "VerifyOptions",
    "VerifyReport",
    "align_detections",
    "compare",
    "group_norm_modules",
    "group_stats",
    "kappa",
    "merged_into",
    "onnxruntime_message",
    "runtime_session",
    "same_function",
    "second_size",
    "stress_inputs",
    "verify_model",
    "verify_onnx",
]

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
    threads: int = 0  # onnxruntime intra-op threads (0: its default); also what auto times at
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
        if self.threads < 0:
            raise GNSurgeonError(f"--threads must be 0 (onnxruntime's default) or more, got {self.threads}")


@dataclass
class VerifyReport:
    """Everything the verification found; ``ok`` is False when any comparison exceeded its limit."""

    onnx_file: str | None
    source: str | None
    options: VerifyOptions
    input_shape: list = field(default_factory=list)
    dynamic_batch: bool = True
    dynamic_size: bool = False  # H and W are dynamic axes: checked at a second size too
    opset: int | None = None
    exported_with: dict = field(default_factory=dict)  # the file's gnsurgeon metadata (lowering, onnxruntime)
    checker: str = ""
    model_checks: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)
    failures: list[VerifyFailure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failed_layers(self) -> list[str]:
        """The path of every failing layer call, in check order (a layer called twice may be listed twice)."""
        return [f.layer for f in self.failures if isinstance(f, LayerMismatch)]

    def headline(self) -> str:
        """What failed, in one line: every failing layer by name, the first reason in full."""
        parts = [str(f) for f in self.failures if not isinstance(f, LayerMismatch)]
        layers = list(dict.fromkeys(self.failed_layers))
        if layers:
            names = ", ".join(layers[:10]) + (f", ... {len(layers) - 10} more" if len(layers) > 10 else "")
            first = next(f for f in self.failures if isinstance(f, LayerMismatch))
            where = self._lowering_words(set(layers))
            parts.append(f"{len(layers)} GN layer(s) out of limits ({names}) {where}; first: {first}")
        return "; ".join(parts)

    def _lowering_words(self, failed: set[str]) -> str:
        """"in the layernorm lowering (chosen by auto with onnxruntime 1.32.0) on onnxruntime 1.22.1":
        which form broke, and on which runtime, for the headline."""
        forms = sorted({r.get("form", "other") for r in self.layers if r["path"] in failed and not r["ok"]} - {"other"})
        meta = self.exported_with
        made = ""
        if meta.get("gn_op") in forms and meta.get("gn_op_requested") == "auto" and meta.get("onnxruntime"):
            made = f" (chosen by auto with onnxruntime {meta['onnxruntime']})"
        lowering = f"in the {'/'.join(forms)} lowering{made} " if forms else ""
        return f"{lowering}on onnxruntime {_onnxruntime_version()}"

    def to_dict(self) -> dict:
        opts = self.options
        return {
            "command": "verify-onnx",
            "gnsurgeon_version": __version__,
            "onnx_file": self.onnx_file,
            "source": self.source,
            "ok": self.ok,
            "failures": [str(f) for f in self.failures],
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
            "dynamic_size": self.dynamic_size,
            "opset": self.opset,
            "onnxruntime": _onnxruntime_version(),
            "exported_with": self.exported_with,
            "checker": self.checker,
            "model": self.model_checks,
            "layers": self.layers,
            "timings_s": self.timings,
        }


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
    """Max abs / relative error of ``out`` vs ``ref`` (:func:`~gnsurgeon.metrics.max_errors`, the
    definition every report shares); ok when max abs <= atol + rtol·limit_scale·max|ref|."""
    out, ref = np.asarray(out), np.asarray(ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    limit = atol + rtol * limit_scale * scale
    if out.shape != ref.shape:
        return {"ok": False, "problem": f"shape {list(out.shape)}, expected {list(ref.shape)}", "limit": limit}
    nonfinite = int(out.size - np.isfinite(out).sum()) if out.size else 0
    if nonfinite:
        return {"ok": False, "max_abs": None, "max_rel": None, "nonfinite": nonfinite, "limit": limit}
    errors = max_errors(ref, out)
    return {"ok": errors["max_abs"] <= limit, **errors, "limit": limit}


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


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def runtime_session(model_or_path, threads: int = 0, *, timed: bool = False):
    """An onnxruntime CPU session for a model (proto or path), ``threads`` intra-op threads (0: the
    runtime's default), logging off (failures are reported per check).

    ``timed``: the session is one of several timed in turn in this process, so its thread pool stops
    spinning when each run ends (``session.force_spinning_stop``). Without it, each session's workers
    keep spinning for a while after their run, on the cores the next session's run needs: on 2 cores
    at 2 threads, resnet18's GN / BN ratios timed that way came out anywhere from 0.83 to 1.76 from
    one run to the next, against 1.12-1.16 with the option and 1.13-1.14 for each graph timed alone
    (README "Latency", the timing-method table). Inside a run nothing changes: the workers spin
    between kernels as a deployed session's do."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures are reported per check, not logged to stderr
    if threads:
        options.intra_op_num_threads = threads
    if timed:
        options.add_session_config_entry("session.force_spinning_stop", "1")
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


def _layer_inputs(model: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[dict[str, list[torch.Tensor]], object]:
    """Run ``model`` on ``x``; return what each module in ``paths`` received, per call (cloned before
    an in-place op can change it), and the model's output."""
    seen = capture(model, x, inputs=paths, grad="inference")
    received = {p: [c.first for c in calls if isinstance(c.first, torch.Tensor)] for p, calls in seen.inputs.items()}
    return {p: xs for p, xs in received.items() if xs}, seen.result


# ------------------------------------------------------------------------------------ the checks
def _input_shape(dims: list, config: DataConfig, report: VerifyReport) -> tuple[int, ...]:
    """One sample's shape from the file's input dims (the data config's where a dim is dynamic);
    sets the report's batch and H/W dynamism. A detection file takes one image: no batch axis."""
    size = tuple(config.input_size)
    single = config.task == "detection" and len(dims) == len(size)
    if not single and len(dims) != len(size) + 1:
        raise GNSurgeonError(
            f"the ONNX input has rank {len(dims)}, but the model's data config expects {len(size) + 1} "
            f"(N, {', '.join(map(str, size))})"
        )
    sample = dims if single else dims[1:]
    shape = tuple(d if isinstance(d, int) and d > 0 else s for d, s in zip(sample, size, strict=True))
    if shape != size:
        report.notes.append(f"input size {list(shape)} taken from the ONNX file (data config says {list(size)})")
    report.dynamic_batch = not single and not (isinstance(dims[0], int) and dims[0] > 0)
    report.dynamic_size = len(shape) >= 3 and not all(isinstance(d, int) and d > 0 for d in sample[-2:])
    batch = [] if single else ["batch" if report.dynamic_batch else dims[0]]
    report.input_shape = [*batch, *shape[:-2], *[d if isinstance(d, int) and d > 0 else str(d) for d in sample[-2:]]]
    return shape


def second_size(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The other sample shape a file with dynamic H and W is run at: H x 1.5 and W x 0.75, multiples
    of 16 (at least 16), so that H != W and both differ from the export size."""
    *lead, h, w = shape
    return (*lead, max(16, h * 3 // 2 // 16 * 16), max(16, w * 3 // 4 // 16 * 16))


def as_array(x) -> np.ndarray:
    """The numpy feed for a probe input: a tensor, or a detector's one-image list (the file's input is
    that image)."""
    return (x[0] if isinstance(x, list) else x).numpy()


def _load_images(options: VerifyOptions, config: DataConfig) -> torch.Tensor:
    dataset = ImageFolderData(options.data, eval_transform(config), limit=options.max_images, seed=options.seed)
    images, _, broken = collate_skip_broken([dataset[i] for i in range(len(dataset))])
    if images is None:
        raise GNSurgeonError(f"no readable image in {options.data} ({len(broken)} broken)")
    return images


def _top1(out: np.ndarray, ref: np.ndarray) -> float | None:
    if out.ndim != 2 or out.shape[1] < 2 or out.shape != ref.shape or not len(out):
        return None
    return float((out.argmax(1) == ref.argmax(1)).mean())


_DETECTION_FIELDS = ("boxes", "labels", "scores", "masks", "keypoints", "keypoints_scores")


def align_detections(outs: list[np.ndarray], refs: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """``outs`` with each image's detections reordered to PyTorch's order: detections whose scores
    tie to float32 rounding (random weights: 100 boxes within 2e-3) come out of the sort in either
    order. Each reference detection is paired with the nearest unused ONNX box of the same label; a
    detection with no counterpart still shows as an error after the reordering."""
    outs = list(outs)
    images: dict[str, dict[str, int]] = {}
    for i, name in enumerate(names):
        prefix, _, key = name.rpartition(".")
        if key in _DETECTION_FIELDS:
            images.setdefault(prefix, {})[key] = i
    for fields in images.values():
        if "boxes" not in fields:
            continue
        ref_boxes, out_boxes = refs[fields["boxes"]], np.asarray(outs[fields["boxes"]])
        if ref_boxes.shape != out_boxes.shape or not len(ref_boxes):
            continue
        cost = np.abs(ref_boxes[:, None, :] - out_boxes[None, :, :]).max(-1)
        if "labels" in fields:
            cost += 1e9 * (refs[fields["labels"]][:, None] != np.asarray(outs[fields["labels"]])[None, :])
        order, used = [], np.zeros(len(out_boxes), bool)
        for row in cost:
            j = int(np.argmin(np.where(used, np.inf, row)))
            used[j] = True
            order.append(j)
        for index in fields.values():
            if len(outs[index]) == len(order):
                outs[index] = np.asarray(outs[index])[order]
    return outs


def _check_model(session, input_name: str, refs: list, name: str, x, opts, names: list[str]) -> dict:
    row: dict = {"input": name, "batch": len(x) if isinstance(x, list) else int(x.shape[0])}
    try:
        outs = session.run(None, {input_name: as_array(x)})
    except Exception as exc:  # onnxruntime raises its own exception types
        row.update(ok=False, problem=f"onnxruntime failed: {onnxruntime_message(exc)}")
        return row
    if len(outs) != len(refs):
        row.update(ok=False, problem=f"{len(outs)} ONNX outputs, PyTorch returns {len(refs)}")
        return row
    outs = align_detections(outs, refs, names)
    results = [compare(o, r, 1.0, opts.atol, opts.model_rtol) for o, r in zip(outs, refs, strict=True)]
    worst = max(results, key=error_ratio)
    row.update({k: worst[k] for k in ("max_abs", "max_rel", "limit", "nonfinite", "problem") if k in worst})
    row["ok"] = all(r["ok"] for r in results)
    row["top1_agreement"] = _top1(np.asarray(outs[0]), refs[0]) if names[:1] == ["output"] else None
    return row


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


def _check_layer(graph: OnnxGraph, sub: GNSubgraph, module: nn.GroupNorm, cases: dict, opts: VerifyOptions) -> dict:
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
        session = runtime_session(extract_subgraph(graph.model, sub, first.dim(), graph), opts.threads)
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


def _layer_failure(row: dict) -> LayerMismatch:
    """The first two reasons ``row`` failed (G/eps problems first, then failing inputs), as one record."""
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
    return LayerMismatch(layer=row["path"], reason="; ".join(parts[:2]) + more)


def _model_failure(row: dict) -> ModelMismatch:
    why = row.get("problem") or (
        f"{row['nonfinite']} non-finite output(s)"
        if row.get("max_abs") is None
        else f"max abs {row['max_abs']:.2e} > limit {row['limit']:.2e}"
    )
    return ModelMismatch(input=row["input"], reason=why)


def _open_model(model, onnx_file: str | None, config: DataConfig, report: VerifyReport):
    """Check the file with onnx.checker, read its input, load it in onnxruntime: ``(session, input
    name, input shape without the batch axis)``; the findings go into ``report``."""
    import onnx

    report.opset = model_opset(model)
    try:
        onnx.checker.check_model(onnx_file if onnx_file else model, full_check=True)
        report.checker = "passed (full check)"
    except Exception as exc:  # ValidationError, InferenceError, ...
        report.checker = f"failed: {onnxruntime_message(exc)}"
        report.failures.append(CheckerFailure(reason=onnxruntime_message(exc)))
    input_name, dims = model_input(model)
    shape = _input_shape(dims, config, report)
    try:
        session = runtime_session(onnx_file if onnx_file else model, report.options.threads)
    except Exception as exc:
        raise GNSurgeonError(f"onnxruntime cannot load the ONNX model: {onnxruntime_message(exc)}") from None
    return session, input_name, shape


def _model_inputs(config: DataConfig, options: VerifyOptions, report: VerifyReport) -> list[tuple[str, torch.Tensor]]:
    """``[(name, input)]`` for the whole-model check: random at batch 1 and batch > 1 (or at the fixed
    batch the file was made for), at a second H x W when those are dynamic, then real images when
    ``options.data`` is given. The per-layer check uses the last one's activations."""
    detection = config.task == "detection"
    static = None if report.dynamic_batch else (1 if detection else report.input_shape[0])
    batches = [1, options.batch] if static is None else [static]
    inputs = [(f"random, batch {b}", make_probe_input(config, batch=b, seed=options.seed + b)) for b in batches]
    if report.dynamic_size:
        other = second_size(tuple(config.input_size))
        other_config = DataConfig(**{**config.to_dict(), "input_size": other})
        x = make_probe_input(other_config, batch=batches[0], seed=options.seed + 7)
        inputs.insert(1, (f"random, batch {batches[0]}, {other[-2]}x{other[-1]}", x))
    if detection:
        report.notes.append("a detection file takes one image per run: other batch sizes are not checked")
    elif static is not None:
        report.notes.append(f"the ONNX input has a fixed batch of {static}: other batch sizes are not checked")
    if options.data and detection:
        report.notes.append("--data is not used for detection models (they normalise their own [0, 1] images)")
    elif options.data:
        images = _load_images(options, config)
        if static is None or len(images) >= static:
            images = images if static is None else images[:static]
            inputs.append((f"images from {options.data}, batch {len(images)}", images))
        else:
            report.notes.append(f"{len(images)} image(s) cannot fill the fixed batch of {static}: images not checked")
    return inputs


def _check_whole_model(
    session, input_name: str, reference: nn.Module, inputs: list, paths: list[str], report: VerifyReport
) -> dict[str, list[torch.Tensor]]:
    """Compare the outputs on every input; return what each GN layer in ``paths`` received on the
    last one (real images when given, else the batch > 1): realistic activations for the per-layer
    check, at no extra forward pass."""
    captured: dict[str, list[torch.Tensor]] = {}
    for i, (name, x) in enumerate(inputs):
        captured, out = _layer_inputs(reference, x, paths if i == len(inputs) - 1 else [])
        flat = flatten_outputs(out)
        refs = [t.float().numpy() for _, t in flat]
        row = _check_model(session, input_name, refs, name, x, report.options, [n for n, _ in flat])
        report.model_checks.append(row)
        if not row["ok"]:
            report.failures.append(_model_failure(row))
    return captured


def same_function(a: nn.Module, b: nn.Module) -> bool:
    """Whether two GN modules compute the same function: type, G, eps, affine values and (timm's
    GroupNormAct) the same activation."""
    if type(a) is not type(b) or (a.num_groups, a.eps, repr(a)) != (b.num_groups, b.eps, repr(b)):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def merged_into(
    path: str, activation: torch.Tensor, modules: dict[str, nn.GroupNorm], captured: dict, found: dict
) -> GNSubgraph | None:
    """The subgraph of another GN layer that also computes this call of ``path``, or None.

    The exporter keeps one copy of identical computations: two layers with the same function
    (:func:`same_function`) applied to the same tensor (LeViT's ``head.bn`` and ``head_dist.bn`` at
    their initial γ = 1, β = 0) leave one subgraph, scoped to the first. That subgraph serves both, so
    it is checked for both, each against its own module and input.
    """
    for other, subs in found.items():
        if other == path or not same_function(modules[path], modules[other]):
            continue
        for sub, seen in zip(subs, captured.get(other, []), strict=False):
            if seen.shape == activation.shape and torch.equal(seen, activation):
                return dataclasses.replace(sub, path=path, mapped_by=f"{sub.mapped_by} (merged into {other})")
    return None


def _check_layers(model, modules: dict[str, nn.GroupNorm], captured: dict, report: VerifyReport) -> None:
    """Every call of every GN layer: its subgraph located, cut out and run on its activation and the
    stress inputs."""
    calls = {p: len(captured[p]) for p in modules if p in captured}
    graph = OnnxGraph(model)
    found, notes = locate_group_norms(model, calls, graph)
    report.notes.extend(notes)
    cache: dict = {}
    for path in calls:
        subs = found.get(path, [])
        for call, activation in enumerate(captured[path]):
            sub = subs[call] if call < len(subs) else merged_into(path, activation, modules, captured, found)
            if sub is None:
                failure = LayerNotFound(layer=path)
                report.layers.append({"path": path, "ok": False, "problems": [failure.reason]})
                report.failures.append(failure)
                continue
            cases = _layer_cases(activation, modules[path].num_groups, report.options, report.dynamic_batch, cache)
            row = _check_layer(graph, sub, modules[path], cases, report.options)
            if len(captured[path]) > 1:
                row["call"] = call
            report.layers.append(row)
            if not row["ok"]:
                report.failures.append(_layer_failure(row))
    _, unreached = split_reached(modules, calls)
    if unreached:  # e.g. GoogLeNet's aux heads: no node in the graph, nothing to verify
        report.notes.append(unreached_note(unreached, consequence="not in the graph, not checked"))


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
    options = options or VerifyOptions()
    reference = reference.float().eval()
    report = VerifyReport(onnx_file, source, options, exported_with=export_metadata(model))
    made_with, here = report.exported_with.get("onnxruntime"), _onnxruntime_version()
    if made_with and made_with != here:
        report.notes.append(
            f"the file's GN lowering ({report.exported_with.get('gn_op')}) was verified with onnxruntime "
            f"{made_with}; re-checked here on onnxruntime {here}"
        )
    start = time.perf_counter()
    session, input_name, shape = _open_model(model, onnx_file, config, report)
    report.timings["load"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    inputs = _model_inputs(DataConfig(**{**config.to_dict(), "input_size": shape}), options, report)
    modules = group_norm_modules(reference)
    captured = _check_whole_model(session, input_name, reference, inputs, list(modules), report)
    report.timings["model"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    _check_layers(model, modules, captured, report)
    report.timings["layers"] = round(time.perf_counter() - start, 3)
    return report


def verify_onnx(
    onnx_file: str | Path,
    source: str,
    options: VerifyOptions | None = None,
    source_options: SourceOptions | None = None,
    *,
    model: nn.Module | None = None,
) -> VerifyReport:
    """Check an existing ONNX file against the checkpoint or model source it should compute.

    ``source_options`` is a :class:`~gnsurgeon.sources.SourceOptions` for the source (weights,
    constructor kwargs, input size); ``model`` the unconverted architecture of a checkpoint saved
    with ``source=None`` (as for :func:`gnsurgeon.load`). Returns the report; ``report.ok`` is False
    when a check failed.
    """
    import onnx

    options = options or VerifyOptions()
    path = Path(onnx_file)
    if not path.is_file():
        raise GNSurgeonError(f"ONNX file {path} does not exist")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError, missing external data
        raise GNSurgeonError(f"cannot read ONNX file {path}: {onnxruntime_message(exc)}") from None
    opened = open_source(source, source_options or SourceOptions(), model=model)
    return verify_model(proto, opened.model, opened.data_config, options, onnx_file=str(path), source=str(source))
