"""Calibration's block-boundary cache: the same parameters as streaming, the budget ladder (float32,
float16, disk, streaming) visible in the report, the temporary folder removed however the run ends,
the chain probe on every kind of boundary, and tuning passes kept or undone on held-out images."""

from __future__ import annotations

import math
import tempfile

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from gnsurgeon import activation_cache, apply_plan, make_plan
from gnsurgeon.activation_cache import (
    ActivationStore,
    CacheChoice,
    Room,
    budget_bytes,
    choose_cache,
    open_store,
    probe_boundaries,
)
from gnsurgeon.calibration import (
    CalibrationOptions,
    _BlockBatch,
    _final_pass,
    _logits_divergence,
    _tune_block,
    calibrate,
    calibration_batches,
    calibration_blocks,
)
from gnsurgeon.data import BrokenImages
from gnsurgeon.errors import GNSurgeonError
from gnsurgeon.report import calibration_summary
from gnsurgeon.sources import DataConfig

from .helpers import randomize_bn

CONFIG = DataConfig(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib-cache")
    gen = torch.Generator().manual_seed(1)
    for i in range(40):
        pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
    return root


class _ShiftInPlace(nn.Module):
    """Works in place on its input and is not idempotent: a cache handing out its own tensor would
    see them shift again at every use."""

    def forward(self, x):
        return x.add_(1.0)


def _block(c: int, inplace_first: bool = False, act: bool = True) -> nn.Sequential:
    head = [_ShiftInPlace()] if inplace_first else []
    return nn.Sequential(*head, nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), *([nn.ReLU()] if act else []))


class _Graph(nn.Module):
    """One block per kind of boundary: after the stem (re-sync), a chain (``b`` follows ``a``, and
    works in place on its input), branches reading one input (``c2`` shares ``c1``'s), glue
    (``d`` reads a sum), a residual tap (``e`` reads ``a``'s output, not ``d``'s) and an in-place
    edit of a block's output before the next block reads it (``f``)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a, self.b = _block(c, act=False), _block(c, inplace_first=True)  # b works in place on a's output
        self.c1, self.c2, self.d = (_block(c) for _ in range(3))
        self.e = _block(c, act=False)  # its output is edited in place (no ReLU needs it for backward)
        self.f = _block(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        a = self.a(self.stem(x))
        b = self.b(a)
        c1, c2 = self.c1(b), self.c2(b)
        d = self.d(c1 + c2)
        e = self.e(a)
        e.add_(1.0)
        f = self.f(e)
        return self.head((d + f).mean((2, 3)))


def _teacher(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = _Graph() if name == "boundaries" else timm.create_model(name, num_classes=10)
    return randomize_bn(model).eval()


def _options(images, **kw) -> CalibrationOptions:
    kw = {"samples": 40, "batch_size": 8, "block_steps": 5, "final_steps": 2, **kw}
    return CalibrationOptions(data=str(images), **kw)


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x.double() - y.double()).abs().max().item() for x, y in pairs if x.is_floating_point())


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "boundaries"])
def test_cached_calibration_gives_the_streamed_parameters(name, images):
    teacher = _teacher(name)
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    streamed, s_report = calibrate(teacher, student, plan, CONFIG, _options(images, cache="off"))
    cached, c_report = calibrate(teacher, student, plan, CONFIG, _options(images, cache="ram"))
    on_disk, d_report = calibrate(teacher, student, plan, CONFIG, _options(images, cache="disk"))
    assert s_report.cache["mode"] == "off" and s_report.cache["bytes_cached"] == 0
    assert c_report.cache["mode"] == "ram" and c_report.cache["dtype"] == "float32"
    assert d_report.cache["mode"] == "disk" and d_report.cache["dtype"] == "float32"
    assert 0 < c_report.cache["bytes_cached"] <= c_report.cache["bytes_needed_fp32"]
    assert _max_difference(streamed, cached) < 1e-5
    assert _max_difference(streamed, on_disk) < 1e-5
    assert [b.get("note") for b in s_report.blocks] == [b.get("note") for b in c_report.blocks]
    assert c_report.memory["peak_rss_mb"] > 0 and c_report.phases["layer_fit"] > 0
    if name == "boundaries":
        # Re-synced from the images: the first block, glue, a residual tap, an in-place edit.
        assert c_report.cache["resynced_blocks"] == ["a", "d", "e", "f"]
    if name == "test_resnet":
        assert c_report.cache["resynced_blocks"] == ["conv1", "layer1"]  # the stem; after the max-pool


def test_the_probe_tells_each_kind_of_boundary():
    teacher = _teacher("boundaries")
    plan = make_plan(teacher)
    model = apply_plan(teacher, plan).eval()
    blocks = calibration_blocks(model, [lp.path for lp in plan], 4)
    assert [b for b, _ in blocks] == ["a", "b", "c1", "c2", "d", "e", "f"]
    bounds = {b.path: b for b in probe_boundaries(model, blocks, torch.randn(2, 3, 16, 16))}
    assert [p for p, b in bounds.items() if b.follows] == ["b", "c1"]
    assert [p for p, b in bounds.items() if b.shares] == ["c2"]
    assert all(b.calls == 1 and not b.unusable for b in bounds.values())
    assert bounds["a"].in_bytes == 8 * 16 * 16 * 4 and bounds["a"].out_bytes == 8 * 16 * 16 * 4


class _Counting(nn.Sequential):
    """A block whose output depends on state outside its arguments: run alone it gives another output."""

    def __init__(self, *mods) -> None:
        super().__init__(*mods)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) * self.calls


class _Outside(nn.Module):
    """Calls its block's norm layer once outside the block before calling the block."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Sequential(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3))

    def forward(self, x):
        return self.blk(self.blk[1](x))


class _Scaled(nn.Sequential):
    """Reads a factor its parent sets only for the length of its own forward."""

    def forward(self, x):
        return super().forward(x) * self.factor


class _SetsFactor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = _Scaled(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))

    def forward(self, x):
        self.blk.factor = 2.0
        try:
            return self.blk(x)
        finally:
            del self.blk.factor


def test_the_probe_refuses_blocks_the_cache_cannot_stand_in_for():
    counting = nn.Sequential(_Counting(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)))
    (bound,) = probe_boundaries(counting, [("0", ["0.1"])], torch.randn(2, 3, 4, 4))
    assert "'0' gives a different output when run alone" in bound.unusable
    (bound,) = probe_boundaries(_Outside(), [("blk", ["blk.1"])], torch.randn(2, 3, 4, 4))
    assert "runs its layer 'blk.1' outside its own forward" in bound.unusable
    (failing,) = probe_boundaries(_SetsFactor(), [("blk", ["blk.1"])], torch.randn(2, 3, 4, 4))
    assert "'blk' fails when run alone on its recorded input" in failing.unusable and "factor" in failing.unusable
    choice = choose_cache("auto", 100, [Room("ram", CPU, 10**9)], unusable=bound.unusable)
    assert choice.mode == "off" and "outside its own forward" in choice.reason


def test_budget_ladder_float32_float16_disk_streaming():
    rooms = [Room("ram", CPU, 1000), Room("disk", CPU, 400)]
    assert (choose_cache("auto", 900, rooms).mode, choose_cache("auto", 900, rooms).dtype) == ("ram", torch.float32)
    half = choose_cache("auto", 1500, rooms)
    assert (half.mode, half.dtype) == ("ram", torch.float16) and "float16" in half.reason
    disk = choose_cache("auto", 700, [Room("ram", CPU, 100), Room("disk", CPU, 1000)])
    assert (disk.mode, disk.dtype) == ("disk", torch.float32)
    off = choose_cache("auto", 3000, rooms)
    assert off.mode == "off" and "fit no budget" in off.reason
    forced = choose_cache("ram", 3000, rooms)
    assert (forced.mode, forced.dtype) == ("ram", torch.float16) and "forced" in forced.reason
    assert choose_cache("disk", 100, rooms).mode == "disk"  # fits in RAM, but disk was asked for
    assert choose_cache("off", 1, rooms).mode == "off"
    with pytest.raises(GNSurgeonError, match="'memory' is not one of"):
        choose_cache("memory", 1, rooms)


def test_budget_sizes_and_option_checks(images):
    assert budget_bytes("8G", 0) == 8 * 2**30 and budget_bytes("512MiB", 0) == 512 * 2**20
    assert budget_bytes("50%", 1000) == 500 and budget_bytes(1234, 0) == 1234 and budget_bytes("2e3", 0) == 2000
    for bad in ("lots", "150%", -1, 1.5):
        with pytest.raises(GNSurgeonError, match="--calib-cache-mem"):
            budget_bytes(bad, 100)
    with pytest.raises(GNSurgeonError, match="--calib-cache 'gpu' is not one of"):
        _options(images, cache="gpu").check()
    with pytest.raises(GNSurgeonError, match="--calib-cache-mem 'big' is not a size"):
        _options(images, cache_mem="big").check()


def test_a_small_memory_budget_spills_to_disk_then_streams(images, monkeypatch):
    teacher = _teacher("test_resnet")
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    _, in_ram = calibrate(teacher, student, plan, CONFIG, _options(images))
    needed = in_ram.cache["bytes_needed_fp32"]
    assert in_ram.cache["mode"] == "ram" and in_ram.cache["dtype"] == "float32"
    _, half = calibrate(teacher, student, plan, CONFIG, _options(images, cache_mem=int(needed * 0.6)))
    assert half.cache["mode"] == "ram" and half.cache["dtype"] == "float16" and "float16" in half.cache["reason"]
    assert half.cache["bytes_cached"] < in_ram.cache["bytes_cached"]
    _, spilled = calibrate(teacher, student, plan, CONFIG, _options(images, cache_mem=1))
    assert spilled.cache["mode"] == "disk" and "files" in spilled.cache["reason"]
    assert "cache: float32 in disk" in calibration_summary(spilled.to_dict())
    monkeypatch.setattr(activation_cache, "free_disk_bytes", lambda _folder: 1)
    _, streamed = calibrate(teacher, student, plan, CONFIG, _options(images, cache_mem=1))
    assert streamed.cache["mode"] == "off" and "fit no budget" in streamed.cache["reason"]
    assert "streaming: " in calibration_summary(streamed.to_dict())


def test_a_float16_cache_stays_close_to_float32(images):
    teacher = _teacher("test_resnet")
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    full, report = calibrate(teacher, student, plan, CONFIG, _options(images, cache="ram"))
    half, half_report = calibrate(teacher, student, plan, CONFIG, _options(images, cache="ram", cache_mem=1))
    assert half_report.cache["dtype"] == "float16"
    errors = [(report.layers[p]["after"], half_report.layers[p]["after"]) for p in report.layers]
    assert max(abs(a - b) for a, b in errors) < 0.02, errors
    assert abs(report.after["logits_cosine"] - half_report.after["logits_cosine"]) < 0.01
    assert _max_difference(full, half) > 0  # rounded inputs do move the fit a little


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("ending", [None, RuntimeError, KeyboardInterrupt])
def test_the_disk_cache_folder_is_removed_however_the_run_ends(ending, images, tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    teacher = _teacher("test_resnet")
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append([p.name for p in folder.glob("gnsurgeon-calib-cache-*/*.npy")])
        if ending is not None and done == 8:
            raise ending("stop here")

    if ending is None:
        _, report = calibrate(teacher, student, plan, CONFIG, _options(images, cache="disk"), progress)
        assert report.cache["mode"] == "disk"
    else:
        with pytest.raises(ending, match="stop here"):
            calibrate(teacher, student, plan, CONFIG, _options(images, cache="disk"), progress)
    assert any(seen)  # the cache really was on disk while it ran
    assert list(folder.iterdir()) == []


def test_the_store_hands_out_copies_and_frees_what_it_dropped(tmp_path):
    x = torch.randn(4, 3)
    for choice, directory in (
        (CacheChoice("ram", CPU, torch.float32), None),
        (CacheChoice("disk", CPU, torch.float32), tmp_path),
    ):
        store = ActivationStore(choice, CPU, directory)
        stored = store.put(((x,), {"scale": 2.0}))
        (got,), kwargs = store.get(stored)
        assert torch.equal(got, x) and kwargs == {"scale": 2.0}
        got.mul_(0)  # the caller's own copy: the cache is unchanged
        assert torch.equal(store.get(stored)[0][0], x)
        assert store.held == store.peak == x.numel() * 4
        store.drop(stored)
        assert store.held == 0 and not list(tmp_path.iterdir())
    half = ActivationStore(CacheChoice("ram", CPU, torch.float16), CPU)
    back = half.get(half.put(x))
    assert back.dtype == torch.float32 and torch.allclose(back, x, rtol=1e-3, atol=1e-3)
    assert half.held == x.numel() * 2
    with open_store(CacheChoice("off"), CPU) as none:
        assert none is None


def _batches(x: torch.Tensor, target: torch.Tensor, size: int = 8):
    def stream():
        for i in range(0, len(x), size):
            t = target[i : i + size]
            yield _BlockBatch((x[i : i + size],), {}, t, t.var().clamp_min(1e-12))

    return stream


def test_a_tuning_pass_is_undone_when_its_held_out_error_grows():
    """The training batches ask for 2·x; the held-out images agree with the block as it is (x). The
    steps lower the training error, so scored on its own batches the pass would be kept; scored on
    images it did not train on, it is undone."""
    gen = torch.Generator().manual_seed(0)
    x_fit, x_held = torch.randn(32, 4, generator=gen), torch.randn(16, 4, generator=gen)
    options = CalibrationOptions(block_steps=20, block_lr=0.05)

    def identity() -> nn.Linear:
        layer = nn.Linear(4, 4)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(4))
            layer.bias.zero_()
        return layer

    kept = identity()
    result = _tune_block("blk", kept, list(kept.parameters()), _batches(x_fit, 2 * x_fit), options)
    assert "note" not in result and result["loss_last"] < result["loss_first"]  # training error fell
    undone = identity()
    result = _tune_block(
        "blk", undone, list(undone.parameters()), _batches(x_fit, 2 * x_fit), options, held_out=_batches(x_held, x_held)
    )
    assert result["note"].startswith("reverted") and result["steps"] == 20
    assert result["loss_first"] == 0.0
    assert torch.equal(undone.weight, torch.eye(4)) and not torch.equal(kept.weight, torch.eye(4))


def test_calibration_scores_its_passes_on_the_hold_out(images):
    teacher = _teacher("test_resnet")
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan).eval()
    options = _options(images, final_steps=3)
    fit, held, n_fit, n_hold = calibration_batches(options, CONFIG, BrokenImages())
    assert n_hold == 8 and n_fit == 32
    held_before = _logits_divergence(student, teacher, held)
    assert not math.isclose(held_before, _logits_divergence(student, teacher, fit))
    result = _final_pass(student, teacher, fit, options, protected=set(), held_out=held)
    assert result["loss_first"] == pytest.approx(held_before)
    _, report = calibrate(teacher, apply_plan(teacher, plan), plan, CONFIG, options)
    assert {b["scored_on"] for b in report.blocks if b["steps"]} == {"held-out images"}
    _, report = calibrate(teacher, apply_plan(teacher, plan), plan, CONFIG, _options(images, holdout=0))
    assert {b["scored_on"] for b in report.blocks if b["steps"]} == {"the training images (no hold-out)"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_cache_lives_on_the_gpu_and_matches_streaming(images):
    teacher = _teacher("test_resnet")
    plan = make_plan(teacher)
    student = apply_plan(teacher, plan)
    _, streamed = calibrate(teacher, student, plan, CONFIG, _options(images, device="cuda", cache="off"))
    _, cached = calibrate(teacher, student, plan, CONFIG, _options(images, device="cuda", cache="ram"))
    assert cached.cache["device"].startswith("cuda") and cached.memory["peak_cuda_mb"] > 0
    # GPU kernels may sum in any order (cuDNN), so compare what calibration achieved, not bits.
    for path, errors in streamed.layers.items():
        assert cached.layers[path]["after"] == pytest.approx(errors["after"], rel=1e-3, abs=1e-5), path
    assert cached.after["logits_cosine"] == pytest.approx(streamed.after["logits_cosine"], abs=1e-3)
