"""Silent data problems get an error or a warning: out-of-range labels, a single class, test labels
never seen in training, x_test without y_test, train and test on different pixel scales,
non-finite values, empty text cells, empty class folders, broken images, undecodable CSV files.
Messages name the file and the configuration key (data_root) the user sets."""

import numpy as np
import pytest

from padnet.data import load_dataset


def write_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def images(n: int, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 8, 8))
    return x.astype(dtype) if dtype == np.uint8 else (x / 255.0).astype(dtype)


@pytest.mark.parametrize("bad", [-1, 255])
def test_ignore_style_labels_are_refused(tmp_path, bad) -> None:
    y = np.array([0, 1, 2, 1, 0, 2, bad, 1])
    path = write_npz(tmp_path / "d.npz", x=images(8), y=y)
    with pytest.raises(ValueError, match=rf"label {bad}"):
        load_dataset("npz", root=path, val_fraction=0.0)


def test_non_contiguous_integer_labels_warn(tmp_path) -> None:
    path = write_npz(tmp_path / "d.npz", x=images(8), y=np.array([0, 1, 5, 1, 0, 5, 0, 1]))
    with pytest.warns(UserWarning, match=r"not 0\.\.2"):
        splits = load_dataset("npz", root=path, val_fraction=0.0)
    assert splits.num_classes == 3


def test_a_single_class_is_refused(tmp_path) -> None:
    path = write_npz(tmp_path / "d.npz", x=images(6), y=np.zeros(6, dtype=int))
    with pytest.raises(ValueError, match="at least two classes"):
        load_dataset("npz", root=path, val_fraction=0.0)


def test_x_test_without_y_test_is_refused(tmp_path) -> None:
    path = write_npz(tmp_path / "d.npz", x=images(6), y=np.array([0, 1] * 3), x_test=images(2))
    with pytest.raises(ValueError, match="x_test without y_test"):
        load_dataset("npz", root=path)


def test_test_labels_unseen_in_training_warn(tmp_path) -> None:
    path = write_npz(tmp_path / "d.npz", x=images(6), y=np.array([0, 1] * 3),
                     x_test=images(3, 1), y_test=np.array([0, 1, 2]))
    with pytest.warns(UserWarning, match="only in the test split"):
        load_dataset("npz", root=path, val_fraction=0.0)


def test_uint8_and_unit_float_images_are_on_the_same_scale(tmp_path) -> None:
    path = write_npz(tmp_path / "d.npz", x=images(6), y=np.array([0, 1] * 3),
                     x_test=images(2, 1, np.float32), y_test=np.array([0, 1]))
    load_dataset("npz", root=path)  # uint8 and floats in [0, 1]: the same scale, fine


def test_train_and_test_on_different_pixel_scales_are_refused(tmp_path) -> None:
    path = write_npz(tmp_path / "e.npz", x=images(6), y=np.array([0, 1] * 3),
                     x_test=255 * images(2, 1, np.float32), y_test=np.array([0, 1]))
    with pytest.raises(ValueError, match="different pixel scales"):
        load_dataset("npz", root=path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels_are_refused_at_load_time(tmp_path, value) -> None:
    x = images(6, dtype=np.float32)
    x[2, 3, 4] = value
    path = write_npz(tmp_path / "d.npz", x=x, y=np.array([0, 1] * 3))
    with pytest.raises(ValueError, match=r"non-finite .* image 2"):
        load_dataset("npz", root=path)


def test_empty_text_cells_warn(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood film,pos\n,neg\nbad film,neg\n  ,pos\n")
    with pytest.warns(UserWarning, match=r"2 empty text cell\(s\).*lines 3, 5"):
        load_dataset("csv", root=str(path), val_fraction=0.0)


def test_undecodable_csv_names_file_line_and_encoding(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\nfine,pos\n" + "caf\xe9 noir,neg\n".encode("cp1252"))
    with pytest.raises(ValueError, match=r"t\.csv.*line 3.*not UTF-8.*UTF-8"):
        load_dataset("csv", root=str(path), val_fraction=0.0)


def test_empty_class_folders_are_refused(tmp_path) -> None:
    pil = pytest.importorskip("PIL.Image")
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            pil.fromarray(images(1, i)[0]).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images in class folder\(s\) \['empty'\]"):
        load_dataset("image_folder", root=str(tmp_path))


def test_a_broken_image_names_the_file(tmp_path) -> None:
    pil = pytest.importorskip("PIL.Image")
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        pil.fromarray(images(1)[0]).save(tmp_path / cls / "ok.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"broken\.png.*cannot be read"):
        load_dataset("image_folder", root=str(tmp_path))


@pytest.mark.parametrize(("name", "missing_file", "error"),
                         [("npz", True, FileNotFoundError), ("csv", False, ValueError)],
                         ids=["npz-file-not-found", "csv-without-root"])
def test_missing_user_data_points_at_data_root(tmp_path, name, missing_file, error) -> None:
    kwargs = {"root": str(tmp_path / "missing.npz")} if missing_file else {}
    with pytest.raises(error, match="data_root"):
        load_dataset(name, **kwargs)
