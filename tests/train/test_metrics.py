"""Accuracy, macro F1 and Matthews correlation against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from padnet.train.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    matthews_corrcoef,
)


def test_binary_case_by_hand():
    # TP = 3, FN = 1, FP = 2, TN = 4 (class 1 positive)
    targets = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    preds = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    cm = confusion_matrix(preds, targets, 2)
    assert cm.tolist() == [[4, 2], [1, 3]]
    assert accuracy(cm) == pytest.approx(0.7)
    f1_pos, f1_neg = 2 * 3 / (2 * 3 + 2 + 1), 2 * 4 / (2 * 4 + 1 + 2)
    assert macro_f1(cm) == pytest.approx((f1_pos + f1_neg) / 2)
    assert matthews_corrcoef(cm) == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))


def test_three_classes_by_hand():
    cm = torch.tensor([[2, 1, 0], [0, 1, 1], [1, 0, 2]])
    # n = 8, correct = 5, row and column sums (3, 2, 3): (5*8 - 22) / (64 - 22)
    assert matthews_corrcoef(cm) == pytest.approx(18 / 42)
    assert macro_f1(cm) == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)
    assert classification_metrics(cm)["acc"] == pytest.approx(5 / 8)


def test_degenerate_cases():
    y = torch.tensor([0, 1, 2, 1])
    perfect = confusion_matrix(y, y, 3)
    assert classification_metrics(perfect) == {"acc": 1.0, "f1": 1.0, "mcc": 1.0}
    constant = confusion_matrix(torch.zeros(4, dtype=torch.long), y, 3)
    assert matthews_corrcoef(constant) == 0.0  # zero denominator
    inverse = confusion_matrix(1 - torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 1, 0]), 2)
    assert matthews_corrcoef(inverse) == pytest.approx(-1.0)
    assert accuracy(torch.zeros(2, 2, dtype=torch.long)) == 0.0


def test_macro_f1_leaves_out_classes_absent_from_targets_and_predictions():
    # scikit-learn: f1_score([0, 1, 0, 1], [0, 1, 1, 1], average="macro") == 0.7333...
    cm = confusion_matrix(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 1]), 3)
    assert macro_f1(cm) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3)) == 1.0
    assert macro_f1(torch.zeros(3, 3, dtype=torch.long)) == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="class indices"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 2)
