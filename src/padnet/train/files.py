"""Run-directory files written by the :class:`~padnet.train.loop.Trainer` (rank 0 only):
``config.yaml``, ``metrics.csv``, ``checkpoint/`` (via :mod:`padnet.train.checkpoint`), the final
``model.safetensors`` (config and model info in its header) and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from padnet.train import checkpoint as ckpt
from padnet.utils.io import atomic_write, save_json, save_safetensors

__all__ = ["METRIC_COLUMNS", "RunFiles"]

METRIC_COLUMNS = (
    "epoch", "step", "lr", "temperature", "dynamic_ratio", "train_loss", "train_acc", "aux_loss",
    "val_loss", "val_acc", "val_f1", "val_mcc", "test_loss", "test_acc", "test_f1", "test_mcc",
    "epoch_time_s",
)


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class RunFiles:
    """Mixin of :class:`~padnet.train.loop.Trainer`: everything it reads from and writes to its
    run directory. Expects ``cfg``, ``dist``, ``run_dir``, ``model``, ``optimizer``, ``scaler``,
    ``imp``, ``imp_result``, ``splits``, ``in_chans``, ``loop``, ``steps_per_epoch``, ``log``,
    ``global_sums`` and ``_zero_sums``."""

    def model_info(self) -> dict[str, Any]:
        """What rebuilding the model needs besides the config (classes, input shape)."""
        s = self.splits
        return {"num_classes": s.num_classes, "in_chans": self.in_chans, "kind": s.kind,
                "input_shape": list(s.input_shape) if s.input_shape else None,
                "class_names": list(s.class_names)}

    def weights_metadata(self) -> dict[str, str]:
        """Header of the saved ``model.safetensors``: config and model info as JSON strings."""
        return {"padnet_config": json.dumps(self.cfg.to_dict()),
                "padnet_model_info": json.dumps(self.model_info())}

    def write_metrics(self) -> None:
        """Rewrite ``metrics.csv`` from the history (rank 0)."""
        if not self.dist.is_main:
            return
        lines = [",".join(METRIC_COLUMNS)]
        for row in self.loop["history"]:
            lines.append(",".join(_cell(row.get(k)) for k in METRIC_COLUMNS))
        text = "\n".join(lines) + "\n"
        atomic_write(self.run_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(text))

    def write_config(self) -> None:
        """Write ``config.yaml`` (rank 0), without ``stop_after`` (a way to interrupt a run,
        not part of the experiment: ``--resume RUN_DIR`` then runs to the end)."""
        if self.dist.is_main:
            text = self.cfg.replace(stop_after=0).to_yaml()
            atomic_write(self.run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))

    def save_checkpoint(self) -> None:
        """Write ``checkpoint/`` and ``metrics.csv`` (rank 0; every rank must call it: the
        epoch's running sums are added over ranks first)."""
        loop = {**self.loop, "sums": self.global_sums()}
        if not self.dist.is_main:
            return
        state = {"optimizer": self.optimizer.state_dict(), "rng": ckpt.rng_state(),
                 "loop": loop, "config": self.cfg.to_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "imp": self.imp.state_dict() if self.imp is not None else None,
                 "imp_result": self.imp_result.to_dict() if self.imp_result else None}
        ckpt.save_checkpoint(self.run_dir, self.model.state_dict(), state,
                             step=self.loop["global_step"], metadata=self.weights_metadata())
        self.write_metrics()

    def resume(self, directory: Path) -> None:
        """Load weights, optimizer, scaler, IMP, loop counters and RNG states."""
        model_state, state, step = ckpt.load_checkpoint(directory)
        try:
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"the checkpoint in {directory} does not fit the model and "
                             f"optimizer of this config (was the config changed?): "
                             f"{str(err).splitlines()[0]}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.imp is not None and state.get("imp"):
            self.imp.load_state_dict(state["imp"])
            self.imp_result = self.imp.result
        self.loop = state["loop"]
        self.loop["global_step"] = step
        if not self.dist.is_main:  # the saved sums are over all ranks: count them once
            self.loop["sums"] = self._zero_sums()
        if state.get("imp_result") and self.imp is None:
            self.imp_result = state["imp_result"]
        ckpt.set_rng_state(state["rng"])
        self.log(f"resumed {self.run_dir} at step {step} (epoch {self.loop['epoch'] + 1}, "
                 f"step {self.loop['step_in_epoch']} of {self.steps_per_epoch})")

    def finish(self) -> dict[str, Any]:
        """Write the final ``model.safetensors`` and ``summary.json`` (rank 0); the summary."""
        import padnet

        s, history = self.splits, self.loop["history"]
        info = self.model_info()
        imp = self.imp_result
        summary = _json_safe({
            "config": self.cfg.to_dict(), **info, "data": s.info,
            "final": history[-1] if history else {},
            "best_val_acc": max((r["val_acc"] for r in history if "val_acc" in r), default=None),
            "stats": padnet.stats(self.model).to_dict()["total"],
            "imp": imp.to_dict() if hasattr(imp, "to_dict") else imp,
            "steps": self.loop["global_step"], "train_time_s": self.loop["train_time_s"],
            "world_size": self.dist.world_size, "device": str(self.device)})
        if self.dist.is_main:
            save_safetensors(self.run_dir / "model.safetensors", self.model.state_dict(),
                             self.weights_metadata())
            save_json(self.run_dir / "summary.json", summary)
            self.write_metrics()
        return summary
