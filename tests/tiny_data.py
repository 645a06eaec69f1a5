"""Tiny generated image data for the tests that train a run: grey 8x8 images of 3 classes whose
brightness depends on the class (so a few steps of training learn something)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_npz(path: Path, n: int = 96, *, test: int = 0) -> Path:
    """Write ``n`` images (the last ``test`` of them as an own test split) to the ``.npz`` at
    ``path``; returns ``path``."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = (rng.random((n, 8, 8)) * 80 + y[:, None, None] * 60).astype(np.uint8)
    if test:
        np.savez(path, x=x[:-test], y=y[:-test], x_test=x[-test:], y_test=y[-test:])
    else:
        np.savez(path, x=x, y=y)
    return path
