"""``gnsurgeon finetune`` on every task convert accepts: segmentation, detection and video.

Small torchvision models at small inputs (lraspp_mobilenet_v3_large at 64 px, Faster R-CNN
MobileNetV3-FPN at 64 px, mc3_18 on 4 x 32 x 32 clips), converted from BN weights whose statistics
are randomised as trained ones would be (random-init teachers are fine for the mechanics), and
distilled label-free with ``--teacher source``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import gnsurgeon
from gnsurgeon import ConvertOptions, FinetuneOptions, GNSurgeonError, read_checkpoint
from gnsurgeon.data import ClipFolderData, clip_transform, frame_indices, read_clip
from gnsurgeon.finetuning import read_state
from gnsurgeon.finetuning.models import Models
from gnsurgeon.hooks import eval_mode
from gnsurgeon.models import SourceSpec, build_model
from tests.helpers import randomize_bn

FAST = {"workers": 0, "log_every": 1, "eval_batch_size": 4, "batch_size": 2, "teacher": "source"}
MODELS = {
    "segmentation": ("lraspp_mobilenet_v3_large", {"num_classes": 3}, (3, 64, 64)),
    "detection": (
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        {"num_classes": 3, "min_size": 64, "max_size": 64},
        (3, 64, 64),
    ),
    "video": ("mc3_18", {"num_classes": 3}, (3, 4, 32, 32)),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def noise(rng, side: int) -> np.ndarray:
    """An image with structure (a bright square on noise), so features and logits vary."""
    pixels = rng.integers(0, 90, (side, side, 3)).astype(np.uint8)
    x, y = rng.integers(0, side // 2, 2)
    pixels[y : y + side // 3, x : x + side // 3, rng.integers(0, 3)] = 230
    return pixels


def write_frames(folder: Path, frames: int, rng, side: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(frames):
        Image.fromarray(noise(rng, side)).save(folder / f"{f:03d}.png")
    return folder


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8, options={"qscale": "1"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """A flat image folder, clip folders (labelled, with one bad video and one bad frame folder, and
    flat), and one converted checkpoint per task with its BN weights recorded (``teacher: source``)."""
    root = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    flat = root / "flat"
    flat.mkdir()
    for i in range(8):
        Image.fromarray(noise(rng, 48)).save(flat / f"{i}.png")
    clips = root / "clips"
    for label in ("a", "b"):
        for k in range(2):
            write_frames(clips / label / f"clip{k}", 5, rng)
        write_video(clips / label / "video.mp4", [noise(rng, 40) for _ in range(6)])
    (clips / "a" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 30)
    bad = write_frames(clips / "b" / "badframes", 4, rng)
    (bad / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    paths = {"root": root, "flat": flat, "clips": clips, "flat_clips": root / "flat_clips"}
    for k in range(4):
        write_frames(paths["flat_clips"] / f"clip{k}", 4, rng)
    for task, (name, kwargs, size) in MODELS.items():
        torch.manual_seed(0)
        weights = root / f"{task}-bn.safetensors"
        save_file(randomize_bn(build_model(SourceSpec("torchvision", name, kwargs))).state_dict(), str(weights))
        paths[task] = root / f"{task}-gn.safetensors"
        options = ConvertOptions(weights=str(weights), model_kwargs=kwargs, input_size=size)
        gnsurgeon.convert_source(f"torchvision:{name}", paths[task], options)
    return paths


def options(ws, task: str, **kwargs) -> FinetuneOptions:
    data = str(ws["flat_clips"] if task == "video" else ws["flat"])
    return FinetuneOptions(**{"data": data, "val": data, **FAST, **kwargs})


def kd_on(checkpoint: Path, opts: FinetuneOptions, batch) -> float:
    """The task's distillation loss of ``checkpoint`` against its BN teacher on a fixed batch."""
    info = read_checkpoint(checkpoint)
    models = Models.open(checkpoint, info, opts, None, torch.device("cpu"))
    models.task.prepare(models.student, info.plan, opts)
    with torch.no_grad(), eval_mode(models.student):
        net = models.task.network(models.student)
        return models.task.loss(net, models.teacher, batch, torch.zeros(len(batch)), False).kd.item()


def fixed_batch(ws, task: str):
    opts = options(ws, task)
    info = read_checkpoint(ws[task])
    data = Models.open(ws[task], info, opts, None, torch.device("cpu")).task.dataset(opts.data, train=False)
    return torch.stack([data[i][0] for i in range(4)])


# ------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("task", list(MODELS))
def test_a_few_steps_lower_the_distillation_loss(ws, task, tmp_path):
    """Four steps at batch 2, label-free, lower the task's KD loss measured on a fixed batch of four
    (per-pixel KL for segmentation, relative feature MSE for detection, logits KL for video)."""
    out = tmp_path / "ft.safetensors"
    # mc3_18 diverges at lr 0.01 without warmup (KD 0.002 -> 0.35 in 4 steps); the default lr, 0.02 x 2 / 32, does not
    opts = options(ws, task, steps=4, lr=None if task == "video" else 0.01)
    report = gnsurgeon.finetune(ws[task], out, opts)
    assert report.settings.task == task and report.settings.labeled is False
    batch = fixed_batch(ws, task)
    before, after = kd_on(ws[task], opts, batch), kd_on(out, opts, batch)
    assert after < 0.95 * before, (before, after)
    assert report.after["teacher_agreement"] is not None or report.after["feature_cosine"] is not None
    history = read_checkpoint(out).history
    assert [h["stage"] for h in history] == ["convert", "finetune"] and history[-1]["settings"]["task"] == task


def test_segmentation_resume_is_bit_exact(ws, tmp_path):
    common = {"steps": 5, "checkpoint_every": 2, "seed": 3, "val": None}
    straight = tmp_path / "straight.safetensors"
    gnsurgeon.finetune(ws["segmentation"], straight, options(ws, "segmentation", **common))

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        gnsurgeon.finetune(ws["segmentation"], resumed, options(ws, "segmentation", **common), callback=interrupt)
    assert read_state(tmp_path / "resumed.state.pt")["step"] == 2
    report = gnsurgeon.finetune(ws["segmentation"], resumed, options(ws, "segmentation", **common, resume=True))
    assert report.resumed_from == 2 and report.steps == 5
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not torch.equal(
        a["classifier.high_classifier.weight"], load_file(str(ws["segmentation"]))["classifier.high_classifier.weight"]
    )


def test_detection_on_a_flat_folder_without_labels(ws, tmp_path):
    """The BN teacher's features are the target; the heads conversion did not change stay frozen
    (their weights come out identical), unless --train-heads; AMP (bf16 autocast) runs on CPU."""
    start = load_file(str(ws["detection"]))
    out = tmp_path / "det.safetensors"
    report = gnsurgeon.finetune(ws["detection"], out, options(ws, "detection", steps=3, amp=True))
    assert report.settings.task == "detection" and report.settings.labeled is False
    assert report.settings.amp == "bfloat16" and report.settings.train_heads is False
    assert any("heads rpn, roi_heads stay frozen" in n for n in report.notes), report.notes
    assert report.after["feature_cosine"] > report.before["feature_cosine"]
    assert "teacher_boxes" in report.after and np.isfinite(report.final_loss)
    after = load_file(str(out))
    heads = [k for k in after if k.startswith(("rpn.", "roi_heads."))]
    assert heads and all(torch.equal(after[k], start[k]) for k in heads)
    assert not torch.equal(after["backbone.fpn.layer_blocks.0.0.weight"], start["backbone.fpn.layer_blocks.0.0.weight"])

    trained = tmp_path / "det-heads.safetensors"
    report = gnsurgeon.finetune(ws["detection"], trained, options(ws, "detection", steps=2, val=None, train_heads=True))
    assert report.settings.train_heads is True and not report.notes
    moved = load_file(str(trained))
    assert not torch.equal(moved["rpn.head.conv.0.0.weight"], start["rpn.head.conv.0.0.weight"])  # fed student features


def test_dense_tasks_need_a_teacher_and_say_so(ws, tmp_path):
    with pytest.raises(GNSurgeonError, match="a segmentation model fine-tunes by distillation"):
        gnsurgeon.finetune(ws["segmentation"], tmp_path / "o.safetensors", options(ws, "segmentation", teacher=None))


# --------------------------------------------------------------------------------------- video
def test_bad_clips_are_reported_not_fatal_and_labels_train(ws, tmp_path):
    """A corrupt video and a frame folder with a corrupt frame are skipped and counted; the class
    sub-folders are labels (CE + KD per clip); channels_last (channels_last_3d for clips) on CPU."""
    opts = options(ws, "video", data=str(ws["clips"]), val=None, epochs=1.0, channels_last=True)
    report = gnsurgeon.finetune(ws["video"], tmp_path / "v.safetensors", opts)
    assert report.settings.labeled is True and report.settings.classes == 2 and report.settings.train_images == 8
    assert report.settings.channels_last is True
    assert report.broken_images["count"] == 2
    assert {Path(p).name for p in report.broken_images["first"]} == {"broken.mp4", "badframes"}
    records = [json.loads(line) for line in (tmp_path / "v.metrics.jsonl").read_text().splitlines()]
    assert all("ce" in r and "kd" in r for r in records if r["event"] == "train")


def test_video_files_and_frame_folders_give_the_same_clip(ws, tmp_path):
    rng = np.random.default_rng(5)
    frames = [np.kron(rng.integers(0, 255, (5, 5, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(6)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:03d}.png")
    video = write_video(tmp_path / "clip.mp4", frames)
    a, b = read_clip(folder, 3, train=False), read_clip(video, 3, train=False)
    assert a.shape == b.shape == (3, 3, 40, 40) and a.dtype == torch.uint8
    assert (a.float() - b.float()).abs().mean() < 12  # mpeg4 at qscale 1 on 8 x 8 blocks of colour
    config = read_checkpoint(ws["video"]).data_config
    data = ClipFolderData(ws["flat_clips"], clip_transform(config, train=False), frames=4, train=False)
    clip, label, _ = data[0]
    assert clip.shape == (3, 4, 32, 32) and label == -1


def test_frame_indices_cover_the_clip():
    assert frame_indices(8, 4, train=False) == [1, 3, 5, 7]  # the middle of each of four segments
    assert frame_indices(2, 4, train=False) == [0, 0, 1, 1]  # a short clip repeats frames
    torch.manual_seed(0)
    drawn = frame_indices(100, 4, train=True)
    assert all(25 * i <= f < 25 * (i + 1) for i, f in enumerate(drawn))


# ------------------------------------------------------------------------------------- torchrun
def test_torchrun_detection_two_processes_match_one_at_twice_the_batch(ws, tmp_path):
    """DDP wraps the detector's feature-matching forward (DetectionNet), not the detector, so the
    gradients it syncs are the ones the loss made: 2 processes x batch 1 = 1 process x batch 2.
    One step: the relative feature loss of a random-init detector is sharp enough that float
    rounding (9e-7 after one step, measured) grows to 1e-4 by the second, in one process as well
    (batch 2 against batch 1 x 2 accumulated); a missing sync differs by the step itself."""
    single = tmp_path / "single.safetensors"
    gnsurgeon.finetune(ws["detection"], single, options(ws, "detection", steps=1, val=None, lr=0.02))
    ddp = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "gnsurgeon.cli", "finetune", ws["detection"], "--data", ws["flat"], "-o", ddp, "--teacher", "source",
        "--steps", "1", "--batch-size", "1", "--lr", "0.02", "--workers", "0", "--log-every", "1", "-q",
    ]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = load_file(str(single)), load_file(str(ddp))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-5, worst
    start = load_file(str(ws["detection"]))
    assert max(float((a[k] - start[k]).abs().max()) for k in a if k.startswith("backbone.")) > 1e-3
