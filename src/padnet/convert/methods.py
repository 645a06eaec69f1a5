"""The table of conversion methods: ``dyconv``, ``condconv``, ``odconv``, ``moe`` and any a user
registers. :func:`padnet.dynamize`, the command line, config validation and ``padnet list`` all
read it.

A method is a converter ``convert(model, *, include, exclude, init, copy_noise_std, **kwargs) ->
ConversionReport`` that replaces modules in place. :func:`replace_modules` builds the converter
of the common case, "replace every module of one type by a PAD layer built from it"::

    register_method("toy", replace_modules(nn.Linear, ToyPadLinear.from_linear), target="linear")

The convolution methods take ``nn.Conv2d`` and its subclasses (Hugging Face's and timm's
convolutions), skip the stem and squeeze-and-excitation gates by default, and refuse, naming it,
any module they cannot replace without changing what the model computes
(:func:`replace_modules`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from padnet.convert.report import ConversionEntry, ConversionReport
from padnet.layers.dynamic_conv import DynamicConv2d
from padnet.layers.odconv import ODConv2d
from padnet.layers.pad_conv import DYNAMIC_SAME, PadConv2d, dynamic_same_pad4
from padnet.layers.protocol import PadLayer
from padnet.registry import Registry

__all__ = ["GATE_CLASS", "METHODS", "Method", "get_method", "match_any", "method_names",
           "register_method", "replace_module", "replace_modules"]

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


# ---- when a replacement is faithful -----------------------------------------------------------

#: Class names of squeeze-and-excitation gates (torchvision's ``SqueezeExcitation``, timm's
#: ``SqueezeExcite`` and ``SEModule``, Hugging Face's ``EfficientNetSqueezeExciteLayer`` and
#: ``RegNetSELayer``): their convolutions act on pooled 1x1 maps and stay static by default.
GATE_CLASS = re.compile(r"SqueezeExcit|SE(Layer|Module|Block)")


def _in_gate(name: str, modules: dict[str, nn.Module]) -> bool:
    """True when an enclosing module of ``name`` (not the model itself) is an SE gate."""
    parts = name.split(".")
    return any(GATE_CLASS.search(type(modules[".".join(parts[:i])]).__name__)
               for i in range(1, len(parts)))


def _dropped_by_replacement(module: nn.Module) -> str:
    """What replacing ``module`` would silently lose ('' when nothing)."""
    if any(isinstance(p, UninitializedParameter) for p in module.parameters(recurse=False)):
        return "a lazy module without weights yet; run one forward pass first"
    if parametrize.is_parametrized(module):
        return ("its weights are parametrized (torch.nn.utils.parametrize), which the new layer "
                "would not keep; remove the parametrization first")
    hooks = [kind for kind, found in (
        ("forward", module._forward_hooks), ("forward pre", module._forward_pre_hooks),
        ("backward", module._backward_hooks), ("backward pre", module._backward_pre_hooks),
    ) if found]
    if hooks:
        return (f"it has {' and '.join(hooks)} hooks (weight_norm, spectral_norm, ...), which "
                "the new layer would not keep; remove them first")
    return ""


def _own_forward(module: nn.Module, source: type[nn.Module]) -> bool:
    """True when ``type(module)`` redefines the forward computation of ``source``."""
    return any(getattr(type(module), a) is not getattr(source, a)
               for a in ("forward", "_conv_forward") if hasattr(source, a))


@contextmanager
def _evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the block; every submodule's mode restored after."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _probe_inputs(conv: nn.Conv2d) -> list[Tensor]:
    """Two random inputs ``(2, C_in, H, W)``, ``H != W``, each side of both parities (for the
    stride) across the two, from a private generator (the global seed is untouched)."""
    sizes = [d * (k - 1) + 1 + s for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation,
                                                    strict=True)]
    gen = torch.Generator().manual_seed(0)
    like = {"device": conv.weight.device, "dtype": conv.weight.dtype}
    return [torch.randn(2, conv.in_channels, h, w, generator=gen, dtype=torch.float64).to(**like)
            for h, w in ((sizes[0], sizes[1] + 1), (sizes[0] + 1, sizes[1]))]


def _close(got: object, ref: object) -> bool:
    """Same shape and equal up to float tolerance, relative to the largest output."""
    if not (isinstance(got, Tensor) and isinstance(ref, Tensor)) or got.shape != ref.shape:
        return False
    tol = max(1e-4, 16 * torch.finfo(ref.dtype).eps)
    return float((got - ref).abs().max()) <= tol * max(float(ref.abs().max()), 1e-12)


def _conv_padding(conv: nn.Conv2d) -> tuple[str | None, str]:
    """For an ``nn.Conv2d`` subclass with its own forward: the padding a PAD layer needs to
    compute the same (``None``: the module's own) and ``''``, or ``None`` and why it cannot.

    The forward is run with random weights (:func:`torch.func.functional_call`, the module is not
    modified) on random inputs and compared with a plain convolution and with one preceded by
    dynamic "same" padding (:func:`~padnet.layers.pad_conv.dynamic_same_pad4`).
    """
    if conv.weight.device.type == "meta":
        return None, "its forward is its own, which cannot be checked on the meta device"
    gen = torch.Generator().manual_seed(1)
    params = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
              for n, p in conv.named_parameters(recurse=False) if n in ("weight", "bias")}
    weight, bias = params["weight"], params.get("bias")

    def plain(x: Tensor) -> Tensor:
        return nn.Conv2d._conv_forward(conv, x, weight, bias)

    def same(x: Tensor) -> Tensor:
        pad4 = dynamic_same_pad4(*x.shape[-2:], conv.kernel_size, conv.stride, conv.dilation)
        return nn.Conv2d._conv_forward(conv, F.pad(x, pad4), weight, bias)

    candidates = [(None, plain)]
    if conv.padding in ((0, 0), "valid"):
        candidates.append((DYNAMIC_SAME, same))
    probes = _probe_inputs(conv)
    with _evaluating(conv):
        try:
            refs = [functional_call(conv, params, (x,)) for x in probes]
        except Exception as err:  # a foreign forward may fail in any way
            return None, (f"its own forward fails on an input (2, {conv.in_channels}, H, W) "
                          f"({type(err).__name__}: {err})")
        for padding, run in candidates:
            if all(_close(run(x), ref) for x, ref in zip(probes, refs, strict=True)):
                return padding, ""
    return None, ("its own forward computes neither a plain convolution with its weight nor one "
                  "with dynamic 'same' padding")


def _differs(conv: nn.Conv2d, new: nn.Module) -> str:
    """'' when ``new`` computes what ``conv`` computes on a random input (eval mode), else
    how it differs. Nothing is checked on the meta device."""
    if conv.weight.device.type == "meta":
        return ""
    x = _probe_inputs(conv)[0]
    with _evaluating(conv, new):
        ref, got = conv(x), new(x)
    if _close(got, ref):
        return ""
    if got.shape != ref.shape:
        return f"the new layer's output has shape {tuple(got.shape)}, not {tuple(ref.shape)}"
    err = float((got - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
    return f"the new layer's output differs from its output (relative error {err:.2g})"


def _refuse(refused: list[tuple[str, str, str]], method: str) -> None:
    """Raise ValueError naming every refused module ``(name, type, why)``, if any."""
    if not refused:
        return
    lines = "\n".join(f"  {name!r} ({kind}): {why}" for name, kind, why in refused)
    names = [name for name, _, _ in refused]
    raise ValueError(f"cannot convert {len(refused)} module(s) faithfully with method "
                     f"{method!r} (the model is unchanged):\n{lines}\nleave them static with "
                     f"exclude={names!r}")


# ---- the converter -----------------------------------------------------------------------------

def _check_include(model: nn.Module, eligible: Callable[[nn.Module], bool], kind: str,
                   include: list[str], method: str) -> None:
    named = [(n, m) for n, m in model.named_modules() if n]
    for pat in include:
        hits = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"include pattern {pat!r} matches no module of the model")
        for n, m in hits:  # an explicitly named module must be convertible
            if pat == n and not eligible(m) and not isinstance(m, PadLayer):
                raise ValueError(
                    f"cannot convert module {n!r} of type {type(m).__name__} with "
                    f"method={method!r}: only {kind} modules can be made dynamic")


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


def _build_all(chosen: list[tuple[str, nn.Module]], source: type[nn.Module],
               build: Callable[..., nn.Module], method: str, init: str,
               kwargs: dict) -> list[nn.Module]:
    """The new layer of every chosen module; ValueError, before any is replaced, when one
    cannot be replaced faithfully (see :func:`replace_modules`)."""
    refused, paddings = [], []
    for name, module in chosen:
        padding, why = None, _dropped_by_replacement(module)
        if not why and type(module) is not source and _own_forward(module, source):
            padding, why = (_conv_padding(module) if source is nn.Conv2d else
                            (None, f"its forward is its own, not {source.__name__}'s"))
        if why:
            refused.append((name, type(module).__name__, why))
        paddings.append(padding)
    _refuse(refused, method)
    new_layers = []
    for (name, module), padding in zip(chosen, paddings, strict=True):
        new = build(module, init=init, **kwargs)
        why = ""
        if padding is not None and not isinstance(new, PadConv2d):
            why = f"it pads by input size, which a {type(new).__name__} cannot carry"
        elif padding is not None:
            new.padding = padding  # the subclass's own padding step, carried by the layer
        if not why and init == "copy" and isinstance(module, nn.Conv2d):
            why = _differs(module, new)
        if why:
            refused.append((name, type(module).__name__, why))
        new_layers.append(new)
    _refuse(refused, method)
    return new_layers


def replace_modules(
    source: type[nn.Module], build: Callable[..., nn.Module], *, skip_first: bool = False,
    method: str = "", subclasses: bool = False, skip_gates: bool = False,
) -> Converter:
    """A converter replacing modules of type ``source`` by ``build(module, init=,
    copy_noise_std=, **kwargs)``.

    Args:
        source: the module type to replace.
        build: makes the new layer from a module.
        skip_first: leave the first candidate in module order (the stem of a CNN) static.
        method: the name used in the report and in messages.
        subclasses: False: only modules of exactly type ``source``; subclasses are left alone
            and listed in the report. True: subclasses too, where the replacement is faithful.
            One that keeps ``source``'s forward is converted as it is; an ``nn.Conv2d`` subclass
            with its own forward is run on random inputs and converted when it computes a plain
            convolution with its weight, or one preceded by dynamic "same" padding (timm's
            ``Conv2dSame``; the PAD layer gets ``padding='dynamic_same'``); others are refused.
        skip_gates: leave convolutions inside squeeze-and-excitation gates (:data:`GATE_CLASS`)
            static.

    ``skip_first`` and ``skip_gates`` apply when no ``include`` is given. A module whose
    replacement would lose something (hooks, a parametrization, lazy weights) is refused; with
    ``init='copy'`` every new layer that replaces an ``nn.Conv2d`` is run against it on a random
    input (eval mode) and refused when they differ (docs/method.md §3). Refusals raise one
    ValueError naming every refused module, before anything is replaced.
    """

    def eligible(module: nn.Module) -> bool:
        return type(module) is source or (subclasses and isinstance(module, source))

    def convert(model: nn.Module, *, include: list[str] | None = None,
                exclude: list[str] | None = None, init: str = "copy",
                copy_noise_std: float = 0.01, **kwargs) -> ConversionReport:
        report = ConversionReport(method or source.__name__)
        kind = f"{source.__name__}{' (or subclass)' if subclasses else ''}"
        if include is not None:
            _check_include(model, eligible, kind, include, report.method)
        modules = dict(model.named_modules())
        candidates = [(n, m) for n, m in modules.items() if isinstance(m, source)]
        first = next((n for n, m in candidates if eligible(m)), None)

        def placement(name: str, module: nn.Module) -> str:
            """Why the candidate stays static ('' when it is converted)."""
            if not eligible(module):
                return f"a subclass of {source.__name__}, not converted"
            if include is not None and not match_any(name, include):
                return "not in include"
            if include is None and skip_first and name == first:
                return "stem"
            if include is None and skip_gates and _in_gate(name, modules):
                return "squeeze-excitation gate"
            if exclude is not None and match_any(name, exclude):
                return "excluded"
            return ""

        chosen = []
        for name, module in candidates:
            reason = placement(name, module)
            if reason:
                report.skipped.append(ConversionEntry(name, type(module).__name__,
                                                      reason=reason))
            else:
                chosen.append((name, module))
        new_layers = _build_all(chosen, source, build, report.method, init,
                                {"copy_noise_std": copy_noise_std, **kwargs})
        for (name, module), new in zip(chosen, new_layers, strict=True):
            replace_module(model, name, new)
            report.converted.append(ConversionEntry(name, type(module).__name__,
                                                    type(new).__name__))
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
    register_method(_name, replace_modules(nn.Conv2d, _build, skip_first=True, method=_name,
                                           subclasses=True, skip_gates=True),
                    target="conv", description=_desc, anneals_temperature=_anneal)
