"""padnet.dynamize on CNNs from outside padnet: the vision CNNs of ``transformers`` (ResNet,
ConvNeXt, EfficientNet, MobileNetV2, RegNet) built from tiny configs through the model registry
(nothing downloaded), and ``nn.Conv2d`` subclasses -- one that keeps nn.Conv2d's forward, one that
pads dynamically in its forward as timm's ``Conv2dSame`` does, and ones that cannot be converted
faithfully and must be refused."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import padnet
from padnet.convert import register_method, replace_modules
from padnet.convert.methods import METHODS
from padnet.layers import DynamicConv2d, ODConv2d, PadLayer
from padnet.layers.pad_conv import dynamic_same_pad4
from padnet.models import create_model, list_models

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS,
                                        reason="pip install 'padnet[text]' (transformers)")
FAMILIES = ["hf_resnet", "hf_convnext", "hf_efficientnet", "hf_mobilenet_v2", "hf_regnet"]
METHOD_NAMES = ["dyconv", "condconv", "odconv"]


@torch.no_grad()
def scramble(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of unit gain, and random BatchNorm statistics, so that any change of the
    function shows in the output (the default inits have zero biases, unit norms, and ConvNeXt's
    layer scale of 1e-6 that would hide its convolutions)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
        if p.dim() > 1:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif name.endswith(("weight", "scale_parameter")):
            p.copy_(1 + 0.3 * noise)
        else:
            p.copy_(0.3 * noise)
    for name, b in model.named_buffers():
        if name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=gen, dtype=torch.float64).to(b))
        elif name.endswith("running_mean"):
            b.copy_(0.3 * torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b))
    return model


def images(*size: int, channels: int = 3, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(seed))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def hf_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return scramble(create_model(name, num_classes=5, **kwargs)).eval()


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------- the registry


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_registry_builds_each_family_and_returns_logits(name):
    model = create_model(name, num_classes=7, in_chans=2)
    assert name in list_models("hf_*")
    assert type(model.model).__name__.endswith("ForImageClassification")
    assert model.config.num_labels == 7 and model.config.num_channels == 2
    out = model(images(32, 32, channels=2))
    assert type(out) is torch.Tensor and out.shape == (2, 7)


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_fresh_models_have_live_activations_in_training(name):
    """EfficientNet and MobileNetV2 would not: transformers draws their BatchNorm scales from
    normal(0, 0.02), which the builder replaces by torchvision's init."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).train()
    with torch.no_grad():
        assert float(model(images(32, 32, batch=4)).std()) > 0.01


@needs_transformers
def test_registry_config_overrides_reach_the_config():
    model = create_model("hf_resnet", num_classes=3, size="tiny", depths=[2, 1])
    assert list(model.config.depths) == [2, 1]
    assert len(model.model.resnet.encoder.stages[0].layers) == 2


@needs_transformers
def test_registry_records_how_to_rebuild_the_model():
    arch = create_model("hf_regnet", num_classes=4, size="tiny", depths=[1, 2]).padnet_arch
    assert json.loads(json.dumps(arch)) == {"registry": "hf_regnet", "num_classes": 4,
                                            "in_chans": 3, "size": "tiny", "depths": [1, 2]}


@needs_transformers
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": "huge"}, "size must be one of \\('tiny', 'small', 'default'\\), got 'huge'"),
        ({"depth": [1, 1]}, "hf_resnet: ResNetConfig has no field 'depth' \\(config fields: .*"
                            "depths"),
        ({"num_labels": 3}, "set num_labels through num_classes="),
        ({"layer_type": "wide"}, "hf_resnet: invalid config .*layer_type"),
    ],
)
def test_registry_bad_options_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("hf_resnet", **kwargs)


@needs_transformers
def test_wrong_number_of_input_channels_is_a_value_error():
    model = create_model("hf_convnext", num_classes=3, in_chans=1)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, H, W\), got \(2, 3, "):
        model(images(16, 16))


# ---------------------------------------------------------------- function preservation


@needs_transformers
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("name", FAMILIES)
def test_copy_conversion_preserves_outputs(name, method):
    model = hf_model(name)
    x = images(37, 45)  # odd, non-square: TF "SAME" and asymmetric paddings are exercised
    with torch.no_grad():
        before = model(x)
        padnet.dynamize(model, method, num_kernels=3, dynamic_ratio=0.4)
        after = model(x)
    assert len(model.padnet_report) > 0
    assert relative_error(after, before) <= 1e-5


@needs_transformers
def test_a_wrong_padding_would_be_seen_by_the_comparison():
    """The comparison above is sensitive: padding one of MobileNetV2's 3x3 convolutions a second
    time (it is padded TF-style by its enclosing module) shows."""
    model = hf_model("hf_mobilenet_v2")
    x = images(37, 45)
    with torch.no_grad():
        before = model(x)
        padnet.dynamize(model, "dyconv", num_kernels=2)
        for m in model.modules():
            if isinstance(m, DynamicConv2d) and m.kernel_size == (3, 3):
                m.padding = 1
                break
        assert relative_error(model(x), before) > 1e-2


@needs_transformers
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("name", FAMILIES)
def test_converted_model_trains_and_every_parameter_gets_a_gradient(name, method):
    model = hf_model(name).train()
    padnet.dynamize(model, method, num_kernels=2, dynamic_ratio=0.4, init="copy_noise")
    out = model(images(32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{pname} received no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


# ---------------------------------------------------------------- placement


def is_gate(name: str) -> bool:
    return ".squeeze_excite." in name or ".attention." in name


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_default_placement_skips_the_stem_and_the_se_gates(name):
    model = hf_model(name)
    convs = conv_names(model)
    report = padnet.dynamize(model, "dyconv").padnet_report
    assert report.names == [n for n in convs[1:] if not is_gate(n)]
    reasons = {e.name: e.reason for e in report.skipped}
    assert reasons == {convs[0]: "stem",
                       **{n: "squeeze-excitation gate" for n in convs if is_gate(n)}}
    assert not any(isinstance(m, PadLayer) for m in model.model.classifier.modules())


@needs_transformers
def test_the_stems_are_the_embedding_convolutions():
    stems = {name: conv_names(hf_model(name))[0] for name in FAMILIES}
    assert stems == {
        "hf_resnet": "model.resnet.embedder.embedder.convolution",
        "hf_convnext": "model.convnext.embeddings.patch_embeddings",
        "hf_efficientnet": "model.efficientnet.embeddings.convolution",
        "hf_mobilenet_v2": "model.mobilenet_v2.conv_stem.first_conv.convolution",
        "hf_regnet": "model.regnet.embedder.embedder.convolution",
    }


@needs_transformers
def test_efficientnet_depthwise_subclass_is_converted():
    model = padnet.dynamize(hf_model("hf_efficientnet"), "odconv")
    block = model.model.efficientnet.encoder.blocks[1].depthwise_conv
    assert isinstance(block.depthwise_conv, ODConv2d) and block.depthwise_conv.groups == 48
    assert any(e.before == "EfficientNetDepthwiseConv2d" for e in model.padnet_report.converted)


@needs_transformers
def test_include_converts_the_se_gates_on_request():
    model = hf_model("hf_regnet")
    x = images(32, 32)
    with torch.no_grad():
        before = model(x)
        report = padnet.dynamize(model, "condconv", include="*attention*").padnet_report
        after = model(x)
    assert report.names and all(".attention." in n for n in report.names)
    assert relative_error(after, before) <= 1e-5


@needs_transformers
def test_exported_and_saved_hf_model_reloads_from_the_registry(tmp_path):
    model = padnet.dynamize(hf_model("hf_resnet"), "dyconv", num_kernels=2, dynamic_ratio=0.5,
                            init="copy_noise", copy_noise_std=0.3)
    deployed = padnet.export(model)
    padnet.save(deployed, tmp_path / "m.safetensors")
    loaded = padnet.load(tmp_path / "m.safetensors")
    x = images(32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        assert relative_error(deployed(x), ref) <= 1e-5
        assert relative_error(loaded(x), ref) <= 1e-5


# ---------------------------------------------------------------- nn.Conv2d subclasses


class SameConv2d(nn.Conv2d):
    """Stands for timm's ``Conv2dSame``: TensorFlow "SAME" zero padding worked out in forward
    from each input's size, then an unpadded convolution."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation,
                              strict=True):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias,
                        self.stride, 0, self.dilation, self.groups)


class ReflectDepthwise(nn.Conv2d):
    """A subclass that only fixes arguments (like EfficientNet's): dilation, reflect padding."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=2, dilation=2, groups=channels,
                         padding_mode="reflect")


class LoggingConv2d(nn.Conv2d):
    """Its own forward, which computes what nn.Conv2d computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward (timm's ``StdConv2d``): not a convolution with
    ``self.weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SkipConv2d(nn.Conv2d):
    """Its forward takes a second tensor."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + skip


def subclass_net(middle: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # stem
        SameConv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        middle if middle is not None else ReflectDepthwise(16),
        SameConv2d(16, 16, 5, stride=2, groups=4, dilation=(1, 2), bias=False),
        LoggingConv2d(16, 8, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


@pytest.mark.parametrize("size", [(15, 16), (16, 17), (9, 9)])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_conv2d_subclasses_convert_function_preserving(method, size):
    model = subclass_net()
    x = images(*size)
    with torch.no_grad():
        before = model(x)
        padnet.dynamize(model, method, num_kernels=3, dynamic_ratio=0.5)
        after = model(x)
    assert relative_error(after, before) <= 1e-5
    assert model.padnet_report.names == ["1", "3", "4", "5"]
    assert [model[i].padding for i in (1, 3, 4, 5)] == ["dynamic_same", (2, 2), "dynamic_same",
                                                        (0, 0)]
    assert model[3].padding_mode == "reflect" and model[4].dilation == (1, 2)


def test_dynamic_same_padding_matches_the_reference_for_all_small_geometries():
    for n in range(1, 12):
        for k in (1, 2, 3, 5):
            for s in (1, 2, 3):
                for d in (1, 2):
                    left, right, _, _ = dynamic_same_pad4(1, n, (1, k), (1, s), (1, d))
                    out = (n + left + right - d * (k - 1) - 1) // s + 1
                    assert out == math.ceil(n / s)  # TensorFlow "SAME": ceil(n / s) outputs
                    assert 0 <= right - left <= 1 and left >= 0
                    # no more padding than needed: one less would lose an output
                    if left + right:
                        assert (n + left + right - 1 - d * (k - 1) - 1) // s + 1 < out


@needs_transformers
def test_dynamic_same_padding_equals_transformers_tf_padding():
    from transformers.models.mobilenet_v2.modeling_mobilenet_v2 import apply_tf_padding

    for n in range(1, 10):
        for k in (1, 2, 3, 5):
            for s in (1, 2, 3):
                conv = nn.Conv2d(1, 1, (k, 3), stride=(s, 2))
                x = torch.randn(1, 1, n, n + 1)
                pad4 = dynamic_same_pad4(n, n + 1, conv.kernel_size, conv.stride, conv.dilation)
                assert torch.equal(F.pad(x, pad4), apply_tf_padding(x, conv))


def test_a_dynamic_same_layer_trains_and_exports():
    model = padnet.dynamize(subclass_net(), "dyconv", num_kernels=2, dynamic_ratio=0.5,
                            init="copy_noise", copy_noise_std=0.3).train()
    model(images(15, 16)).square().mean().backward()
    assert model[1].weight.grad is not None and model[1].static_weight.grad is not None
    deployed = padnet.export(model)
    with torch.no_grad():
        for size in [(15, 16), (16, 17)]:
            x = images(*size)
            assert relative_error(deployed(x), model.eval()(x)) <= 1e-5


def test_dynamic_same_padding_as_a_layer_argument():
    layer = DynamicConv2d(2, 3, 3, stride=2, padding="dynamic_same", num_kernels=1)
    x = images(7, 8, channels=2)
    ref = F.conv2d(F.pad(x, dynamic_same_pad4(7, 8, (3, 3), (2, 2), (1, 1))), layer.weight[0],
                   layer.bias[0], stride=2)
    torch.testing.assert_close(layer(x), ref)
    assert layer.output_area(7, 8) == 4 * 4 and "padding=dynamic_same" in repr(layer)
    with pytest.raises(ValueError, match="padding must be 'same', 'valid', 'dynamic_same', an "
                                         "int or a pair, got 'tf'"):
        DynamicConv2d(2, 3, 3, padding="tf")


# ---------------------------------------------------------------- refusals


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert not any(isinstance(m, PadLayer) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("middle", "why"),
    [
        (StdConv2d(16, 16, 3, padding=1), "its own forward computes neither a plain convolution "
                                          "with its weight nor one with dynamic 'same' padding"),
        (SkipConv2d(16, 16, 3, padding=1), "its own forward fails on an input \\(2, 16, H, W\\) "
                                           "\\(TypeError: .*skip"),
    ],
    ids=["weight-standardised", "other-signature"],
)
def test_a_subclass_that_is_not_a_plain_convolution_is_refused(middle, why):
    model = subclass_net(middle)
    state = state_of(model)
    name = type(middle).__name__
    with pytest.raises(ValueError, match=(
            f"cannot convert 1 module\\(s\\) faithfully with method 'dyconv' \\(the model is "
            f"unchanged\\):\n  '3' \\({name}\\): {why}.*\nleave them static with "
            f"exclude=\\['3'\\]")):
        padnet.dynamize(model, "dyconv")
    assert_unchanged(model, state)
    assert isinstance(padnet.dynamize(model, "dyconv", exclude="3")[1], DynamicConv2d)


def test_an_explicitly_included_unfaithful_subclass_is_refused_too():
    with pytest.raises(ValueError, match="'3' \\(StdConv2d\\): its own forward"):
        padnet.dynamize(subclass_net(StdConv2d(16, 16, 3, padding=1)), include="3")


def test_a_convolution_with_hooks_is_refused():
    model = subclass_net()
    model[3].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ValueError, match="'3' \\(ReflectDepthwise\\): it has forward hooks"):
        padnet.dynamize(model, "odconv")
    assert type(model[1]) is SameConv2d


def test_a_parametrized_convolution_is_refused():
    model = subclass_net()
    nn.utils.parametrizations.weight_norm(model[5])
    with pytest.raises(ValueError, match="'5' \\(ParametrizedLoggingConv2d\\): its weights are "
                                         "parametrized"):
        padnet.dynamize(model, "dyconv")


def test_every_refused_module_is_named_at_once():
    model = subclass_net(StdConv2d(16, 16, 3, padding=1))
    model[5].register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(ValueError, match="(?s)cannot convert 2 module.*'3' \\(StdConv2d\\).*'5' "
                                         "\\(LoggingConv2d\\): it has forward pre hooks.*"
                                         "exclude=\\['3', '5'\\]"):
        padnet.dynamize(model, "condconv")


@pytest.fixture
def careless_method():
    """A method whose layers drop the padding of the convolution they replace."""

    def build(conv, **kwargs):
        layer = DynamicConv2d.from_conv(conv, **kwargs)
        layer.padding = 0
        return layer

    register_method("careless", replace_modules(nn.Conv2d, build, method="careless",
                                                subclasses=True), target="conv")
    yield "careless"
    METHODS.unregister("careless")


def test_a_copy_that_does_not_reproduce_the_convolution_is_refused(careless_method):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    state = state_of(model)
    with pytest.raises(ValueError, match="'0' \\(Conv2d\\): the new layer's output has shape"):
        padnet.dynamize(model, careless_method)
    assert_unchanged(model, state)
    # kaiming starts from scratch on purpose: nothing to compare
    padnet.dynamize(model, careless_method, init="kaiming")
