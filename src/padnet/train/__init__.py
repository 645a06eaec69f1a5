"""Training: an explicit loop, resumable pickle-free checkpoints, data parallelism, metrics,
and the static / fully dynamic / PAD comparison.

    >>> from padnet.train import load_config, train
    >>> cfg = load_config("configs/demo.yaml", ["--epochs", "1"])
    >>> result = train(cfg)              # writes cfg.out_dir; result.model is the trained model
"""

from padnet.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from padnet.train.compare import CompareResult, compare
from padnet.train.config import ImpConfig, TrainConfig, load_config
from padnet.train.loop import Trainer, TrainResult
from padnet.train.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    matthews_corrcoef,
)
from padnet.train.run import train
from padnet.train.rundir import RunDir
from padnet.train.state import LoopState
from padnet.train.step import evaluate

__all__ = [
    "CompareResult",
    "ImpConfig",
    "LoopState",
    "RunDir",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "accuracy",
    "classification_metrics",
    "compare",
    "confusion_matrix",
    "evaluate",
    "find_checkpoint",
    "load_checkpoint",
    "load_config",
    "macro_f1",
    "matthews_corrcoef",
    "save_checkpoint",
    "train",
]
