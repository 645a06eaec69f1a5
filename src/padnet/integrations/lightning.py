"""PAD-Net in a Lightning ``Trainer`` (docs/integrations.md): :class:`PadCallback` runs a
:class:`~padnet.integrations.core.PadSchedule` -- router temperature annealing (docs/method.md
§2.1), interleaved or one-shot IMP (§4, §4.5) and the dynamic ratio, temperature and IMP
iteration logged every step as ``padnet/...`` -- and saves its progress in Lightning checkpoints.

A callback cannot change the loss a ``training_step`` returns, so the MoE auxiliary losses
(§2.2) are one line of the ``training_step``, with the callback kept on the module (``self.pad
= PadCallback(...)``, also passed to ``Trainer(callbacks=[...])``)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss + self.pad.aux_loss(self)      # self.pad: the PadCallback

IMP scores batches of the training set in an order of its own and, by default, with the
module's own loss: its ``training_step(batch, 0)`` (its ``self.log`` calls muted meanwhile; the
returned tensor, or the ``'loss'`` of a returned dict), in which ``self.pad.aux_loss(self)`` is
zero: the scores use the task loss only. (``padnet.aux_loss(self)`` in its place works for
training too, but then enters the scores.) Modules with manual optimization step
their optimizers in ``training_step``: they need ``loss_fn=``. The batches reach IMP as the
DataLoader yields them, moved to the module's device (Lightning's batch-transfer hooks are not
run).

Needs Lightning (``pip install 'padnet[lightning]'``): ``lightning`` or, failing that,
``pytorch_lightning``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from padnet.integrations.core import PadSchedule, scoring_loader_like

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError("padnet.integrations.lightning needs Lightning: pip install "
                          "'padnet[lightning]'") from None

__all__ = ["LOG_PREFIX", "PadCallback", "training_step_loss"]

#: Prefix of the names the callback logs.
LOG_PREFIX = "padnet/"


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of ``module.training_step(batch, 0)`` with its logging muted: the tensor it
    returns, or the ``'loss'`` of the mapping it returns."""
    module.log, module.log_dict = _noop, _noop  # instance attributes shadow the methods
    try:
        out = module.training_step(batch, 0)
    finally:
        del module.log, module.log_dict
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor):
        raise TypeError(f"{type(module).__name__}.training_step returned "
                        f"{type(out).__name__}, not a loss tensor (or a dict with 'loss'): pass "
                        "PadCallback(loss_fn=lambda module, batch: ...) for IMP's scores")
    return loss


class PadCallback(pl.Callback):
    """Run a :class:`~padnet.integrations.core.PadSchedule` in a Lightning ``Trainer``.

    Takes the arguments of :class:`PadSchedule` (``dynamic_ratio``, ``temperature=(start, end,
    anneal_steps)``, ``imp_mode``, ``end_step``, ``warmup_fraction``, ``loss_fn``, ``aux_weight``
    and the IMP options ``iterations``, ``num_batches``, ``score``...); without ``end_step``
    interleaved IMP ends after ``warmup_fraction`` of ``trainer.estimated_stepping_batches``.
    Steps are optimizer steps (``trainer.global_step``). ``scoring_data=`` (an iterable of
    batches) replaces the scoring batches drawn from ``trainer.train_dataloader``; the default
    loss is :func:`training_step_loss`. The schedule's state is saved in checkpoints and
    restored on ``fit(ckpt_path=...)``.
    """

    def __init__(self, dynamic_ratio: float | None = None, *, scoring_data: Any = None,
                 **schedule_kwargs: Any) -> None:
        schedule_kwargs.setdefault("loss_fn", training_step_loss)
        self.schedule = PadSchedule(dynamic_ratio, **schedule_kwargs)
        self.scoring_data = scoring_data
        self._batches: Any = None
        self._pending: dict[str, Any] | None = None  # a checkpoint's state, applied at start
        self._last_step: int | None = None

    # ---- helpers -------------------------------------------------------------------------
    def _scoring(self, trainer: Any) -> Any:
        if self.scoring_data is not None:
            return self.scoring_data
        if self._batches is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise ValueError("IMP needs scoring batches: the Trainer has no train_dataloader "
                                 "yet; pass PadCallback(scoring_data=...)")
            self._batches = scoring_loader_like(
                loader, seed=self.schedule.imp_options.get("seed", 0))
        return self._batches

    def _total(self, trainer: Any) -> int | None:
        total = trainer.estimated_stepping_batches
        return int(total) if total not in (None, float("inf")) and total >= 1 else None

    def aux_loss(self, pl_module: nn.Module) -> Tensor:
        """``aux_weight * padnet.aux_loss(pl_module)`` for the ``training_step``; zero while IMP
        scores (:meth:`PadSchedule.aux_loss`)."""
        return self.schedule.aux_loss(pl_module)

    def logs(self, pl_module: nn.Module) -> dict[str, float]:
        """The values this callback logs, under :data:`LOG_PREFIX`."""
        return {LOG_PREFIX + k: v for k, v in self.schedule.logs(pl_module).items()}

    # ---- hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if (not getattr(pl_module, "automatic_optimization", True) and not self.schedule.imp_done
                and self.schedule.loss_fn is training_step_loss):
            raise ValueError(f"{type(pl_module).__name__} uses manual optimization: its "
                             "training_step steps the optimizers, so IMP cannot score with it; "
                             "pass PadCallback(loss_fn=lambda module, batch: <task loss>)")
        batches = None if self.schedule.imp_done else self._scoring(trainer)
        if self._pending is not None:
            self.schedule.load_state_dict(self._pending, pl_module, batches,
                                          total_steps=self._total(trainer))
            self._pending = None
        self._last_step = trainer.global_step
        self.schedule.on_step(trainer.global_step, pl_module, batches,
                              total_steps=self._total(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        batches = None if self.schedule.imp_done else self._scoring(trainer)
        self.schedule.on_step(step, pl_module, batches, total_steps=self._total(trainer))
        for name, value in self.logs(pl_module).items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return self.schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)
