"""PAD-Net in the Hugging Face ``Trainer`` (docs/integrations.md).

* :class:`PadCallback`: a ``TrainerCallback`` running a :class:`~padnet.integrations.core.
  PadSchedule`: router temperature annealing (docs/method.md §2.1), interleaved or one-shot IMP
  (§4, §4.5) scoring batches of the Trainer's training set with the model's own loss, and the
  current dynamic ratio, temperature and IMP iteration in the Trainer's logs (``padnet/...``).
  It keeps the conversion record in ``model.config`` up to date, so every checkpoint and
  ``trainer.save_model()`` directory loads back with :func:`load_pretrained`.
* :class:`PadTrainer`: a ``Trainer`` whose training loss is the model's loss plus
  ``aux_weight * padnet.aux_loss(model)`` (the MoE auxiliary losses, §2.2; with gradient
  accumulation, their mean over the micro-batches of a step); evaluation losses stay the model's
  own. It also puts the callback's values into the logs before any reporter sees
  them. A Trainer subclass of your own gets the same with :class:`PadLossMixin`.
* :func:`save_pretrained`, :func:`load_pretrained` (= ``padnet.from_pretrained``),
  :func:`attach_record`: the round trip of :mod:`padnet.integrations.hf_io`.

Needs ``transformers`` and, for its Trainer, ``accelerate`` (``pip install 'padnet[hf]'``)::

    padnet.dynamize(model, "moe", num_experts=4, top_k=2)
    pad = PadCallback(dynamic_ratio=0.3, iterations=3, num_batches=2)
    trainer = PadTrainer(model=model, args=args, train_dataset=train, callbacks=[pad])
    trainer.train()
    trainer.save_model("out")            # padnet.from_pretrained("out") rebuilds it
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError:
    raise ImportError("padnet.integrations.hf needs transformers (and accelerate for its "
                      "Trainer): pip install 'padnet[hf]'") from None

from padnet.integrations.core import PadSchedule, scoring_loader_like
from padnet.integrations.hf_io import attach_record, load_pretrained, save_pretrained

__all__ = ["LOG_PREFIX", "SCHEDULE_FILE", "PadCallback", "PadLossMixin", "PadTrainer",
           "attach_record", "load_pretrained", "save_pretrained"]

#: Prefix of the keys the callback adds to the Trainer's logs.
LOG_PREFIX = "padnet/"

#: The file in each checkpoint directory that holds the schedule's progress.
SCHEDULE_FILE = "padnet_schedule.json"


class PadCallback(TrainerCallback):
    """Run a :class:`~padnet.integrations.core.PadSchedule` inside ``transformers.Trainer``.

    Takes the arguments of :class:`PadSchedule` (``dynamic_ratio``, ``temperature=(start, end,
    anneal_steps)``, ``imp_mode``, ``end_step``, ``warmup_fraction``, ``loss_fn`` and the IMP
    options ``iterations``, ``num_batches``, ``score``...); without ``end_step`` interleaved IMP
    ends after ``warmup_fraction`` of the Trainer's ``max_steps``. Steps are optimizer steps
    (``state.global_step``). IMP scores batches of the training set drawn in an order of its
    own (seed ``args.seed``, batch size ``per_device_train_batch_size``; ``scoring_data=`` an
    iterable of batches replaces them); its default loss is the model's own (``model(**batch)
    .loss``). ``seed`` defaults to ``args.seed``. ``attach_record=False`` leaves
    ``model.config`` alone (for PAD layers the conversion record does not know).

    Each checkpoint directory gets the schedule's progress (:data:`SCHEDULE_FILE`, JSON; the
    masks are in the weights), and a run resumed from ``<output_dir>/checkpoint-<step>``
    continues IMP where it stood. Resumed from elsewhere, IMP iterations due before the resumed
    step run at once (with a warning).
    """

    def __init__(self, dynamic_ratio: float | None = None, *, scoring_data: Any = None,
                 attach_record: bool = True, **schedule_kwargs: Any) -> None:
        self._seed_given = "seed" in schedule_kwargs
        self.schedule = PadSchedule(dynamic_ratio, **schedule_kwargs)
        self.scoring_data = scoring_data
        self.attach = bool(attach_record)
        self._batches: Any = None

    # ---- helpers -------------------------------------------------------------------------
    def _scoring(self, args: Any, train_dataloader: Any) -> Any:
        if self.scoring_data is not None:
            return self.scoring_data
        if self._batches is None and train_dataloader is not None:
            self._batches = scoring_loader_like(
                train_dataloader, batch_size=args.per_device_train_batch_size, seed=args.seed)
        return self._batches

    def _attach(self, model: nn.Module | None) -> None:
        config = getattr(model, "config", None)
        if self.attach and callable(getattr(config, "to_json_string", None)):  # a HF model
            try:
                attach_record(model)
            except ValueError as err:
                raise ValueError(f"{err} (or pass PadCallback(attach_record=False) to train "
                                 "without the record)") from None

    def logs(self, model: nn.Module) -> dict[str, float]:
        """The values this callback logs, under :data:`LOG_PREFIX`."""
        return {LOG_PREFIX + k: v for k, v in self.schedule.logs(model).items()}

    @staticmethod
    def _checkpoint_dir(args: Any, state: Any) -> Path:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    def _resume(self, args: Any, state: Any, model: nn.Module, batches: Any) -> None:
        """Load the schedule's progress saved with the checkpoint of ``state.global_step``."""
        path = self._checkpoint_dir(args, state) / SCHEDULE_FILE
        if not path.is_file():
            warnings.warn(f"resuming at step {state.global_step} without {path}: the IMP "
                          "iterations due so far run now", stacklevel=2)
            return
        saved = json.loads(path.read_text())
        if saved.get("partition") is not None:  # the masks came back with the weights
            from padnet.layers import find_pad_weights

            saved["partition"]["masks"] = {w.name: w.mode_mask.mask.detach().cpu().clone()
                                           for w in find_pad_weights(model)}
        self.schedule.load_state_dict(saved, model, batches,
                                      total_steps=max(state.max_steps, 1))

    # ---- events --------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if not self._seed_given and self.schedule.dynamic_ratio is not None:
            self.schedule.imp_options["seed"] = args.seed
        self._attach(model)
        batches = None if self.schedule.imp_done else self._scoring(args, train_dataloader)
        if state.global_step > 0 and self.schedule.last_step is None and batches is not None:
            self._resume(args, state, model, batches)
        self.schedule.on_step(state.global_step, model, batches,
                              total_steps=max(state.max_steps, 1))

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                    train_dataloader: Any = None, **kwargs: Any) -> None:
        batches = None if self.schedule.imp_done else self._scoring(args, train_dataloader)
        self.schedule.on_step(state.global_step, model, batches,
                              total_steps=max(state.max_steps, 1))
        if control.should_save:  # the checkpoint saved next gets the current record
            self._attach(model)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from padnet.utils.io import save_json

        directory = self._checkpoint_dir(args, state)
        if not args.should_save or not directory.is_dir():
            return
        progress = self.schedule.state_dict()
        if progress["partition"] is not None:
            progress["partition"] = {k: v for k, v in progress["partition"].items()
                                     if k != "masks"}
        save_json(directory / SCHEDULE_FILE, progress)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               model: nn.Module = None, **kwargs: Any) -> None:
        if logs is None or model is None:
            return
        values = self.logs(model)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module = None,
                     **kwargs: Any) -> None:
        self._attach(model)


class PadLossMixin:
    """Mixin for a ``transformers.Trainer`` subclass: adds ``aux_weight *
    padnet.aux_loss(model)`` to the training loss (not to evaluation losses) and the values of
    any :class:`PadCallback` to the logs. Put it before ``Trainer`` in the bases."""

    aux_weight: float = 1.0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any],
                     return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training and self.aux_weight:
            from padnet.layers import aux_loss

            aux = self.aux_weight * aux_loss(model).to(loss.dtype)
            if self._loss_scaled_for_ga(num_items_in_batch):
                # the Trainer will not divide this loss by the accumulation steps: divide the
                # per-micro-batch aux loss here, so a step gets the mean over its micro-batches
                aux = aux / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + aux
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """The Trainer's own rule (``training_step``) for a loss that it does not divide by
        the gradient accumulation steps."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool((getattr(self, "model_accepts_loss_kwargs", False)
                     and num_items_in_batch is not None)
                    or getattr(self, "compute_loss_func", None) is not None)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, PadCallback):
                logs.update(cb.logs(self.model))
        super().log(logs, *args, **kwargs)


class PadTrainer(PadLossMixin, Trainer):
    """``transformers.Trainer`` plus the MoE auxiliary losses in the training loss
    (``aux_weight``, default 1: the layers' own coefficients weight them already) and the
    :class:`PadCallback` values in every log. Other arguments as ``Trainer``."""

    def __init__(self, *args: Any, aux_weight: float = 1.0, **kwargs: Any) -> None:
        from padnet.utils.checks import check_number

        self.aux_weight = check_number(aux_weight, "aux_weight", minimum=0)
        super().__init__(*args, **kwargs)

