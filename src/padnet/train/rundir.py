"""The run directory: ``config.yaml``, ``metrics.csv``, ``checkpoint/`` (via
:mod:`padnet.train.checkpoint`), the final ``model.safetensors`` (config and model info in its
header) and ``summary.json``. Every file is written atomically, and only by the main process
(``is_main``: rank 0 under torchrun); on other ranks the writing methods do nothing.

A directory holding any of these files (:data:`RUN_FILES`, or a checkpoint directory) is a run:
a fresh run refuses it without ``overwrite``, so nothing a user had is removed unasked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from padnet.train import checkpoint as ckpt
from padnet.train.config import TrainConfig
from padnet.utils.io import atomic_write, remove_stale_temporaries, save_json, save_safetensors

__all__ = ["METRIC_COLUMNS", "RUN_FILES", "RunDir", "model_info", "weights_metadata"]

#: the files of a run directory besides its checkpoint directories
RUN_FILES = ("config.yaml", "metrics.csv", "model.safetensors", "summary.json")

METRIC_COLUMNS = (
    "epoch", "step", "lr", "temperature", "dynamic_ratio", "train_loss", "train_acc", "aux_loss",
    "val_loss", "val_acc", "val_f1", "val_mcc", "test_loss", "test_acc", "test_f1", "test_mcc",
    "epoch_time_s",
)


def model_info(splits: Any, in_chans: int | None) -> dict[str, Any]:
    """What rebuilding a model needs besides its config (classes, input shape)."""
    return {"num_classes": splits.num_classes, "in_chans": in_chans, "kind": splits.kind,
            "input_shape": list(splits.input_shape) if splits.input_shape else None,
            "class_names": list(splits.class_names)}


def weights_metadata(cfg: TrainConfig, info: dict[str, Any]) -> dict[str, str]:
    """Header of a saved ``model.safetensors``: config and model info as JSON strings."""
    return {"padnet_config": json.dumps(cfg.to_dict()), "padnet_model_info": json.dumps(info)}


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@dataclass(frozen=True)
class RunDir:
    """The files of one run under ``path``; only the main process writes them."""

    path: Path
    is_main: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def weights_file(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    # ---- reading -------------------------------------------------------------------------
    def find_checkpoint(self) -> Path | None:
        """The newest complete checkpoint directory, or None."""
        return ckpt.find_checkpoint(self.path)

    def run_files(self) -> list[Path]:
        """The files and checkpoint directories of a run found in the directory."""
        names = (*RUN_FILES, *ckpt.CHECKPOINT_NAMES)
        return [self.path / n for n in names if (self.path / n).exists()]

    def recorded_config(self) -> TrainConfig | None:
        """The run's own config: ``config.yaml``, else the one recorded in its newest complete
        checkpoint; None when it has neither."""
        from padnet.train.config import load_config

        if self.config_file.is_file():
            return load_config(self.config_file)
        found = self.find_checkpoint()
        if found is None:
            return None
        data = json.loads((found / "state.json").read_text()).get("state", {}).get("config")
        return TrainConfig.from_dict(data) if isinstance(data, dict) else None

    def recorded_config_source(self) -> str:
        """Where :meth:`recorded_config` reads the run's config (for messages)."""
        return str(self.config_file) if self.config_file.is_file() else "its checkpoint"

    def prepare(self, *, resume: bool, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None for a fresh run).

        Raises ValueError when ``path`` is a file, or when a fresh run would replace a run (any
        of its files) without ``overwrite``; FileNotFoundError (or CorruptFileError naming the
        damaged files) when resuming finds no complete checkpoint. On the main process stale
        temporary files of a killed write are removed and, when resuming, the checkpoints
        settled (:func:`~padnet.train.checkpoint.settle_checkpoints`).
        """
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out_dir {self.path} is a file, not a directory: choose another "
                             "out_dir (or --resume RUN_DIR)")
        if resume:
            if self.is_main:
                remove_stale_temporaries(self.path)
                ckpt.settle_checkpoints(self.path)
            found = self.find_checkpoint()
            if found is None:
                ckpt.load_latest_checkpoint(self.path)  # raises, naming damaged files
            return found
        existing = self.run_files()
        if existing and not overwrite:
            names = ", ".join(p.name for p in existing)
            raise ValueError(f"{self.path} already holds a run ({names}); pass --resume to "
                             "continue it, --overwrite to replace it, or choose another out_dir")
        if self.is_main:
            remove_stale_temporaries(self.path)
            for name in ckpt.CHECKPOINT_NAMES:
                remove_stale_temporaries(self.path / name)
        return None

    # ---- writing (main process only) -----------------------------------------------------
    def clear(self) -> None:
        """Remove the files of an earlier run (checkpoints, final weights, metrics, summary;
        ``config.yaml`` is written anew by the run)."""
        if self.is_main:
            for name in ckpt.CHECKPOINT_NAMES:
                shutil.rmtree(self.path / name, ignore_errors=True)
            for name in ("model.safetensors", "metrics.csv", "summary.json"):
                (self.path / name).unlink(missing_ok=True)

    def write_config(self, cfg: TrainConfig) -> None:
        """``config.yaml`` without ``stop_after`` (a way to interrupt a run, not part of the
        experiment: ``--resume RUN_DIR`` then runs to the end)."""
        if self.is_main:
            _write_text(self.config_file, cfg.replace(stop_after=0).to_yaml())

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        """``metrics.csv``: one row per epoch, columns :data:`METRIC_COLUMNS`."""
        if self.is_main:
            lines = [",".join(METRIC_COLUMNS)]
            lines += [",".join(_cell(row.get(k)) for k in METRIC_COLUMNS) for row in history]
            _write_text(self.metrics_file, "\n".join(lines) + "\n")

    def write_checkpoint(self, model_state: dict[str, Tensor], state: dict[str, Any], *,
                         step: int, metadata: dict[str, str]) -> None:
        """``checkpoint/`` (see :func:`padnet.train.checkpoint.save_checkpoint`)."""
        if self.is_main:
            ckpt.save_checkpoint(self.path, model_state, state, step=step, metadata=metadata)

    def write_weights(self, model_state: dict[str, Tensor], metadata: dict[str, str]) -> None:
        """The final ``model.safetensors``."""
        if self.is_main:
            save_safetensors(self.weights_file, model_state, metadata)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """``summary.json``."""
        if self.is_main:
            save_json(self.summary_file, summary)
