"""What IMP scores on: its scoring batches, the task loss and the scoring context.

* :func:`default_loss`, :func:`check_loss`, :func:`to_device`, :class:`BatchSource`: batches and
  the task loss.
* :func:`scoring_context`: train/eval mode, normalisation buffers and RNG of a scoring pass,
  all restored afterwards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.loss import _Loss

__all__ = ["BatchSource", "check_loss", "default_loss", "resolve_loss_fn", "scoring_context",
           "to_device"]

# ---- data -----------------------------------------------------------------------------------
def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) tuple / list / dict batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        items = [to_device(b, device) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    return batch


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Task loss of a batch: ``(inputs, targets)`` -> ``cross_entropy(model(inputs), targets)``
    (logits ``(B, C, ...)``, targets ``(B, ...)``); a dict -> ``model(**batch).loss``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("model(**batch) returned no loss: put the labels in the batch or "
                             "pass loss_fn(model, batch)")
        return loss
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        logits = model(batch[0])
        if not isinstance(logits, Tensor):
            raise TypeError(f"model(inputs) returned {type(logits).__name__}, not logits: pass "
                            "loss_fn(model, batch)")
        return F.cross_entropy(logits, batch[1])
    raise TypeError(f"no default loss for a batch of type {type(batch).__name__}: pass "
                    "loss_fn(model, batch) -> scalar Tensor")


class _OutputsTargets:
    """A loss of ``(outputs, targets)`` as IMP's ``loss_fn(model, batch)``."""

    def __init__(self, loss: Callable[..., Tensor]) -> None:
        self.loss = loss

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"loss_fn {self.loss!r} takes (outputs, targets), so batches must be "
                            f"(inputs, targets) pairs; got {type(batch).__name__}")
        return self.loss(model(batch[0]), batch[1])


class _Checked:
    """A user's ``loss_fn(model, batch)`` whose type errors explain the expected form."""

    def __init__(self, loss_fn: Callable[..., Tensor]) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        try:
            return self.loss_fn(model, batch)
        except (TypeError, AttributeError) as err:
            raise TypeError(
                f"loss_fn is called as loss_fn(model, batch) and returns the loss; it raised "
                f"{type(err).__name__}: {err}. For a loss of (outputs, targets) pass "
                "loss_fn=lambda model, batch: my_loss(model(batch[0]), batch[1])") from err


def resolve_loss_fn(loss_fn: Callable[..., Tensor] | None) -> Callable[[nn.Module, Any], Tensor]:
    """IMP's loss as ``fn(model, batch)``: the default loss for None; a PyTorch loss of
    ``(outputs, targets)`` (an ``nn`` loss module or a ``torch.nn.functional`` loss) applied to
    ``model(inputs)``; any other callable as it is, its type errors explained."""
    if loss_fn is None:
        return default_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model, batch) -> scalar Tensor, got "
                        f"{loss_fn!r}")
    if isinstance(loss_fn, _Loss) or getattr(loss_fn, "__module__", "") == "torch.nn.functional":
        return _OutputsTargets(loss_fn)
    return _Checked(loss_fn)


def check_loss(loss: Any) -> Tensor:
    """``loss`` if it is a finite scalar tensor; a clear error otherwise."""
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TypeError(f"the scoring loss must be a scalar tensor, got {got}: loss_fn takes "
                        "(model, batch) and returns the loss")
    if not torch.isfinite(loss.detach()):
        raise ValueError(f"non-finite scoring loss {float(loss.detach()):g}")
    return loss


class BatchSource:
    """Scoring batches drawn from ``data``. ``cycle=False``: every pass takes the first
    ``num_batches`` (all when None). ``cycle=True``: passes take the next ``num_batches`` from an
    iterator kept between passes, restarted at the end of ``data``; ``consumed`` counts them."""

    def __init__(self, data: Iterable, num_batches: int | None, *, cycle: bool) -> None:
        if data is None or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise ValueError(f"data must be an iterable of batches, got {type(data).__name__}")
        if isinstance(data, Iterator) and not cycle:  # one-shot iterator: keep what a pass needs
            data = list(itertools.islice(data, num_batches))
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError("data is empty: IMP needs at least one scoring batch")
        self.data, self.num_batches = data, num_batches
        self.cycle = cycle and num_batches is not None
        self.consumed, self._skip = 0, 0
        self._it: Iterator | None = None
        self._fresh = True  # nothing drawn from the current iterator yet

    def batches(self) -> Iterator:
        """The batches of one scoring pass."""
        if not self.cycle:
            yield from itertools.islice(self.data, self.num_batches)
            return
        for _ in range(self.num_batches):
            yield self._next(count=True)

    def _next(self, *, count: bool) -> Any:
        while self._skip and count:  # fast-forward after a resume
            self._skip -= 1
            self._next(count=False)
        if self._it is None:
            self._it, self._fresh = iter(self.data), True
        try:
            batch = next(self._it)
        except StopIteration:
            if self._fresh or isinstance(self.data, Iterator):
                raise ValueError("data yielded no batches (or its iterator is exhausted): IMP "
                                 "needs re-iterable scoring data") from None
            self._it = None
            return self._next(count=count)
        self._fresh = False
        self.consumed += int(count)
        return batch

    def fast_forward(self, consumed: int) -> None:
        """Resume after ``consumed`` batches: skip them (modulo ``len(data)`` where known) on
        the next draw. A shuffling loader gives other batches than before; the count holds."""
        self.consumed, self._it = consumed, None
        n = len(self.data) if hasattr(self.data, "__len__") else 0
        self._skip = consumed % n if n else consumed


@contextmanager
def scoring_context(model: nn.Module, bn_mode: str, seed: int, device: torch.device) -> Iterator:
    """Mode, normalisation buffers and RNG of a scoring pass, all restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    norms = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)})
             for m in model.modules() if isinstance(m, _NormBase)]
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    model.train(bn_mode == "train")
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(seed)
            if devices:
                with torch.cuda.device(devices[0]):
                    torch.cuda.manual_seed(seed)
            yield
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, buffers in norms:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)
