"""gnsurgeon.hooks: capture, early stop, clones, hook removal and train/eval restore, tested directly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gnsurgeon.hooks import Call, StopForward, capture, detached_clone, eval_mode, registered


class _Scale(nn.Module):
    def forward(self, x, factor=1.0):
        return x * factor


class _Net(nn.Module):
    """conv -> in-place ReLU (overwrites the conv's output) -> scale (called with a keyword) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.scale = _Scale()
        self.head = nn.Linear(4, 2)
        self.ran: list[str] = []  # modules whose forward completed, in order
        for name in ("conv", "act", "scale", "head"):
            getattr(self, name).register_forward_hook(lambda _m, _a, _o, name=name: self.ran.append(name))

    def forward(self, x):
        x = self.act(self.conv(x))
        x = self.scale(x, factor=2.0)
        return self.head(x.mean((2, 3)))


class _Broken(_Net):
    def forward(self, x):
        self.conv(x)
        raise RuntimeError("the forward failed")


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture
def net():
    return _Net().eval()


def test_captures_inputs_and_outputs_at_several_paths(net):
    x = torch.randn(2, 3, 5, 5)
    seen = capture(net, x, inputs=["conv", "scale", "head"], outputs=["conv", "head"])
    conv_out = net.conv(x)
    assert torch.equal(seen.input("conv"), x)
    assert torch.equal(seen.output("conv"), conv_out)
    assert torch.equal(seen.input("scale"), conv_out.relu())
    assert seen.inputs["scale"][0].kwargs == {"factor": 2.0}
    assert torch.equal(seen.input("head"), (2 * conv_out.relu()).mean((2, 3)))
    assert torch.equal(seen.output("head"), seen.result)
    assert not seen.stopped
    assert list(seen.inputs) == ["conv", "scale", "head"]  # the order the modules ran


def test_a_call_replays_a_block_on_recorded_arguments(net):
    x = torch.randn(2, 4, 3, 3)
    seen = capture(net.scale, Call((x,), {"factor": 3.0}), inputs=[""], outputs=[""])
    assert torch.equal(seen.result, 3 * x) and torch.equal(seen.output(""), 3 * x)
    assert seen.inputs[""][0].kwargs == {"factor": 3.0}
    stopped = capture(net.scale, Call((x,), {"factor": 3.0}), inputs=[""], stop_at="")
    assert stopped.stopped and torch.equal(stopped.input(""), x)


def test_a_module_called_twice_is_recorded_twice():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(4, 3)
    seen = capture(model, x, outputs=["0"])
    assert len(seen.outputs["0"]) == 2
    assert torch.equal(seen.outputs["0"][1], model(x))


def test_captured_output_is_unaffected_by_a_later_in_place_op(net):
    x = torch.randn(2, 3, 5, 5)
    expected = net.conv(x)
    assert (expected < 0).any()  # the in-place ReLU after conv really overwrites something
    seen = capture(net, x, outputs=["conv"])
    assert torch.equal(seen.output("conv"), expected)


def test_stop_at_an_output_skips_the_rest_of_the_forward(net):
    seen = capture(net, torch.randn(1, 3, 4, 4), outputs=["conv"], stop_at="conv")
    assert seen.stopped and seen.result is None
    assert net.ran == ["conv"]  # act, scale and head never ran
    assert seen.output("conv").shape == (1, 4, 4, 4)


def test_stop_at_an_input_only_path_stops_before_that_module_runs(net):
    x = torch.randn(1, 3, 4, 4)
    seen = capture(net, x, inputs=["scale"], stop_at="scale")
    assert seen.stopped
    assert net.ran == ["conv", "act"]  # scale itself never ran
    assert torch.equal(seen.input("scale"), net.conv(x).relu())
    with pytest.raises(KeyError, match="head"):
        seen.input("head")


def test_stop_at_must_be_a_captured_path(net):
    with pytest.raises(ValueError, match="stop_at"):
        capture(net, torch.randn(1, 3, 4, 4), outputs=["conv"], stop_at="head")


@pytest.mark.parametrize("stop_at", [None, "conv"])
def test_hooks_are_removed_after_the_forward(net, stop_at):
    before = _hook_count(net)
    capture(net, torch.randn(1, 3, 4, 4), inputs=["conv", "head"], outputs=["conv"], stop_at=stop_at)
    assert _hook_count(net) == before


def test_hooks_are_removed_after_a_forward_that_raises():
    model = _Broken().eval()
    before = _hook_count(model)
    with pytest.raises(RuntimeError, match="the forward failed"):
        capture(model, torch.randn(1, 3, 4, 4), inputs=["conv"], outputs=["conv", "head"])
    assert _hook_count(model) == before
    model.ran.clear()
    with pytest.raises(RuntimeError, match="the forward failed"):  # not StopForward from a stale hook
        model(torch.randn(1, 3, 4, 4))
    assert model.ran == ["conv"]


def test_registered_removes_handles_on_exception():
    layer = nn.Linear(2, 2)
    with pytest.raises(StopForward), registered([layer.register_forward_hook(lambda *_: None)]):
        raise StopForward
    assert not layer._forward_hooks


def test_transform_is_recorded_instead_of_the_input(net):
    x = torch.randn(2, 3, 4, 4)
    seen = capture(net, x, inputs=["conv", "head"], transform=lambda path, module, t: (path, type(module), t.shape))
    assert seen.input("conv") == ("conv", nn.Conv2d, x.shape)
    assert seen.input("head") == ("head", nn.Linear, torch.Size([2, 4]))


def test_grad_mode_keeps_the_autograd_graph():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(5, 3, requires_grad=True)
    seen = capture(model, x, outputs=["1"], grad="grad")
    hidden = seen.output("1")
    assert hidden.requires_grad and hidden.grad_fn is not None
    hidden.sum().backward()
    expected = torch.autograd.grad(model[1](model[0](x)).sum(), x)[0]
    assert torch.allclose(x.grad, expected)
    assert seen.result.requires_grad


def test_default_grad_mode_records_detached_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    seen = capture(model, torch.randn(2, 3, requires_grad=True), outputs=["0"])
    assert not seen.output("0").requires_grad and not seen.result.requires_grad
    inference = capture(model, torch.randn(2, 3), outputs=["0"], grad="inference")
    assert inference.output("0").is_inference()


def _modes(model: nn.Module) -> dict[str, bool]:
    return {path: m.training for path, m in model.named_modules()}


def test_eval_mode_restores_mixed_per_submodule_flags(net):
    net.train()
    net.conv.eval()  # a frozen part inside a training model
    mixed = _modes(net)
    with eval_mode(net):
        assert not any(_modes(net).values())
    assert _modes(net) == mixed
    with eval_mode(net, train=True):
        assert all(_modes(net).values())
    assert _modes(net) == mixed


def test_eval_mode_restores_flags_on_exception(net):
    other = nn.BatchNorm1d(3).train()
    net.train()
    net.head.eval()
    mixed = _modes(net)
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net, other):
        assert not net.training and not other.training
        raise RuntimeError("inside")
    assert _modes(net) == mixed and other.training


def test_detached_clone_copies_nested_tensors():
    a = torch.ones(2, requires_grad=True)
    value = {"x": [a * 1, (a * 2, "tag")], "n": 3}
    copy = detached_clone(value)
    assert copy["n"] == 3 and copy["x"][1][1] == "tag"
    assert not copy["x"][0].requires_grad
    value["x"][0].data.zero_()
    assert torch.equal(copy["x"][0], torch.ones(2))
