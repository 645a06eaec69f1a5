"""Fashion-MNIST IDX reader on small generated files, the missing-file error, and real data."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from padnet.data import find_fashion_mnist, load_fashion_mnist
from padnet.data.fashion_mnist import read_idx


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fake_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n, gz in (("train", 12, True), ("t10k", 5, False)):
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), gz)
    return tmp_path


def test_loads_gzip_files(fake_dir):
    x, y = load_fashion_mnist(fake_dir, "train")
    assert x.shape == (12, 28, 28) and x.dtype.is_floating_point is False
    assert y.shape == (12,) and int(y.max()) < 10


def test_loads_plain_files(fake_dir):
    x, y = load_fashion_mnist(fake_dir, "test")
    assert x.shape == (5, 28, 28) and y.shape == (5,)


def test_find_fashion_mnist_accepts_a_directory_with_the_files(fake_dir):
    assert find_fashion_mnist(fake_dir) == fake_dir


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="split must be one of .*'val'"):
        load_fashion_mnist(tmp_path, "val")


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"\x00\x00\x0d\x01abcd", "not an unsigned-byte IDX file"),
     (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc",
      "header promises 10 bytes of data, file has 3")],
    ids=["float-type-code", "short-data"],
)
def test_corrupt_files_are_clear_errors(tmp_path, content, match):
    (tmp_path / "bad").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST not installed (make data)")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist(split="test")
    assert x.shape == (10000, 28, 28) and y.bincount().tolist() == [1000] * 10
