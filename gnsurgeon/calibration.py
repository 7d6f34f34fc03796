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

A tuning pass (one block, or the end-to-end pass) is scored before and after on images it did not
train on (the calibration hold-out) and undone when that error grew: calibration never ends worse
than the closed-form fit, and a pass that only fits its own training images is not kept.

**Cost: cached block boundaries** (GPTQ, AIMET AdaRound, BRECQ). Passes 1 and 2 see the models
block by block. Streamed, every layer fit and every tuning step would re-run both models from the
image up to the block (depth² × images × steps). Instead, for each calibration batch the student's
and the original's inputs at the current block are kept (:mod:`gnsurgeon.activation_cache`): the
block's layers are fitted and the block tuned by running the block alone on them, then the cached
inputs are pushed through the calibrated block (and the original's through the original block) to
become the next block's inputs. That holds only where the next block reads exactly this block's
output; one watched forward (:func:`~gnsurgeon.activation_cache.probe_boundaries`) finds where, and
elsewhere (the stem before the first block, pooling and heads between blocks, residual taps, FPNs)
the block's inputs are re-synchronised from the images with one forward per batch that stops at the
block. The cache needs images × (a block's input + output) × 2 models; over the memory budget it
is kept in float16, then in memory-mapped files, and only then is calibration streamed
(:class:`_Streamed`, which holds one batch of one block). Pass 3 holds one training step of the
model and streams its images. Everything is seeded: the same seed gives the same parameters,
cached (float32) or streamed, up to float rounding.

Each pass is split in two: where a block's activations come from (:class:`_Streamed`,
:class:`_CachedBlock`: the student's layer inputs for a fit, the block's inputs and the original
block's outputs for tuning) and what is done with them (:func:`_fit_layer`, :func:`_tune_block`),
so the cache cannot change what is computed, only where its inputs come from. Hooks and train/eval
switches go through :mod:`gnsurgeon.hooks`.

Stage: calibration, after surgery and before fine-tuning. It imports: activation_cache, data,
devices, errors, hooks, layers, metrics, plan, sources (never surgery, fold or the checks: it gets
both models ready-made).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .activation_cache import (
    CACHE_MODES,
    ActivationStore,
    Boundary,
    CacheChoice,
    budget_bytes,
    cache_bytes_needed,
    cache_rooms,
    choose_cache,
    open_store,
    peak_memory,
    probe_boundaries,
)
from .data import BrokenImages, ImageFolderData, collate_skip_broken, eval_transform
from .devices import resolve_device
from .errors import GNSurgeonError
from .hooks import Call, capture, eval_mode
from .layers import frozen_affine_params
from .metrics import kl_divergence
from .models import DataConfig
from .outputs import main_logits
from .plan import Action, Plan
from .reach import reached_layers, unreached_note

_T = TypeVar("_T")


# Auto end-to-end pass: FINAL_STEPS steps where some GN layer's groups hold fewer than
# FINAL_PASS_GROUP_VALUES values per image (C/G x H x W at the calibration input size), else off.
# That is where it paid on the benchmarks: MobileNetV3-small's smallest groups hold 3-256 values at
# 32×32 to 128×128, and the pass is worth up to 8 points there; ResNet-18's hold 16-256 and it never
# kept the pass. At 224×224 ResNets' groups hold 784 or more (16 channels × 7×7); there, forced on,
# the pass changed no result on the shifted224 benchmark and would be most of resnet50's calibration
# time. README "Calibration" (the end-to-end pass follows the input size) and "Benchmarks".
FINAL_STEPS = 300
FINAL_PASS_GROUP_VALUES = 512


@dataclass
class CalibrationOptions:
    """How to calibrate: the image folder, how many images, the method and its budget.

    ``final_steps`` None is resolved by :func:`calibrate` for the model and its input size
    (:func:`auto_final_steps`); the report gives the value used and why (``settings``)."""

    data: str = ""
    samples: int = 256
    holdout: float = 0.2
    batch_size: int = 32
    method: str = "block"  # "layer" (closed form only) or "block" (closed form, block tuning, end to end)
    block_steps: int = 150
    block_inner_steps: int = 1  # optimiser steps per computed batch (more is cheaper but fits worse)
    block_lr: float = 3e-3
    max_block_layers: int = 4
    final_steps: int | None = None  # end-to-end logits matching (no labels); 0: off; None: auto (auto_final_steps)
    final_lr: float = 1e-3
    final_mix: bool = True  # label-free mixup of the calibration images: more distinct inputs, less overfit
    final_augment: bool = True  # random shifts and scales of the images (the original labels whatever it sees)
    final_features: float = 0.0  # weight of matching every calibration block's output in the end-to-end pass
    final_checks: int = 1  # held-out scores during the end-to-end pass; the best-scoring parameters are kept
    # After this share of the end-to-end steps the held-out divergence is scored once more: if it has
    # not fallen below where the pass started, the pass stops there and is undone (0: off). Where
    # the pass cannot win (ResNet-18 on the benchmarks, README "Benchmarks") the end check undoes
    # it anyway, so this gives the same model for half the pass's cost. Not earlier: at a tenth of
    # the run MobileNetV3's divergence had not yet fallen, and stopping there cost it up to 6 points.
    final_abort: float = 0.5
    photometric: float = 0.0  # contrast/brightness jitter strength of the end-to-end batches and the copies
    copy_mix: bool = False  # the copies are mixup pairs of the batch's images (then shifted/scaled, jittered)
    copies: int = 0  # jittered copies of each calibration batch, seen by every pass (layer fit, blocks, end to end)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    # Where block-boundary activations are cached: "auto" (memory if it fits, float16, then disk, else
    # streaming), "ram", "disk" (forced; float16 when over budget) or "off" (streaming: re-run the prefix).
    cache: str = "auto"
    # The in-memory budget: bytes (int), a size such as "8G" / "512M", or a share of the free memory
    # ("50%"): of the GPU's on CUDA, else of the host's RAM.
    cache_mem: int | str = "50%"

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
        if self.block_steps < 0 or (self.final_steps is not None and self.final_steps < 0):
            raise GNSurgeonError("--calib-steps and --calib-final-steps must be 0 or more")
        if self.batch_size < 1:
            raise GNSurgeonError("the calibration batch size must be at least 1")
        if not 0 <= self.final_abort < 1:
            raise GNSurgeonError("the end-to-end pass's abort point (final_abort) must be in [0, 1)")
        if self.cache not in CACHE_MODES:
            raise GNSurgeonError(f"--calib-cache {self.cache!r} is not one of {', '.join(CACHE_MODES)}")
        budget_bytes(self.cache_mem, 0)  # a malformed size fails here, before any work


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
    cache: dict = field(default_factory=dict)  # the cache mode, its bytes and why; the re-syncs
    memory: dict = field(default_factory=dict)  # {"peak_rss_mb"} (and "peak_cuda_mb" on CUDA)
    # Seconds per phase: probe (the boundary probe), propagation (cache re-syncs, targets, pushing
    # the cache through each block), layer_fit, block_tuning and end_to_end (optimiser steps),
    # scoring (each pass's held-out error before and after), metrics (this report's before/after).
    phases: dict = field(default_factory=dict)
    # The auto settings as resolved: {"batch_size", "final_steps", "auto": {setting: why}}.
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "samples": self.samples,
            "holdout": self.holdout,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "before": self.before,
            "after": self.after,
            "layers": self.layers,
            "blocks": self.blocks,
            "broken_images": self.broken_images,
            "notes": self.notes,
            "cache": self.cache,
            "memory": self.memory,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
        }


def _batches(loader: DataLoader, broken: BrokenImages, device: torch.device):
    for images, _labels, bad in loader:
        broken.add(bad)
        if images is not None:
            yield images.to(device)


def _gn_pre_activation(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)


def _bn_pre_activation(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    a, b = (t.to(x.dtype) for t in frozen_affine_params(bn))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * a.view(shape) + b.view(shape)


def _channels_last_flat(t: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N·...) for per-channel sums."""
    return t.transpose(0, 1).reshape(t.shape[1], -1).double()


def _fit_layer(gn: nn.Module, bn: nn.Module, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], device) -> None:
    """Closed-form per-channel least squares for the GN layer ``gn`` (γ, β set in place) from
    ``pairs``: per batch, the input the student's layer receives and the one its BN original
    receives. A layer that received nothing is left as it is."""
    c = gn.num_channels
    sums = {k: torch.zeros(c, dtype=torch.float64, device=device) for k in ("z", "y", "zz", "zy", "n")}
    for xs, xt in pairs:
        z = _channels_last_flat(F.group_norm(xs, gn.num_groups, None, None, gn.eps))
        y = _channels_last_flat(_bn_pre_activation(bn, xt))
        sums["z"] += z.sum(1)
        sums["y"] += y.sum(1)
        sums["zz"] += (z * z).sum(1)
        sums["zy"] += (z * y).sum(1)
        sums["n"] += z.shape[1]
    n = sums["n"]
    if not n.any():
        return
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


@dataclass
class _Clock:
    """Seconds spent per phase of one calibration (the report's ``phases``: where the time went)."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":  # once per phase, never per step: kernels are asynchronous
                torch.cuda.synchronize(self.device)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def _mean_block_loss(module: nn.Module, batches: Callable[[], Iterable[_BlockBatch | None]]) -> float | None:
    """The block's relative error averaged over one pass of ``batches()`` (weighted by images):
    None when a batch has no tensor output to compare, NaN when there is no batch."""
    total, count = None, 0
    with torch.no_grad():
        for batch in batches():
            if batch is None:
                return None
            n = len(batch.target)
            loss = _block_loss(module, batch) * n
            total = loss if total is None else total + loss
            count += n
    return math.nan if total is None else (total / count).item()  # one host read per score, not per batch


def _train_block(
    params: list[nn.Parameter],
    module: nn.Module,
    batches: Callable[[], Iterable[_BlockBatch | None]],
    options: CalibrationOptions,
    tick: Callable[[], None] | None,
) -> int:
    """``options.block_steps`` Adam steps (cosine-decayed) on ``batches()``, cycled; the steps taken."""
    opt = torch.optim.Adam(params, lr=options.block_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, options.block_steps))
    step = 0
    for batch in _cycle(batches):
        if batch is None:
            break
        for _ in range(min(options.block_inner_steps, options.block_steps - step)):
            _optimizer_step(opt, schedule, _block_loss(module, batch))
            if tick:
                tick()
            step += 1
        if step >= options.block_steps:
            break
    return step


def _tune_block(
    block: str,
    module: nn.Module,
    params: list[nn.Parameter],
    batches: Callable[[], Iterable[_BlockBatch | None]],
    options: CalibrationOptions,
    tick: Callable[[], None] | None = None,
    held_out: Callable[[], Iterable[_BlockBatch | None]] | None = None,
    clock: _Clock | None = None,
) -> dict:
    """Tune ``params`` (Adam, cosine-decayed, ``options.block_steps`` steps) so that ``module`` maps
    each batch's input to its target; ``batches()`` is one pass over the data, repeated as needed.

    ``held_out()`` (default: ``batches()``) scores the block before and after, on images the steps
    did not train on; a tuning that raised that error is undone, so a block never ends worse than
    the closed-form fit left it, and overfitting the training batches does not count as a gain.
    """
    if options.block_steps <= 0:
        return {"block": block, "steps": 0}
    clock = clock or _Clock(torch.device("cpu"))
    scored = held_out or batches
    snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with clock.timed("scoring"):
        before = _mean_block_loss(module, scored)
    if before is None:
        return {"block": block, "steps": 0, "note": "block input/output is not a tensor"}
    if math.isnan(before):  # no readable batch
        return {"block": block, "steps": 0}
    with clock.timed("block_tuning"):
        steps = _train_block(params, module, batches, options, tick)
    with clock.timed("scoring"):
        after = _mean_block_loss(module, scored)
    result = {"block": block, "steps": steps, "loss_first": before, "loss_last": after}
    return _keep_if_lower(module, snapshot, result, "the block's error")


class _Streamed:
    """One block's activations computed from the images (no cache): every use runs both models from
    the image and stops at the layer or block, so memory is one batch of one block, and the cost a
    prefix forward per batch, per layer fit and per tuning step."""

    def __init__(self, student: nn.Module, teacher: nn.Module, block: str, fit_data, held_data=None) -> None:
        self.student, self.teacher, self.block = student, teacher, block
        self.fit_data, self.held_data = fit_data, held_data or fit_data

    def layer_pairs(self, path: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per fit batch: the input of the student's layer ``path`` and of the original's."""
        for x in self.fit_data():
            xs = capture(self.student, x, inputs=[path], stop_at=path).inputs.get(path)
            xt = capture(self.teacher, x, inputs=[path], stop_at=path).inputs.get(path)
            if xs and xt:
                yield xs[0].first, xt[0].first

    def prepare_targets(self) -> None:
        """Nothing to prepare: targets are computed per batch."""

    def fit_batches(self) -> Iterator[_BlockBatch | None]:
        return (_block_batch(self.student, self.teacher, self.block, x) for x in self.fit_data())

    def held_batches(self) -> Iterator[_BlockBatch | None]:
        return (_block_batch(self.student, self.teacher, self.block, x) for x in self.held_data())


def _relative(path: str, block: str) -> str:
    """``path`` inside the module at ``block`` ("" for the block itself)."""
    return "" if path == block else path[len(block) + 1 :]


def _run_alone(module: nn.Module, call: Call | None) -> Any:
    """``module`` run alone on the arguments of ``call`` (no autograd); None when there is no call."""
    if call is None:
        return None
    with torch.no_grad():
        return module(*call.args, **call.kwargs)


class _CachedBlock:
    """One block's activations from the cache: per batch (fit batches, then held-out ones) the
    arguments the student's and the original's block receive, in ``store``. Layer inputs and targets
    come from running the block alone on them; afterwards :meth:`finish` turns them into the next
    block's inputs when the next block reads this one's output, or hands them on as they are when
    the next block reads the same input (``keep_inputs``)."""

    def __init__(self, store: ActivationStore, student: nn.Module, teacher: nn.Module, block: str, inputs) -> None:
        self.store, self.block = store, block
        self.student, self.teacher = student.get_submodule(block), teacher.get_submodule(block)
        self.s_in, self.t_in, self.n_fit = inputs  # stored (args, kwargs) per batch, or None: not reached
        self.t_out: list | None = None
        self.keep_inputs = False  # the next block reads the same inputs: do not free them

    def _call(self, stored) -> Call | None:
        return None if stored is None else Call(*self.store.get(stored))

    def _held(self) -> range:
        total = len(self.s_in)
        return range(self.n_fit, total) if total > self.n_fit else range(self.n_fit)

    def layer_pairs(self, path: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per fit batch: the input of the student's layer ``path`` and of the original's, from the
        block alone run on the cached inputs (it stops at the layer)."""
        rel = _relative(path, self.block)
        for s, t in zip(self.s_in[: self.n_fit], self.t_in[: self.n_fit], strict=True):
            if s is None or t is None:
                continue
            xs = capture(self.student, self._call(s), inputs=[rel], stop_at=rel).inputs.get(rel)
            xt = capture(self.teacher, self._call(t), inputs=[rel], stop_at=rel).inputs.get(rel)
            if xs and xt:
                yield xs[0].first, xt[0].first

    def prepare_targets(self) -> None:
        """The original block's outputs (the targets) from its cached inputs, which are then freed
        (the layer fits that needed them are done) unless the next block reads them too."""
        if self.t_out is not None:
            return
        self.t_out = []
        for i, t in enumerate(self.t_in):
            out = _run_alone(self.teacher, self._call(t))
            self.t_out.append(None if out is None else self.store.put(out))
            if not self.keep_inputs:
                self.store.drop(t)
                self.t_in[i] = None

    def _batches(self, indices: Iterable[int]) -> Iterator[_BlockBatch | None]:
        self.prepare_targets()
        for i in indices:
            call, target = self._call(self.s_in[i]), self.store.get(self.t_out[i], copy=False)
            if call is None or not isinstance(target, torch.Tensor):
                yield None
            else:
                yield _BlockBatch(call.args, call.kwargs, target, target.var().clamp_min(1e-12))

    def fit_batches(self) -> Iterator[_BlockBatch | None]:
        return self._batches(range(self.n_fit))

    def held_batches(self) -> Iterator[_BlockBatch | None]:
        return self._batches(self._held())

    def finish(self, next_follows: bool) -> tuple | None:
        """The next block's cached inputs: this block's own when the next one reads the same
        (``keep_inputs``); when it reads this block's output (``next_follows``), the student's
        through the calibrated block, the original's through the original block. Everything else is
        freed."""
        if self.keep_inputs:
            self.store.drop(self.t_out)
            return self.s_in, self.t_in, self.n_fit
        if not next_follows:
            for stored in (self.s_in, self.t_in, self.t_out):
                self.store.drop(stored)
            return None
        self.prepare_targets()
        s_out = []
        for i, s in enumerate(self.s_in):
            out = _run_alone(self.student, self._call(s))
            s_out.append(None if out is None else self.store.put(((out,), {})))
            self.store.drop(s)
            self.s_in[i] = None
        t_out = [None if t is None else ((t,), {}) for t in self.t_out]
        return s_out, t_out, self.n_fit


def _tune(source, student: nn.Module, block: str, options: CalibrationOptions, protected: set[str], tick, clock):
    """Tune the block's own parameters on ``source`` (:class:`_Streamed` or :class:`_CachedBlock`) so
    its output matches the original block's; scored on the source's held-out batches."""
    module = student.get_submodule(block)
    # Everything trainable in the block (GN γ/β and the convs around them: tuning only γ/β got
    # 97.3% instead of 98.7% top-1 on the digits resnet18), except what the plan protects.
    params = _tunable(module, student, protected)
    if not params:
        return {"block": block, "steps": 0}
    with eval_mode(module):
        return _tune_block(block, module, params, source.fit_batches, options, tick, source.held_batches, clock)


def _reconstruct_block(
    student, teacher, block: str, loader_fn, options: CalibrationOptions, protected: set[str], tick=None, held_out=None
) -> dict:
    """Tune the block's own parameters so its output matches the original block's output, streamed
    from ``loader_fn`` (scored on ``held_out``, default the same images)."""
    source = _Streamed(student, teacher, block, loader_fn, held_out)
    return _tune(source, student, block, options, protected, tick, None)


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


def _shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image randomly shifted (±1/8 of its side) and scaled (±10%), borders reflected."""
    n = len(x)
    scale = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.2  # ±10%
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.25  # ±1/8 of the image
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def _photometric(x: torch.Tensor, gen: torch.Generator, strength: float) -> torch.Tensor:
    """Each image's contrast about its own mean times a factor in [1/(1+s), 1+s] (log-uniform) and its
    brightness moved by up to ±s/2 (in the normalised input's units, about ±s/8 of the pixel range)."""
    shape = (len(x),) + (1,) * (x.dim() - 1)
    contrast = torch.exp((torch.rand(shape, generator=gen) * 2 - 1) * math.log1p(strength)).to(x)
    offset = ((torch.rand(shape, generator=gen) - 0.5) * strength).to(x)
    mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return (x - mean) * contrast + mean + offset


def _distinct_inputs(x: torch.Tensor, options: CalibrationOptions, gen: torch.Generator) -> torch.Tensor:
    """More distinct inputs from one batch, without labels: the original's logits are the target
    wherever the input lies, so mixup pairs and shifted/scaled copies are all valid training points."""
    if options.final_mix and len(x) > 1:
        lam = torch.rand(len(x), *([1] * (x.dim() - 1)), generator=gen).to(x)
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        x = torch.cat([x, lam * x + (1 - lam) * x[perm]])
    if options.final_augment and x.dim() == 4:
        x = _shifted(x, gen)
    if options.photometric > 0:
        x = _photometric(x, gen, options.photometric)
    return x


def _with_copies(stream: Callable[[], Iterable[torch.Tensor]], options: CalibrationOptions):
    """``stream`` with ``options.copies`` jittered copies after each batch (shifted/scaled when the
    input is an image, and photometric jitter): more distinct inputs for the layer fit and the block
    passes too, not only the end-to-end pass. Each copy is seeded by (seed, batch, copy), so every
    pass over the stream yields the same images (the cache re-synchronises on them)."""
    if options.copies <= 0:
        return stream

    def iterate() -> Iterator[torch.Tensor]:
        for i, x in enumerate(stream()):
            yield x
            for k in range(options.copies):
                gen = torch.Generator().manual_seed(options.seed * 1_000_003 + i * 1009 + k + 17)
                y = x
                if options.copy_mix and len(x) > 1:
                    lam = torch.rand(len(x), *([1] * (x.dim() - 1)), generator=gen).to(x)
                    y = lam * x + (1 - lam) * x[torch.randperm(len(x), generator=gen).to(x.device)]
                y = _shifted(y, gen) if x.dim() == 4 else y
                yield _photometric(y, gen, options.photometric) if options.photometric > 0 else y

    return iterate


def _final_pass(
    student,
    teacher,
    loader_fn,
    options: CalibrationOptions,
    protected: set[str],
    tick=None,
    held_out=None,
    clock: _Clock | None = None,
    features: list[str] | None = None,
) -> dict:
    """Match the original's class logits end to end (KL, no labels) for a few hundred steps.

    Classifiers match their (N, classes) logits, segmentation models their per-pixel logits;
    models without class logits (detectors) skip this pass.

    Block-local fits cannot undo what GN removes where groups see a handful of values (1×1 and 2×2
    maps late in small-input MobileNets); layers downstream have to compensate. Each batch is
    widened by :func:`_distinct_inputs` (seeded), without which the pass overfits the few hundred
    calibration images. With ``options.final_features`` the outputs of the blocks at ``features``
    are matched too (relative MSE), which keeps the inside of the student near the original's while
    its logits move. The divergence on ``held_out()`` (images the pass does not train on; default
    the training images) is measured before, every ``options.final_checks``-th of the run and after;
    the parameters that scored best are kept (the ones before the pass when none beat them).

    After ``options.final_abort`` of the steps the divergence on ``held_out()`` is scored once more
    and, if it has not fallen below where the pass began, the pass stops there and is undone. On
    ResNet-18 (every benchmark in README "Benchmarks") the whole pass was undone by the end check
    anyway, while it took 80-90% of calibration's time; where the pass helps (MobileNetV3 on small
    maps) the divergence has fallen by half-way, though not yet a tenth of the way in. This check
    never changes which parameters are kept when the pass goes on: it does not enter the best-of
    comparison.
    Memory: one training step of the model.
    """
    name = "(end to end)"
    held_out = held_out or loader_fn
    clock = clock or _Clock(torch.device("cpu"))
    with clock.timed("scoring"):
        before = _logits_divergence(student, teacher, held_out)
    if before is None:
        return {"block": name, "steps": 0, "note": "the model does not output class logits"}
    params = _tunable(student, student, protected)
    best = _Best(before, copy.deepcopy(student.state_dict()), 0)

    def score(step: int) -> None:
        with clock.timed("scoring"):
            loss = _logits_divergence(student, teacher, held_out)
        if loss < best.loss:
            best.loss, best.state, best.step = loss, copy.deepcopy(student.state_dict()), step

    stopped: dict = {}

    def keep_going(step: int) -> bool:
        with clock.timed("scoring"):
            loss = _logits_divergence(student, teacher, held_out)
        if loss < before:
            return True
        stopped.update(step=step, loss=loss)
        return False

    with clock.timed("end_to_end"):
        steps = _match_logits(
            student, teacher, loader_fn, params, options, tick, features or [], score, _abort_step(options), keep_going
        )
    student.load_state_dict(best.state)
    result = {"block": name, "steps": steps, "loss_first": before, "loss_last": best.loss, "kept_step": best.step}
    if stopped:
        result["stopped_at"] = stopped["step"]
        outcome = "reverted" if best.step == 0 else f"kept step {best.step}"
        result["note"] = (
            f"{outcome}; stopped after {stopped['step']} of {options.final_steps} steps: the held-out logits "
            f"divergence had not fallen ({before:.4g} -> {stopped['loss']:.4g}), so the rest of the pass was skipped"
        )
    elif best.step == 0:  # never leave the model further from its original than the block fits did
        result["note"] = "reverted: tuning did not lower the logits divergence"
    return result


# The shortest end-to-end run that final_abort may stop early (the default run is 300 steps).
MIN_ABORT_RUN = 10


def _abort_step(options: CalibrationOptions) -> int:
    """The end-to-end step after which a pass that has not lowered the held-out divergence stops;
    0 (never) for runs under :data:`MIN_ABORT_RUN` steps, whose first few steps are noise to judge
    by, and where that share of the run rounds to no step or to the last (the end check decides)."""
    if options.final_steps < MIN_ABORT_RUN:
        return 0
    step = round(options.final_abort * options.final_steps)
    return step if 1 <= step < options.final_steps else 0


@dataclass
class _Best:
    """The best held-out score of a tuning run so far, the parameters that scored it, and at which step."""

    loss: float
    state: dict
    step: int


def _feature_loss(student_out: dict, teacher_out: dict) -> torch.Tensor | float:
    """Mean over blocks of the relative MSE between the student's and the original's block outputs."""
    losses = [
        F.mse_loss(s[-1], teacher_out[p][-1]) / teacher_out[p][-1].var().clamp_min(1e-12)
        for p, s in student_out.items()
        if p in teacher_out and isinstance(s[-1], torch.Tensor)
    ]
    return sum(losses) / len(losses) if losses else 0.0


def _match_logits(
    student,
    teacher,
    loader_fn,
    params: list[nn.Parameter],
    options: CalibrationOptions,
    tick=None,
    features: list[str] | None = None,
    score: Callable[[int], None] | None = None,
    abort_step: int = 0,
    keep_going: Callable[[int], bool] | None = None,
) -> int:
    """Tune ``params`` (Adam, cosine-decayed) so the student's class logits (and, weighted by
    ``options.final_features``, its block outputs at ``features``) match the original's on widened
    batches, for ``options.final_steps`` steps; ``score(step)`` is called every
    ``options.final_checks``-th of the run and at the end. After ``abort_step`` steps (0: never) the
    run ends early when ``keep_going(step)`` says so; the progress ticks of the skipped steps are
    given at once. Returns the steps taken."""
    if options.final_steps <= 0:
        return 0
    opt = torch.optim.Adam(params, lr=options.final_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, options.final_steps))
    gen = torch.Generator().manual_seed(options.seed + 1)
    watched = features if options.final_features > 0 else []
    every = max(1, options.final_steps // max(1, options.final_checks))
    steps = 0
    for x in _cycle(loader_fn):
        x = _distinct_inputs(x, options, gen)
        target = capture(teacher, x, outputs=watched)
        out = capture(student, x, outputs=watched, grad="grad")
        loss = kl_divergence(class_scores(out.result), class_scores(target.result))
        if watched:
            loss = loss + options.final_features * _feature_loss(out.outputs, target.outputs)
        _optimizer_step(opt, schedule, loss)
        steps += 1
        if tick:
            tick()
        if keep_going and steps == abort_step and not keep_going(steps):
            if tick:
                for _ in range(options.final_steps - steps):
                    tick()
            break
        if score and (steps % every == 0 or steps >= options.final_steps):
            score(steps)
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


@torch.no_grad()
def gn_fit_errors(teacher: nn.Module, plan: Plan, batches: Callable[[], Iterable[torch.Tensor]]) -> dict[str, float]:
    """Per layer the plan turns into GN: the share of its BN original's output variance that no GN
    can reproduce, 1 − R² of the best per-channel affine of the GN-normalised input (the closed-form
    layer fit), measured on the original's own inputs over ``batches()``.

    On the original's inputs nothing upstream is wrong yet, so this is what GN loses at that layer
    alone: BN in inference passes on each image's brightness, contrast and per-channel offsets;
    GN divides them out per sample and group. A stem conv on photos, or a layer on 1×1/2×2 maps,
    scores high; one forward per batch, five running sums per channel per layer. The layers come in
    the order the forward pass first reaches them, which the BN* plan's "earliest" rank reads.
    """
    layers = {lp.path: lp for lp in plan.with_action(Action.GN)}

    def sums(path: str, bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lp = layers[path]
        y = _channels_last_flat(_bn_pre_activation(bn, x))
        z = _channels_last_flat(F.group_norm(x, lp.groups, None, None, lp.eps))
        n = torch.full_like(z[:, 0], z.shape[1])
        return torch.stack([z.sum(1), y.sum(1), (z * z).sum(1), (z * y).sum(1), (y * y).sum(1), n])

    total: dict[str, torch.Tensor] = {}
    for x in batches():
        seen = capture(teacher, x, inputs=list(layers), transform=sums)
        for path, calls in seen.inputs.items():
            for call in calls:
                total[path] = total[path] + call.first if path in total else call.first
    errors = {}
    for path, (sz, sy, szz, szy, syy, n) in total.items():
        var_z = szz / n - (sz / n) ** 2
        var_y = syy / n - (sy / n) ** 2
        cov = szy / n - (sz / n) * (sy / n)
        unexplained = (var_y - cov**2 / var_z.clamp_min(1e-12)).clamp_min(0)
        errors[path] = (unexplained.sum() / var_y.sum().clamp_min(1e-30)).item()
    return errors


def measure_gn_fit(teacher: nn.Module, plan: Plan, data_config: DataConfig, options: CalibrationOptions) -> dict:
    """:func:`gn_fit_errors` on the calibration images ``options`` names (the fit part, as calibration
    reads them); ``teacher`` is not modified."""
    options.check()
    fit, _held, _n_fit, _n_hold = calibration_batches(options, data_config, BrokenImages())
    model = copy.deepcopy(teacher).to(options.torch_device()).eval()
    return gn_fit_errors(model, plan, fit)


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

    auto: dict[str, str] = {}
    broken = BrokenImages()
    fit_data, eval_data, n_fit, n_hold = calibration_batches(options, data_config, broken)
    first = next(iter(fit_data()), None)
    order, unreached = _execution_order(student, gn_paths, first)
    if options.final_steps is None:
        steps, auto["final_steps"] = auto_final_steps(*smallest_groups(student, order, first))
        options = replace(options, final_steps=steps)
    clock = _Clock(device)
    report = CalibrationReport(options.method, n_fit, n_hold)
    report.settings = {"batch_size": options.batch_size, "final_steps": options.final_steps, "auto": auto}
    if unreached:  # e.g. GoogLeNet's aux heads: they run in training only, so there is nothing to fit them on
        report.notes.append(unreached_note(unreached, consequence="not calibrated (γ/β as converted)"))
    with clock.timed("metrics"):
        report.before = _agreement(student, teacher, eval_data)
        before = _layer_errors(student, teacher, order, eval_data)
    fit_data = _with_copies(fit_data, options)
    images = _Images(fit_data, eval_data, n_hold > 0, n_fit * (1 + options.copies) + n_hold)
    passes = _Passes(student, teacher, images, options, untouchable(plan), device, clock)
    report.blocks, report.cache = passes.run(order, first[:2], progress)
    with clock.timed("metrics"):
        after = _layer_errors(student, teacher, order, eval_data)
        report.after = _agreement(student, teacher, eval_data)
    report.layers = {p: {"before": before[p], "after": after[p]} for p in order}
    report.broken_images = broken.to_dict()
    report.memory = peak_memory(device)
    report.phases = clock.seconds
    report.seconds = time.perf_counter() - start
    for p in student.parameters():
        p.grad = None
    return student.cpu(), report


@dataclass(frozen=True)
class _Images:
    """The calibration images as two seeded, re-iterable streams: the images the passes fit on, and
    the images that score each tuning pass (the hold-out; the fit images when there is none)."""

    fit: Callable[[], Iterable[torch.Tensor]]
    held: Callable[[], Iterable[torch.Tensor]]
    apart: bool  # the held-out images are not fit images
    count: int  # images in both streams, each counted once


class _Boundaries:
    """The cache's walk through the blocks: a block's inputs are the previous block's outputs where
    the probe saw the chain, else they are re-synchronised from the images (one forward per batch of
    each model, stopping at the block); ``resynced`` lists the blocks where that happened."""

    def __init__(self, store: ActivationStore, student: nn.Module, teacher: nn.Module, images: _Images) -> None:
        self.store, self.student, self.teacher, self.images = store, student, teacher, images
        self.pending: tuple | None = None  # the next block's inputs, when it follows
        self.resynced: list[str] = []

    def enter(self, bound: Boundary, next_shares: bool) -> _CachedBlock:
        """The cached view of block ``bound`` (its inputs handed on or re-synced); ``next_shares``:
        the next block reads the same inputs, so they are kept."""
        cached = (bound.follows or bound.shares) and self.pending is not None
        inputs = self.pending if cached else self._resync(bound.path)
        self.pending = None
        view = _CachedBlock(self.store, self.student, self.teacher, bound.path, inputs)
        view.keep_inputs = next_shares
        return view

    def leave(self, view: _CachedBlock, next_bound: Boundary | None) -> None:
        """Hand this block's inputs or outputs on to the next block when it reads them."""
        self.pending = view.finish(next_bound is not None and next_bound.follows)
        if next_bound is None or not (next_bound.follows or next_bound.shares):
            self.store.drop(self.pending)
            self.pending = None

    def _resync(self, block: str) -> tuple[list, list, int]:
        self.resynced.append(block)
        s_in, t_in, n_fit = [], [], 0
        for held, stream in enumerate([self.images.fit] + ([self.images.held] if self.images.apart else [])):
            for x in stream():
                s_in.append(self._input(self.student, block, x))
                t_in.append(self._input(self.teacher, block, x))
                n_fit += not held
        return s_in, t_in, n_fit

    def _input(self, model: nn.Module, block: str, x: torch.Tensor):
        calls = capture(model, x, inputs=[block], stop_at=block).inputs.get(block)
        return self.store.put((calls[0].args, calls[0].kwargs)) if calls else None


@dataclass
class _Passes:
    """The calibration passes over one student/teacher pair: what every pass needs, given once."""

    student: nn.Module
    teacher: nn.Module
    images: _Images
    options: CalibrationOptions
    protected: set[str]  # paths whose parameters no pass tunes (see :func:`untouchable`)
    device: torch.device
    clock: _Clock

    def run(
        self, order: list[str], probe: torch.Tensor, progress: Callable[[int, int], None] | None
    ) -> tuple[list[dict], dict]:
        """Fit every GN layer at ``order`` (execution order), block by block; with the block method,
        tune each block after its layers are fitted, then the whole student. ``probe``: a batch or
        two of images for :func:`probe_boundaries`. Returns one result per tuning pass, and what the
        cache did (for the report)."""
        options = self.options
        blocks = calibration_blocks(self.student, order, options.max_block_layers)
        with self.clock.timed("probe"):
            bounds = probe_boundaries(self.student, blocks, probe)
        reached = [(b, paths, bound) for (b, paths), bound in zip(blocks, bounds, strict=True) if bound.calls]
        final = options.final_steps if options.method == "block" else 0
        tuned = sum(block not in paths for block, paths, _ in reached) if self._tuning() else 0
        tick = _counter(sum(len(p) for _, p, _ in reached) + options.block_steps * tuned + final, progress)
        choice = self._choose(bounds)
        with open_store(choice, self.device) as store:
            results, resynced = self._blocks(reached, store, tick)
            cache = choice.to_dict() | {
                "bytes_cached": store.peak if store is not None else 0,
                "resyncs": len(resynced),
                "resynced_blocks": resynced,
                "unreached_blocks": [b.path for b in bounds if not b.calls],
            }
        if final > 0:
            fit, held = self.images.fit, self.images.held
            features = [block for block, _, _ in reached]
            results.append(
                _final_pass(
                    self.student, self.teacher, fit, options, self.protected, tick, held, self.clock, features
                )
            )
        scored_on = "held-out images" if self.images.apart else "the training images (no hold-out)"
        return [r | {"scored_on": scored_on} if r.get("steps") else r for r in results], cache

    def _tuning(self) -> bool:
        return self.options.method == "block" and self.options.block_steps > 0

    def _choose(self, bounds: list[Boundary]) -> CacheChoice:
        """Where the cache goes: from the bytes the probe measured, the budgets, and ``options.cache``."""
        unusable = next((b.unusable for b in bounds if b.unusable), "")
        needed = cache_bytes_needed(bounds, self.images.count)
        rooms = [] if self.options.cache == "off" else cache_rooms(self.options.cache_mem, self.device)
        return choose_cache(self.options.cache, needed, rooms, unusable)

    def _blocks(self, reached: list[tuple[str, list[str], Boundary]], store: ActivationStore | None, tick):
        """Per block: fit its layers, then tune it (block method). Activations come from the cache when
        there is a ``store``, else they are streamed. Returns the tuning results and the re-synced blocks."""
        walk = _Boundaries(store, self.student, self.teacher, self.images) if store is not None else None
        results = []
        for k, (block, paths, bound) in enumerate(reached):
            after = reached[k + 1][2] if k + 1 < len(reached) else None
            with self.clock.timed("propagation"):
                source = walk.enter(bound, after is not None and after.shares) if walk else self._streamed(block)
            for path in paths:
                gn, bn = self.student.get_submodule(path), self.teacher.get_submodule(path)
                with self.clock.timed("layer_fit"):
                    _fit_layer(gn, bn, source.layer_pairs(path), self.device)
                tick()
            if self._tuning() and block not in paths:
                with self.clock.timed("propagation"):
                    source.prepare_targets()
                results.append(_tune(source, self.student, block, self.options, self.protected, tick, self.clock))
            if walk:
                with self.clock.timed("propagation"):
                    walk.leave(source, after)
        return results, walk.resynced if walk else []

    def _streamed(self, block: str) -> _Streamed:
        return _Streamed(self.student, self.teacher, block, self.images.fit, self.images.held)


def _counter(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """A ``tick()`` that counts one unit of work done and reports ``progress(done, total)``."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    return tick


def smallest_groups(model: nn.Module, paths: list[str], x: torch.Tensor) -> tuple[str, int]:
    """The GN layer of ``paths`` whose groups hold the fewest values per image on ``x`` (C/G x the
    spatial size it runs at), and that number. One image is run; only input shapes are kept."""
    seen = capture(model, x[:1], inputs=paths, transform=lambda _path, _module, t: tuple(t.shape))
    values = {
        path: math.prod(calls[0].first[1:]) // model.get_submodule(path).num_groups
        for path, calls in seen.inputs.items()
    }
    path = min(values, key=values.get)
    return path, values[path]


def auto_final_steps(path: str, values: int) -> tuple[int, str]:
    """The end-to-end pass's steps when not given, from the smallest GN groups (:func:`smallest_groups`),
    and why in words: :data:`FINAL_STEPS` below :data:`FINAL_PASS_GROUP_VALUES` values a group, else 0."""
    if values < FINAL_PASS_GROUP_VALUES:
        return FINAL_STEPS, f"on: {path}'s groups hold {values} values (fewer than {FINAL_PASS_GROUP_VALUES})"
    return 0, (
        f"off: every GN group holds {FINAL_PASS_GROUP_VALUES} values or more (the fewest: {values}, {path}); "
        "--calib-final-steps 300 runs it"
    )


def _execution_order(model: nn.Module, paths: list[str], x: torch.Tensor | None) -> tuple[list[str], list[str]]:
    """GN layers sorted by when they run (module registration order can differ from call order), and
    those the eval forward never runs (:func:`~gnsurgeon.reach.reached_layers`: one rule with export)."""
    if x is None:
        raise GNSurgeonError("no readable image in the calibration folder")
    order, unreached = reached_layers(model, x[:1], paths)
    if not order:
        raise GNSurgeonError(unreached_note(unreached, consequence="nothing to calibrate"))
    return order, unreached
