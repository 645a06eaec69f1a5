"""Deterministic train/val/test splits by seed, subset sampling, label encoding and DatasetSplits.

Every split is a function of ``(number of examples, seed, fractions)`` only: the same seed gives the
same validation set whatever ``subset`` is, so runs with different training budgets are evaluated on
identical held-out examples. Permutations come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DatasetSplits", "SplitIndices", "check_fraction", "check_subset", "encode_labels",
    "make_split_indices", "split_indices", "subset_indices",
]


@dataclass
class DatasetSplits:
    """The splits of one data set and what a training loop needs to consume them.

    ``collate`` turns a list of items into a batch: images give ``(x float (B, C, H, W),
    y int64 (B,))``; text gives ``dict(input_ids, attention_mask, labels)`` padded to the longest
    sequence in the batch. ``input_shape`` is ``(C, H, W)`` for images and None for text.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int
    class_names: list[str]
    kind: str
    collate: Callable[[list], Any]
    input_shape: tuple[int, int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitIndices:
    """Sorted example indices (int64 tensors) of each split; ``val``/``test`` may be empty."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def check_fraction(arg: str, value: float) -> float:
    """Return ``value`` as a float if it lies in [0, 1), else raise ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{arg} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_subset(subset: int | None) -> int | None:
    """Return ``subset`` if it is None or an int >= 1, else raise ValueError."""
    if subset is None:
        return None
    if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or subset < 1:
        raise ValueError(f"subset must be None or an int >= 1, got {subset!r}")
    return int(subset)


def _count(n: int, fraction: float) -> int:
    """round(n * fraction), but at least one example for a positive fraction."""
    return 0 if fraction == 0.0 else max(1, int(round(n * fraction)))


def split_indices(
    n: int, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.0
) -> SplitIndices:
    """Split ``range(n)`` at random (by ``seed``) into train, val and test index sets.

    The validation set holds ``round(n * val_fraction)`` examples (at least one when the fraction is
    positive), the test set likewise; the rest is training data, which must not be empty.
    """
    val_fraction = check_fraction("val_fraction", val_fraction)
    test_fraction = check_fraction("test_fraction", test_fraction)
    n_val, n_test = _count(n, val_fraction), _count(n, test_fraction)
    if n - n_val - n_test < 1:
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training "
            f"examples out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    parts = perm[:n_val], perm[n_val:n_val + n_test], perm[n_val + n_test:]
    val, test, train = (torch.from_numpy(np.sort(p)).long() for p in parts)
    return SplitIndices(train=train, val=val, test=test)


def subset_indices(indices: torch.Tensor, subset: int | None, *, seed: int = 0) -> torch.Tensor:
    """At most ``subset`` of ``indices``, drawn without replacement by ``seed``, sorted.

    Nested: for one seed the examples kept for ``subset=k`` include those kept for any smaller k.
    """
    subset = check_subset(subset)
    if subset is None or subset >= len(indices):
        return indices
    # An independent stream (seed, 1) so the choice does not depend on how the split was drawn.
    order = np.random.default_rng([seed, 1]).permutation(len(indices))[:subset]
    return indices[torch.from_numpy(np.sort(order))]


def _sort_key(value: str) -> tuple[int, int | str]:
    try:
        return (0, int(value))
    except ValueError:
        return (1, value)


def check_integer_labels(keys: Sequence[str], source: str) -> None:
    """Refuse negative labels and a lone 255 next to classes ``0, 1, ...`` (markers of examples
    to ignore, not classes) and warn when integer labels are not ``0..C-1`` (e.g. -1/1 labels).
    ``keys``: the distinct labels, sorted."""
    ints = [int(k) for k in keys if _sort_key(k)[0] == 0]
    if len(ints) != len(keys) or not ints:
        return
    others = [v for v in ints if v != 255]
    if 0 in ints and (ints[0] < 0 or (255 in ints and max(others) < 64)):
        bad = ints[0] if ints[0] < 0 else 255
        raise ValueError(f"{source}: label {bad} looks like a marker of examples to ignore, not a "
                         f"class (labels: {ints[:8]}{'...' if len(ints) > 8 else ''}); remove "
                         "those examples or give every example a class")
    if ints != list(range(len(ints))):
        warnings.warn(f"{source}: integer labels {ints[:8]}{'...' if len(ints) > 8 else ''} are "
                      f"not 0..{len(ints) - 1}; they are mapped to 0..{len(ints) - 1} in sorted "
                      "order", UserWarning, stacklevel=3)


def encode_labels(
    values: Sequence[Any] | np.ndarray, source: str = "labels",
) -> tuple[torch.Tensor, list[str], dict[str, int]]:
    """Map raw labels to ``0..C-1`` in sorted order.

    Labels are compared as stripped strings; those that parse as integers sort numerically
    (``-1 < 1 < 10``) and before the others, which sort lexicographically. Integer labels are
    checked with :func:`check_integer_labels` (``source`` names the data in messages). Returns the
    codes ``(N,)`` int64, the class names (in code order) and the mapping ``{name: code}``.
    """
    names = [str(v.item() if isinstance(v, np.generic) else v).strip() for v in values]
    if not names:
        raise ValueError("no labels: the data set is empty")
    keys = sorted(set(names), key=_sort_key)  # integers first (numerically), then strings
    check_integer_labels(keys, source)
    mapping = {k: i for i, k in enumerate(keys)}
    codes = torch.tensor([mapping[n] for n in names], dtype=torch.int64)
    return codes, keys, mapping


def make_split_indices(
    n: int,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    subset: int | None,
    has_test: bool,
) -> SplitIndices:
    """Split indices for a data set of ``n`` examples; ``test_fraction`` is ignored (0) when the
    data set has its own test split (``has_test``). ``subset`` caps the training indices only."""
    check_fraction("test_fraction", test_fraction)
    parts = split_indices(n, seed=seed, val_fraction=val_fraction,
                          test_fraction=0.0 if has_test else test_fraction)
    return SplitIndices(train=subset_indices(parts.train, subset, seed=seed),
                        val=parts.val, test=parts.test)
