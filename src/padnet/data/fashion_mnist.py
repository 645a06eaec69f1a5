"""Fashion-MNIST from its four standard IDX files (Xiao et al. 2017, MIT licence).

The files are looked for in, in order: the ``root`` argument, ``$PADNET_DATA/fashion-mnist``,
``./data/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist`` package). Plain or gzip-compressed files are accepted.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FASHION_MNIST_CLASSES", "find_fashion_mnist", "load_fashion_mnist", "read_idx"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "Install it with `apt-get install dataset-fashion-mnist` (files in "
    "/usr/share/datasets/fashion-mnist), or without root `apt-get download dataset-fashion-mnist "
    "&& dpkg -x dataset-fashion-mnist_*.deb DIR` and pass DIR/usr/share/datasets/fashion-mnist; "
    "`make data` (or `python -m padnet.data.fetch --only fashion_mnist`) does the latter into "
    "./data/fashion-mnist."
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (unsigned-byte data, any number of dimensions) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header promises {expected} bytes of data, file has "
                         f"{len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(tuple(dims))


def _candidates(root: str | Path | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    found = []
    if os.environ.get("PADNET_DATA"):
        found.append(Path(os.environ["PADNET_DATA"]) / "fashion-mnist")
    found += [Path("data/fashion-mnist"), Path("/usr/share/datasets/fashion-mnist")]
    return found


def _file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(root: str | Path | None = None) -> Path | None:
    """The first directory holding all four Fashion-MNIST files, or None."""
    for directory in _candidates(root):
        if all(_file(directory, s) for pair in _FILES.values() for s in pair):
            return directory
    return None


def load_fashion_mnist(
    root: str | Path | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of one split (``train``/``test``).

    Raises FileNotFoundError saying how to obtain the data when the files are missing.
    """
    if split not in _FILES:
        raise ValueError(f"split must be one of {tuple(_FILES)}, got {split!r}")
    directory = find_fashion_mnist(root)
    if directory is None:
        where = ", ".join(str(p) for p in _candidates(root))
        raise FileNotFoundError(f"Fashion-MNIST IDX files not found in: {where}. {HOW_TO_GET}")
    images = read_idx(_file(directory, _FILES[split][0]))
    labels = read_idx(_file(directory, _FILES[split][1]))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} "
                         "do not form a data set")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
