"""Calibration: fit the new GN layers so the converted model reproduces its BN original on data.

Copying γ/β keeps BN's weights but not its function: BN in inference applies fixed dataset
statistics, GN each sample's own group statistics. Calibration refits, without labels, on a few
hundred images:

1. **Layer fit** (closed form). Layers are visited in execution order; each is fitted on the inputs
   that the already-calibrated layers before it produce, so errors do not compound. For a GN layer
   with normalised input ``z`` (GN without affine) and the BN original's pre-activation output
   ``y = a·x_bn + b`` on the same image, the per-channel least-squares ``γ, β`` minimising
   ``Σ (γ·z + β − y)²`` come from five running sums per channel, streamed over batches.
2. **Block reconstruction** (a short optimisation). GN's per-sample statistics cannot be undone by
   a per-channel affine, but the layers of a block together can compensate: for each block (the
   smallest module holding a few GN layers, e.g. a ResNet bottleneck), in order, the block's
   parameters are tuned (Adam, cosine-decayed) so its output matches the original block's output,
   fed by the calibrated blocks before it.
3. **End to end** (a few hundred steps). Where GN groups see a handful of values (1×1 and 2×2 maps
   late in small-input MobileNets) nothing local can restore what GN removed; the layers downstream
   must compensate. The whole student is tuned to match the original's logits (KL, no labels) on the
   calibration images widened by mixup pairs and shifted/scaled copies (the original labels any
   input), which keeps it from overfitting a few hundred images.

A tuning pass (one block, or the end-to-end pass) is scored before and after on the same data and
undone when it did not lower the error: calibration never ends worse than the closed-form fit.

Passes 1 and 2 hold one batch of one layer's (block's) activations and stop each forward at the
layer (block) being fitted; pass 3 holds one training step of the model. No pass holds the dataset: batches are
streamed. Everything is seeded: the same seed gives the same parameters.

Each tuning step is split in two: getting the activations (:func:`_layer_input` for a layer fit,
:func:`_block_batch` for a block: the student block's input, the original block's output) and
fitting on them (:func:`_fit_layer` sums, :func:`_tune_block`), so that a source of cached block
boundaries can feed the same tuner. Hooks and train/eval switches go through :mod:`gnsurgeon.hooks`.

Stage: calibration, after surgery and before fine-tuning. It imports: data, devices, errors, hooks,
layers, metrics, plan, sources (never surgery, fold or the checks: it gets both models ready-made).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .data import BrokenImages, ImageFolderData, collate_skip_broken, eval_transform
from .devices import resolve_device
from .errors import GNSurgeonError
from .hooks import capture, eval_mode
from .layers import frozen_affine_params
from .metrics import kl_divergence
from .models import DataConfig
from .outputs import main_logits
from .plan import Action, Plan
from .reach import reached_layers, unreached_note

_T = TypeVar("_T")


@dataclass
class CalibrationOptions:
    """How to calibrate: the image folder, how many images, the method and its budget."""

    data: str = ""
    samples: int = 256
    holdout: float = 0.2
    batch_size: int = 32
    method: str = "block"  # "layer" (closed form only) or "block" (closed form, block tuning, end to end)
    block_steps: int = 150
    block_inner_steps: int = 1  # optimiser steps per computed batch (more is cheaper but fits worse)
    block_lr: float = 3e-3
    max_block_layers: int = 4
    final_steps: int = 300  # end-to-end logits matching over the whole student (no labels); 0: off
    final_lr: float = 1e-3
    final_mix: bool = True  # label-free mixup of the calibration images: more distinct inputs, less overfit
    final_augment: bool = True  # random shifts and scales of the images (the original labels whatever it sees)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, "--calib-device")

    def check(self) -> None:
        if self.method not in ("layer", "block"):
            raise GNSurgeonError(f"calibration method {self.method!r} is not 'layer' or 'block'")
        if self.samples < 2:
            raise GNSurgeonError("--calib-samples must be at least 2")
        if not 0 <= self.holdout < 1:
            raise GNSurgeonError("the calibration hold-out fraction must be in [0, 1)")
        self.torch_device()
        if self.block_steps < 0 or self.final_steps < 0:
            raise GNSurgeonError("--calib-steps and --calib-final-steps must be 0 or more")


@dataclass
class CalibrationReport:
    """Per-layer relative errors before/after, and agreement with the original on held-out images."""

    method: str
    samples: int
    holdout: int
    layers: dict = field(default_factory=dict)  # path -> {"before": rel_err, "after": rel_err}
    before: dict = field(default_factory=dict)  # {"top1_agreement": %, "logits_cosine": x}
    after: dict = field(default_factory=dict)
    blocks: list = field(default_factory=list)
    seconds: float = 0.0
    broken_images: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # e.g. GN layers the eval forward never runs (skipped)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "samples": self.samples,
            "holdout": self.holdout,
            "seconds": round(self.seconds, 3),
            "before": self.before,
            "after": self.after,
            "layers": self.layers,
            "blocks": self.blocks,
            "broken_images": self.broken_images,
            "notes": self.notes,
        }


def _batches(loader: DataLoader, broken: BrokenImages, device: torch.device):
    for images, _labels, bad in loader:
        broken.add(bad)
        if images is not None:
            yield images.to(device)


def _layer_input(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    """The input (first positional arg, cloned) of the module at ``path``; the forward stops there."""
    return capture(model, x, inputs=[path], stop_at=path).input(path)


def _gn_pre_activation(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)


def _bn_pre_activation(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    a, b = (t.to(x.dtype) for t in frozen_affine_params(bn))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * a.view(shape) + b.view(shape)


def _channels_last_flat(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N·...) for per-channel sums."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).double()


def _fit_layer(student, teacher, path: str, loader_fn, device) -> None:
    """Closed-form per-channel least squares for GN layer ``path`` (γ, β set in place)."""
    gn = student.get_submodule(path)
    bn = teacher.get_submodule(path)
    c = gn.num_channels
    sums = {k: torch.zeros(c, dtype=torch.float64, device=device) for k in ("z", "y", "zz", "zy", "n")}
    for x in loader_fn():
        xs = _layer_input(student, path, x)
        xt = _layer_input(teacher, path, x)
        z = _channels_last_flat(F.group_norm(xs, gn.num_groups, None, None, gn.eps))
        y = _channels_last_flat(_bn_pre_activation(bn, xt))
        sums["z"] += z.sum(1)
        sums["y"] += y.sum(1)
        sums["zz"] += (z * z).sum(1)
        sums["zy"] += (z * y).sum(1)
        sums["n"] += z.shape[1]
    n = sums["n"]
    mean_z, mean_y = sums["z"] / n, sums["y"] / n
    var_z = sums["zz"] / n - mean_z**2
    cov = sums["zy"] / n - mean_z * mean_y
    flat = var_z <= 1e-8  # a constant normalised input carries no scale information
    gamma = torch.where(flat, gn.weight.detach().double(), cov / var_z.clamp_min(1e-8))
    beta = mean_y - gamma * mean_z
    with torch.no_grad():
        gn.weight.copy_(gamma.to(gn.weight.dtype))
        gn.bias.copy_(beta.to(gn.bias.dtype))


def calibration_blocks(model: nn.Module, gn_paths: list[str], max_layers: int) -> list[tuple[str, list[str]]]:
    """Group GN layers into blocks: for each layer, the shallowest ancestor holding at most
    ``max_layers`` GN layers (a ResNet block, an inverted residual); a layer alone otherwise."""
    counts: dict[str, int] = {}
    for p in gn_paths:
        parts = p.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            counts[prefix] = counts.get(prefix, 0) + 1
    blocks: dict[str, list[str]] = {}
    for p in gn_paths:
        parts = p.split(".")
        owner = p
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if counts[prefix] <= max_layers:
                owner = prefix
                break
        blocks.setdefault(owner, []).append(p)
    return list(blocks.items())


@dataclass
class _BlockBatch:
    """What tuning a block needs from one batch of images: the arguments the student's block receives
    (fed by the calibrated blocks before it), the original block's output on the same images, and
    that output's variance, which makes the loss relative."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    scale: torch.Tensor


def _block_batch(student: nn.Module, teacher: nn.Module, block: str, x: torch.Tensor) -> _BlockBatch | None:
    """The student block's input and the original block's output for ``x``; each forward stops at the
    block. None when the block is not reached or its output is not a tensor (nothing to regress on)."""
    fed = capture(student, x, inputs=[block], stop_at=block).inputs.get(block)
    made = capture(teacher, x, outputs=[block], stop_at=block).outputs.get(block)
    if not fed or not made or not isinstance(made[0], torch.Tensor):
        return None
    target = made[0]
    return _BlockBatch(fed[0].args, fed[0].kwargs, target, target.var().clamp_min(1e-12))


def _block_loss(module: nn.Module, batch: _BlockBatch) -> torch.Tensor:
    """Mean squared error of the block's output against the original's, relative to its variance."""
    return F.mse_loss(module(*batch.args, **batch.kwargs), batch.target) / batch.scale


def _tunable(module: nn.Module, model: nn.Module, protected: set[str]) -> list[nn.Parameter]:
    """``module``'s trainable parameters, less those of the ``protected`` paths of ``model``."""
    frozen = {id(p) for path in protected for p in model.get_submodule(path).parameters()}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in frozen]


def _cycle(stream: Callable[[], Iterable[_T]]) -> Iterator[_T]:
    """The items of ``stream()`` pass after pass (a fresh pass only when asked for), until a pass is empty."""
    while True:
        empty = True
        for item in stream():
            empty = False
            yield item
        if empty:
            return


def _optimizer_step(opt: torch.optim.Optimizer, schedule, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()


def _keep_if_lower(module: nn.Module, snapshot: dict, result: dict, what: str) -> dict:
    """``result`` of a tuning pass; ``module`` back at ``snapshot`` when the pass did not lower ``what``."""
    if not result["loss_last"] <= result["loss_first"]:
        module.load_state_dict(snapshot)
        result.update(loss_last=result["loss_first"], note=f"reverted: tuning did not lower {what}")
    return result


def _tune_block(
    block: str,
    module: nn.Module,
    params: list[nn.Parameter],
    batches: Callable[[], Iterable[_BlockBatch | None]],
    options: CalibrationOptions,
    tick: Callable[[], None] | None = None,
) -> dict:
    """Tune ``params`` (Adam, cosine-decayed, ``options.block_steps`` steps) so that ``module`` maps
    each batch's input to its target; ``batches()`` is one pass over the data, repeated as needed.

    The first batch scores the block before and after; a tuning that did not lower that score is
    undone, so a block never ends worse than the closed-form fit left it.
    """
    if options.block_steps <= 0:
        return {"block": block, "steps": 0}
    opt = torch.optim.Adam(params, lr=options.block_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, options.block_steps))
    snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}
    check: _BlockBatch | None = None  # the first batch: the same data scores the block before and after
    before = math.nan
    step = 0
    for batch in _cycle(batches):
        if batch is None:
            return {"block": block, "steps": 0, "note": "block input/output is not a tensor"}
        if check is None:
            check = batch
            with torch.no_grad():
                before = _block_loss(module, check).item()
        for _ in range(min(options.block_inner_steps, options.block_steps - step)):
            _optimizer_step(opt, schedule, _block_loss(module, batch))
            if tick:
                tick()
            step += 1
        if step >= options.block_steps:
            break
    if check is None:  # no readable batch
        return {"block": block, "steps": 0}
    with torch.no_grad():
        after = _block_loss(module, check).item()
    result = {"block": block, "steps": step, "loss_first": before, "loss_last": after}
    return _keep_if_lower(module, snapshot, result, "the block's error")


def _reconstruct_block(
    student, teacher, block: str, loader_fn, options: CalibrationOptions, protected: set[str], tick=None
) -> dict:
    """Tune the block's own parameters so its output matches the original block's output."""
    module = student.get_submodule(block)
    # Everything trainable in the block (GN γ/β and the convs around them: tuning only γ/β got
    # 97.3% instead of 98.7% top-1 on the digits resnet18), except what the plan protects.
    params = _tunable(module, student, protected)
    if not params:
        return {"block": block, "steps": 0}

    def batches() -> Iterator[_BlockBatch | None]:
        return (_block_batch(student, teacher, block, x) for x in loader_fn())

    with eval_mode(module):
        return _tune_block(block, module, params, batches, options, tick)


def class_scores(output) -> torch.Tensor | None:
    """A model output as rows of class logits: (N, classes) as is, dense (N, classes, H, W) logits
    (segmentation; torchvision's ``{"out": ...}``) one row per position; None for anything else
    (detector boxes, feature lists). What counts as logits is :func:`~gnsurgeon.outputs.main_logits`'s."""
    output = main_logits(output)
    if output is None or output.dim() < 2:
        return None
    return output if output.dim() == 2 else output.movedim(1, -1).reshape(-1, output.shape[1])


def _logits_divergence(student, teacher, loader_fn) -> float | None:
    """Mean KL(original ‖ student) of the class logits over the data; None without class logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x in loader_fn():
            out, target = class_scores(student(x)), class_scores(teacher(x))
            if out is None or target is None:
                return None
            total += kl_divergence(out, target).item() * len(x)
            count += len(x)
    return total / count if count else None


def _distinct_inputs(x: torch.Tensor, options: CalibrationOptions, gen: torch.Generator) -> torch.Tensor:
    """More distinct inputs from one batch, without labels: the original's logits are the target
    wherever the input lies, so mixup pairs and shifted/scaled copies are all valid training points."""
    if options.final_mix and len(x) > 1:
        lam = torch.rand(len(x), *([1] * (x.dim() - 1)), generator=gen).to(x)
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        x = torch.cat([x, lam * x + (1 - lam) * x[perm]])
    if options.final_augment and x.dim() == 4:
        n = len(x)
        scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2  # ±10%
        shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25  # ±1/8 of the image
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    return x


def _final_pass(student, teacher, loader_fn, options: CalibrationOptions, protected: set[str], tick=None) -> dict:
    """Match the original's class logits end to end (KL, no labels) for a few hundred steps.

    Classifiers match their (N, classes) logits, segmentation models their per-pixel logits;
    models without class logits (detectors) skip this pass.

    Block-local fits cannot undo what GN removes where groups see a handful of values (1×1 and 2×2
    maps late in small-input MobileNets); layers downstream have to compensate. Each batch is
    widened by :func:`_distinct_inputs` (seeded), without which the pass overfits the few hundred
    calibration images. The divergence over the calibration images
    is measured before and after; a pass that did not lower it is undone. Memory: one training step
    of the model.
    """
    name = "(end to end)"
    before = _logits_divergence(student, teacher, loader_fn)
    if before is None:
        return {"block": name, "steps": 0, "note": "the model does not output class logits"}
    params = _tunable(student, student, protected)
    snapshot = copy.deepcopy(student.state_dict())
    steps = _match_logits(student, teacher, loader_fn, params, options, tick)
    after = _logits_divergence(student, teacher, loader_fn)
    result = {"block": name, "steps": steps, "loss_first": before, "loss_last": after}
    # Never leave the model further from its original than the block fits did.
    return _keep_if_lower(student, snapshot, result, "the logits divergence")


def _match_logits(
    student, teacher, loader_fn, params: list[nn.Parameter], options: CalibrationOptions, tick=None
) -> int:
    """Tune ``params`` (Adam, cosine-decayed) so the student's class logits match the original's
    on widened batches, for ``options.final_steps`` steps; return the steps taken."""
    if options.final_steps <= 0:
        return 0
    opt = torch.optim.Adam(params, lr=options.final_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, options.final_steps))
    gen = torch.Generator().manual_seed(options.seed + 1)
    steps = 0
    for x in _cycle(loader_fn):
        x = _distinct_inputs(x, options, gen)
        with torch.no_grad():
            target = class_scores(teacher(x))
        _optimizer_step(opt, schedule, kl_divergence(class_scores(student(x)), target))
        steps += 1
        if tick:
            tick()
        if steps >= options.final_steps:
            break
    return steps


@torch.no_grad()
def _agreement(student, teacher, loader_fn) -> dict:
    """Top-1 agreement (%) and logits cosine with the original: per image, or per pixel for segmentation."""
    agree = total = 0
    cos_sum = 0.0
    for x in loader_fn():
        ys, yt = class_scores(student(x)), class_scores(teacher(x))
        if ys is None or yt is None:
            return {}
        agree += (ys.argmax(1) == yt.argmax(1)).sum().item()
        cos_sum += F.cosine_similarity(ys.double(), yt.double(), dim=1).sum().item()
        total += len(ys)
    if not total:
        return {}
    return {"top1_agreement": 100.0 * agree / total, "logits_cosine": cos_sum / total}


@torch.no_grad()
def _layer_errors(student, teacher, paths: list[str], loader_fn, sample: int = 4096) -> dict[str, float]:
    """Relative error ||GN(x_s) − BN(x_t)||² / ||BN(x_t)||² per layer (pre-activation), summed over data.

    Both sides are compared at the same ``sample`` evenly spaced positions of each image's layer
    output (all of them when smaller), so one forward per model holds a few KB per layer instead of
    every layer's activations.
    """
    num = dict.fromkeys(paths, 0.0)
    den = dict.fromkeys(paths, 0.0)
    for x in loader_fn():
        outs = _sampled_pre_activations(student, paths, x, _gn_pre_activation, sample)
        refs = _sampled_pre_activations(teacher, paths, x, _bn_pre_activation, sample)
        for p in paths:
            if p in outs and p in refs:
                num[p] += (outs[p] - refs[p]).pow(2).sum().item()
                den[p] += refs[p].pow(2).sum().item()
    return {p: (num[p] / den[p] if den[p] > 0 else math.nan) for p in paths}


def _sampled_pre_activations(model: nn.Module, paths: list[str], x: torch.Tensor, norm_fn, sample: int) -> dict:
    """``norm_fn(layer, input)`` for each layer at ``paths`` in one forward, ``sample`` positions per image
    (a layer called more than once: its last call)."""

    def sampled(_path: str, module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        flat = norm_fn(module, inp).flatten(1)
        if flat.shape[1] > sample:
            flat = flat[:, torch.linspace(0, flat.shape[1] - 1, sample, device=flat.device).long()]
        return flat.double()

    seen = capture(model, x, inputs=paths, transform=sampled)
    return {path: calls[-1].first for path, calls in seen.inputs.items()}


def untouchable(plan: Plan) -> set[str]:
    """Module paths whose parameters calibration never tunes: convs holding a folded BN* (their
    weights must stay the exact BN* fold) and norm layers the plan keeps or freezes."""
    paths = {lp.producer for lp in plan.with_action(Action.FOLDED) if lp.producer}
    return paths | {lp.path for lp in plan.with_action(Action.KEEP, Action.FROZEN)}


def calibration_batches(options: CalibrationOptions, data_config: DataConfig, broken: BrokenImages) -> tuple:
    """(fit batches, held-out batches, fit count, held-out count): two re-iterable, seeded streams.

    ``options.samples`` images are read with the model's eval transform; ``options.holdout`` of them
    are kept apart for the agreement metric (all are used for both when there are too few).
    """
    device = options.torch_device()
    dataset = ImageFolderData(
        options.data, eval_transform(data_config), limit=options.samples, seed=options.seed, readable_only=True
    )
    broken.add(dataset.unreadable)  # passed over: the counts below are images really used
    n_hold = int(round(len(dataset) * options.holdout)) if len(dataset) > 4 else 0
    shuffled = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(options.seed)).tolist()
    fit_set = Subset(dataset, sorted(shuffled[n_hold:]))
    hold_set = Subset(dataset, sorted(shuffled[:n_hold]))

    def stream(subset):
        def iterate():
            dl = DataLoader(subset, batch_size=options.batch_size, shuffle=False, collate_fn=collate_skip_broken)
            return _batches(dl, broken, device)

        return iterate

    return stream(fit_set), stream(hold_set if n_hold else fit_set), len(fit_set), n_hold


def calibrate(
    teacher: nn.Module,
    student: nn.Module,
    plan: Plan,
    data_config: DataConfig,
    options: CalibrationOptions,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, CalibrationReport]:
    """Return a calibrated copy of ``student`` (the GN conversion of ``teacher``) and the report.

    Only layers whose plan action is ``gn`` are fitted; BN* layers, and the convs a BN* was folded
    into, are left as they are. Neither input model is modified. ``progress(done, total)`` is called
    after each layer fit and each optimiser step (for a progress bar).
    """
    options.check()
    start = time.perf_counter()
    device = options.torch_device()
    torch.manual_seed(options.seed)
    student = copy.deepcopy(student).to(device).eval()
    teacher = copy.deepcopy(teacher).to(device).eval()
    gn_paths = [lp.path for lp in plan.with_action(Action.GN)]
    if not gn_paths:
        raise GNSurgeonError("nothing to calibrate: the plan converts no layer to GroupNorm")

    broken = BrokenImages()
    fit_data, eval_data, n_fit, n_hold = calibration_batches(options, data_config, broken)
    order, unreached = _execution_order(student, gn_paths, next(iter(fit_data()), None))
    report = CalibrationReport(options.method, n_fit, n_hold)
    if unreached:  # e.g. GoogLeNet's aux heads: they run in training only, so there is nothing to fit them on
        report.notes.append(unreached_note(unreached, consequence="not calibrated (γ/β as converted)"))
    report.before = _agreement(student, teacher, eval_data)
    before = _layer_errors(student, teacher, order, eval_data)
    passes = _Passes(student, teacher, fit_data, options, untouchable(plan), device)
    report.blocks = passes.run(order, progress)
    after = _layer_errors(student, teacher, order, eval_data)
    report.layers = {p: {"before": before[p], "after": after[p]} for p in order}
    report.after = _agreement(student, teacher, eval_data)
    report.broken_images = broken.to_dict()
    report.seconds = time.perf_counter() - start
    for p in student.parameters():
        p.grad = None
    return student.cpu(), report


@dataclass
class _Passes:
    """The calibration passes over one student/teacher pair: what every pass needs, given once."""

    student: nn.Module
    teacher: nn.Module
    fit_data: Callable[[], Iterable[torch.Tensor]]
    options: CalibrationOptions
    protected: set[str]  # paths whose parameters no pass tunes (see :func:`untouchable`)
    device: torch.device

    def run(self, order: list[str], progress: Callable[[int, int], None] | None) -> list[dict]:
        """Fit every GN layer at ``order`` (execution order); with the block method, tune each block
        after its layers are fitted, then the whole student. Returns one result per tuning pass."""
        options = self.options
        if options.method == "layer":
            blocks = [(path, [path]) for path in order]  # each layer its own block: nothing to tune
            total = len(order)
        else:
            blocks = calibration_blocks(self.student, order, options.max_block_layers)
            tuned = sum(block not in paths for block, paths in blocks)
            total = len(order) + options.block_steps * tuned + options.final_steps
        tick = _counter(total, progress)
        results = []
        for block, paths in blocks:
            for path in paths:
                _fit_layer(self.student, self.teacher, path, self.fit_data, self.device)
                tick()
            if block not in paths and options.block_steps > 0:
                results.append(
                    _reconstruct_block(self.student, self.teacher, block, self.fit_data, options, self.protected, tick)
                )
        if options.method == "block" and options.final_steps > 0:
            results.append(_final_pass(self.student, self.teacher, self.fit_data, options, self.protected, tick))
        return results


def _counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """A ``tick()`` that counts one unit of work done and reports ``progress(done, total)``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return tick


def _execution_order(model: nn.Module, paths: list[str], x: torch.Tensor | None) -> tuple[list[str], list[str]]:
    """GN layers sorted by when they run (module registration order can differ from call order), and
    those the eval forward never runs (:func:`~gnsurgeon.reach.reached_layers`: one rule with export)."""
    if x is None:
        raise GNSurgeonError("no readable image in the calibration folder")
    order, unreached = reached_layers(model, x[:1], paths)
    if not order:
        raise GNSurgeonError(unreached_note(unreached, consequence="nothing to calibrate"))
    return order, unreached
