"""A PAD model can be built and run on the meta device (shape inference without memory)."""

import torch

import padnet
from padnet.models import create_model


def test_a_dynamized_resnet_runs_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = padnet.dynamize(create_model("resnet8", num_classes=10), "dyconv",
                                dynamic_ratio=0.3)
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and out.device.type == "meta"
