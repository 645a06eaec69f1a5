"""Iterative Mode Partition (IMP, docs/method.md §4): score every mask position on a few batches,
keep the best ``round(kappa_t * N)`` dynamic, repeat for t = 1..T with a falling kappa_t.

* :func:`partition_model`: one shot; all T iterations on the model as it is, over the same batches.
* :class:`IterativePartition`: interleaved with training; the loop calls its ``step()`` once
  per training step and iteration t runs at its scheduled step (see
  :mod:`padnet.partition.schedule`), so the network trains between iterations.

Each iteration re-scores every position (static ones may turn dynamic again); after the last one
the masks are left alone (they are buffers: no optimizer touches them). Scores use the task loss
only (no auxiliary MoE losses). The scoring pass puts the model in eval mode (``bn_mode='eval'``)
or in train mode with every normalisation buffer restored afterwards (``'train'``), draws its
randomness (dropout, router noise) from a seeded, forked RNG and leaves no ``.grad`` behind.
Under ``torch.distributed`` the summed mask gradients and Theta_hat moments are all-reduced before
thresholding, so every rank computes the same mask. A DDP wrapper is unwrapped for scoring.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from padnet.layers.protocol import PadWeight, find_pad_weights
from padnet.partition import scores as S
from padnet.partition.data import BatchSource, resolve_loss_fn, scoring_context, to_device
from padnet.partition.observe import LossFn, PassResult, all_reduce_sum, scoring_pass
from padnet.partition.report import PartitionResult
from padnet.partition.schedule import SCHEDULES, iteration_steps, kappa_schedule
from padnet.utils.checks import check_choice, check_int, check_optional

__all__ = ["OPTIONS", "IterativePartition", "partition_model"]

#: Allowed values of the string options (scores: the names in :data:`~.scores.SCORES`).
OPTIONS: dict[str, tuple[str, ...]] = {
    "schedule": SCHEDULES,
    "scope": ("global", "layer"),
    "granularity": ("element", "channel"),
    "static_init": ("keep", "mean"),
    "bn_mode": ("eval", "train"),
}


class IterativePartition:
    """IMP interleaved with training; call :meth:`step` once per training step.

    Iteration t runs after ``step_t = start_step + round(t * (end_step - start_step) / T)``
    training steps, each scoring on the next ``num_batches`` batches of ``data`` (cycled; None:
    one full pass). ``bn_mode`` defaults to ``'train'`` here (running statistics are poor early
    in training). Options as :func:`partition`; ``state_dict``/``load_state_dict`` resume it.
    """

    def __init__(
        self, model: nn.Module, data: Iterable, *, dynamic_ratio: float,
        loss_fn: LossFn | None = None, iterations: int = 5, start_step: int = 0,
        end_step: int = 1000, num_batches: int | None = 4, schedule: str = "exponential",
        scope: str = "global", granularity: str = "element", score: str = "taylor",
        static_init: str = "keep", bn_mode: str = "train", seed: int = 0, normalize: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.kappas = kappa_schedule(dynamic_ratio, iterations, schedule)
        self.schedule_steps = iteration_steps(iterations, start_step, end_step)
        opts = {"schedule": schedule, "scope": scope, "granularity": granularity, "score": score,
                "static_init": static_init, "bn_mode": bn_mode}
        for key, value in opts.items():
            check_choice(value, key, S.SCORES.names() if key == "score" else OPTIONS[key])
        check_optional(num_batches, check_int, "num_batches", 1)
        check_int(seed, "seed")
        self.entries: list[PadWeight] = find_pad_weights(model)
        if not self.entries:
            raise ValueError("model has no PAD layers: call padnet.dynamize(model) first")
        self.config = {"dynamic_ratio": float(dynamic_ratio), "iterations": iterations,
                       "start_step": start_step, "end_step": end_step, "num_batches": num_batches,
                       **opts, "seed": seed, "normalize": bool(normalize)}
        self.loss_fn = resolve_loss_fn(loss_fn)
        self.source = BatchSource(data, num_batches, cycle=True)
        self.steps_done = 0
        self.result = PartitionResult(
            layers=[e.name for e in self.entries],
            numel=[e.mode_mask.numel for e in self.entries],
            num_dynamic=[e.mode_mask.num_dynamic for e in self.entries], iterations=iterations,
            scope=scope, granularity=granularity, score=score)

    # ---- progress ------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Number of iterations run so far (0..T)."""
        return self.result.iteration

    @property
    def done(self) -> bool:
        """True once all T iterations ran; the masks are final."""
        return self.iteration >= len(self.kappas)

    def step(self) -> PartitionResult | None:
        """Count one training step; run every iteration now due. Returns the result after an
        iteration ran, else None (always None once :attr:`done`)."""
        self.steps_done += 1
        ran = None
        while not self.done and self.steps_done >= self.schedule_steps[self.iteration]:
            ran = self.run_iteration()
        return ran

    def run_iteration(self) -> PartitionResult:
        """Run the next iteration now, whatever the step count; returns a snapshot of
        :attr:`result` (per-layer counts, scores summary, history)."""
        if self.done:
            raise RuntimeError(f"all {len(self.kappas)} IMP iterations already ran")
        t = self.iteration + 1
        kappa = self.kappas[t - 1]
        start = time.perf_counter()
        old = [e.mode_mask.mask.clone() for e in self.entries]
        scores, means = self._score(t)
        ranked, masks = self._select(scores, kappa)
        if self.config["static_init"] == "mean":
            self._mean_init(old, masks, means)
        r = self.result
        for e, m in zip(self.entries, masks, strict=True):
            e.mode_mask.set_mask(m)
        r.num_dynamic = [e.mode_mask.num_dynamic for e in self.entries]
        back = sum(int((~o & m.to(o.device)).sum()) for o, m in zip(old, masks, strict=True))
        away = sum(int((o & ~m.to(o.device)).sum()) for o, m in zip(old, masks, strict=True))
        r.score_summary = {e.name: {"min": float(s.min()), "mean": float(s.mean()),
                                    "max": float(s.max())}
                           for e, s in zip(self.entries, ranked, strict=True) if s.numel()}
        r.flipped_to_dynamic.append(back)
        r.flipped_to_static.append(away)
        r.seconds.append(time.perf_counter() - start)
        r.kappas.append(kappa)
        return copy.deepcopy(r)  # a snapshot; ``self.result`` stays live

    # ---- one iteration -------------------------------------------------------------------
    def _score(self, t: int) -> tuple[list[Tensor], list[Tensor] | None]:
        """Scores ``(shape)`` float64 per PAD weight, and Theta_hat means when needed."""
        cfg, score = self.config, S.SCORES.get(self.config["score"])
        theta = score.needs_theta or cfg["static_init"] == "mean"
        grads = moments = None
        if score.needs_grad or theta:
            res = self._pass(t, grads=score.needs_grad, theta=theta)
            grads = all_reduce_sum(res.grads) if res.grads is not None else None
            if theta:
                flat = all_reduce_sum(res.theta_sums)
                moments = [S.moments(*flat[3 * i:3 * i + 3]) for i in range(len(self.entries))]
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + t)
        scores = [score.fn(S.ScoreInputs(
            e, grads[i] if grads is not None else None,
            *(moments[i] if moments is not None else (None, None)), gen))
            for i, e in enumerate(self.entries)]
        return scores, [m for m, _ in moments] if moments is not None else None

    def _pass(self, t: int, *, grads: bool, theta: bool) -> PassResult:
        """One scoring pass over this iteration's batches, in the scoring context."""
        device = next(self.model.parameters()).device
        seed = self.config["seed"] * 1_000_003 + t
        with scoring_context(self.model, self.config["bn_mode"], seed, device):
            batches = (to_device(b, device) for b in self.source.batches())
            return scoring_pass(self.model, batches, self.entries, self.loss_fn, grads=grads,
                                theta=theta, device=device)

    def _select(self, scores: list[Tensor], kappa: float) -> tuple[list[Tensor], list[Tensor]]:
        """Ranked scores (per position or per channel) and the new boolean masks."""
        channel = self.config["granularity"] == "channel"
        ranked = [S.channel_scores(s) for s in scores] if channel else [s.double() for s in scores]
        if self.config["normalize"] and self.config["scope"] == "global":
            ranked = S.normalize_scores(ranked)
        if self.config["scope"] == "layer":
            chosen = S.select_layerwise(ranked, kappa)
        elif not channel:
            chosen = S.select_global(ranked, kappa)
        else:
            sizes = [e.mode_mask.numel // e.mode_mask.shape[0] for e in self.entries]
            target = round(kappa * sum(e.mode_mask.numel for e in self.entries))
            chosen = S.select_channels_global(ranked, sizes, target)
        if channel:
            chosen = [S.expand_channels(c, e.shape) for c, e in zip(chosen, self.entries,
                                                                    strict=True)]
        return ranked, chosen

    @torch.no_grad()
    def _mean_init(self, old: list[Tensor], new: list[Tensor], means: list[Tensor]) -> None:
        """``W_s[j] = (lam_d / lam_s) * mean_x Theta_hat_j(x)`` where j turns static now."""
        for e, o, m, mean in zip(self.entries, old, new, means, strict=True):
            lam_d, lam_s = (float(v.detach()) for v in e.mode_mask.scales())
            if lam_s == 0.0:  # prune mode: static positions are zero anyway
                continue
            turned = (o & ~m.to(o.device)).to(e.static.device)
            value = (mean * (lam_d / lam_s)).to(device=e.static.device, dtype=e.static.dtype)
            e.static.data[turned] = value[turned]

    # ---- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Progress, configuration, history and masks (plain data and bool tensors)."""
        r = self.result
        return {"version": 1, "config": dict(self.config), "iteration": self.iteration,
                "steps_done": self.steps_done, "batches_consumed": self.source.consumed,
                "history": {"kappas": list(r.kappas), "flipped_to_dynamic":
                            list(r.flipped_to_dynamic), "flipped_to_static":
                            list(r.flipped_to_static), "seconds": list(r.seconds),
                            "score_summary": {k: dict(v) for k, v in r.score_summary.items()}},
                "masks": {e.name: e.mode_mask.mask.detach().cpu().clone() for e in self.entries}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: same configuration required; restores the masks and
        fast-forwards the data iterator past the batches already consumed."""
        for key, value in self.config.items():
            if state["config"].get(key) != value:
                raise ValueError(f"IMP state was saved with {key}={state['config'].get(key)!r}, "
                                 f"this partition has {key}={value!r}")
        names = [e.name for e in self.entries]
        if sorted(state["masks"]) != sorted(names):
            raise ValueError(f"IMP state holds masks of {sorted(state['masks'])}, the model has "
                             f"{sorted(names)}")
        for e in self.entries:
            e.mode_mask.set_mask(state["masks"][e.name])
        h, r = state["history"], self.result
        r.kappas, r.seconds = list(h["kappas"]), list(h["seconds"])
        r.flipped_to_dynamic = list(h["flipped_to_dynamic"])
        r.flipped_to_static = list(h["flipped_to_static"])
        r.score_summary = {k: dict(v) for k, v in h["score_summary"].items()}
        r.num_dynamic = [e.mode_mask.num_dynamic for e in self.entries]
        assert len(r.kappas) == int(state["iteration"])
        self.steps_done = int(state["steps_done"])
        self.source.fast_forward(int(state["batches_consumed"]))


def partition_model(
    model: nn.Module, data: Iterable, *, dynamic_ratio: float, loss_fn: LossFn | None = None,
    iterations: int = 1, schedule: str = "exponential", scope: str = "global",
    granularity: str = "element", score: str = "taylor", static_init: str = "keep",
    num_batches: int | None = None, bn_mode: str = "eval", seed: int = 0, normalize: bool = False,
) -> PartitionResult:
    """One-shot IMP: run all ``iterations`` now, each over the first ``num_batches`` batches of
    ``data`` (all when None), and return the :class:`PartitionResult`.

    Args:
        model: a model with PAD layers (see :func:`padnet.dynamize`); masks change in place.
        data: re-iterable batches: ``(inputs, targets)`` (cross-entropy of ``model(inputs)``),
            dicts (``model(**batch).loss``), or anything ``loss_fn(model, batch)`` takes.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor`` replacing the default loss; a
            PyTorch loss of ``(outputs, targets)`` (``nn.CrossEntropyLoss()``,
            ``F.cross_entropy``...) is applied to ``model(inputs)`` of ``(inputs, targets)``.
        dynamic_ratio: target kappa in [0, 1]. iterations: T >= 1.
        schedule: ``exponential`` or ``linear`` (:mod:`padnet.partition.schedule`).
        scope: ``global`` (one threshold: exactly ``round(kappa_t * N)`` dynamic positions over
            all PAD weights) or ``layer`` (exactly ``round(kappa_t * N_l)`` per weight).
        granularity: ``element`` or ``channel`` (whole output channels / neurons, scored by the
            sum of their positions' scores; global scope follows
            :func:`padnet.partition.scores.select_channels_global`).
        score: ``taylor``, ``variance``, ``magnitude`` or ``random`` (:mod:`.scores`).
        static_init: ``keep`` the stored ``W_s`` or set positions turning static to ``mean``
            ``(lam_d / lam_s) * mean_x Theta_hat(x)`` (skipped where ``lam_s = 0``).
        num_batches: scoring batches per iteration (the first ones of ``data``; None: all).
        bn_mode: ``eval`` or ``train`` (batch statistics; running buffers restored).
        seed: seeds the random score and the scoring pass's RNG. normalize: divide each layer's
            scores by their mean before a global threshold (default: raw, as the authors).
    """
    imp = IterativePartition(
        model, data, dynamic_ratio=dynamic_ratio, loss_fn=loss_fn, iterations=iterations,
        start_step=0, end_step=0, num_batches=num_batches, schedule=schedule, scope=scope,
        granularity=granularity, score=score, static_init=static_init, bn_mode=bn_mode,
        seed=seed, normalize=normalize)
    imp.source = BatchSource(data, num_batches, cycle=False)  # the same batches every iteration
    while not imp.done:
        imp.run_iteration()
    return imp.result
