"""ONNX export beyond classifiers: a detection model (a list of images in, dicts out, through the
TorchScript exporter), a segmentation model with dynamic H/W checked at two sizes, a 5-D (video) GN,
an exporter failure as one sentence, and ``--center-groups`` on a runtime whose GN variance is
E[x²] − E[x]² (native GroupNormalization).

The models are the smallest that have each structure (a torchvision FasterRCNN with a two-conv
frozen-BN + GN backbone, a conv/GN/upsample segmenter, a Conv3d/GN clip model): the real torchvision
ones take 30-60 s each to export and verify on two shared cores (fasterrcnn_mobilenet_v3_large_320_fpn
at 128 px: 12 s of CPU), too slow for the suite; r3d_18 is exported by the video-3d recipe test.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gnsurgeon.cli import app
from gnsurgeon.errors import GNSurgeonError
from gnsurgeon.onnx_export import center_groups, export_model, fold_for_export
from gnsurgeon.onnx_graph import model_input
from gnsurgeon.onnx_verify import VerifyOptions, second_size, verify_model
from gnsurgeon.sources import DataConfig


def tiny_detector() -> nn.Module:
    """FasterRCNN on a stride-4 backbone: conv -> FrozenBatchNorm2d -> ReLU -> conv -> GN -> ReLU."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(8)
    frozen.weight.uniform_(0.5, 1.5)
    frozen.bias.normal_()
    frozen.running_mean.normal_()
    frozen.running_var.uniform_(0.5, 1.5)
    first = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
    backbone = nn.Sequential(first, frozen, nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.ReLU())
    backbone.out_channels = 16
    return FasterRCNN(
        backbone,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_anchor_generator=AnchorGenerator(((8, 16),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 4, 2),
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        box_score_thresh=0.0,  # every box out: random weights score all classes alike
        box_detections_per_img=10,
    ).eval()


class TinySegmenter(nn.Module):
    """conv (stride 2) -> GN -> ReLU -> 1x1 classes, upsampled to the input's H x W; a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.gn = nn.GroupNorm(4, 8)
        self.classifier = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.classifier(torch.relu(self.gn(self.conv(x))))
        return {"out": nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear"), "aux": y}


def test_detection_model_exports_and_verifies():
    model = tiny_detector()
    image = [torch.rand(3, 64, 64)]
    folded, folds = fold_for_export(model, image)
    assert [(f["path"], f["action"]) for f in folds] == [("backbone.1", "folded")]  # the frozen BN
    proto = export_model(folded, image, opset=18, gn_op="layernorm", dynamic_size=True, name="tiny-frcnn")
    assert model_input(proto) == ("input", [3, "height", "width"])
    assert [o.name for o in proto.graph.output] == ["boxes", "labels", "scores"]
    report = verify_model(proto, model, DataConfig(task="detection", input_size=(3, 64, 64)), VerifyOptions())
    assert report.ok, report.headline()
    # One image at the export size and one at another H x W; detections compared box by box.
    assert [r["input"] for r in report.model_checks] == ["random, batch 1", "random, batch 1, 96x48"]
    assert all(r["max_rel"] < 1e-5 and r["top1_agreement"] is None for r in report.model_checks)
    (layer,) = report.layers
    assert (layer["path"], layer["form"], layer["mapped_by"]) == ("backbone.4", "layernorm", "pattern")
    assert len(layer["cases"]) == 5 and all(c["ok"] for c in layer["cases"].values())  # batch 1: 4 stress inputs


def test_detection_model_refuses_the_native_form_in_one_sentence(tmp_path):
    result = CliRunner().invoke(
        app,
        ["export-onnx", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "-o", str(tmp_path / "d.onnx"),
         "--gn-op", "native", "--model-kwargs", "min_size=64,max_size=64", "--input-size", "3,64,64"],
    )  # fmt: skip
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in text
    assert "--gn-op native needs --opset 21" in text and "TorchScript exporter, which stops at opset 20" in text


def test_segmentation_model_with_dynamic_size_verifies_at_two_sizes():
    torch.manual_seed(0)
    model = TinySegmenter().eval()
    proto = export_model(model, torch.randn(1, 3, 32, 48), gn_op="decomposed", dynamic_size=True, name="tiny-seg")
    assert model_input(proto) == ("input", ["batch", 3, "height", "width"])
    assert [o.name for o in proto.graph.output] == ["out", "aux"]
    report = verify_model(proto, model, DataConfig(task="segmentation", input_size=(3, 32, 48)), VerifyOptions())
    assert report.ok, report.headline()
    assert report.dynamic_size and second_size((3, 32, 48)) == (3, 48, 32)
    assert [r["input"] for r in report.model_checks] == ["random, batch 1", "random, batch 1, 48x32", "random, batch 3"]
    # The file itself at two more sizes, against PyTorch.
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 40, 24), (1, 3, 64, 64)):
        x = torch.randn(*shape)
        with torch.no_grad():
            ref = model(x)
        out, aux = session.run(None, {"input": x.numpy()})
        assert out.shape == tuple(ref["out"].shape) == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(out, ref["out"].numpy(), atol=1e-5, rtol=0)


def test_video_5d_group_norm_in_the_layernorm_form():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv3d(8, 4, 1)).eval()
    proto = export_model(model, torch.randn(1, 3, 2, 8, 8), gn_op="layernorm")
    assert "LayerNormalization" in {n.op_type for n in proto.graph.node}
    report = verify_model(proto, model, DataConfig(task="video", input_size=(3, 2, 8, 8)), VerifyOptions())
    assert report.ok, report.headline()
    assert report.layers[0]["form"] == "layernorm" and len(report.layers[0]["cases"]) == 6


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # a branch on the data: torch.export cannot trace it


def test_an_export_the_exporter_cannot_do_is_one_sentence_naming_the_model():
    with pytest.raises(GNSurgeonError) as info:
        export_model(Branchy(), torch.randn(1, 3, 4, 4), name="toy:branchy")
    message = str(info.value)
    assert message.startswith("torch.onnx could not export toy:branchy at opset 18: ")
    assert "\n" not in message and "data-dependent" in message


class Offset(nn.Module):
    """Activations a trained net can have: conv output at mean 1000, spread ~0.01 (κ ~ 1e5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.gn2 = nn.GroupNorm(2, 8)
        with torch.no_grad():
            self.conv.weight.mul_(0.01)
            self.conv.bias.fill_(1000.0)

    def forward(self, x):
        y = torch.relu(self.gn(self.conv(x)))
        return self.gn2(self.conv2(y) + y)  # gn2 reads a residual sum: no producer to centre in


def test_center_groups_is_exact_and_rescues_the_native_op_on_offset_activations():
    torch.manual_seed(0)
    model = Offset().eval()
    x = torch.randn(4, 3, 16, 16)
    centred, rows = center_groups(model, x)
    by_path = {r["path"]: r for r in rows}
    assert by_path["gn"]["action"] == "centred" and by_path["gn"]["producer"] == "conv"
    assert by_path["gn"]["kappa_before"] > 1e4 and by_path["gn"]["kappa_after"] < 10
    assert abs(by_path["gn"]["max_shift"] - 1000) < 1
    assert (by_path["gn2"]["action"], by_path["gn2"]["note"]) == ("kept", "after add (residual stream)")
    assert model.conv.bias[0] == 1000.0  # the input model is untouched
    with torch.no_grad():  # exact: in float64 only the rounding of the new bias is left
        drift = (centred.double()(x.double()) - model.double()(x.double())).abs().max()
    assert drift < 1e-9
    config = DataConfig(input_size=(3, 16, 16))
    verdicts = {}
    for name, reference in (("plain", model.float()), ("centred", centred.float())):
        proto = export_model(reference, x[:1], opset=21, gn_op="native")
        report = verify_model(proto, reference, config, VerifyOptions(stress=False))
        verdicts[name] = {r["path"]: r["cases"]["activation, batch 3"] for r in report.layers}
    assert not verdicts["plain"]["gn"]["ok"]  # E[x²] − E[x]² at κ ~ 1e5: NaN or far off
    assert verdicts["centred"]["gn"]["ok"] and verdicts["centred"]["gn"]["max_abs"] < 1e-5
