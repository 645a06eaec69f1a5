"""The PAD-Net training schedule without a trainer: what padnet's own loop does around each
optimizer step, as one object that any loop (plain PyTorch, Hugging Face, Lightning) calls.

Per optimizer step the schedule

* anneals the router temperature linearly from ``start`` to ``end`` over ``anneal_steps`` steps,
  then holds it (DY-Conv's schedule, docs/method.md §2.1, counted in steps);
* runs the Iterative Mode Partition iterations that are due (docs/method.md §4, §4.5): interleaved
  (iteration t once ``start_step + round(t * (end_step - start_step) / T)`` steps are done, each
  scoring the next ``num_batches`` batches) or one-shot (all T iterations before the first step);
* weights the MoE auxiliary losses for the loss (docs/method.md §2.2): ``schedule.aux_loss(model)``
  is ``aux_weight * padnet.aux_loss(model)``;
* reports the current dynamic ratio, temperature and IMP iteration for the trainer's logs.

A plain loop::

    pad = PadSchedule(dynamic_ratio=0.3, temperature=(30.0, 1.0, 1000), end_step=300)
    pad.on_step(0, model, loader)                     # start temperature, one-shot IMP
    for step, (x, y) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(x), y) + pad.aux_loss(model)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        pad.on_step(step, model, loader)              # IMP iterations due, next temperature
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from padnet.utils.checks import check_choice, check_int, check_number, check_optional, check_ratio

__all__ = ["IMP_MODES", "IMP_OPTIONS", "PadSchedule", "scoring_loader_like"]

#: How IMP runs in a schedule: during training, or all iterations before the first step.
IMP_MODES = ("interleaved", "oneshot")

#: Options passed through to :class:`~padnet.partition.IterativePartition` (one-shot:
#: :func:`~padnet.partition.partition_model`, which takes all but ``start_step``).
IMP_OPTIONS = ("iterations", "start_step", "num_batches", "schedule", "scope", "granularity",
               "score", "static_init", "bn_mode", "seed", "normalize")

#: Fraction of the training steps interleaved IMP runs over when no ``end_step`` is given (the
#: default of ``padnet train``'s ``imp_warmup_fraction``).
DEFAULT_WARMUP_FRACTION = 0.3


def _check_temperature(value: Any) -> tuple[float, float, int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"temperature must be (start, end, anneal_steps) or None, got {value!r}")
    start = check_number(value[0], "temperature start", minimum=0, strict=True)
    end = check_number(value[1], "temperature end", minimum=0, strict=True)
    steps = check_int(value[2], "temperature anneal_steps", 0)
    return start, end, steps


def _check_imp_options(options: dict[str, Any]) -> dict[str, Any]:
    """Unknown keys raise TypeError; the string choices and counts are checked now, not at the
    first step."""
    from padnet.partition import OPTIONS, SCORES

    unknown = sorted(set(options) - set(IMP_OPTIONS))
    if unknown:
        raise TypeError(f"unknown IMP option(s) {', '.join(map(repr, unknown))}; allowed: "
                        f"{', '.join(IMP_OPTIONS)}")
    for key, choices in OPTIONS.items():
        if key in options:
            check_choice(options[key], key, choices)
    if "score" in options:
        check_choice(options["score"], "score", SCORES.names())
    if "iterations" in options:
        check_int(options["iterations"], "iterations", 1)
    if "start_step" in options:
        check_int(options["start_step"], "start_step", 0)
    if "num_batches" in options:
        check_optional(options["num_batches"], check_int, "num_batches", 1)
    if "seed" in options:
        check_int(options["seed"], "seed")
    return dict(options)


class PadSchedule:
    """Temperature annealing, Iterative Mode Partition and the auxiliary-loss weight of a PAD
    model's training, driven by the number of optimizer steps done (module docstring).

    Args:
        dynamic_ratio: IMP's target kappa in [0, 1]; None runs no IMP.
        temperature: ``(start, end, anneal_steps)``: the router temperature of 0-based step s is
            ``start + (end - start) * s / anneal_steps`` up to ``anneal_steps``, then ``end``
            (:func:`padnet.temperature_schedule` with steps for epochs); None leaves it alone.
        aux_weight: weight of ``padnet.aux_loss(model)`` in :meth:`aux_loss` (>= 0).
        imp_mode: ``'interleaved'`` or ``'oneshot'``.
        end_step: the step after which interleaved IMP's last iteration runs (default
            ``round(warmup_fraction * total_steps)``, at least 1; ``total_steps`` is then needed
            by :meth:`on_step`).
        warmup_fraction: in (0, 1]; used when ``end_step`` is None.
        loss_fn: IMP's scoring loss ``loss_fn(model, batch) -> scalar`` (default: the model's own
            loss: ``model(**batch).loss`` for dict batches, cross-entropy of ``model(x)`` for
            ``(x, y)``); :meth:`on_step` may also pass one.
        **imp_options: :data:`IMP_OPTIONS` for :class:`~padnet.partition.IterativePartition`
            (``iterations``, ``num_batches``, ``score``, ``scope``, ``bn_mode``, ``seed``...).

    Raises ValueError / TypeError naming the argument for bad values, and ValueError when IMP
    options are given without ``dynamic_ratio``.
    """

    def __init__(
        self, dynamic_ratio: float | None = None, *,
        temperature: tuple[float, float, int] | None = None, aux_weight: float = 1.0,
        imp_mode: str = "interleaved", end_step: int | None = None,
        warmup_fraction: float = DEFAULT_WARMUP_FRACTION,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, **imp_options: Any,
    ) -> None:
        self.dynamic_ratio = None if dynamic_ratio is None else check_ratio(dynamic_ratio)
        self.temperature = _check_temperature(temperature)
        self.aux_weight = check_number(aux_weight, "aux_weight", minimum=0)
        self.imp_mode = check_choice(imp_mode, "imp_mode", IMP_MODES)
        self.imp_options = _check_imp_options(imp_options)
        check_optional(end_step, check_int, "end_step", 0)
        start = self.imp_options.get("start_step", 0)
        if end_step is not None and end_step < start:
            raise ValueError(f"end_step must be >= start_step={start}, got {end_step}")
        self.end_step = end_step
        self.warmup_fraction = check_number(warmup_fraction, "warmup_fraction", minimum=0,
                                            strict=True, maximum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (model, batch) -> scalar Tensor, got "
                            f"{loss_fn!r}")
        self.loss_fn = loss_fn
        if self.dynamic_ratio is None and (imp_options or end_step is not None):
            given = sorted({*imp_options, *(["end_step"] if end_step is not None else [])})
            raise ValueError(f"IMP option(s) {', '.join(given)} given without dynamic_ratio: "
                             "pass dynamic_ratio=... (the target kappa) to run IMP")
        self.partition: Any = None  # IterativePartition once built (interleaved)
        self.result: Any = None  # the latest PartitionResult of this process
        self.imp_iteration = 0  # IMP iterations run so far
        self._oneshot_done = False
        self.current_temperature: float | None = None
        self.last_step: int | None = None
        self._scoring = False

    # ---- progress ------------------------------------------------------------------------
    @property
    def imp_done(self) -> bool:
        """True when no IMP iteration is left (or no IMP was asked for)."""
        if self.dynamic_ratio is None or self._oneshot_done:
            return True
        return self.partition is not None and self.partition.done

    def temperature_at(self, step: int) -> float | None:
        """The router temperature of 0-based optimizer step ``step`` (None without a
        temperature schedule)."""
        if self.temperature is None:
            return None
        import padnet

        start, end, steps = self.temperature
        return padnet.temperature_schedule(step, start=start, end=end, anneal_epochs=steps)

    def resolve_end_step(self, total_steps: int | None) -> int:
        """Interleaved IMP's ``end_step``: the given one, else ``round(warmup_fraction *
        total_steps)`` (at least 1 and at least ``start_step``)."""
        if self.end_step is not None:
            return self.end_step
        if total_steps is None:
            raise ValueError("interleaved IMP needs end_step= (the step of its last iteration) "
                             "or total_steps= (it then ends after warmup_fraction of them)")
        check_int(total_steps, "total_steps", 1)
        start = self.imp_options.get("start_step", 0)
        return max(1, start, round(self.warmup_fraction * total_steps))

    # ---- the step ------------------------------------------------------------------------
    def on_step(
        self, step: int, model: nn.Module, batches: Iterable | None = None,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, *,
        total_steps: int | None = None,
    ) -> Any:
        """Call with ``step = 0`` before training and after every optimizer step with the number
        of optimizer steps done. Runs the IMP iterations due (scoring ``batches``, a
        re-iterable of training batches, needed until IMP is done) and sets the temperature
        of the coming step. Returns the :class:`~padnet.partition.PartitionResult` when an
        iteration ran, else None."""
        check_int(step, "step", 0)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        ran = None
        if not self.imp_done:
            self._scoring = True  # aux_loss() is zero in IMP's scoring loss
            try:
                ran = self._partition(step, model, batches, loss_fn or self.loss_fn,
                                      total_steps)
            finally:
                self._scoring = False
        temperature = self.temperature_at(step)
        if temperature is not None:
            import padnet

            if padnet.set_temperature(model, temperature) == 0:
                raise ValueError(
                    f"temperature={self.temperature} was given but {type(model).__name__} has no "
                    "router with a temperature (DY-Conv, CondConv and ODConv layers have one, "
                    "MoE layers none): pass temperature=None")
            self.current_temperature = temperature
        self.last_step = step
        return ran

    def _partition(self, step: int, model: nn.Module, batches: Iterable | None,
                   loss_fn: Any, total_steps: int | None) -> Any:
        if batches is None:
            raise ValueError(f"IMP (dynamic_ratio={self.dynamic_ratio}) scores training batches: "
                             "pass batches= (a re-iterable of training batches, e.g. the "
                             "DataLoader) until it is done")
        if self.imp_mode == "oneshot":
            from padnet.partition import partition_model

            opts = {k: v for k, v in self.imp_options.items() if k != "start_step"}
            self.result = partition_model(model, batches, dynamic_ratio=self.dynamic_ratio,
                                          loss_fn=loss_fn, **opts)
            self.imp_iteration = self.result.iteration
            self._oneshot_done = True
            return self.result
        if self.partition is None:
            from padnet.partition import IterativePartition

            self.partition = IterativePartition(
                model, batches, dynamic_ratio=self.dynamic_ratio, loss_fn=loss_fn,
                end_step=self.resolve_end_step(total_steps), **self.imp_options)
        # driven by the absolute step count, so a loop that resumes at step s catches up
        self.partition.steps_done = step - 1
        ran = self.partition.step()
        if ran is not None:
            self.result = ran
        self.imp_iteration = self.partition.iteration
        return ran

    # ---- loss and logs -------------------------------------------------------------------
    def aux_loss(self, model: nn.Module) -> Tensor:
        """``aux_weight * padnet.aux_loss(model)``: the auxiliary losses the MoE layers stored
        in the last forward (a 0-dim zero without any); add it to the task loss. While IMP
        scores (a loss computed inside :meth:`on_step`) it is zero: the scores use the task
        loss only (docs/method.md §4)."""
        from padnet.layers import aux_loss

        total = aux_loss(model)
        return total.detach() * 0.0 if self._scoring else total * self.aux_weight

    def logs(self, model: nn.Module) -> dict[str, float]:
        """What a trainer logs: ``dynamic_ratio`` (dynamic positions over all positions of the
        PAD weights, :func:`padnet.partition.layer_ratio_report`), ``temperature`` (when
        scheduled) and ``imp_iteration`` (when IMP runs)."""
        from padnet.partition import layer_ratio_report

        report = layer_ratio_report(model)
        out = {"dynamic_ratio": report.total_ratio} if report.layers else {}
        if self.current_temperature is not None:
            out["temperature"] = self.current_temperature
        if self.dynamic_ratio is not None:
            out["imp_iteration"] = float(self.imp_iteration)
        return out

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's progress: IMP iterations done, the interleaved partition's state
        (masks, history, batches consumed), the last step and temperature (plain data and bool
        tensors)."""
        return {"version": 1, "last_step": self.last_step, "imp_iteration": self.imp_iteration,
                "oneshot_done": self._oneshot_done,
                "temperature": self.current_temperature,
                "partition": self.partition.state_dict() if self.partition is not None else None}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None,
                        batches: Iterable | None = None, *, total_steps: int | None = None) -> None:
        """Resume from :meth:`state_dict`; an interleaved IMP state needs the ``model`` and the
        scoring ``batches`` (and ``total_steps`` when no ``end_step`` was given)."""
        if state.get("partition") is not None:
            if model is None or batches is None:
                raise ValueError("the state holds an interleaved IMP: pass model= and batches=")
            from padnet.partition import IterativePartition

            self.partition = IterativePartition(
                model, batches, dynamic_ratio=self.dynamic_ratio, loss_fn=self.loss_fn,
                end_step=self.resolve_end_step(total_steps), **self.imp_options)
            self.partition.load_state_dict(state["partition"])
        self.imp_iteration = int(state.get("imp_iteration", 0))
        self._oneshot_done = bool(state.get("oneshot_done", False))
        self.last_step = state.get("last_step")
        self.current_temperature = state.get("temperature")


def scoring_loader_like(loader: Any, *, batch_size: int | None = None, seed: int = 0) -> Any:
    """IMP's scoring batches from a training ``DataLoader``: the same data set and collate
    function in an own shuffled order (seed ``seed + IMP_SEED_OFFSET``, as ``padnet train``),
    so that scoring draws nothing from the training loader's iterator or random state. A
    non-DataLoader iterable is returned as it is."""
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler

    from padnet.train.imp import IMP_SEED_OFFSET

    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or dataset is None:
        return loader
    size = batch_size or loader.batch_size
    if size is None:  # a batch_sampler without a fixed size: take its first batch's size
        size = len(next(iter(loader.batch_sampler)))
    check_int(size, "batch_size", 1)
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=size, collate_fn=loader.collate_fn)
    gen = torch.Generator().manual_seed(seed + IMP_SEED_OFFSET)
    n = len(dataset)
    return DataLoader(dataset, batch_size=size, sampler=RandomSampler(dataset, generator=gen),
                      collate_fn=loader.collate_fn, drop_last=n >= size)
