"""Accuracy against compute for early exits and dynamic tokens (docs/method.md §6.1): one knob
swept over a list of values on a data split, each value beside the full model.

Knobs:

* ``threshold``: the exit criterion's threshold of an early-exit model
  (:class:`~padnet.conditional.EarlyExitModel`); each value runs
  :meth:`~padnet.conditional.EarlyExitModel.infer` with ``make_criterion(criterion, value)``.
  The full model is the host network alone (no exit heads).
* ``keep``: the keep ratio of every layer that selects tokens
  (:func:`~padnet.conditional.select_tokens`); the full model keeps every token (``keep = 1``).
* ``r``: the tokens merged per layer (:func:`~padnet.conditional.merge_tokens`) in every layer
  that merges (in all layers when none does yet); the full model merges none (``r = 0``, the
  unchanged model).

A token knob runs the whole network (an early-exit model: its final exit). Per value:
accuracy on the split; FLOPs per sample, counted by ``torch.utils.flop_counter.FlopCounterMode``
over the whole split (text models with eager attention, whose products it counts), so that an
early exit's shrinking batch and each batch's padding count as they run; the median latency of
a batch (the mean over ``latency_batches`` batches of ``batch_size`` consecutive samples of the
split, cycled when it is smaller, so that the exits taken are those of real samples), measured
side by side with the full model in interleaved repetitions; ``speedup`` = full latency / this
latency. The model's settings are restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from padnet.conditional.criteria import CRITERIA, make_criterion
from padnet.conditional.exits import EarlyExitModel
from padnet.conditional.tokens import eager_attention, find_encoder_layers, layer_token_mode
from padnet.utils.checks import check_choice, check_int

__all__ = ["KNOBS", "TradeoffRow", "default_values", "sweep"]

KNOBS = ("threshold", "keep", "r")
_DEFAULTS: dict[str, list[float]] = {
    "max_prob": [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "entropy": [0.8, 0.4, 0.2, 0.1, 0.05, 0.02],
    "patience": [1, 2, 3],
    "keep": [0.25, 0.5, 0.75],
    "r": [1, 2, 4, 8],
}


@dataclass
class TradeoffRow:
    """One point of the sweep (``value`` None: the full model)."""

    knob: str
    value: float | None
    accuracy: float
    flops_per_sample: float
    latency_ms: float  # median time of a batch of ``batch_size``
    speedup: float  # full latency / latency
    flops_ratio: float  # flops_per_sample / the full model's
    exit_rates: list[float] | None = None  # threshold sweeps: fraction taking each exit

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["value"] = "full" if self.value is None else self.value
        row["exit_rates"] = (None if self.exit_rates is None
                             else " ".join(f"{r:.4f}" for r in self.exit_rates))
        return row


def default_values(knob: str, criterion: str = "max_prob") -> list[float]:
    """The values a sweep of ``knob`` tries when none are given (for ``threshold``: those of
    ``criterion``)."""
    check_choice(knob, "knob", KNOBS)
    return list(_DEFAULTS[check_choice(criterion, "criterion", tuple(CRITERIA))
                          if knob == "threshold" else knob])


# ---- the model's knobs -----------------------------------------------------------------------
def _host(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, EarlyExitModel) else model


def _token_layers(model: nn.Module, mode: str) -> list[nn.Module]:
    try:
        stack = find_encoder_layers(_host(model))[1]
    except (TypeError, ValueError):
        return []
    return [layer for layer in stack if layer_token_mode(layer) == mode]


def _merge_targets(model: nn.Module) -> list[nn.Module]:
    layers = _token_layers(model, "merge")
    chosen = [layer for layer in layers if layer.merge_r > 0]
    return chosen or layers


@contextlib.contextmanager
def _restored(layers: list[nn.Module], attr: str) -> Iterator[None]:
    saved = [getattr(layer, attr) for layer in layers]
    try:
        yield
    finally:
        for layer, value in zip(layers, saved, strict=True):
            setattr(layer, attr, value)


def _check_values(knob: str, values: Sequence[Any], criterion: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"values must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"values must be finite numbers, got {v!r} in {list(values)}")
        if knob == "keep" and not 0 < v <= 1:
            raise ValueError(f"keep values must be in (0, 1], got {v!r}")
        if knob == "r":
            check_int(v, "r", 0)
        if knob == "threshold":
            make_criterion(criterion, v)  # the criterion's own check of its threshold
        out.append(v)
    return out


def _runner(model: nn.Module, knob: str, value: float | None,
            criterion: str) -> Callable[[Any], tuple[Tensor, Tensor | None]]:
    """``run(inputs) -> (logits (B, C), exit_index (B,) or None)`` at ``value`` (None: the
    full model). Token settings are set at every call, so runners can alternate."""
    if knob == "threshold":
        if value is None:
            return lambda inputs: (_logits(model, inputs), None)
        chosen = make_criterion(criterion, value)

        def infer(inputs: Any) -> tuple[Tensor, Tensor]:
            out = (model.infer(**inputs, criterion=chosen) if isinstance(inputs, Mapping)
                   else model.infer(inputs, criterion=chosen))
            return out.logits, out.exit_index

        return infer
    layers = _token_layers(model, "select") if knob == "keep" else _merge_targets(model)
    attr = "keep" if knob == "keep" else "merge_r"
    setting = (1.0 if knob == "keep" else 0) if value is None else value

    def run(inputs: Any) -> tuple[Tensor, None]:
        for layer in layers:
            setattr(layer, attr, setting)
        return _logits(model, inputs), None

    return run


def _logits(model: nn.Module, inputs: Any) -> Tensor:
    """Logits of the whole network: an early-exit model's final exit without the intermediate
    heads, else the model's own output."""
    call = model.final_logits if isinstance(model, EarlyExitModel) else model
    if isinstance(inputs, Mapping):
        out = call(**inputs)
        return out if isinstance(out, Tensor) else out.logits
    return call(inputs)


# ---- measuring -------------------------------------------------------------------------------
def _split(batch: Any, device: torch.device) -> tuple[Any, Tensor]:
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"].to(device)
    x, y = batch
    return x.to(device), y.to(device)


def _measure(run: Callable[[Any], tuple[Tensor, Tensor | None]], batches: list[tuple[Any, Tensor]],
             num_exits: int, counting: Any) -> tuple[float, float, list[float] | None]:
    """Accuracy, FLOPs per sample and exit rates of ``run`` over ``batches``."""
    from torch.utils.flop_counter import FlopCounterMode

    correct = total = 0
    counts = torch.zeros(num_exits, dtype=torch.long)
    seen_exits = False
    with counting(), FlopCounterMode(display=False) as counter:
        for inputs, targets in batches:
            logits, taken = run(inputs)
            correct += int((logits.argmax(-1) == targets).sum())
            total += int(targets.numel())
            if taken is not None:
                seen_exits = True
                counts += torch.bincount(taken.cpu(), minlength=num_exits)
    rates = [int(c) / total for c in counts] if seen_exits else None
    return correct / total, counter.get_total_flops() / total, rates


def _latency_batches(batches: list[tuple[Any, Tensor]], size: int, count: int) -> list[Any]:
    """``count`` batches of ``size``: the first ``size * count`` samples of ``batches`` in order
    (cycled when there are fewer)."""
    pieces, n, total = [], 0, size * count
    while n < total:
        for inputs, _ in batches:
            pieces.append(inputs)
            n += (next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs).shape[0]
            if n >= total:
                break
    if isinstance(pieces[0], Mapping):
        joined = {k: _cat_padded([p[k] for p in pieces]) for k in pieces[0]}
        return [{k: v[i * size:(i + 1) * size] for k, v in joined.items()}
                for i in range(count)]
    joined = torch.cat(pieces)
    return [joined[i * size:(i + 1) * size] for i in range(count)]


def _cat_padded(tensors: list[Tensor]) -> Tensor:
    """Concatenate ``(B_i, T_i)`` token tensors along the batch, right-padding with zeros to
    the longest ``T``."""
    length = max(t.shape[1] for t in tensors) if tensors[0].dim() > 1 else None
    if length is None:
        return torch.cat(tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, length - t.shape[1])) for t in tensors])


class _Timed(nn.Module):
    """A runner over fixed batches, called like a model by :func:`padnet.bench.measure_latency`
    (the inputs it is given only serve to synchronise the device)."""

    def __init__(self, run: Callable[[Any], Any], batches: list[Any]) -> None:
        super().__init__()
        self.run, self.batches = run, batches

    def forward(self, *args: Any, **kwargs: Any) -> None:
        for inputs in self.batches:
            self.run(inputs)


def sweep(model: nn.Module, data: Iterable[Any], knob: str, values: Sequence[float] | None = None,
          *, criterion: str = "max_prob", batch_size: int = 32, latency_batches: int = 1,
          reps: int = 10, device: torch.device | str | None = None) -> list[TradeoffRow]:
    """Sweep ``knob`` over ``values`` (module docstring); the first row is the full model.

    Args:
        model: an :class:`~padnet.conditional.EarlyExitModel` (``threshold``) or a model whose
            encoder selects (``keep``) or merges (``r``) tokens; eval mode for the duration.
        data: batches ``(x, y)`` or dicts with ``labels`` (a DataLoader), read once.
        knob: ``threshold``, ``keep`` or ``r``.
        values: the values to try (default :func:`default_values`).
        criterion: the exit rule of a ``threshold`` sweep (``max_prob``, ``entropy``,
            ``patience``).
        batch_size: the size of the batches whose latency is measured; latency_batches: how
            many (consecutive samples of the split; the latency is the mean per batch);
            reps: timed repetitions.
        device: where the batches go (default: the model's device).
    """
    from padnet.bench import measure_latency

    check_choice(knob, "knob", KNOBS)
    check_choice(criterion, "criterion", tuple(CRITERIA))
    check_int(batch_size, "batch_size", 1)
    check_int(latency_batches, "latency_batches", 1)
    check_int(reps, "reps", 1)
    exits = isinstance(model, EarlyExitModel)
    if knob == "threshold" and not exits:
        raise ValueError("knob 'threshold' needs a model with early exits (add_exits)")
    mode = {"keep": "select", "r": "merge"}.get(knob)
    if mode is not None and not _token_layers(model, mode):
        raise ValueError(f"knob {knob!r} needs a model whose encoder "
                         f"{'selects' if mode == 'select' else 'merges'} tokens "
                         f"({'select_tokens' if mode == 'select' else 'merge_tokens'})")
    values = _check_values(knob, default_values(knob, criterion) if values is None else values,
                           criterion)
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (
        param.device if param is not None else torch.device("cpu"))
    batches = [_split(b, device) for b in data]
    if not batches:
        raise ValueError("data holds no batches")
    text = isinstance(batches[0][0], Mapping)
    counting = (lambda: eager_attention(_host(model))) if text else contextlib.nullcontext
    num_exits = model.num_exits if exits else 1
    runners = {v: _runner(model, knob, v, criterion) for v in [None, *values]}
    touched = _token_layers(model, "select") if knob == "keep" else _merge_targets(model)
    attr = "keep" if knob == "keep" else "merge_r"
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), _restored(touched, attr):
            measured = {v: _measure(run, batches, num_exits, counting)
                        for v, run in runners.items()}
            timing = _latency_batches(batches, batch_size, latency_batches)
            timed = {str(v): _Timed(run, timing) for v, run in runners.items()}
            ms = {k: t / latency_batches for k, t in
                  measure_latency(timed, timing[0], reps=reps).items()}
    finally:
        for m, was in modes:
            m.train(was)
    full_flops, full_ms = measured[None][1], ms["None"]
    return [TradeoffRow(knob, v, acc, flops, ms[str(v)], full_ms / ms[str(v)],
                        flops / full_flops if full_flops else math.nan, rates)
            for v, (acc, flops, rates) in measured.items()]
