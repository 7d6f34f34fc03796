"""Models with auxiliary heads (issue #12): one reading of model outputs as logits, and one rule for
layers that an eval-mode forward never runs.

torchvision's GoogLeNet returns ``GoogLeNetOutputs`` in train mode and runs its aux heads only
there: fine-tuning once died on the namedtuple, calibration with ``KeyError`` on the aux layers.
Real GoogLeNet at 64x64 where it is cheap; Inception3 needs ~299 px for its aux head, so its
output type is checked on a direct forward at that size only in the unit test of the reader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import gnsurgeon
from gnsurgeon import CalibrationOptions, ConvertOptions, FinetuneOptions, load, read_checkpoint
from gnsurgeon.calibration import calibrate, class_scores
from gnsurgeon.models import DataConfig
from gnsurgeon.onnx_export import export_model
from gnsurgeon.onnx_verify import verify_model
from gnsurgeon.outputs import AUX_WEIGHT, main_logits, split_logits
from gnsurgeon.plan import Action
from gnsurgeon.reach import reached_layers, split_reached
from gnsurgeon.surgery import convert
from tests.helpers import randomize_bn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _images(folder: Path, classes: int, per_class: int, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            pixels[..., c % 3] += 150
            Image.fromarray(pixels).save(folder / f"class{c}" / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def googlenet(tmp_path_factory):
    """GoogLeNet with its aux heads (3 classes, 64x64): BN weights, and their GN conversion."""
    root = tmp_path_factory.mktemp("googlenet")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=True))
    weights = root / "bn.safetensors"
    save_file(model.state_dict(), str(weights))
    common = {"num_classes": 3, "input_size": (3, 64, 64), "weights": str(weights)}
    common["model_kwargs"] = {"aux_logits": True}
    gn = root / "gn.safetensors"
    gnsurgeon.convert_source("torchvision:googlenet", gn, ConvertOptions(**common))
    return {"root": root, "weights": weights, "gn": gn, "common": common, "data": _images(root / "train", 3, 4)}


# ------------------------------------------------------------------------------ the reader
def test_split_logits_reads_every_known_output_and_guesses_nothing():
    main, aux1, aux2 = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert split_logits(main).main is main and split_logits(main).aux == ()
    g = torchvision.models.GoogLeNetOutputs(main, aux2, aux1)
    assert split_logits(g).main is main and split_logits(g).aux == (aux2, aux1)
    inception = torchvision.models.InceptionOutputs(main, None)  # aux_logits=False in train mode
    assert split_logits(inception).main is main and split_logits(inception).aux == ()
    seg = {"out": torch.randn(2, 3, 4, 4), "aux": torch.randn(2, 3, 4, 4)}
    assert split_logits(seg).main is seg["out"] and split_logits(seg).aux == (seg["aux"],)
    assert split_logits((main, aux1)) is None  # which element is main is the model's convention
    assert split_logits({"boxes": main}) is None and split_logits(torch.ones(2, dtype=torch.long)) is None
    assert class_scores(g).shape == (2, 3) and class_scores(seg).shape == (2 * 16, 3)


def test_inception_v3_train_output_is_read():
    model = torchvision.models.inception_v3(num_classes=3, aux_logits=True, init_weights=False).train()
    out = model(torch.randn(2, 3, 299, 299))
    assert type(out).__name__ == "InceptionOutputs"
    logits = split_logits(out)
    assert logits.main.shape == (2, 3) and len(logits.aux) == 1 and logits.aux[0].shape == (2, 3)
    assert main_logits(out) is out.logits


# --------------------------------------------------------------------------- fine-tuning
def test_finetune_googlenet_trains_main_and_aux_heads(googlenet, tmp_path):
    out = tmp_path / "ft.safetensors"
    options = FinetuneOptions(
        data=str(googlenet["data"]), val=str(googlenet["data"]), steps=2, batch_size=4, workers=0, teacher="source"
    )
    report = gnsurgeon.finetune(googlenet["gn"], out, options)
    before, after = load(googlenet["gn"]), load(out)
    # The aux heads are trained (they only get a gradient through the aux loss) and so is the trunk.
    assert not torch.equal(before.aux1.fc2.weight, after.aux1.fc2.weight)
    assert not torch.equal(before.aux2.fc2.weight, after.aux2.fc2.weight)
    assert not torch.equal(before.fc.weight, after.fc.weight)
    assert any(f"weighted {AUX_WEIGHT:g}" in note for note in report.notes), report.notes
    assert report.after["images"] == 12


# ------------------------------------------------------------------ layers that never run
def test_calibrate_googlenet_skips_the_aux_heads_with_a_note(googlenet, tmp_path):
    options = ConvertOptions(
        **googlenet["common"], calibrate=str(googlenet["data"]), calib_samples=4, calib_method="layer"
    )
    report = gnsurgeon.convert_source("torchvision:googlenet", tmp_path / "cal.safetensors", options)
    cal = report.calibration
    assert cal["notes"] and "aux1.conv.bn" in cal["notes"][0] and "not calibrated" in cal["notes"][0]
    assert not any(p.startswith(("aux1.", "aux2.")) for p in cal["layers"])
    # Every GN layer that runs is calibrated; the layers the default measured BN* plan kept are not GN.
    gn = {lp.path for lp in report.plan.with_action(Action.GN)}
    assert set(cal["layers"]) == {p for p in gn if not p.startswith(("aux1.", "aux2."))}
    assert report.max_frozen["default"] and not set(report.max_frozen["kept"]) & set(cal["layers"])
    assert [h["stage"] for h in read_checkpoint(tmp_path / "cal.safetensors").history] == ["convert"]


class TrainOnlyHead(nn.Module):
    """A trunk with a GN head that runs only in training (as GoogLeNet's aux heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        x = self.stem(x)
        return (self.head(x), self.aux(x)) if self.training else self.head(x)


def test_one_rule_for_layers_that_do_not_run_in_eval_mode(tmp_path):
    teacher = randomize_bn(TrainOnlyHead())
    teacher(torch.randn(1, 3, 8, 8))  # materialise the lazy layer
    teacher.eval()
    student = convert(teacher)
    x = torch.randn(2, 3, 8, 8)
    assert reached_layers(student, x, ["aux.1", "stem.1"]) == (["stem.1"], ["aux.1"])
    assert split_reached(["a", "b", "c"], ["c", "a"]) == (["c", "a"], ["b"])
    assert student.training is False  # modes come back as they were

    # calibration: the unreached layer is skipped before any work, with a note
    _images(tmp_path / "data", 2, 3, size=8)
    plan = gnsurgeon.make_plan(teacher)
    config = DataConfig(input_size=(3, 8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    options = CalibrationOptions(data=str(tmp_path / "data"), method="layer", samples=4)
    _, report = calibrate(teacher, student, plan, config, options)
    assert list(report.layers) == ["stem.1"] and "aux.1" in report.notes[0]

    # export + verification: the same rule writes the same note
    proto = export_model(student.eval(), torch.randn(1, 3, 8, 8))
    verified = verify_model(proto, student, config)
    assert verified.ok, verified.headline()
    assert any("aux.1" in note and "not run by the model in eval mode" in note for note in verified.notes)
