"""The table of conversion methods: ``dyconv``, ``condconv``, ``odconv``, ``moe`` and any a user
registers. :func:`padnet.dynamize`, the command line, config validation and ``padnet list`` all
read it.

A method is a converter ``convert(model, *, include, exclude, init, copy_noise_std, **kwargs) ->
ConversionReport`` that replaces modules in place. :func:`replace_modules` builds the converter
of the common case, "replace every module of one type by a PAD layer built from it"::

    register_method("toy", replace_modules(nn.Linear, ToyPadLinear.from_linear), target="linear")
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from torch import nn

from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.layers.odconv import ODConv2d
from padnet.layers.protocol import PadLayer
from padnet.registry import Registry

__all__ = ["METHODS", "Method", "get_method", "match_any", "method_names", "register_method",
           "replace_module", "replace_modules"]

Converter = Callable[..., ConversionReport]


@dataclass(frozen=True)
class Method:
    """A registered conversion method.

    ``target`` names what it converts (``'conv'``: ``nn.Conv2d`` modules, ``'ffn'``: feed-forward
    blocks); ``anneals_temperature`` marks methods whose routers take the temperature schedule.
    """

    name: str
    convert: Converter
    target: str
    description: str = ""
    anneals_temperature: bool = False


METHODS: Registry[Method] = Registry("method")


def register_method(
    name: str, convert: Converter, *, target: str, description: str = "",
    anneals_temperature: bool = False, replace: bool = False,
) -> Method:
    """Add a conversion method to the table (see the module docstring); returns it."""
    method = Method(name, convert, target, description, anneals_temperature)
    return METHODS.register(name, method, replace=replace)


def get_method(name: str) -> Method:
    """The registered method ``name`` (ValueError listing the methods otherwise)."""
    return METHODS.get(name)


def method_names(target: str | None = None) -> list[str]:
    """Registered method names, optionally only those converting ``target``."""
    return METHODS.names() if target is None else METHODS.filter(lambda m: m.target == target)


def match_any(name: str, patterns: Sequence[str]) -> bool:
    """True when the qualified module name matches one of the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the qualified ``name`` of ``model``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _check_include(model: nn.Module, source: type[nn.Module], include: list[str],
                   method: str) -> None:
    named = [(n, m) for n, m in model.named_modules() if n]
    for pat in include:
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"include pattern {pat!r} matches no module of the model")
        for n, m in hits:  # an explicitly named module must be convertible
            if pat == n and type(m) is not source and not isinstance(m, PadLayer):
                raise ValueError(
                    f"cannot convert module {n!r} of type {type(m).__name__} with "
                    f"method={method!r}: only {source.__name__} modules can be made dynamic")


def _nothing_converted(model: nn.Module, source: type[nn.Module],
                       report: ConversionReport) -> None:
    """Raise: a conversion that changes nothing is a mistake the user should hear about."""
    pad = sorted({type(m).__name__ for m in model.modules() if isinstance(m, PadLayer)})
    if pad:
        raise ValueError(f"the model already has PAD layers ({', '.join(pad)}) from an earlier "
                         f"conversion and no {source.__name__} left for method "
                         f"{report.method!r}: convert a fresh copy of the static model")
    if not report.skipped:
        kind = ("nn." if source.__module__.startswith("torch.nn") else "") + source.__name__
        raise ValueError(f"found no {kind} module to convert with method {report.method!r} in "
                         f"{type(model).__name__}")


def replace_modules(
    source: type[nn.Module], build: Callable[..., nn.Module], *, skip_first: bool = False,
    method: str = "",
) -> Converter:
    """A converter replacing every module of exactly type ``source`` by ``build(module, init=,
    copy_noise_std=, **kwargs)``. ``skip_first`` leaves the first such module as it is (the stem
    of a CNN); subclasses of ``source`` are left alone and listed in the report."""

    def convert(model: nn.Module, *, include: list[str] | None = None,
                exclude: list[str] | None = None, init: str = "copy",
                copy_noise_std: float = 0.01, **kwargs) -> ConversionReport:
        report = ConversionReport(method or source.__name__)
        if include is not None:
            _check_include(model, source, include, report.method)
        candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, source)]
        first = next((n for n, m in candidates if type(m) is source), None)
        for name, module in candidates:
            before = type(module).__name__
            reason = (f"a subclass of {source.__name__}, not converted" if type(module) is not
                      source else "not in include" if include is not None and not
                      match_any(name, include) else "stem" if include is None and skip_first
                      and name == first else "excluded" if exclude is not None and
                      match_any(name, exclude) else "")
            if reason:
                report.skipped.append(ConversionEntry(name, before, reason=reason))
                continue
            new = build(module, init=init, copy_noise_std=copy_noise_std, **kwargs)
            replace_module(model, name, new)
            report.converted.append(ConversionEntry(name, before, type(new).__name__))
        if not report.converted:
            _nothing_converted(model, source, report)
        return report

    return convert


for _name, _build, _desc, _anneal in (
    ("dyconv", partial(DynamicConv2d.from_conv, routing="softmax"),
     "DY-Conv: K kernels mixed by softmax routing with temperature", True),
    ("condconv", partial(DynamicConv2d.from_conv, routing="sigmoid"),
     "CondConv: K kernels mixed by sigmoid routing", False),
    ("odconv", ODConv2d.from_conv,
     "ODConv: kernel, channel, filter and spatial attentions", True),
):
    register_method(_name, replace_modules(nn.Conv2d, _build, skip_first=True, method=_name),
                    target="conv", description=_desc, anneals_temperature=_anneal)
