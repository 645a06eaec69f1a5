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


METHODS = ["dyconv", "condconv", "odconv"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [1.0, 0.3, 0.0])
def test_copy_init_preserves_outputs_for_any_mask(method, ratio):
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.randn(4, 3, 12, 12)
    before = model(x)
    padnet.dynamize(model, method, num_kernels=3, dynamic_ratio=ratio)
    assert relative_error(model(x), before) <= 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ratio", [1.0, 0.3, 0.0])
def test_converted_model_trains(method, ratio):
    torch.manual_seed(0)
    model = padnet.dynamize(TinyNet(), method, num_kernels=3, dynamic_ratio=ratio).train()
    model(torch.randn(4, 3, 12, 12)).sum().backward()


@pytest.fixture
def odconv_net() -> TinyNet:
    return padnet.dynamize(TinyNet(), "odconv")


def test_default_placement_keeps_stem_and_classifier_static(odconv_net):
    assert type(odconv_net.stem) is nn.Conv2d and type(odconv_net.head) is nn.Linear


def test_default_placement_converts_the_inner_convolutions(odconv_net):
    assert isinstance(odconv_net.block[0], ODConv2d) and isinstance(odconv_net.shortcut, ODConv2d)


def test_report_lists_converted_and_skipped_modules(odconv_net):
    report = odconv_net.padnet_report
    assert report.names == ["block.0", "block.3", "shortcut"]
    assert [(e.name, e.reason) for e in report.skipped] == [("stem", "stem")]


def test_report_text_and_dict(odconv_net):
    report = odconv_net.padnet_report
    assert "converted 3 module(s)" in str(report) and report.to_dict()["method"] == "odconv"


@pytest.fixture
def patterned_net() -> TinyNet:
    return padnet.dynamize(TinyNet(), include=["block.*", "stem"], exclude="block.3")


def test_include_patterns_select_the_modules(patterned_net):
    assert isinstance(patterned_net.stem, DynamicConv2d)
    assert isinstance(patterned_net.block[0], DynamicConv2d)
    assert type(patterned_net.shortcut) is nn.Conv2d


def test_exclude_patterns_win_over_include(patterned_net):
    assert type(patterned_net.block[3]) is nn.Conv2d


def test_report_names_the_pattern_that_skipped_a_module(patterned_net):
    reasons = {e.name: e.reason for e in patterned_net.padnet_report.skipped}
    assert reasons == {"block.3": "excluded", "shortcut": "not in include"}


@pytest.fixture
def double_net() -> TinyNet:
    model = TinyNet().double().eval()
    padnet.dynamize(model, "dyconv", num_kernels=2, path="mixture", scale_mode="d",
                    temperature=30.0, dynamic_ratio=0.5)
    return model


def test_layer_arguments_pass_through(double_net):
    conv = double_net.block[0]
    assert conv.num_kernels == 2 and conv.path == "mixture"
    assert conv.mode_mask.scale_mode == "dynamic_only"  # "d" is its alias
    assert conv.router.temperature == 30.0 and abs(conv.dynamic_ratio - 0.5) < 0.01


def test_converted_layers_keep_dtype_and_mode(double_net):
    conv = double_net.block[0]
    assert conv.weight.dtype == torch.float64 and not conv.training


def test_set_temperature_counts_the_layers(double_net):
    assert padnet.set_temperature(double_net, 1.0) == 3


def base_net_and_output() -> tuple[TinyNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    base = TinyNet().eval()
    return base, x, base(x)


def copy_of(base: TinyNet) -> TinyNet:
    model = TinyNet().eval()
    model.load_state_dict(base.state_dict())
    return model


def test_copy_noise_changes_the_function_slightly():
    base, x, ref = base_net_and_output()
    noisy = padnet.dynamize(copy_of(base), init="copy_noise", copy_noise_std=0.01)
    err = relative_error(noisy(x), ref)
    assert 0 < err < 0.1


def test_kaiming_init_changes_the_function():
    base, x, ref = base_net_and_output()
    assert relative_error(padnet.dynamize(copy_of(base), init="kaiming")(x), ref) > 0.05


def test_converting_an_already_dynamic_model_again_is_refused_and_changes_nothing():
    model = padnet.dynamize(TinyNet())
    first = model.block[0]
    with pytest.raises(ValueError, match="already has PAD layers"):
        padnet.dynamize(model, "condconv")
    assert model.block[0] is first


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
    with pytest.raises(exc, match=match):
        padnet.dynamize(TinyNet(), **kwargs)


@pytest.mark.parametrize("include", ["nothing.*", "head"])
def test_a_bad_include_pattern_leaves_the_model_unchanged(include):
    model = TinyNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        padnet.dynamize(model, include=include)
    assert type(model.shortcut) is nn.Conv2d  # checked before anything is replaced
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        padnet.dynamize("resnet18")


@pytest.mark.parametrize("method", METHODS)
def test_copy_noise_is_relative_to_the_copy_for_every_method(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3))
    padnet.dynamize(model, method, init="copy", num_kernels=4)
    exact = model[1].weight.detach().clone()
    torch.manual_seed(0)
    noisy = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 64, 3))
    padnet.dynamize(noisy, method, init="copy_noise", copy_noise_std=0.1, num_kernels=4)
    relative = float((noisy[1].weight.detach() - exact).std() / exact.std())
    assert 0.09 < relative < 0.11
