"""``padnet.dynamize``: turn the layers of any model into (partially) dynamic ones, in place.

The method is looked up in the table of :mod:`padnet.convert.methods`. The convolution methods
(docs/method.md §2.1, §3) replace ``nn.Conv2d`` modules by
:class:`~padnet.layers.DynamicConv2d` (``dyconv``: softmax routing; ``condconv``: sigmoid routing)
or :class:`~padnet.layers.ODConv2d` (``odconv``), on any CNN: padnet's models, Hugging Face's
vision CNNs, timm-style convolutions. ``method='moe'`` turns feed-forward blocks into mixtures of
experts (:mod:`padnet.convert.moe`).

Default placement of the convolution methods (docs/method.md §2.1): as in PAD-Net's code, every
convolution becomes dynamic -- 3x3, depthwise, 1x1 and the 1x1 projection shortcuts alike --
except

* the stem, the first convolution in module order (few input channels, full resolution);
* the convolutions of squeeze-and-excitation gates (inside a module whose class name matches
  :data:`~padnet.convert.methods.GATE_CLASS`, e.g. EfficientNet's ``squeeze_excite``, RegNet's
  ``attention``): they act on pooled 1x1 maps and are input-dependent gates already
  (CondConv's EfficientNet keeps them static too).

Linear layers (classifiers, ConvNeXt's pointwise MLPs) are never touched. ``include`` replaces
this placement, ``exclude`` removes modules from it; the report gives every skipped module with
its reason.

Subclasses of ``nn.Conv2d`` are converted when that is exact: one that keeps ``nn.Conv2d``'s
forward (EfficientNet's depthwise convolution) as it is; one with its own forward only when, run on
random inputs, it computes a plain convolution or one with dynamic "same" padding (timm's
``Conv2dSame``, carried as ``padding='dynamic_same'``). Anything else -- another forward, forward
or backward hooks, a parametrization, lazy weights -- is refused with a ValueError naming the
module, before anything changes. With ``init='copy'`` every new layer is also checked against the
convolution it replaces on a random input.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from padnet.convert.methods import get_method
from padnet.layers.pad_conv import INITS
from padnet.utils.checks import check_choice, check_number

__all__ = ["dynamize"]


def _patterns(value: str | Iterable[str] | None, name: str) -> list[str] | None:
    if value is None:
        return None
    pats = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"{name} must be a string or a list of strings, got {value!r}")
    return pats


def _is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers`` PreTrainedModel, told without importing transformers."""
    config = getattr(model, "config", None)
    return config is not None and any(
        c.__module__.startswith("transformers.")
        and c.__name__ in ("PretrainedConfig", "PreTrainedConfig")
        for c in type(config).__mro__)


def dynamize(
    model: nn.Module,
    method: str = "dyconv",
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    init: str = "copy",
    copy_noise_std: float = 0.01,
    verbose: bool = False,
    **method_kwargs,
) -> nn.Module:
    """Replace the layers of ``model`` by dynamic ones, in place, and return the model.

    Args:
        model: any ``nn.Module``.
        method: a registered method (``padnet list``): ``'dyconv'``, ``'condconv'``, ``'odconv'``
            (convolutions; take ``num_kernels``, default 4) or ``'moe'`` (FFN blocks; take
            ``num_experts``, ``top_k``, ``layers``; see :func:`padnet.convert.moe.dynamize_moe`).
        include: fnmatch patterns of qualified module names to convert (all other candidates
            stay static); by default the placement of the module docstring.
        exclude: patterns of names to leave static.
        init: ``'copy'`` (function-preserving), ``'copy_noise'`` (copies plus Gaussian noise of
            relative std ``copy_noise_std``) or ``'kaiming'`` (random).
        verbose: print the conversion report.
        **method_kwargs: passed to the method and on to each new layer (``num_kernels``,
            ``dynamic_ratio``, ``scale_mode``, ``path``, ``temperature``, ``reduction``, ...).

    The :class:`~padnet.convert.report.ConversionReport` is kept as ``model.padnet_report``.
    A Hugging Face model also gets its conversion record in ``model.config`` (see
    :func:`padnet.integrations.hf_io.attach_record`), so ``model.save_pretrained(dir)`` and
    ``padnet.from_pretrained(dir)`` round-trip it; call ``attach_record`` again after changing
    scale modes by hand.
    Raises ValueError for an unknown method or init, a pattern that matches nothing, an
    explicitly named module that cannot be converted, or a selected module that cannot be
    replaced without changing the function (the model is then unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    convert = get_method(method).convert
    check_choice(init, "init", INITS)
    check_number(copy_noise_std, "copy_noise_std", minimum=0)
    report = convert(model, include=_patterns(include, "include"),
                     exclude=_patterns(exclude, "exclude"), init=init,
                     copy_noise_std=copy_noise_std, **method_kwargs)
    model.padnet_report = report  # plain attribute, not a submodule
    if _is_transformers_model(model):  # save_pretrained then carries the conversion record
        from padnet.integrations.hf_io import attach_record

        attach_record(model)
    if verbose:
        print(report)
    return model
