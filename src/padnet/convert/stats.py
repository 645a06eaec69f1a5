"""``padnet.stats``: stored parameters and forward FLOPs of a (partially) dynamic model.

**Parameters.** For a PAD weight with K dynamic factors of N positions each and dynamic ratio
kappa, deployment stores the dynamic values at dynamic positions and one static value elsewhere
(docs/method.md §5)::

    stored = K * kappa * N + (1 - kappa) * N      (fully dynamic: K * N; static: N)

Every other parameter (routers, biases, normalisation, static layers) is counted as ``other``.

**FLOPs** (docs/method.md §5.1), given an example input: :func:`flops` runs one forward of four
forms of the model under ``torch.utils.flop_counter.FlopCounterMode`` and divides each count by
the batch size. FlopCounterMode counts matrix products, convolutions and attention kernels, two
FLOPs per multiply-add; element-wise work (activations, normalisation, softmax, mask products,
adding a static kernel, pooling) counts zero. The four forms:

* ``static``: the static equivalent (:func:`static_equivalent`): every PAD convolution an
  ``nn.Conv2d`` of its geometry, ``2 * C_out * (C_in / g) * kh * kw * H' * W'`` per sample; every
  MoE the dense FFN it was upcycled from, ``4 * hidden * intermediate`` per token (gated:
  ``6 * hidden * intermediate``). No router.
* ``dynamic``: the model with every mask set to all-dynamic (kappa = 1), unfolded. A dynamic
  convolution adds its router (the FC layers on the pooled input), the per-sample aggregation
  ``sum_k pi_k W_k`` (``2 * K * N`` per sample, a ``(B, K) x (K, N)`` product) and the routed bias
  (``2 * K * C_out``) to the convolution, whose cost is unchanged (one kernel per sample). On the
  ``mixture`` path there is no aggregation but K convolutions and the per-sample mixing of their
  outputs. A MoE costs its router (``2 * hidden * E`` per token) plus the experts that actually
  run: ``4 * hidden * intermediate`` for each kept (token, expert) assignment, so top-k routing
  costs k expert FFNs per token, assignments dropped by a capacity limit cost nothing, and the
  ``bmm`` path counts the padding rows it multiplies.
* ``pad``: the model as it is, unfolded (the form it trains in). The masks are element-wise
  products, so a PAD layer costs what the fully dynamic one costs, plus one more kernel on the
  mixture path and the dense static matmuls of MoE's ``shared`` static path; a layer with no
  dynamic position runs one ordinary convolution but still its router.
* ``exported``: :func:`padnet.export` of the model (docs/method.md §5). A whole-channel mask runs
  its static channels as one ordinary convolution and aggregates only the dynamic channels'
  kernels; an element mask costs what the fully dynamic layer costs (softmax routing folds ``S``
  into every ``D_k``); a PAD-MoE runs like a plain MoE. On the same execution paths never more
  than the training form, except that the deployed convolution pads the dynamic channels of a
  channel mask to a multiple of 8 (groups 1) and convolves the padding too, which on large
  feature maps outweighs the saved aggregation.

The counts are those of this input: they depend on the batch size where the execution path does
(``auto`` paths, the deployed convolution's batch-1 path) and, for MoE, on the routing of these
tokens. Text inputs count per sequence, padding tokens included.

**Conditional computation** (docs/method.md §6.1). For a model with early exits
(:class:`~padnet.conditional.EarlyExitModel`) the four forms count the training forward, every
exit head included. What the exits and dynamic tokens save is in ``.conditional``
(:class:`ConditionalStats`): FLOPs per sample of the model computing everything (the host
network alone, no exit heads, token patches bypassed) against those of early-exit inference
with the model's criterion (``model.infer``, the batch shrinking as samples exit) and tokens as
set, both counted on the whole example batch with eager attention.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from padnet.convert.methods import replace_module
from padnet.layers.moe import MoE
from padnet.layers.pad import ModeMask
from padnet.layers.pad_conv import PadConv2d
from padnet.layers.protocol import PadLayer, find_pad_layers, qualified_name
from padnet.ops.conv import pad_input
from padnet.utils.checks import check_choice

__all__ = ["ConditionalStats", "FlopStats", "LayerStats", "ModelStats", "conditional_flops",
           "flops", "format_count", "forward_flops", "register_static_equivalent",
           "static_equivalent", "stats"]


@dataclass
class LayerStats:
    """Counts for one PAD weight (one mask)."""

    name: str
    kind: str
    num_factors: int  # K kernels or E experts
    numel: int  # N positions of one weight
    num_dynamic: int  # kappa * N
    pruned: bool = False  # scale mode prune: the static part is zero and not stored

    @property
    def dynamic_ratio(self) -> float:
        return self.num_dynamic / self.numel if self.numel else 0.0

    @property
    def dynamic_params(self) -> int:
        """Stored dynamic values: ``K * kappa * N``."""
        return self.num_factors * self.num_dynamic

    @property
    def static_params(self) -> int:
        """Stored static values: ``(1 - kappa) * N`` (none when pruned)."""
        return 0 if self.pruned else self.numel - self.num_dynamic

    @property
    def stored_params(self) -> int:
        return self.dynamic_params + self.static_params

    @property
    def fully_dynamic_params(self) -> int:
        return self.num_factors * self.numel

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("dynamic_ratio", "dynamic_params", "static_params", "stored_params",
                    "fully_dynamic_params"):
            d[key] = getattr(self, key)
        return d


@dataclass
class ModelStats:
    """Per-layer :class:`LayerStats` plus the model's totals."""

    layers: list[LayerStats] = field(default_factory=list)
    other_params: int = 0  # parameters outside the PAD weights
    flops: FlopStats | None = None  # forward FLOPs per sample, when an example input was given
    #: what early exits / dynamic tokens save, when the model has them and an input was given
    conditional: ConditionalStats | None = None

    def _sum(self, attr: str) -> int:
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def numel(self) -> int:
        return self._sum("numel")

    @property
    def num_dynamic(self) -> int:
        return self._sum("num_dynamic")

    @property
    def dynamic_ratio(self) -> float:
        """Global dynamic ratio over all PAD weights."""
        return self.num_dynamic / self.numel if self.numel else 0.0

    @property
    def dynamic_params(self) -> int:
        return self._sum("dynamic_params")

    @property
    def static_params(self) -> int:
        return self._sum("static_params")

    @property
    def stored_params(self) -> int:
        """PAD weights as deployed plus every other parameter."""
        return self._sum("stored_params") + self.other_params

    @property
    def fully_dynamic_params(self) -> int:
        return self._sum("fully_dynamic_params") + self.other_params

    def to_dict(self) -> dict:
        keys = ("numel", "num_dynamic", "dynamic_ratio", "dynamic_params", "static_params",
                "other_params", "stored_params", "fully_dynamic_params")
        d = {"layers": [layer.to_dict() for layer in self.layers],
             "total": {k: getattr(self, k) for k in keys}}
        if self.flops is not None:
            d["flops"] = self.flops.to_dict()
        if self.conditional is not None:
            d["conditional"] = self.conditional.to_dict()
        return d

    def __str__(self) -> str:
        head = ("layer", "kind", "K", "N", "ratio", "dynamic", "static", "stored", "fully dyn")
        rows = [head]
        for s in [*self.layers]:
            rows.append((s.name, s.kind, str(s.num_factors), f"{s.numel:,}",
                         f"{s.dynamic_ratio:.3f}", f"{s.dynamic_params:,}",
                         f"{s.static_params:,}", f"{s.stored_params:,}",
                         f"{s.fully_dynamic_params:,}"))
        rows.append(("other parameters", "", "", "", "", "", "", f"{self.other_params:,}",
                     f"{self.other_params:,}"))
        rows.append(("total", "", "", f"{self.numel:,}", f"{self.dynamic_ratio:.3f}",
                     f"{self.dynamic_params:,}", f"{self.static_params:,}",
                     f"{self.stored_params:,}", f"{self.fully_dynamic_params:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        fmt = [f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths)]
        lines = ["  ".join(f.format(c) for f, c in zip(fmt, r, strict=True)) for r in rows]
        rule = "-" * len(lines[0])
        table = "\n".join([lines[0], rule, *lines[1:-2], rule, *lines[-2:]])
        parts = [table, *(str(x) for x in (self.flops, self.conditional) if x is not None)]
        return "\n\n".join(parts)


def stats(model: nn.Module, inputs: Any = None, *, export_path: str = "auto") -> ModelStats:
    """Count stored parameters of ``model`` per PAD weight and in total, and with an example
    input its forward FLOPs per sample (:func:`flops`, in ``.flops``).

    The PAD weights are those the model's PAD layers report (:func:`find_pad_layers`); each
    holds ``K * N`` dynamic and ``N`` static values. ``inputs`` is a batch as the model takes it
    (a tensor, a tuple of positional arguments or a dict of keyword arguments); ``export_path``
    is the execution path of the exported convolutions. For a model with early exits or
    dynamic tokens, ``.conditional`` holds the compute they save on that input
    (:func:`conditional_flops`). Print the result for a table, or call ``.to_dict()``.
    """
    result = ModelStats()
    pad_weight_params = 0
    for layer_name, layer in find_pad_layers(model):
        for w in layer.pad_weights():
            name = qualified_name(layer_name, layer, w.name)
            mask = w.mode_mask
            result.layers.append(LayerStats(name, type(layer).__name__, w.num_factors,
                                            mask.numel, mask.num_dynamic,
                                            mask.pruned))
            pad_weight_params += w.dynamic.numel() + w.static.numel()
    total = sum(p.numel() for p in model.parameters())
    result.other_params = total - pad_weight_params
    if inputs is not None:
        result.flops = flops(model, inputs, export_path=export_path)
        result.conditional = conditional_flops(model, inputs)
    return result


# ---- FLOPs -----------------------------------------------------------------------------------
def format_count(value: float) -> str:
    """``value`` with three significant digits and an SI suffix (``1.23M``)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class FlopStats:
    """Forward FLOPs per sample of four forms of one model on one example batch (see the module
    docstring and docs/method.md §5.1 for what each counts).

    ``static``: the static equivalent; ``dynamic``: every mask all-dynamic; ``pad``: the model as
    it is (training form, unfolded); ``exported``: :func:`padnet.export` of it;
    ``batch_size``: the example batch the totals were divided by.
    """

    static: float
    dynamic: float
    pad: float
    exported: float
    batch_size: int

    def ratio(self, form: str) -> float:
        """FLOPs of ``form`` (``dynamic``, ``pad``, ``exported``) over the static equivalent's."""
        check_choice(form, "form", ("static", "dynamic", "pad", "exported"))
        return getattr(self, form) / self.static if self.static else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [("FLOPs per sample", f"(batch {self.batch_size})", "vs static")]
        for label, form in (("static equivalent", "static"), ("fully dynamic", "dynamic"),
                            ("PAD, training form", "pad"), ("PAD, exported", "exported")):
            rows.append((label, format_count(getattr(self, form)), f"{self.ratio(form):.3f}x"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}"
                         for r in rows)


class _StaticConv2d(nn.Conv2d):
    """``nn.Conv2d`` standing in for a PAD convolution: its weight, geometry and padding (taken
    from the layer for each input size, so every padding the layer accepts works); injected
    routing is accepted and ignored."""

    def forward(self, x: Tensor, routing_weights: Any = None) -> Tensor:
        xp, conv_pad = pad_input(x, self.pad4(*x.shape[-2:]), self.padding_mode)
        return F.conv2d(xp, self.weight, self.bias, self.stride, conv_pad, self.dilation,
                        self.groups)


class _DenseFFN(nn.Module):
    """The dense FFN ``fc2(act(fc1(x)))``, or with an up projection ``fc3`` the gated FFN
    ``fc2(act(fc1(x)) * fc3(x))``, standing in for a MoE layer (same call signature)."""

    def __init__(self, fc1: nn.Linear, act: Any, fc2: nn.Linear,
                 fc3: nn.Linear | None = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.fc3 = fc1, act, fc2, fc3

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        h = self.act(self.fc1(x))
        return self.fc2(h if self.fc3 is None else h * self.fc3(x))


def _shared(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=False)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = _shared(weight)
    if bias is not None:
        lin.bias = _shared(bias)
    return lin


def _static_conv(layer: PadConv2d) -> nn.Module:
    conv = _StaticConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         0, layer.dilation, layer.groups, bias=layer.bias is not None,
                         padding_mode=layer.padding_mode, device="meta")
    conv.padding = layer.padding  # for display: pad4 does the padding
    fixed = layer._pad4
    conv.pad4 = getattr(layer, "pad4_for", lambda height, width: fixed)
    conv.weight = _shared(layer.static_weight)
    if layer.bias is not None:
        conv.bias = _shared(layer.bias[0])
    return conv


def _dense_ffn(layer: MoE) -> nn.Module:
    def linear(i: int) -> nn.Linear:
        bias = getattr(layer, f"b{i}")
        return _linear(getattr(layer, f"w{i}_static"), None if bias is None else bias[0])

    up = linear(3) if getattr(layer, "gated", False) else None
    return _DenseFFN(linear(1), layer.act, linear(2), up)


_STATIC_EQUIVALENTS: dict[type, Callable[[Any], nn.Module]] = {
    PadConv2d: _static_conv,
    MoE: _dense_ffn,
}


def register_static_equivalent(layer_type: type[PadLayer],
                               build: Callable[[Any], nn.Module]) -> None:
    """``build(layer) -> nn.Module``: the ordinary layer a PAD layer of ``layer_type`` (or of a
    subclass without its own entry) replaced, with the layer's call signature, for
    :func:`static_equivalent` and the ``static`` FLOPs of :func:`flops`."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, PadLayer)):
        raise TypeError(f"layer_type must be a PadLayer subclass, got {layer_type!r}")
    if not callable(build):
        raise TypeError(f"build must be callable, got {type(build).__name__}")
    _STATIC_EQUIVALENTS[layer_type] = build


def _static_builder(name: str, layer: PadLayer) -> Callable[[Any], nn.Module]:
    for cls in type(layer).__mro__:
        if cls in _STATIC_EQUIVALENTS:
            return _STATIC_EQUIVALENTS[cls]
    known = ", ".join(sorted(c.__name__ for c in _STATIC_EQUIVALENTS))
    raise ValueError(f"no static equivalent known for layer {name or '<model>'!r} of type "
                     f"{type(layer).__name__} (known: {known}); register one with "
                     "padnet.convert.stats.register_static_equivalent")


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares every parameter and buffer with it."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _check_not_deployed(model: nn.Module) -> None:
    from padnet.deploy.export import DEPLOYED_TYPES

    for name, m in model.named_modules():
        if isinstance(m, DEPLOYED_TYPES):
            raise ValueError(f"module {name or '<model>'!r} is already in deployment form "
                             f"({type(m).__name__}): pass the trained model (before "
                             "padnet.export)")


def static_equivalent(model: nn.Module) -> nn.Module:
    """``model`` with every PAD layer replaced by the ordinary layer it stands for: an
    ``nn.Conv2d`` of the same geometry (weight ``W_s``, bias ``b_1``) for a PAD convolution, the
    dense FFN ``hidden -> intermediate -> hidden`` (``W1_s``, ``W2_s`` and for a gated MoE
    ``W3_s``, the first expert's biases) for a MoE. A structural copy in eval mode that shares
    the original's tensors: for measuring cost and shapes, not a trained static model (its
    outputs differ from the PAD model's)."""
    layers = find_pad_layers(model)
    builders = [(name, layer, _static_builder(name, layer)) for name, layer in layers]
    if any(not name for name, _, _ in builders):  # the model itself is the PAD layer
        return builders[0][2](model).eval()
    out = _structural_copy(model)
    for name, layer, build in builders:
        replace_module(out, name, build(layer))
    return out.eval()


def _fully_dynamic(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose every mode mask is all-dynamic (kappa = 1)."""
    out = _structural_copy(model)
    masks = [(n, m) for n, m in out.named_modules() if isinstance(m, ModeMask)]
    for name, mm in masks:
        fresh = ModeMask(mm.shape, mm.num_factors, scale_mode=mm.scale_mode,
                         device=mm.mask.device, dtype=mm.phi.dtype)
        fresh.phi = mm.phi  # shared, as every other tensor
        if name:
            replace_module(out, name, fresh)
    return out.eval()


def _batch_size(inputs: Any) -> int:
    """The batch dimension of an example input (tensor, tuple/list of arguments, dict)."""
    if isinstance(inputs, Tensor):
        tensors = [("inputs", inputs)]
    elif isinstance(inputs, dict):
        tensors = [(f"inputs[{k!r}]", v) for k, v in inputs.items() if isinstance(v, Tensor)]
    elif isinstance(inputs, (tuple, list)):
        tensors = [(f"inputs[{i}]", v) for i, v in enumerate(inputs) if isinstance(v, Tensor)]
    else:
        raise TypeError("inputs must be a tensor, a tuple/list of positional arguments or a "
                        f"dict of keyword arguments, got {type(inputs).__name__}")
    batched = [(n, t) for n, t in tensors if t.dim() >= 1]
    if not batched:
        raise ValueError("inputs must hold at least one tensor with a batch dimension, got "
                         f"{type(inputs).__name__} without one")
    sizes = {n: int(t.shape[0]) for n, t in batched}
    first = next(iter(sizes.values()))
    if first < 1:
        raise ValueError(f"inputs must hold at least one sample, got batch size {first}")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs disagree on the batch size: {sizes}")
    return first


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward of ``model`` on the batch ``inputs`` as FlopCounterMode counts them
    (matrix products, convolutions, attention; element-wise work counts zero), without
    gradients, with ``model`` in eval mode for the duration (its mode restored after)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _batch_size(inputs)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            try:
                _call(model, inputs)
            except RuntimeError as e:
                raise ValueError(f"{type(model).__name__} failed on the example inputs "
                                 f"({_describe(inputs)}): {e}") from e
    finally:
        for m, mode in modes:
            m.training = mode
    return int(counter.get_total_flops())


def _describe(inputs: Any) -> str:
    def one(v: Any) -> str:
        return f"tensor {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__

    if isinstance(inputs, dict):
        return ", ".join(f"{k}={one(v)}" for k, v in inputs.items())
    if isinstance(inputs, (tuple, list)):
        return ", ".join(one(v) for v in inputs)
    return one(inputs)


def flops(model: nn.Module, inputs: Any, *, export_path: str = "auto") -> FlopStats:
    """Forward FLOPs per sample of ``model`` on the example batch ``inputs``: of its static
    equivalent, of the fully dynamic model (every mask all-dynamic), of the PAD model as it is
    (training form) and as :func:`padnet.export` makes it (with ``export_path``). Each is one
    forward under ``torch.utils.flop_counter.FlopCounterMode`` (no gradients, eval mode) divided
    by the batch size; routers, weight aggregation and only the experts that run are included
    (module docstring, docs/method.md §5.1).

    ``inputs``: a tensor (``model(inputs)``), a tuple/list (``model(*inputs)``) or a dict
    (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``); the batch size is their
    first dimension. A model without PAD layers has one number in all four places. ``model`` is
    left as it was: the forms are structural copies sharing its tensors (the export one is
    folded anew). Raises TypeError/ValueError for a bad model or input, a model already in
    deployment form, or a PAD layer kind without static equivalent
    (:func:`register_static_equivalent`).
    """
    from padnet.deploy.conv import DEPLOY_PATHS
    from padnet.deploy.export import export

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice(export_path, "export_path", DEPLOY_PATHS)
    batch = _batch_size(inputs)
    _check_not_deployed(model)
    if not find_pad_layers(model):
        n = forward_flops(_structural_copy(model), inputs) / batch
        return FlopStats(n, n, n, n, batch)
    static = forward_flops(static_equivalent(model), inputs)
    dynamic = forward_flops(_fully_dynamic(model), inputs)
    pad = forward_flops(_structural_copy(model), inputs)
    exported = forward_flops(export(_structural_copy(model), path=export_path, inplace=True),
                             inputs)
    return FlopStats(static / batch, dynamic / batch, pad / batch, exported / batch, batch)


# ---- conditional computation -----------------------------------------------------------------
@dataclass(frozen=True)
class ConditionalStats:
    """FLOPs per sample that early exits and dynamic tokens save on one example batch
    (module docstring, docs/method.md §6.1).

    ``kind``: ``exits``, ``tokens`` or ``exits+tokens``; ``full``: the model computing
    everything (host network alone, token patches bypassed); ``expected``: early-exit inference
    with the model's criterion and tokens as set (None for exits without a criterion);
    ``exit_rates``: fraction of the batch taking each exit, the final one last (None without
    exits or criterion); ``batch_size``: the example batch.
    """

    kind: str
    full: float
    expected: float | None
    exit_rates: list[float] | None
    batch_size: int

    @property
    def saved_fraction(self) -> float | None:
        """``1 - expected / full``."""
        if self.expected is None or not self.full:
            return None
        return 1.0 - self.expected / self.full

    @property
    def speedup(self) -> float | None:
        """``full / expected`` in FLOPs."""
        if self.expected is None or not self.expected:
            return None
        return self.full / self.expected

    def to_dict(self) -> dict:
        return {**asdict(self), "saved_fraction": self.saved_fraction, "speedup": self.speedup}

    def __str__(self) -> str:
        head = f"conditional computation ({self.kind}), FLOPs per sample (batch {self.batch_size})"
        lines = [head, f"  full model          {format_count(self.full)}"]
        if self.expected is None:
            lines.append("  expected            - (the early-exit model has no criterion)")
        else:
            lines.append(f"  expected            {format_count(self.expected)}  "
                         f"({100 * (self.saved_fraction or 0.0):.1f}% saved, "
                         f"x{self.speedup or float('nan'):.2f})")
        if self.exit_rates is not None:
            rates = ", ".join(f"{r:.3f}" for r in self.exit_rates)
            lines.append(f"  exit rates          {rates}")
        return "\n".join(lines)


def conditional_flops(model: nn.Module, inputs: Any) -> ConditionalStats | None:
    """What the early exits and dynamic tokens of ``model`` save on the example batch
    ``inputs`` (:class:`ConditionalStats`; module docstring), or None when it has neither.
    Eval mode and no gradients for the duration."""
    from padnet.conditional import EarlyExitModel, bypass_tokens, eager_attention
    from padnet.conditional.tokens import find_encoder_layers, layer_token_mode

    exits = isinstance(model, EarlyExitModel)
    host = model.backbone if exits else model
    try:
        text = True
        tokens = any(layer_token_mode(m) for m in find_encoder_layers(host)[1])
    except (TypeError, ValueError):
        text = tokens = False
    if not (exits or tokens):
        return None
    batch = _batch_size(inputs)
    kind = "exits+tokens" if exits and tokens else "exits" if exits else "tokens"
    counting = eager_attention(host) if text else contextlib.nullcontext()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), counting:
            if not exits:
                with bypass_tokens(host):
                    full = forward_flops(host, inputs) / batch
                return ConditionalStats(kind, full, forward_flops(host, inputs) / batch, None,
                                        batch)
            with bypass_tokens(host) if tokens else contextlib.nullcontext():
                segments, heads = _call_exit_flops(model, inputs)
            full = sum(segments) + heads[-1]
            if model.criterion is None:
                return ConditionalStats(kind, full, None, None, batch)
            with FlopCounterMode(display=False) as counter:
                taken = _call(_Infer(model), inputs)
            counts = torch.bincount(taken.exit_index.cpu(), minlength=model.num_exits)
            rates = [int(c) / batch for c in counts]
            return ConditionalStats(kind, full, counter.get_total_flops() / batch, rates, batch)
    finally:
        for m, mode in modes:
            m.training = mode


class _Infer(nn.Module):
    """``model.infer`` with the model's own criterion, called like a forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.infer(*args, **kwargs)


def _call_exit_flops(model: nn.Module, inputs: Any) -> tuple[list[float], list[float]]:
    if isinstance(inputs, dict):
        return model.batch_exit_flops(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model.batch_exit_flops(*inputs)
    return model.batch_exit_flops(inputs)
