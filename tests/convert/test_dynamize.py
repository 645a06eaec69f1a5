"""padnet.dynamize on convolutional models: placement, function preservation, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import padnet
from padnet.layers import DynamicConv2d, ODConv2d


class TinyNet(nn.Module):
    """Stem, a residual block with a projection shortcut, depthwise conv, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding="same", groups=16, padding_mode="reflect"),
        )
        self.shortcut = nn.Conv2d(8, 16, 1, stride=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block(x) + self.shortcut(x)
        return self.head(x.mean((2, 3)))


@torch.no_grad()
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().detach())


@pytest.mark.parametrize("method", ["dyconv", "condconv", "odconv"])
@pytest.mark.parametrize("ratio", [1.0, 0.3, 0.0])
def test_copy_init_preserves_outputs_for_any_mask(method, ratio):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(4, 3, 12, 12)
    before = model(x)
    padnet.dynamize(model, method, num_kernels=3, dynamic_ratio=ratio)
    assert relative_error(model(x), before) <= 1e-5
    model.train()
    model(x).sum().backward()  # trains after conversion


def test_default_placement_keeps_stem_and_classifier_static():
    model = padnet.dynamize(TinyNet(), "odconv")
    assert type(model.stem) is nn.Conv2d and type(model.head) is nn.Linear
    assert isinstance(model.block[0], ODConv2d) and isinstance(model.shortcut, ODConv2d)
    report = model.padnet_report
    assert report.names == ["block.0", "block.3", "shortcut"]
    assert [(e.name, e.reason) for e in report.skipped] == [("stem", "stem")]
    assert "converted 3 module(s)" in str(report) and report.to_dict()["method"] == "odconv"


def test_include_and_exclude_patterns():
    model = padnet.dynamize(TinyNet(), include=["block.*", "stem"], exclude="block.3")
    assert isinstance(model.stem, DynamicConv2d) and isinstance(model.block[0], DynamicConv2d)
    assert type(model.block[3]) is nn.Conv2d and type(model.shortcut) is nn.Conv2d
    reasons = {e.name: e.reason for e in model.padnet_report.skipped}
    assert reasons == {"block.3": "excluded", "shortcut": "not in include"}


def test_layer_arguments_pass_through_and_keep_device_dtype_mode():
    model = TinyNet().double().eval()
    padnet.dynamize(model, "dyconv", num_kernels=2, path="mixture", scale_mode="d",
                    temperature=30.0, dynamic_ratio=0.5)
    conv = model.block[0]
    assert conv.num_kernels == 2 and conv.path == "mixture"
    assert conv.mode_mask.scale_mode == "dynamic_only"  # "d" is its alias
    assert conv.router.temperature == 30.0 and conv.weight.dtype == torch.float64
    assert not conv.training and abs(conv.dynamic_ratio - 0.5) < 0.01
    assert padnet.set_temperature(model, 1.0) == 3


def test_copy_noise_and_kaiming_change_the_function():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    base = TinyNet().eval()
    ref = base(x)
    base2 = TinyNet().eval()
    base2.load_state_dict(base.state_dict())
    noisy = padnet.dynamize(base2, init="copy_noise", copy_noise_std=0.01)
    err = relative_error(noisy(x), ref)
    assert 0 < err < 0.1
    fresh = TinyNet().eval()
    fresh.load_state_dict(base.state_dict())
    assert relative_error(padnet.dynamize(fresh, init="kaiming")(x), ref) > 0.05


def test_already_dynamic_modules_are_left_alone():
    model = padnet.dynamize(TinyNet())
    first = model.block[0]
    padnet.dynamize(model, "condconv")
    assert model.block[0] is first and model.padnet_report.names == []


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "dynamic"}, ValueError, "unknown method 'dynamic': method must be one of"),
        ({"init": "zeros"}, ValueError, "init must be one of .*'zeros'"),
        ({"num_kernels": 0}, ValueError, "num_kernels must be an int >= 1, got 0"),
        ({"dynamic_ratio": 2.0}, ValueError, "dynamic_ratio must be in \\[0, 1\\], got 2.0"),
        ({"scale_mode": "all"}, ValueError, "scale_mode must be one of .*'all'"),
        ({"include": "nothing.*"}, ValueError, "include pattern 'nothing.\\*' matches no module"),
        ({"include": "head"}, ValueError, "cannot convert module 'head' of type Linear"),
        ({"include": [3]}, TypeError, "include must be a string or a list of strings"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        padnet.dynamize(model, **kwargs)
    if kwargs.get("include") in ("head", "nothing.*"):  # checked before anything is replaced
        assert type(model.shortcut) is nn.Conv2d
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        padnet.dynamize("resnet18")


@pytest.mark.parametrize("method", ["dyconv", "condconv", "odconv"])
def test_copy_noise_is_relative_to_the_copy_for_every_method(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3))
    padnet.dynamize(model, method, init="copy", num_kernels=4)
    exact = model[1].weight.detach().clone()
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3))
    padnet.dynamize(noisy, method, init="copy_noise", copy_noise_std=0.1, num_kernels=4)
    relative = float((noisy[1].weight - exact).std() / exact.std())
    assert 0.09 < relative < 0.11
