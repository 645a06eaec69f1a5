"""Early exits (dynamic depth, docs/method.md §6): classifier heads inside a network, and
inference that stops computing for the samples that are confident enough.

:func:`add_exits` wraps a host model (padnet's or torchvision's ResNets and MobileNetV2, a Hugging
Face ``BertModel`` / ``BertForSequenceClassification``) in an :class:`EarlyExitModel` with one
head after each named unit; the host's own classifier is the final exit (a ``BertModel`` gets a
new final head). The host is kept, unchanged, as ``model.backbone``; dynamic layers inside it
(``padnet.dynamize``) run as they do in the host.

* ``model(x)`` runs the whole network and returns every exit's logits, first exit first: the
  training forward, used with :func:`exit_loss`.
* ``model.infer(x, criterion=...)`` runs segment after segment; after each exit the samples the
  criterion lets go are dropped from the batch (index-select of the state, for BERT the hidden
  states together with the attention mask), so deeper segments see fewer samples. It returns each
  sample's logits from the exit it took and that exit's index.

Joint training loss of exits ``i = 1..L`` with logits ``z_i``, weights ``w_i``, targets ``y``,
distillation weight ``alpha`` and temperature ``T`` (the last exit teaches, without gradient)::

    loss = w_L CE(z_L, y) + sum_{i<L} w_i [ (1 - alpha) CE(z_i, y) + alpha T^2 KL_i ]
    KL_i = KL(softmax(z_L / T) || softmax(z_i / T)), averaged over the batch
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from padnet.conditional.backbones import Backbone, backbone_for
from padnet.conditional.criteria import ExitCriterion, check_decision
from padnet.utils.checks import check_callable, check_int, check_number

__all__ = ["EarlyExitModel", "ExitOutput", "add_exits", "exit_decisions", "exit_loss"]

HeadFactory = Callable[[int, int], nn.Module]


class ExitOutput(NamedTuple):
    """Result of early-exit inference: ``logits`` ``(B, C)`` from the exit each sample took,
    ``exit_index`` ``(B,)`` int64 (0 = first exit, ``num_exits - 1`` = the final one)."""

    logits: Tensor
    exit_index: Tensor


class _ExitTracker:
    """Which samples are still running, the memory of the criterion, and the results so far."""

    def __init__(self, batch: int, num_exits: int, criterion: ExitCriterion,
                 device: torch.device) -> None:
        self.rows = torch.arange(batch, device=device)  # original rows still running
        self.num_exits, self.criterion = num_exits, criterion
        self.memory: dict[str, Any] = {}
        self.logits: Tensor | None = None
        self.exit_index = torch.full((batch,), -1, dtype=torch.long, device=device)

    def update(self, i: int, logits: Tensor) -> Tensor | None:
        """Record exit ``i`` for the running samples (``logits`` (b, C)). Returns the rows (of
        the running batch) that go on, or None when all go on."""
        b = self.rows.numel()
        if i == self.num_exits - 1:
            done = torch.ones(b, dtype=torch.bool, device=logits.device)
        else:
            done = check_decision(self.criterion(logits, self.memory), b, self.criterion)
        if self.logits is None:
            self.logits = logits.new_zeros((self.exit_index.numel(), *logits.shape[1:]))
        if not bool(done.any()):
            return None
        leaving = done.nonzero().squeeze(1)
        self.logits[self.rows[leaving]] = logits[leaving].to(self.logits.dtype)
        self.exit_index[self.rows[leaving]] = i
        staying = (~done).nonzero().squeeze(1)
        self.rows = self.rows[staying]
        self.memory = {key: self._shrink(key, value, b, staying)
                       for key, value in self.memory.items()}
        return staying

    def _shrink(self, key: str, value: Any, b: int, staying: Tensor) -> Any:
        if not isinstance(value, Tensor):
            return value
        if value.dim() == 0 or value.shape[0] != b:
            raise ValueError(f"criterion {self.criterion!r} stored memory[{key!r}] of shape "
                             f"{tuple(value.shape)}; tensors in memory must have the running "
                             f"batch ({b}) as their first dimension")
        return value.index_select(0, staying)

    def result(self) -> ExitOutput:
        assert self.logits is not None and bool((self.exit_index >= 0).all())
        return ExitOutput(self.logits, self.exit_index)


def _check_criterion(criterion: Any) -> ExitCriterion:
    return check_callable(criterion, "criterion", "(logits (b, C), memory: dict) -> (b,) bool")


class EarlyExitModel(nn.Module):
    """A host model with exit heads; build it with :func:`add_exits` (same arguments).

    Attributes: ``backbone`` (the host), ``exit_points`` (unit names after which the heads
    sit, in execution order), ``exits`` (their heads), ``final_exit`` (a new final head, only for
    a host without a classifier), ``criterion`` (default of :meth:`infer`, may be None).
    """

    def __init__(self, model: nn.Module, after: str | Sequence[str], *,
                 num_classes: int | None = None, head_factory: HeadFactory | None = None,
                 criterion: ExitCriterion | None = None) -> None:
        super().__init__()
        plan = backbone_for(model)
        points = _resolve_points(plan, after)
        own = plan.num_classes(model)
        num_classes = _resolve_classes(num_classes, own, plan.family)
        if head_factory is not None:
            check_callable(head_factory, "head_factory", "(in_features, num_classes) -> nn.Module")
        self.backbone = model
        self._plan: Backbone = plan
        self.exit_points: tuple[str, ...] = tuple(name for name, _ in points)
        self.num_classes = num_classes
        heads = [self._make_head(model, plan.width(model, unit), head_factory)
                 for _, unit in points]
        self.exits = nn.ModuleList(heads)
        width = plan.width(model, plan.units[-1])
        self.final_exit = None if own is not None else self._make_head(model, width, head_factory)
        cuts = [plan.units.index(unit) + 1 for _, unit in points]
        bounds = [0, *cuts, len(plan.units)]
        self._segments = [plan.units[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        self.criterion = None if criterion is None else _check_criterion(criterion)
        self.train(model.training)  # the new heads follow the host's train / eval mode

    def _make_head(self, model: nn.Module, width: int, factory: HeadFactory | None) -> nn.Module:
        if factory is None:
            return self._plan.default_head(model, width, self.num_classes)
        head = factory(width, self.num_classes)
        if not isinstance(head, nn.Module):
            raise TypeError(f"head_factory must return an nn.Module, got {type(head).__name__}")
        return head

    @property
    def num_exits(self) -> int:
        """Intermediate exits plus the final one."""
        return len(self.exits) + 1

    def extra_repr(self) -> str:
        return f"exit_points={list(self.exit_points)}, num_classes={self.num_classes}"

    def _head(self, i: int, state: Any) -> Tensor:
        if i < len(self.exits):
            return self.exits[i](self._plan.features(state))
        if self.final_exit is not None:
            return self.final_exit(self._plan.features(state))
        return self._plan.final(self.backbone, state)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        """Every exit's logits ``(B, num_classes)``, first exit first, the final exit last.
        Inputs are the host's: an image batch ``(B, C, H, W)``, or BERT's ``input_ids``,
        ``attention_mask``, ``token_type_ids``, ``position_ids`` / ``inputs_embeds``."""
        state = self._plan.prepare(self.backbone, *args, **kwargs)
        outputs = []
        for i, units in enumerate(self._segments):
            state = self._plan.run(self.backbone, units, state)
            outputs.append(self._head(i, state))
        return tuple(outputs)

    def final_logits(self, *args: Any, **kwargs: Any) -> Tensor:
        """The final exit's logits ``(B, num_classes)`` alone: the whole network without the
        intermediate heads (the model that early exits are compared with). Inputs as in
        :meth:`forward`."""
        state = self._plan.prepare(self.backbone, *args, **kwargs)
        for units in self._segments:
            state = self._plan.run(self.backbone, units, state)
        return self._head(len(self._segments) - 1, state)

    def infer(self, *args: Any, criterion: ExitCriterion | None = None,
              **kwargs: Any) -> ExitOutput:
        """Early-exit inference on a batch (inputs as in :meth:`forward`).

        After exit ``i`` the criterion (``criterion``, else ``self.criterion``) picks the samples
        that stop; only the others are index-selected into segment ``i + 1``, and the final exit
        takes whoever is left. Samples do not interact (put the model in eval mode first so that
        BatchNorm uses running statistics), so each gets what it would get alone.
        Returns :class:`ExitOutput` ``(logits (B, C), exit_index (B,))``.
        """
        chosen = criterion if criterion is not None else self.criterion
        if chosen is None:
            raise ValueError("infer needs a criterion: pass criterion=... (e.g. "
                             "MaxProbability(0.9)) here or to add_exits")
        chosen = _check_criterion(chosen)
        state = self._plan.prepare(self.backbone, *args, **kwargs)
        batch = self._plan.batch_size(state)
        device = self._plan.features(state).device
        tracker = _ExitTracker(batch, self.num_exits, chosen, device)
        for i, units in enumerate(self._segments):
            state = self._plan.run(self.backbone, units, state)
            staying = tracker.update(i, self._head(i, state))
            if staying is not None:
                if staying.numel() == 0:
                    break
                state = self._plan.select(state, staying)  # the batch shrinks
        return tracker.result()

    @torch.no_grad()
    def exit_flops(self, *args: Any, **kwargs: Any) -> tuple[list[int], list[int]]:
        """FLOPs of each segment and of each exit head for ONE sample: the first sample of the
        given inputs, counted by ``torch.utils.flop_counter.FlopCounterMode``. Ops it does not
        know count zero: element-wise ones, and on CPU the fused attention of a BERT built with
        ``attn_implementation='sdpa'`` (use ``'eager'`` to count the attention products).
        Returns ``(segments, heads)``, one entry per exit; segment 0 includes the input
        preparation (stem, embeddings)."""
        args, kwargs = _first_sample(args), {k: _first_sample(v) for k, v in kwargs.items()}
        segments, heads, _ = self._count_flops(args, kwargs)
        return segments, heads

    @torch.no_grad()
    def batch_exit_flops(self, *args: Any, **kwargs: Any) -> tuple[list[float], list[float]]:
        """As :meth:`exit_flops`, but every segment and head runs on the whole batch and the
        counts are divided by its size: FLOPs per sample as the batch computes them (for text,
        at the batch's padded length; with token selection, at the batch's widest selection)."""
        segments, heads, batch = self._count_flops(args, kwargs)
        return [f / batch for f in segments], [f / batch for f in heads]

    def _count_flops(self, args: tuple, kwargs: dict) -> tuple[list[int], list[int], int]:
        """Segment and head FLOPs of one full pass over the given batch, and its size."""
        from torch.utils.flop_counter import FlopCounterMode

        segments, heads = [], []
        state = None
        for i, units in enumerate(self._segments):
            with FlopCounterMode(display=False) as counter:
                if i == 0:
                    state = self._plan.prepare(self.backbone, *args, **kwargs)
                state = self._plan.run(self.backbone, units, state)
            segments.append(int(counter.get_total_flops()))
            with FlopCounterMode(display=False) as counter:
                self._head(i, state)
            heads.append(int(counter.get_total_flops()))
        return segments, heads, self._plan.batch_size(state)


def _first_sample(value: Any) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0:
        return value[:1]
    if isinstance(value, tuple):
        return tuple(_first_sample(v) for v in value)
    return value


def _resolve_points(plan: Backbone, after: Any) -> list[tuple[str, str]]:
    """``after`` as ``[(name given, unit)]`` in execution order; ValueError/TypeError otherwise."""
    names = [after] if isinstance(after, str) else after
    if not isinstance(names, Iterable) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"after must be a unit name or a list of unit names, got {after!r}")
    names = list(names)
    allowed = plan.exit_candidates()
    if not names:
        raise ValueError(f"after must name at least one unit; {plan.family} units: {allowed}")
    points = []
    for name in names:
        unit = plan.aliases.get(name, name)
        if name not in allowed:
            why = ("is the last unit: the final exit already sits there"
                   if unit == plan.units[-1] else "is not an exit point of this model")
            raise ValueError(f"after: {name!r} {why}; {plan.family} exit points: {allowed}")
        points.append((name, unit))
    order = [plan.units.index(unit) for _, unit in points]
    if len(set(order)) != len(order):
        raise ValueError(f"after names the same point twice: {names}")
    if order != sorted(order):
        ordered = [name for _, name in sorted(zip(order, names, strict=True))]
        raise ValueError(f"after must list the exit points in execution order, e.g. {ordered}, "
                         f"got {names}")
    return points


def _resolve_classes(num_classes: Any, own: int | None, family: str) -> int:
    if num_classes is None:
        if own is None:
            raise ValueError(f"num_classes is required: this {family} model has no classifier "
                             "of its own")
        return own
    num_classes = check_int(num_classes, "num_classes", 1)
    if own is not None and num_classes != own:
        raise ValueError(f"num_classes={num_classes} differs from the model's own classifier "
                         f"({own} classes), which is the final exit")
    return num_classes


def add_exits(model: nn.Module, after: str | Sequence[str], *, num_classes: int | None = None,
              head_factory: HeadFactory | None = None,
              criterion: ExitCriterion | None = None) -> EarlyExitModel:
    """Wrap ``model`` in an :class:`EarlyExitModel` with an exit head after each unit in ``after``.

    Args:
        model: a ResNet (padnet's ``resnet8/20/32/18/50``, ``resnet18_cifar`` or torchvision's;
            units ``layerI`` = a stage, or ``layerI.J`` = one block), a MobileNetV2 (units
            ``features.N``), a ``BertModel`` (units ``encoder.layer.I``) or a
            ``BertForSequenceClassification`` (units ``bert.encoder.layer.I``). Dynamic layers
            inside (``padnet.dynamize``) are fine. Its parameters are shared, not copied.
        after: unit names, in execution order, at least one; the last unit is not allowed (the
            final exit sits there).
        num_classes: outputs of every head; by default those of the model's own classifier,
            required for a ``BertModel``.
        head_factory: ``(in_features, num_classes) -> nn.Module`` mapping the unit's output to
            logits ``(B, num_classes)``; ``in_features`` is the unit's channels (CNN) or hidden
            size (BERT). By default :class:`~padnet.conditional.backbones.PoolHead` (average pool
            + linear) for CNNs, :class:`~padnet.conditional.backbones.ClsHead` (``[CLS]`` token
            through dense + tanh + dropout + linear) for BERT.
        criterion: the default criterion of :meth:`EarlyExitModel.infer`.
    """
    return EarlyExitModel(model, after, num_classes=num_classes, head_factory=head_factory,
                          criterion=criterion)


def exit_decisions(all_logits: Sequence[Tensor], criterion: ExitCriterion) -> ExitOutput:
    """What :meth:`EarlyExitModel.infer` decides, from every exit's logits computed beforehand
    (``all_logits``: one ``(B, C)`` tensor per exit, e.g. the training forward's output): the
    criterion sees, at each exit, the rows of the samples still running, exactly as in
    ``infer``. Nothing is saved by it; it serves analysis and tests."""
    _check_exit_logits(all_logits)
    criterion = _check_criterion(criterion)
    first = all_logits[0]
    tracker = _ExitTracker(first.shape[0], len(all_logits), criterion, first.device)
    for i, logits in enumerate(all_logits):
        if tracker.update(i, logits.index_select(0, tracker.rows)) is not None \
                and tracker.rows.numel() == 0:
            break
    return tracker.result()


def _check_exit_logits(all_logits: Any) -> None:
    if (not isinstance(all_logits, (list, tuple)) or not all_logits
            or not all(isinstance(z, Tensor) for z in all_logits)):
        raise TypeError("exit logits must be a non-empty list or tuple of (B, C) tensors, got "
                        f"{type(all_logits).__name__}")
    shape = tuple(all_logits[0].shape)
    if len(shape) != 2 or any(tuple(z.shape) != shape for z in all_logits):
        shapes = [tuple(z.shape) for z in all_logits]
        raise ValueError(f"exit logits must all have one shape (B, C), got {shapes}")


def exit_loss(all_logits: Sequence[Tensor], targets: Tensor, *,
              weights: Sequence[float] | None = None, distill: float = 0.0,
              temperature: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    """Joint loss of every exit (module docstring): weighted cross-entropies, where the
    intermediate exits may also learn from the last one (KL at ``temperature``, scaled by
    ``temperature**2``; the teacher is detached).

    Args:
        all_logits: one ``(B, C)`` tensor per exit, the final exit last.
        targets: ``(B,)`` class indices.
        weights: one number >= 0 per exit (not all zero); default 1 each. The sum is not
            normalised.
        distill: ``alpha`` in [0, 1]; 0 = cross-entropy only.
        temperature: ``T`` > 0.
        label_smoothing: in [0, 1), applied to every cross-entropy term (as
            ``F.cross_entropy(..., label_smoothing=...)``), not to the distillation term.
    Returns a 0-dim tensor.
    """
    _check_exit_logits(all_logits)
    n, batch = len(all_logits), all_logits[0].shape[0]
    if not isinstance(targets, Tensor) or tuple(targets.shape) != (batch,):
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be class indices of shape ({batch},), got {got}")
    weights = _check_weights(weights, n)
    alpha = check_number(distill, "distill", minimum=0.0, maximum=1.0)
    temp = check_number(temperature, "temperature", minimum=0.0, strict=True)
    if math.isinf(temp):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    smooth = check_number(label_smoothing, "label_smoothing", minimum=0.0)
    if smooth >= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    last = all_logits[-1].float()
    teacher = F.log_softmax(last.detach() / temp, dim=-1)  # (B, C)
    total = weights[-1] * F.cross_entropy(last, targets, label_smoothing=smooth)
    for w, logits in zip(weights[:-1], all_logits[:-1], strict=True):
        logits = logits.float()
        term = F.cross_entropy(logits, targets, label_smoothing=smooth)
        if alpha > 0:
            student = F.log_softmax(logits / temp, dim=-1)
            kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
            term = (1 - alpha) * term + alpha * temp**2 * kl
        total = total + w * term
    return total


def _check_weights(weights: Any, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, Tensor):
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)) or len(weights) != n:
        raise ValueError(f"weights must hold one number per exit ({n}), got {weights!r}")
    values = [check_number(w, f"weights[{i}]", minimum=0.0) for i, w in enumerate(weights)]
    if any(math.isinf(v) for v in values) or not any(v > 0 for v in values):
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {weights!r}")
    return values
