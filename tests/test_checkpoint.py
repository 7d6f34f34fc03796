"""The checkpoint format: one safetensors file, readable alone, rebuilt offline, written atomically."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import gnsurgeon
from gnsurgeon import GNSurgeonError, SourceSpec, load, make_plan, read_checkpoint, save
from gnsurgeon.checkpoint import write_atomically
from gnsurgeon.sources import DataConfig, build_model


@pytest.fixture
def converted(tmp_path):
    spec = SourceSpec("timm", "test_resnet", {"num_classes": 7})
    model = build_model(spec)
    plan = make_plan(model)
    gn = gnsurgeon.apply_plan(model, plan)
    path = tmp_path / "m.safetensors"
    save(path, gn, plan, source=spec, data_config=DataConfig(input_size=(3, 64, 64)), history=[{"stage": "convert"}])
    return path, gn, plan


def test_metadata_is_readable_with_safetensors_alone(converted):
    path, gn, plan = converted
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["gnsurgeon.format"] == "1"
    assert meta["gnsurgeon.version"] == gnsurgeon.__version__
    assert json.loads(meta["gnsurgeon.source"])["name"] == "test_resnet"
    assert json.loads(meta["gnsurgeon.source"])["kwargs"] == {"num_classes": 7}
    assert len(json.loads(meta["gnsurgeon.plan"])["layers"]) == len(plan)
    assert json.loads(meta["gnsurgeon.data_config"])["input_size"] == [3, 64, 64]
    assert keys == set(gn.state_dict())


def test_load_rebuilds_exactly_in_eval_mode(converted):
    path, gn, _ = converted
    model = load(path)
    assert not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), gn.eval()(x))
    info = read_checkpoint(path)
    assert info.history == [{"stage": "convert"}] and info.data_config.input_size == (3, 64, 64)


def test_source_less_checkpoint_needs_the_architecture(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    plan = make_plan(model)
    path = save(tmp_path / "x.safetensors", gnsurgeon.apply_plan(model, plan), plan, source=None)
    with pytest.raises(GNSurgeonError, match="records no source"):
        load(path)
    rebuilt = load(path, model=model)
    assert isinstance(rebuilt[1], nn.GroupNorm)
    assert isinstance(model[1], nn.BatchNorm2d)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"precious")

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(GNSurgeonError, match="No space left"):
        write_atomically(target, broken)
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_plain_safetensors_is_not_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(GNSurgeonError, match="not a gnsurgeon checkpoint"):
        read_checkpoint(path)


def test_unknown_format_version_is_refused(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _, _ = converted
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["gnsurgeon.format"] = "99"
    other = tmp_path / "future.safetensors"
    save_file(load_file(str(path)), str(other), metadata=meta)
    with pytest.raises(GNSurgeonError, match="format 99"):
        load(other)
