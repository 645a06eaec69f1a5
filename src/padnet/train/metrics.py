"""Classification metrics from a confusion matrix: accuracy, macro F1, Matthews correlation.

Everything is computed from the ``(C, C)`` confusion matrix (rows: true class, columns:
predicted class), so that data-parallel ranks only add up their matrices before computing.
Degenerate cases follow scikit-learn: macro F1 averages over the classes that occur in the
targets or the predictions (as ``f1_score(average="macro")`` without ``labels=``); MCC is 0 when
its denominator is 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "classification_metrics",
    "confusion_matrix",
    "macro_f1",
    "matthews_corrcoef",
]


def confusion_matrix(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` int64 counts; entry ``[t, p]`` counts samples of true class t predicted as p.

    ``preds`` and ``targets``: int tensors of the same shape with values in ``[0, C)``.
    """
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} differ")
    p, t = preds.reshape(-1).long(), targets.reshape(-1).long()
    if p.numel() and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes})")
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).cpu()


def accuracy(cm: Tensor) -> float:
    """Fraction of correct predictions (0 for an empty matrix)."""
    total = int(cm.sum())
    return float(cm.diagonal().sum()) / total if total else 0.0


def macro_f1(cm: Tensor) -> float:
    """Unweighted mean of ``2 TP / (2 TP + FP + FN)`` over the classes present in the targets or
    the predictions (classes absent from both are left out, as in scikit-learn); 0 when none."""
    cm = cm.double()
    tp = cm.diagonal()
    denom = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)  # 2TP + FP + FN
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean()) if present.any() else 0.0


def matthews_corrcoef(cm: Tensor) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); equals the binary MCC for C = 2."""
    cm = cm.double()
    n = cm.sum()
    correct = cm.diagonal().sum()
    pred, true = cm.sum(0), cm.sum(1)  # per-class predicted / true counts
    cov_ytyp = correct * n - (pred * true).sum()
    cov_ypyp = n * n - (pred * pred).sum()
    cov_ytyt = n * n - (true * true).sum()
    denom = math.sqrt(float(cov_ypyp) * float(cov_ytyt))
    return float(cov_ytyp) / denom if denom > 0 else 0.0


def classification_metrics(cm: Tensor) -> dict[str, float]:
    """``{'acc', 'f1', 'mcc'}`` of a confusion matrix."""
    return {"acc": accuracy(cm), "f1": macro_f1(cm), "mcc": matthews_corrcoef(cm)}
