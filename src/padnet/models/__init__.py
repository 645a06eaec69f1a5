"""Small reference models with torchvision-compatible names, and a registry to list and create them.

    >>> from padnet.models import create_model, list_models
    >>> list_models("resnet*")
    ['resnet18', 'resnet18_cifar', 'resnet20', 'resnet32', 'resnet50', 'resnet8']
    >>> model = create_model("resnet20", num_classes=10)
"""

from padnet.models import hf_vision, mobilenetv2, resnet  # noqa: F401  (registers the builders)
from padnet.models.mobilenetv2 import InvertedResidual, MobileNetV2
from padnet.models.pretrained import load_pretrained, pretrained_available
from padnet.models.registry import create_model, list_models, register_model
from padnet.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "create_model",
    "list_models",
    "load_pretrained",
    "pretrained_available",
    "register_model",
]
