"""Hugging Face ``transformers`` vision CNNs in the model registry, built from configs.

``hf_resnet`` (He et al., 2016), ``hf_convnext`` (Liu et al., "A ConvNet for the 2020s", 2022),
``hf_efficientnet`` (Tan & Le, 2019), ``hf_mobilenet_v2`` (Sandler et al., 2018) and ``hf_regnet``
(Radosavovic et al., "Designing Network Design Spaces", 2020)::

    model = create_model("hf_resnet", num_classes=10, in_chans=1, size="small")
    logits = model(images)  # (B, 10)

Nothing is downloaded: each model is the ``...ForImageClassification`` class built from a
config. ``size`` picks one:

* ``"tiny"``: a few thousand parameters, two stages (EfficientNet: seven one-block stages and a
  total stride of 16), for tests; runs on 16x16 images;
* ``"small"``: four stages (EfficientNet and MobileNetV2: width 0.25 and 0.35), CIFAR scale;
* ``"default"``: the config class's defaults, the ImageNet architectures ResNet-50, ConvNeXt-T,
  EfficientNet-B7, MobileNetV2 1.0 and RegNetY-4.0GF (their architecture, not their weights).

EfficientNet and MobileNetV2 are initialised as torchvision initialises them (convolutions Kaiming
normal, fan-out; BatchNorm scale 1; zero biases): transformers draws every weight, BatchNorm
scales included, from normal(0, 0.02), meant to be overwritten by ported TensorFlow checkpoints,
and from that start the activations vanish (the logits of the tiny variants come out exactly 0).

Further keyword arguments override fields of that config (``depths=[2, 2]``, ``drop_path_rate``);
a name the config does not have raises ValueError. ``num_classes`` and ``in_chans`` set
``num_labels`` and ``num_channels``. The result is a :class:`HFImageClassifier`, whose forward
takes the image tensor and returns the logits. The models are registered when ``transformers``
is installed (``pip install 'padnet[text]'``), which is imported when a model is built, never when
padnet is imported.

Their convolutions -- plain, EfficientNet's depthwise ``nn.Conv2d`` subclass, MobileNetV2's
TensorFlow padding done by the enclosing module -- convert with :func:`padnet.dynamize`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch
from torch import Tensor, nn

from padnet.models.mobilenetv2 import make_divisible
from padnet.models.registry import register_model

__all__ = ["HF_VISION_MODELS", "SIZES", "HFImageClassifier", "hf_config"]

SIZES = ("tiny", "small", "default")

#: registry name -> (config class, model class, {size: config fields}) of ``transformers``
HF_VISION_MODELS: dict[str, tuple[str, str, dict[str, dict[str, Any]]]] = {
    "hf_resnet": ("ResNetConfig", "ResNetForImageClassification", {
        "tiny": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                 "layer_type": "basic"},
        "small": {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256],
                  "depths": [1, 1, 1, 1], "layer_type": "basic"},
    }),
    "hf_convnext": ("ConvNextConfig", "ConvNextForImageClassification", {
        "tiny": {"num_stages": 2, "hidden_sizes": [8, 16], "depths": [1, 1], "patch_size": 2},
        "small": {"num_stages": 4, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 2, 1],
                  "patch_size": 2},
    }),
    "hf_efficientnet": ("EfficientNetConfig", "EfficientNetForImageClassification", {
        # total stride 16, not 32: its stride-2 convolutions pad by kernel, not by input size,
        # and would need inputs of 32 pixels or more
        "tiny": {"width_coefficient": 0.1, "depth_coefficient": 0.1,
                 "strides": [1, 2, 2, 2, 1, 1, 1]},
        "small": {"width_coefficient": 0.25, "depth_coefficient": 0.5},
    }),
    "hf_mobilenet_v2": ("MobileNetV2Config", "MobileNetV2ForImageClassification", {
        "tiny": {"depth_multiplier": 0.1, "finegrained_output": False},
        "small": {"depth_multiplier": 0.35, "finegrained_output": False},
    }),
    "hf_regnet": ("RegNetConfig", "RegNetForImageClassification", {
        "tiny": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                 "groups_width": 4, "layer_type": "y"},
        "small": {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                  "depths": [1, 1, 2, 1], "groups_width": 8, "layer_type": "y"},
    }),
}

#: families whose transformers init is normal(0, 0.02) for every weight (module docstring)
_TORCHVISION_INIT = ("hf_efficientnet", "hf_mobilenet_v2")

#: config fields that create_model's own arguments set
_RESERVED = {"num_labels": "num_classes", "num_channels": "in_chans", "id2label": "num_classes",
             "label2id": "num_classes"}


def _transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise ImportError("the hf_* models need transformers: pip install 'padnet[text]'") from None


def hf_config(name: str, *, num_classes: int, in_chans: int, size: str = "tiny",
              **overrides: Any) -> Any:
    """The ``transformers`` config of registry model ``name`` (module docstring)."""
    if name not in HF_VISION_MODELS:
        raise ValueError(f"name must be one of {tuple(HF_VISION_MODELS)}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    config_cls = getattr(_transformers(), HF_VISION_MODELS[name][0])
    defaults = config_cls()
    known = sorted(k for k in vars(defaults) if not k.startswith("_"))
    for key in overrides:
        if key in _RESERVED:
            raise ValueError(f"{name}: set {key} through {_RESERVED[key]}=, not as a config field")
        if key not in known:
            raise ValueError(f"{name}: {config_cls.__name__} has no field {key!r} (config "
                             f"fields: {', '.join(known)})")
    fields = {**HF_VISION_MODELS[name][2].get(size, {}), **overrides}
    if name == "hf_efficientnet":  # the head's BatchNorm width must be the last conv's
        width = fields.get("width_coefficient", defaults.width_coefficient)
        fields.setdefault("hidden_dim", make_divisible(1280 * width, defaults.depth_divisor))
    try:
        return config_cls(num_labels=num_classes, num_channels=in_chans, **fields)
    except Exception as err:  # transformers' own validation raises its own error types
        raise ValueError(f"{name}: invalid config ({err})") from None


class HFImageClassifier(nn.Module):
    """A ``transformers`` image classifier whose forward maps images ``(B, C, H, W)`` to logits
    ``(B, num_classes)`` (the output object unwrapped). The model is ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        """The wrapped model's config."""
        return self.model.config

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, C, H, W)`` -> logits ``(B, num_classes)``."""
        channels = self.model.config.num_channels
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self.model).__name__} expects images of shape "
                             f"(B, {channels}, H, W), got {got}")
        return self.model(pixel_values=x, return_dict=True).logits


@torch.no_grad()
def _torchvision_init(model: nn.Module) -> None:
    """torchvision's MobileNetV2 / EfficientNet init: convolutions Kaiming normal (fan-out),
    BatchNorm scale 1, linear layers normal(0, 0.01), every bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _builder(name: str) -> None:
    def build(*, num_classes: int = 1000, in_chans: int = 3, size: str = "tiny",
              **overrides: Any) -> HFImageClassifier:
        config = hf_config(name, num_classes=num_classes, in_chans=in_chans, size=size,
                           **overrides)
        model = getattr(_transformers(), HF_VISION_MODELS[name][1])(config)
        if name in _TORCHVISION_INIT:
            _torchvision_init(model)
        return HFImageClassifier(model)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"``transformers``' {HF_VISION_MODELS[name][1]} from a config: ``size`` in "
                     f"{SIZES}, config field overrides (see :mod:`padnet.models.hf_vision`).")
    register_model(build, name=name)


if importlib.util.find_spec("transformers") is not None:  # located, not imported
    for _name in HF_VISION_MODELS:
        _builder(_name)
