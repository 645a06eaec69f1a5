"""``padnet.dynamize``: turn the layers of any model into (partially) dynamic ones, in place.

Convolution methods (PADNET.md §2a, §2c) replace ``nn.Conv2d`` modules by
:class:`~padnet.layers.DynamicConv2d` (``dyconv``: softmax routing; ``condconv``: sigmoid routing)
or :class:`~padnet.layers.ODConv2d` (``odconv``). Default placement follows the paper: every
convolution except the stem (the first ``nn.Conv2d`` of the model) becomes dynamic; linear
classifiers are never touched. ``method='moe'`` turns feed-forward blocks into mixtures of experts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.layers.dynamic_conv import INITS, DynamicConv2d, PerSampleConv2d
from padnet.layers.odconv import ODConv2d

__all__ = ["CONV_METHODS", "METHODS", "dynamize", "match_any", "replace_module"]

#: method name -> (layer class, extra arguments of ``from_conv``)
CONV_METHODS: dict[str, tuple[type[PerSampleConv2d], dict]] = {
    "dyconv": (DynamicConv2d, {"routing": "softmax"}),
    "condconv": (DynamicConv2d, {"routing": "sigmoid"}),
    "odconv": (ODConv2d, {}),
}
METHODS = (*CONV_METHODS, "moe")


def _patterns(value: str | Iterable[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    pats = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")
    return pats


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """True when the qualified module name matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` of ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _convert_convs(
    model: nn.Module,
    method: str,
    *,
    num_kernels: int,
    include: list[str] | None,
    exclude: list[str] | None,
    init: str,
    noise_std: float,
    layer_kwargs: dict,
) -> ConversionReport:
    cls, extra = CONV_METHODS[method]
    report = ConversionReport(method)
    named = list(model.named_modules())
    convs = [(n, m) for n, m in named if type(m) is nn.Conv2d]
    stem = convs[0][0] if convs else None
    if include is not None:
        for pat in include:
            hits = [(n, m) for n, m in named if n and fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"include pattern {pat!r} matches no module of the model")
            for n, m in hits:  # an explicitly named module must be convertible
                if pat == n and type(m) is not nn.Conv2d and not isinstance(m, PerSampleConv2d):
                    raise ValueError(
                        f"cannot convert module {n!r} of type {type(m).__name__} with "
                        f"method={method!r}: only nn.Conv2d modules can be made dynamic"
                    )
    for name, conv in convs:
        before = type(conv).__name__
        if include is not None and not match_any(name, include):
            report.skipped.append(ConversionEntry(name, before, reason="not in include"))
            continue
        if include is None and name == stem:
            report.skipped.append(ConversionEntry(name, before, reason="stem"))
            continue
        if exclude is not None and match_any(name, exclude):
            report.skipped.append(ConversionEntry(name, before, reason="excluded"))
            continue
        new = cls.from_conv(
            conv, num_kernels=num_kernels, init=init, noise_std=noise_std, **extra, **layer_kwargs
        )
        replace_module(model, name, new)
        report.converted.append(ConversionEntry(name, before, type(new).__name__))
    return report


def dynamize(
    model: nn.Module,
    method: str = "dyconv",
    *,
    num_kernels: int = 4,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    init: str = "copy",
    noise_std: float = 0.01,
    verbose: bool = False,
    **layer_kwargs,
) -> nn.Module:
    """Replace the layers of ``model`` by dynamic ones, in place, and return the model.

    Args:
        model: any ``nn.Module``.
        method: ``'dyconv'``, ``'condconv'``, ``'odconv'`` (convolutions) or ``'moe'`` (FFNs;
            takes ``num_experts``, ``top_k``, ``layers``; see
            :func:`padnet.convert.moe.dynamize_moe`).
        num_kernels: K, kernels per dynamic convolution.
        include: fnmatch patterns of qualified module names to convert (all other convolutions
            stay static); by default every convolution but the stem.
        exclude: patterns of names to leave static.
        init: ``'copy'`` (function-preserving), ``'copy_noise'`` (copies plus relative noise
            ``noise_std``) or ``'kaiming'`` (random).
        verbose: print the conversion report.
        **layer_kwargs: passed to each new layer (``dynamic_ratio``, ``scale_mode``, ``path``,
            ``temperature``, ``reduction``, ...).

    The :class:`~padnet.convert.report.ConversionReport` is kept as ``model.padnet_report``.
    Raises ValueError for an unknown method or init, a pattern that matches nothing, or an
    explicitly named module that cannot be converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(num_kernels, int) or num_kernels < 1:
        raise ValueError(f"num_kernels must be an int >= 1, got {num_kernels!r}")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    if method == "moe":
        from padnet.convert.moe import dynamize_moe

        report = dynamize_moe(
            model, include=inc, exclude=exc, init=init, noise_std=noise_std, **layer_kwargs
        )
    else:
        report = _convert_convs(
            model, method, num_kernels=num_kernels, include=inc, exclude=exc, init=init,
            noise_std=noise_std, layer_kwargs=layer_kwargs,
        )
    model.padnet_report = report  # plain attribute, not a submodule
    if verbose:
        print(report)
    return model

