"""The fine-tune's resolved settings, without a model: what ``resolve_settings`` decides from the
options, the data size, the processes and the device, and what the resume check calls the same run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from rich.console import Console
from torch.utils.data import DistributedSampler

from gnsurgeon import GNSurgeonError
from gnsurgeon.finetuning import (
    FinetuneOptions,
    FinetuneReport,
    ParamCounts,
    RunSettings,
    TrainingState,
    WarmupCosine,
    resolve_settings,
)
from gnsurgeon.report import finetune_table

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def resolve(
    images: int = 24,
    *,
    world: int = 1,
    device: torch.device = CPU,
    cuda_bf16: bool = True,
    labeled: bool = True,
    teacher_from: str | None = None,
    params: ParamCounts = ParamCounts(10, 20),
    calibrated_start: bool = False,
    **options,
) -> RunSettings:
    opts = FinetuneOptions(data="train", **options)
    opts.validate()
    return resolve_settings(
        opts,
        train_images=images,
        classes=3,
        labeled=labeled,
        world_size=world,
        device=device,
        cuda_bf16=cuda_bf16,
        teacher_from=teacher_from,
        params=params,
        calibrated_start=calibrated_start,
    )


# ------------------------------------------------------------------------ learning rate, decay
def test_lr_scales_linearly_with_the_effective_batch():
    s = resolve(64, batch_size=8, grad_accum=2, world=2)
    assert s.effective_batch == 32 and s.lr == pytest.approx(0.02)  # SGD's base lr per 32 images
    assert resolve(batch_size=4).lr == pytest.approx(0.02 * 4 / 32)
    # accumulation and processes count like batch: 4 x 2 x 2 is the same lr as 16 x 1 x 1
    assert resolve(64, batch_size=4, grad_accum=2, world=2).lr == resolve(64, batch_size=16).lr
    assert resolve(optimizer="adamw", batch_size=2).lr == pytest.approx(4e-4 * 2 / 32)
    # an explicit lr is used as given, whatever the batch
    assert resolve(64, lr=0.1, batch_size=8, grad_accum=4, world=2).lr == 0.1


def test_a_calibrated_start_defaults_to_a_fifth_of_the_lr():
    """recovery.py on regions: 0.005 at batch 8 undid calibration on two of four models, 0.001 did not."""
    plain, calibrated = resolve(batch_size=8), resolve(batch_size=8, calibrated_start=True)
    assert plain.lr == pytest.approx(0.005) and calibrated.lr == pytest.approx(0.001)
    assert (plain.calibrated_start, calibrated.calibrated_start) == (False, True)
    assert resolve(optimizer="adamw", batch_size=8, calibrated_start=True).lr == pytest.approx(4e-4 * 8 / 32 * 0.2)
    assert resolve(lr=0.01, calibrated_start=True).lr == 0.01  # an explicit lr is never scaled


def test_weight_decay_and_momentum_follow_the_optimizer():
    sgd, adamw = resolve(), resolve(optimizer="adamw")
    assert (sgd.weight_decay, sgd.momentum, sgd.norm_weight_decay) == (1e-4, 0.9, 0.0)
    assert (adamw.weight_decay, adamw.momentum) == (0.01, None)  # AdamW has no momentum setting
    assert resolve(weight_decay=0.0, norm_weight_decay=1e-5).weight_decay == 0.0
    assert resolve(norm_weight_decay=1e-5).norm_weight_decay == 1e-5


# ----------------------------------------------------------------------------- run length
def test_steps_from_epochs_count_this_process_shard_and_accumulation():
    assert resolve(24, batch_size=4).batches_per_epoch == 6
    assert resolve(24, batch_size=4).total_steps == 6  # neither --steps nor --epochs: one epoch
    assert resolve(24, batch_size=4, epochs=2.0).total_steps == 12
    assert resolve(24, batch_size=4, epochs=2.0, grad_accum=4).total_steps == 3  # ceil(12 / 4)
    assert resolve(24, batch_size=4, epochs=0.1).total_steps == 1  # never 0 steps
    # DistributedSampler pads each of 2 shards to ceil(31 / 2) = 16 images: 4 batches of 4 each
    two = resolve(31, batch_size=4, epochs=1.0, world=2)
    assert two.batches_per_epoch == 4 and two.total_steps == 4
    for rank in (0, 1):  # the rule is the sampler's own length, which the trainer iterates
        assert len(DistributedSampler(range(31), num_replicas=2, rank=rank)) // 4 == two.batches_per_epoch
    # partial batches are dropped: 27 images make 6 batches of 4, as 24 do
    assert resolve(27, batch_size=4).total_steps == resolve(24, batch_size=4).total_steps
    assert resolve(24, batch_size=4, steps=50).total_steps == 50  # --steps is taken as given


def test_warmup_is_five_percent_unless_given_and_never_longer_than_the_run():
    assert resolve(steps=200).warmup_steps == 10
    assert resolve(steps=10).warmup_steps == 0  # round(0.5)
    assert resolve(steps=100, warmup_steps=0).warmup_steps == 0
    assert resolve(steps=5, warmup_steps=50).warmup_steps == 5
    s = resolve(steps=200)
    assert s.schedule == "linear warmup + cosine to 0"
    factor = WarmupCosine(s.warmup_steps, s.total_steps)
    assert factor(s.warmup_steps - 1) == 1.0 and factor(s.total_steps) == pytest.approx(0.0)


def test_too_few_images_for_one_batch_names_the_folder_batch_and_processes():
    with pytest.raises(GNSurgeonError, match=r"data folder train has 7 images: fewer than --batch-size 8$"):
        resolve(7, batch_size=8)
    with pytest.raises(GNSurgeonError, match=r"has 12 images: fewer than --batch-size 8 x 2 processes"):
        resolve(12, batch_size=8, world=2)  # 6 images per process
    assert resolve(16, batch_size=8, world=2).batches_per_epoch == 1


# -------------------------------------------------------------------------------- devices
def test_amp_and_channels_last_are_on_for_cuda_and_off_for_cpu_by_default():
    cpu = resolve(device=CPU)
    assert (cpu.amp, cpu.amp_dtype, cpu.channels_last, cpu.device) == (None, None, False, "cpu")
    cuda = resolve(device=CUDA)
    assert (cuda.amp, cuda.amp_dtype, cuda.channels_last, cuda.device) == ("bfloat16", torch.bfloat16, True, "cuda:0")
    # no bf16 on this GPU: fp16 (with a loss scaler, see Optimization)
    assert resolve(device=CUDA, cuda_bf16=False).amp_dtype == torch.float16
    # asked for explicitly, either way
    assert resolve(device=CPU, amp=True).amp == "bfloat16"
    assert resolve(device=CPU, amp=True, cuda_bf16=False).amp == "bfloat16"  # only CUDA's support counts
    assert resolve(device=CUDA, amp=False).amp is None
    assert resolve(device=CPU, channels_last=True).channels_last is True
    assert resolve(device=CUDA, channels_last=False).channels_last is False


def test_kd_settings_only_with_a_teacher():
    plain = resolve(kd_temperature=4.0, kd_weight=0.5)
    assert (plain.teacher, plain.kd_temperature, plain.kd_weight) == (None, None, None)
    kd = resolve(labeled=False, teacher="source", kd_temperature=4.0, kd_weight=0.5, teacher_from="timm:resnet18 + w")
    assert (kd.labeled, kd.teacher, kd.teacher_from) == (False, "source", "timm:resnet18 + w")
    assert (kd.kd_temperature, kd.kd_weight) == (4.0, 0.5)


# ----------------------------------------------------------------------------------- JSON
def test_settings_are_frozen_and_their_json_is_the_flat_dict_of_before():
    s = resolve(steps=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 1.0  # type: ignore[misc]
    d = s.to_dict()
    assert list(d)[:5] == ["train_images", "labeled", "classes", "total_steps", "batch_size"]
    assert list(d)[-5:] == ["amp", "device", "channels_last", "compile", "params"]
    assert len(d) == 33 and d["params"] == {"decay": 10, "no_decay": 20}
    assert json.loads(json.dumps(d)) == d  # plain JSON values only
    report = FinetuneReport("in.safetensors", "out.safetensors", s)
    assert report.to_dict()["settings"] == d
    assert "batches_per_epoch" not in d and "amp_dtype" not in d  # derived, not stored


def test_finetune_table_reads_the_settings():
    s = resolve(64, batch_size=4, grad_accum=2, world=2, labeled=True, teacher="t", teacher_from="t")
    console = Console(width=200, record=True)
    console.print(finetune_table(FinetuneReport("in.safetensors", "out.safetensors", s, steps=5, final_loss=0.25)))
    text = console.export_text()
    assert "4 x 2 accum x 2 proc = 16 images/step" in text
    assert "sgd lr 0.01, wd 0.0001 (10 tensors), norm/bias wd 0 (20 tensors), warmup 0, grad norm clip 5" in text
    assert "CE + KD (T=1, weight 1): final 0.2500" in text
    assert "cpu, amp off, channels_last False" in text and "none (give --val DIR)" in text
    calibrated = resolve(batch_size=8, calibrated_start=True)
    console = Console(width=200, record=True)
    console.print(finetune_table(FinetuneReport("in.safetensors", "out.safetensors", calibrated, steps=5)))
    assert "sgd lr 0.001 (calibrated start), wd" in console.export_text()  # why the lr is not 0.005


# ---------------------------------------------------------------------------- same run?
def test_resume_treats_device_layout_compile_and_param_counts_as_the_same_run():
    saved = resolve(steps=10, device=CPU, params=ParamCounts(10, 20)).trajectory()
    assert not {"device", "channels_last", "compile", "params"} & set(saved)
    elsewhere = resolve(steps=10, device=CUDA, amp=False, channels_last=True, compile=True, params=ParamCounts(1, 2))
    assert elsewhere.changes_from(saved) == []


def test_resume_compares_the_lr_not_why_it_was_chosen():
    """A state saved before ``calibrated_start`` existed resumes when the lr is the same, and is
    refused when the calibrated-start rule changed the lr it would get now."""
    before_the_field = resolve(batch_size=8, lr=0.001).trajectory()
    assert "calibrated_start" not in before_the_field
    assert resolve(batch_size=8, calibrated_start=True).changes_from(before_the_field) == []
    assert resolve(batch_size=8).changes_from(before_the_field) == ["lr=0.001, now 0.005"]


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ({"batch_size": 4}, "batch_size=8, now 4"),
        ({"lr": 0.5}, "lr=0.005, now 0.5"),
        ({"seed": 1}, "seed=0, now 1"),
        ({"steps": 11}, "total_steps=10, now 11"),
        ({"hflip": 0.0}, "hflip=0.5, now 0.0"),
        ({"amp": True}, "amp=None, now 'bfloat16'"),  # autocast changes the numbers
        ({"images": 30}, "train_images=24, now 30"),  # the data changed
        ({"world": 2, "images": 48}, "world_size=1, now 2"),
    ],
)
def test_resume_refuses_what_changes_the_weights(changed, expected):
    base = {"images": 24, "steps": 10, "batch_size": 8, "lr": 0.005}
    saved = resolve(**base).trajectory()
    diffs = resolve(**{**base, **changed}).changes_from(saved)
    assert expected in diffs, diffs


def test_training_state_check_names_up_to_four_differences(tmp_path):
    run = {"steps": 10, "seed": 1, "batch_size": 4, "label_smoothing": 0.1, "hflip": 0.0, "min_crop_scale": 0.2}
    empty = {"model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "rng": [], "broken": [[]]}
    state = TrainingState(
        step=4,
        trajectory=resolve(**run).trajectory(),
        before=None,
        teacher_eval=None,
        images_seen=0,
        train_seconds=0.0,
        **empty,
    )
    path = tmp_path / "run.state.pt"
    state.check_resumes(resolve(**run, device=CUDA, amp=False), path)  # the same run, on another device
    with pytest.raises(GNSurgeonError) as info:
        state.check_resumes(resolve(steps=11), path)
    message = str(info.value)
    assert message.startswith(f"cannot --resume from {path}: it was written with total_steps=10, now 11; ")
    assert message.count(", now ") == 4 and message.endswith("(resume needs the same training options and data)")


# ------------------------------------------------------------------------ gradient clipping
def test_gradients_are_clipped_by_default_and_0_turns_it_off():
    """A gradient spike (GN on a handful of values per group) is clipped to CLIP_GRAD unless asked
    not to: the parameter moves lr x (1 + momentum) x the clipped norm on the first Nesterov step."""
    from gnsurgeon.finetuning.optimization import Optimization
    from gnsurgeon.finetuning.options import CLIP_GRAD

    def first_step(**options) -> float:
        settings = resolve(warmup_steps=0, **options)  # the first step at the full lr
        model = torch.nn.Linear(4, 3, bias=False)
        torch.nn.init.zeros_(model.weight)
        step = Optimization([{"params": list(model.parameters()), "weight_decay": 0.0}], settings, model, CPU)
        model.weight.grad = torch.full_like(model.weight, 100.0)  # norm 100 x sqrt(12)
        step.step()
        return float(model.weight.detach().norm()) / (settings.lr * (1 + settings.momentum))

    assert resolve().clip_grad == CLIP_GRAD > 0
    assert first_step() == pytest.approx(CLIP_GRAD, rel=1e-4)
    assert first_step(clip_grad=0) == pytest.approx(100 * 12**0.5, rel=1e-4)
    assert first_step(clip_grad=1.0) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(GNSurgeonError, match="--clip-grad must be 0 \\(off\\) or more"):
        resolve(clip_grad=-1.0)
