"""Fine-tuning torchvision detectors without labels: match the BN teacher's features, not its boxes.

A detector's boxes are a poor distillation target: which boxes survive score thresholds and NMS
jumps with small changes of the scores, and in training mode torchvision's detectors want ground
truth. What conversion changed is (almost always) the backbone, and its output, the FPN feature
maps, is a dense, stable target. So each step runs the teacher once in eval mode on the images,
capturing what its backbone received (the resized, normalised batch, so both networks see the same
tensor) and returned, and what each trained head unit received and returned; the student's backbone
runs on that batch and its features are pulled toward the teacher's, level by level, by a relative
MSE (per image, MSE / the teacher level's variance: levels of any scale count alike).

Heads are the detector's children other than ``transform`` and ``backbone`` (``rpn``,
``roi_heads``, ``head``); their *units* are their children with parameters (``rpn.head``,
``roi_heads.box_head``, ``roi_heads.box_predictor``, ``head.classification_head``, ...). A head
that conversion did not change (no layer of the plan became GN under it) stays frozen unless
``--train-heads``; a trained unit is matched to the teacher's unit output by the same relative MSE.
A unit fed the feature maps (RPN, RetinaNet/FCOS/SSD heads) runs on the *student's* features, so
it learns what the student's backbone gives it; a unit fed pooled proposals (``box_head``,
``box_predictor``, mask heads) runs on the teacher's input, because the student's own proposals
differ from the teacher's and would not line up with its outputs.

Evaluation compares the two networks in eval mode on the ``--val`` images: the cosine of their
backbone features (per image, averaged over levels) and box agreement, an F1: the share of
boxes scoring at least :data:`BOX_SCORE` that pair up one to one (same label, IoU at least
:data:`BOX_IOU`).

Stage: finetune's detection task. It imports torch, torchvision (detection and box ops),
:mod:`gnsurgeon.data`, :mod:`gnsurgeon.errors`, :mod:`gnsurgeon.hooks`, :mod:`gnsurgeon.plan`,
:mod:`gnsurgeon.probe` and :mod:`gnsurgeon.finetuning.tasks`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import ImageFolderData, eval_transform, train_transform
from ..errors import GNSurgeonError
from ..hooks import Call, capture, eval_mode
from ..plan import Action
from ..probe import flatten_outputs, model_device
from .tasks import LossParts, Task

__all__ = ["BOX_IOU", "BOX_SCORE", "DetectionNet", "DetectionTask", "box_matches", "head_units", "is_detector"]

BOX_SCORE = 0.5  # torchvision's detection examples draw boxes above 0.5; below it boxes are mostly noise
BOX_IOU = 0.5  # PASCAL VOC's match threshold


def is_detector(model: nn.Module) -> bool:
    """torchvision's detectors (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD) by their structure:
    a ``GeneralizedRCNNTransform`` that turns a list of images into a batch, and a ``backbone``."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    return isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform) and isinstance(
        getattr(model, "backbone", None), nn.Module
    )


def head_units(detector: nn.Module) -> dict[str, list[str]]:
    """``{head: [unit paths]}``: each child of the detector other than transform and backbone that
    has parameters, with its children that have parameters (the head itself when it has none)."""
    heads = {}
    for name, head in detector.named_children():
        if name in ("transform", "backbone") or not any(True for _ in head.parameters()):
            continue
        units = [f"{name}.{child}" for child, m in head.named_children() if any(True for _ in m.parameters())]
        heads[name] = units or [name]
    return heads


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """MSE relative to the teacher's variance, so that a level of any scale counts alike.

    ``per_sample``: each image's MSE relative to its own variance, then the mean over images (for
    feature maps: the loss of a batch is then the mean of its images' losses, so 2 processes x
    batch 1 train exactly like 1 x batch 2). Otherwise over the whole tensor (head outputs, whose
    first dimension is proposals, not images)."""
    student, teacher = student.float(), teacher.float()
    if not per_sample or teacher.dim() < 2:
        return F.mse_loss(student, teacher) / teacher.var(unbiased=False).clamp_min(1e-6)
    dims = tuple(range(1, teacher.dim()))
    return ((student - teacher).pow(2).mean(dims) / teacher.var(dims, unbiased=False).clamp_min(1e-6)).mean()


def _as_levels(features) -> list[torch.Tensor]:
    """A backbone's output as a list of feature maps (an OrderedDict of FPN levels, or one tensor)."""
    return [t for _, t in flatten_outputs(features)]


class DetectionNet(nn.Module):
    """The student's training forward: its backbone on the teacher's input batch, and the trained
    head units (feature-fed ones on the student's features, the others on the teacher's inputs).
    A module, so that DDP and torch.compile wrap exactly what runs."""

    def __init__(self, detector: nn.Module, feature_fed: set[str]) -> None:
        super().__init__()
        self.detector = detector
        self.feature_fed = feature_fed

    def forward(self, images: torch.Tensor, calls: dict[str, Call]):
        features = self.detector.backbone(images)
        levels = _as_levels(features)
        outputs = {}
        for path, call in calls.items():
            args = (levels, *call.args[1:]) if path in self.feature_fed else call.args
            outputs[path] = self.detector.get_submodule(path)(*args, **call.kwargs)
        return levels, outputs


class DetectionTask(Task):
    """Backbone/FPN feature matching (plus trained heads' outputs) against the BN teacher."""

    kind = "detection"
    uses_labels = False
    needs_teacher = True
    find_unused_parameters = True  # a mask head sees no box in some batches: no gradient that step
    counters = ("images", "cosine", "teacher_boxes", "student_boxes", "matched")

    def __init__(self, config, options) -> None:
        # torchvision detectors take [0, 1] pixels and normalise inside (model.transform).
        super().__init__(replace(config, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), options)
        self.units: list[str] = []  # the head units trained (and matched)
        self.feature_fed: set[str] = set()

    def dataset(self, root: str, train: bool) -> Dataset:
        o = self.options
        transform = (
            train_transform(self.config, hflip=o.hflip, scale=(o.min_crop_scale, 1.0))
            if train
            else eval_transform(self.config)
        )
        return ImageFolderData(root, transform)

    def probe_input(self, device):
        return [torch.rand(*self.config.input_size, generator=torch.Generator().manual_seed(0)).to(device)]

    def train_heads(self) -> bool:
        return self.options.train_heads

    def check(self, student, teacher, classes, device) -> None:
        if not is_detector(teacher):
            raise GNSurgeonError(f"--teacher {self.options.teacher} is not a torchvision detector like the student")
        mine = self._features(student, "the checkpoint's model", device)
        theirs = self._features(teacher, f"--teacher {self.options.teacher}", device)
        if mine != theirs:
            raise GNSurgeonError(
                f"--teacher {self.options.teacher}'s backbone outputs feature maps {theirs}, the student's {mine}"
            )
        missing = [u for units in head_units(student).values() for u in units if not _has(teacher, u)]
        if missing:
            raise GNSurgeonError(f"--teacher {self.options.teacher} has no {missing[0]} (the student's head)")

    def _features(self, model, what, device) -> list[tuple[int, ...]]:
        with eval_mode(model):
            try:
                seen = capture(model, self.probe_input(device), outputs=["backbone"], stop_at="backbone")
            except Exception as exc:
                raise GNSurgeonError(f"{what} fails on a probe image: {exc}") from None
        return [tuple(t.shape) for t in _as_levels(seen.output("backbone"))]

    def prepare(self, student, plan, options) -> list[str]:
        """Freeze the heads conversion did not change (unless ``--train-heads``); note what trains."""
        changed = {lp.path.split(".")[0] for lp in plan.with_action(Action.GN)}
        frozen = []
        for head, units in head_units(student).items():
            if head in changed or options.train_heads:
                self.units += units
            else:
                student.get_submodule(head).requires_grad_(False)
                frozen.append(head)
        self.feature_fed = self._feature_fed(student)
        notes = []
        if frozen:
            notes.append(
                f"detector heads {', '.join(frozen)} stay frozen: conversion changed no layer in them "
                "(--train-heads trains them too)"
            )
        return notes

    def _feature_fed(self, student: nn.Module) -> set[str]:
        """The trained units whose first argument is the backbone's feature maps (seen on a probe)."""
        if not self.units:
            return set()
        with eval_mode(student):
            seen = capture(student, self.probe_input(model_device(student)), inputs=self.units, outputs=["backbone"])
        levels = [tuple(t.shape) for t in _as_levels(seen.output("backbone"))]
        fed = set()
        for unit in self.units:
            first = seen.inputs[unit][0].first if seen.inputs.get(unit) else None
            if isinstance(first, (list, tuple)) and [tuple(getattr(t, "shape", ())) for t in first] == levels:
                fed.add(unit)
        return fed

    def network(self, student) -> nn.Module:
        return DetectionNet(student, self.feature_fed)

    def _teacher_pass(self, teacher, images) -> tuple:
        """The teacher in eval mode on the images: its backbone's input batch and output levels,
        each trained unit's call and output, and its detections."""
        with eval_mode(teacher):
            seen = capture(teacher, list(images), inputs=["backbone", *self.units], outputs=["backbone", *self.units])
        batch = seen.input("backbone")
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        calls = {u: seen.inputs[u][0] for u in self.units if seen.inputs.get(u)}
        outputs = {u: seen.outputs[u][0] for u in calls}
        return batch, _as_levels(seen.output("backbone")), calls, outputs, seen.result

    def loss(self, net, teacher, images, labels, labeled) -> LossParts:
        batch, target_levels, calls, target_units, _ = self._teacher_pass(teacher, images)
        levels, unit_outputs = net(batch, calls)
        kd = torch.stack([relative_mse(s, t, True) for s, t in zip(levels, target_levels, strict=True)]).mean()
        unit_losses = []
        for path, out in unit_outputs.items():
            pairs = zip(flatten_outputs(out), flatten_outputs(target_units[path]), strict=True)
            unit_losses += [relative_mse(s, t) for (_, s), (_, t) in pairs if t.numel() > 1]
        if unit_losses:
            kd = kd + torch.stack(unit_losses).mean()
        kd = self.options.kd_weight * kd
        return LossParts(kd, torch.zeros_like(kd), kd)

    def eval_counts(self, student, teacher, images, labels) -> list[float]:
        batch, target_levels, _, _, target_boxes = self._teacher_pass(teacher, images)
        seen = capture(student, list(images), outputs=["backbone"])
        levels = _as_levels(seen.output("backbone"))
        pairs = zip(levels, target_levels, strict=True)
        cosine = torch.stack([F.cosine_similarity(s.flatten(1).double(), t.flatten(1).double()) for s, t in pairs])
        cosine = cosine.mean(0)  # per image, the mean over levels
        counts = [len(images), float(cosine.sum()), 0.0, 0.0, 0.0]
        for mine, theirs in zip(seen.result, target_boxes, strict=True):
            n_t, n_s, matched = box_matches(mine, theirs)
            counts[2] += n_t
            counts[3] += n_s
            counts[4] += matched
        return counts

    def summarize(self, sums, has_teacher) -> dict:
        images, boxes = sums["images"], sums["teacher_boxes"] + sums["student_boxes"]
        return {
            "images": int(images),
            "feature_cosine": sums["cosine"] / images if images else None,
            "teacher_agreement": 100.0 * 2 * sums["matched"] / boxes if boxes else None,
            "teacher_boxes": int(sums["teacher_boxes"]),
        }


def box_matches(student: dict, teacher: dict, score: float = BOX_SCORE, iou: float = BOX_IOU) -> tuple[int, int, int]:
    """``(teacher boxes, student boxes, pairs)``: boxes scoring at least ``score``, paired greedily
    (the teacher's in score order, each to its best unpaired student box) with the same label and
    IoU at least ``iou``."""
    from torchvision.ops import box_iou

    t_keep, s_keep = teacher["scores"] >= score, student["scores"] >= score
    t_boxes, s_boxes = teacher["boxes"][t_keep].float(), student["boxes"][s_keep].float()
    t_labels, s_labels = teacher["labels"][t_keep], student["labels"][s_keep]
    if not len(t_boxes) or not len(s_boxes):
        return len(t_boxes), len(s_boxes), 0
    overlap = box_iou(t_boxes, s_boxes)
    overlap[t_labels[:, None] != s_labels[None, :]] = 0.0
    taken = torch.zeros(len(s_boxes), dtype=torch.bool, device=overlap.device)
    matched = 0
    for row in teacher["scores"][t_keep].argsort(descending=True).tolist():
        candidates = overlap[row].masked_fill(taken, 0.0)
        best = int(candidates.argmax())
        if candidates[best] >= iou:
            taken[best] = True
            matched += 1
    return len(t_boxes), len(s_boxes), matched


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
