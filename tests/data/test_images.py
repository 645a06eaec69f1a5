"""Image loaders on small generated files: Fashion-MNIST IDX, .npz arrays, PNG/JPEG folders."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from padnet.data import find_fashion_mnist, load_dataset


def write_idx_gz(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 6)):
        write_idx_gz(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_gz(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return tmp_path


def batch(dataset, collate, size=64):
    return next(iter(DataLoader(dataset, batch_size=size, collate_fn=collate)))


@pytest.fixture
def fmnist_splits(fmnist_dir):
    return load_dataset("fashion_mnist", root=fmnist_dir, val_fraction=0.25, test_fraction=0.5)


def test_fashion_mnist_keeps_its_own_test_split(fmnist_splits):
    splits = fmnist_splits
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)  # own test split
    assert splits.info["sizes"]["test"] == 6


def test_fashion_mnist_describes_its_images_and_classes(fmnist_splits):
    splits = fmnist_splits
    assert splits.kind == "image" and splits.num_classes == 10 and splits.input_shape == (1, 28, 28)
    assert splits.class_names[0] == "T-shirt/top"


def test_fashion_mnist_batches_are_float_images_and_int_labels(fmnist_splits):
    x, y = batch(fmnist_splits.train, fmnist_splits.collate)
    assert x.shape == (15, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_fashion_mnist_is_normalised_with_the_training_statistics(fmnist_splits):
    splits = fmnist_splits
    x, _ = batch(splits.train, splits.collate)
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    assert splits.info["mean"][0] == pytest.approx(splits.train.images[splits.train.indices]
                                                   .float().div(255).mean().item(), abs=1e-6)


@pytest.fixture
def resized_rgb_splits(fmnist_dir):
    return load_dataset("fashion_mnist", root=fmnist_dir, image_size=32, channels=3, subset=4)


def test_resize_and_channel_repeat_shapes(resized_rgb_splits):
    x, _ = batch(resized_rgb_splits.train, resized_rgb_splits.collate)
    assert x.shape == (4, 3, 32, 32) and resized_rgb_splits.input_shape == (3, 32, 32)


def test_repeated_channels_are_copies(resized_rgb_splits):
    x, _ = batch(resized_rgb_splits.train, resized_rgb_splits.collate)
    assert torch.equal(x[:, 0], x[:, 2]) and len(resized_rgb_splits.info["mean"]) == 3


def test_splits_depend_only_on_seed(fmnist_dir):
    a, b = (load_dataset("fashion_mnist", root=fmnist_dir, seed=5) for _ in range(2))
    c = load_dataset("fashion_mnist", root=fmnist_dir, seed=6)
    assert torch.equal(a.val.indices, b.val.indices) and torch.equal(a.train.indices,
                                                                     b.train.indices)
    assert not torch.equal(a.train.indices, c.train.indices)


def test_info_records_the_seed_and_source(fmnist_dir):
    a = load_dataset("fashion_mnist", root=fmnist_dir, seed=5)
    assert a.info["seed"] == 5 and a.info["source"] == str(fmnist_dir.resolve())


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_npz_layouts_give_the_same_images(tmp_path, layout):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (12, 3, 6, 6)).astype(np.uint8)
    y = np.arange(12) % 3
    x = {"nhw": nchw[:, 0], "nhwc": nchw.transpose(0, 2, 3, 1), "nchw": nchw,
         "float": nchw.astype(np.float32) / 255}[layout]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    splits = load_dataset("npz", root=tmp_path / "d.npz", val_fraction=0.0, test_fraction=0.25)
    assert splits.input_shape == ((1, 6, 6) if layout == "nhw" else (3, 6, 6))
    assert (len(splits.train), splits.val, len(splits.test)) == (9, None, 3)
    xb, yb = batch(splits.train, splits.collate)
    expected = torch.from_numpy(nchw[:, :1] if layout == "nhw" else nchw).float() / 255
    expected = expected[splits.train.indices]
    mean, std = (torch.tensor(splits.info[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    torch.testing.assert_close(xb * std + mean, expected, atol=1e-5, rtol=0)
    assert yb.tolist() == (torch.from_numpy(y)[splits.train.indices]).tolist()


NPZ_X = np.zeros((6, 4, 4), np.uint8)


def test_npz_string_labels_and_own_test_split(tmp_path):
    np.savez(tmp_path / "s.npz", x=NPZ_X, y=np.array(["dog", "cat"] * 3), x_test=NPZ_X[:2],
             y_test=np.array(["cat", "dog"]))
    splits = load_dataset("npz", root=tmp_path / "s.npz", test_fraction=0.5)
    assert splits.class_names == ["cat", "dog"] and len(splits.test) == 2
    assert splits.test.labels.tolist() == [0, 1] and splits.info["own_test_split"]


def test_npz_class_names_array(tmp_path):
    np.savez(tmp_path / "n.npz", x=NPZ_X, y=np.array([0, 2, 1, 0, 2, 1]),
             class_names=np.array(["a", "b", "c"]))
    assert load_dataset("npz", root=tmp_path / "n.npz").class_names == ["a", "b", "c"]


def test_npz_float_labels_sort_by_value(tmp_path):
    np.savez(tmp_path / "f.npz", x=NPZ_X, y=np.array([2.0, 0.0, 10.0] * 2))
    with pytest.warns(UserWarning, match="not 0..2"):  # float labels that are integers
        assert load_dataset("npz", root=tmp_path / "f.npz").class_names == ["0", "2", "10"]


@pytest.mark.parametrize(
    ("arrays", "kwargs", "error", "match"),
    [
        (None, {}, FileNotFoundError, "image array file not found: .*d.npz"),
        ({"x": np.zeros((3, 4, 4))}, {}, ValueError,
         r"missing array\(s\) \['y'\]; it has \['x'\]"),
        ({"x": np.zeros((3, 16)), "y": np.zeros(3)}, {}, ValueError, r"'x' has shape \(3, 16\)"),
        ({"x": np.zeros((3, 4, 4, 3)), "y": np.array([0, 1, 0])}, {"channels": 2}, ValueError,
         "channels=2 cannot be made from 3-channel images"),
    ],
    ids=["missing-file", "no-labels", "flat-images", "channels"],
)
def test_npz_errors(tmp_path, arrays, kwargs, error, match):
    if arrays is not None:
        np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(error, match=match):
        load_dataset("npz", root=tmp_path / "d.npz", **kwargs)


def make_folder(root, sizes_and_modes):
    from PIL import Image

    for i, (cls, size, mode, ext) in enumerate(sizes_and_modes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        colour = 200 if mode == "L" else (200, 30, 90)
        Image.new(mode, size, colour).save(root / cls / f"{i}.{ext}")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def mixed_folder(tmp_path):
    """Two classes of 8x8 images, grey and RGB, PNG and JPEG (upper- and lower-case suffix)."""
    pytest.importorskip("PIL")
    return make_folder(tmp_path / "imgs", [("cat", (8, 8), "L", "png"),
                                           ("cat", (8, 8), "RGB", "jpg"),
                                           ("dog", (8, 8), "RGB", "JPEG"),
                                           ("dog", (8, 8), "L", "png")])


def test_image_folder_png_and_jpeg(tmp_path):
    splits = load_dataset("image_folder", root=mixed_folder(tmp_path), val_fraction=0.0)
    assert splits.class_names == ["cat", "dog"] and splits.input_shape == (3, 8, 8)
    assert sorted(splits.train.labels.tolist()) == [0, 0, 1, 1]
    x, y = batch(splits.train, splits.collate)
    assert x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]


def test_image_folder_channels_and_image_size(tmp_path):
    grey = load_dataset("image_folder", root=mixed_folder(tmp_path), channels=1, image_size=5,
                        val_fraction=0.0)
    assert grey.input_shape == (1, 5, 5) and grey.train.images.shape == (4, 1, 5, 5)


def grey_folder_of_two_sizes(tmp_path):
    pytest.importorskip("PIL")
    return make_folder(tmp_path / "g", [("cat", (8, 8), "L", "png"), ("dog", (6, 9), "L", "png")])


def test_image_folder_of_different_sizes_needs_image_size(tmp_path):
    with pytest.raises(ValueError, match="images differ in size .* pass image_size"):
        load_dataset("image_folder", root=grey_folder_of_two_sizes(tmp_path))


def test_image_size_resizes_images_of_different_sizes(tmp_path):
    splits = load_dataset("image_folder", root=grey_folder_of_two_sizes(tmp_path), image_size=7,
                          val_fraction=0.0)
    assert splits.input_shape == (1, 7, 7)


def test_missing_image_folder_points_at_data_root(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere. Set data_root"):
        load_dataset("image_folder", root=tmp_path / "nowhere")


def test_image_folder_without_images_names_its_folders(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no .png/.jpg/.jpeg images .* \['a'\]"):
        load_dataset("image_folder", root=tmp_path / "empty")


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m padnet.data.fetch --only fashion_mnist"):
        load_dataset("fashion_mnist", root=tmp_path)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST not fetched (make data)")
def test_real_fashion_mnist_splits():
    splits = load_dataset("fashion_mnist", seed=0, subset=1000)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1000, 6000, 10000)
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    x, y = batch(splits.val, splits.collate, size=256)
    assert x.shape == (256, 1, 28, 28) and 0.5 < x.std().item() < 1.5
