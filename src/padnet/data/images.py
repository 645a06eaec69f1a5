"""Image data sets: Fashion-MNIST, user arrays in a ``.npz`` and image-folder trees (PNG/JPEG).

Every source is read into one in-memory array ``(N, C, H, W)`` (uint8 kept as uint8) and served by
:class:`ImageArrayDataset`, which converts each item on the fly: integer images are divided by 255
(float images are taken as they are), channels are repeated (1 -> C) or averaged (C -> 1), the image
is resized (bilinear, antialiased) to ``image_size``, then normalised per channel with the mean and
std of the training split (estimated at the source resolution on at most 10,000 training images;
stored in ``info["mean"]``/``info["std"]``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from padnet.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    find_fashion_mnist,
    load_fashion_mnist,
)
from padnet.data.splits import DatasetSplits, encode_labels, make_split_indices
from padnet.utils.checks import check_int, check_optional

__all__ = [
    "IMAGE_EXTENSIONS", "ImageArrayDataset", "ImageTransform", "RawImages", "collate_images",
    "image_splits", "load_fashion_mnist_images", "load_image_folder", "load_npz",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
STATS_SAMPLE = 10_000


@dataclass
class RawImages:
    """Images ``x`` ``(N, C, H, W)`` (uint8 or float32), labels ``y`` ``(N,)`` int64, class names,
    an optional own test split and where the data came from."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    source: str
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None


class ImageTransform:
    """Scale to [0, 1] (integer input), adapt channels, resize, normalise: ``(B, C, H, W)`` ->
    ``(B, channels, image_size, image_size)`` float32."""

    def __init__(self, in_channels: int, *, channels: int | None = None,
                 image_size: int | None = None) -> None:
        channels = in_channels if channels is None else channels
        check_int(channels, "channels", 1)
        if channels not in (1, in_channels) and in_channels != 1:
            raise ValueError(f"channels={channels} cannot be made from {in_channels}-channel "
                             "images (only 1 -> C repeats and C -> 1 averages are supported)")
        check_optional(image_size, check_int, "image_size", 1)
        self.in_channels, self.channels, self.image_size = in_channels, channels, image_size
        self.mean = torch.zeros(channels)
        self.std = torch.ones(channels)

    def prepare(self, x: torch.Tensor, resize: bool = True) -> torch.Tensor:
        """Everything but the normalisation (and the resizing when ``resize`` is False)."""
        x = x.float() / 255.0 if not x.is_floating_point() else x.float()
        if self.channels != x.shape[1]:
            x = x.mean(1, keepdim=True) if self.channels == 1 else x.expand(
                -1, self.channels, -1, -1)
        if resize and self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size,) * 2:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def fit(self, x: torch.Tensor, chunk: int = 1024) -> None:
        """Set the per-channel mean/std from images ``x`` ``(N, C, H, W)`` (before resizing)."""
        total = torch.zeros(self.channels, dtype=torch.float64)
        squares = torch.zeros(self.channels, dtype=torch.float64)
        count = 0
        for start in range(0, len(x), chunk):
            p = self.prepare(x[start:start + chunk], resize=False).double()
            total += p.sum((0, 2, 3))
            squares += (p * p).sum((0, 2, 3))
            count += p.numel() // self.channels
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        self.mean, self.std = mean.float(), std.float().clamp_min(1e-6)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class ImageArrayDataset(Dataset):
    """Items ``(x float32 (C, H, W), y int)`` from the rows ``indices`` of ``images``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 transform: ImageTransform) -> None:
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(self.images[j:j + 1])[0], int(self.labels[j])


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items into ``x`` ``(B, C, H, W)`` float32 and ``y`` ``(B,)`` int64."""
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def load_fashion_mnist_images(root: str | Path | None = None) -> RawImages:
    """Fashion-MNIST: the 60k training images as ``x`` and the 10k test images as ``x_test``."""
    x, y = load_fashion_mnist(root, "train")
    x_test, y_test = load_fashion_mnist(root, "test")
    source = str(find_fashion_mnist(root).resolve())
    return RawImages(x[:, None], y, list(FASHION_MNIST_CLASSES), source,
                     x_test[:, None], y_test)


def _to_nchw(x: np.ndarray, key: str, path: Path) -> torch.Tensor:
    """``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` -> ``(N, C, H, W)``; channels-last wins
    when both readings are possible (C in 1, 3, 4)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3, 4)):
        raise ValueError(f"{path}: '{key}' has shape {x.shape}; expected (N, H, W), (N, H, W, C) "
                         "or (N, C, H, W) with C in 1, 3, 4")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if np.issubdtype(x.dtype, np.integer):
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.float32) / 255.0)
    if np.issubdtype(x.dtype, np.floating):
        finite = np.isfinite(x).reshape(len(x), -1).all(1)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"{path}: '{key}' holds non-finite values (NaN or inf) in image "
                             f"{first} ({int((~finite).sum())} image(s) in all); fix or drop them")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    raise ValueError(f"{path}: '{key}' has dtype {x.dtype}; expected integers or floats")


def _pixel_max(x: torch.Tensor) -> float:
    """Largest pixel value on the scale the transform reads (integers / 255, floats as they are)."""
    return float(x.max()) / 255.0 if not x.is_floating_point() else float(x.max())


def load_npz(path: str | Path) -> RawImages:
    """Images from a ``.npz`` with arrays ``x`` and ``y`` (labels: ints or strings, mapped to
    ``0..C-1`` in sorted order), optionally ``x_test``/``y_test`` (an own test split) and
    ``class_names`` (one per class, in label order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image array file not found: {path}. Set data_root (--data-root "
                                "on the command line, root= in load_dataset) to a .npz with "
                                "arrays x (N, H, W[, C]) and y (N,).")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; it has {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        given, other = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise ValueError(f"{path}: {given} without {other}: an own test split needs both "
                         "(or neither: the test split is then drawn with test_fraction)")
    has_test = "x_test" in arrays
    ys = np.concatenate([arrays["y"].reshape(-1)]
                        + ([arrays["y_test"].reshape(-1)] if has_test else []))
    if np.issubdtype(ys.dtype, np.floating) and np.all(ys == np.round(ys)):
        ys = ys.astype(np.int64)  # 0.0/1.0 labels are integers
    if "class_names" in arrays:
        names = [str(c) for c in arrays["class_names"].reshape(-1).tolist()]
        if not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0 or ys.max() >= len(names):
            raise ValueError(f"{path}: with class_names ({len(names)} entries) y must hold ints "
                             f"in 0..{len(names) - 1}")
        codes = torch.from_numpy(ys.astype(np.int64))
    else:
        codes, names, _ = encode_labels(ys, f"{path}: y")
    x = _to_nchw(arrays["x"], "x", path)
    if len(x) != len(arrays["y"].reshape(-1)):
        raise ValueError(f"{path}: x has {len(x)} images but y has {arrays['y'].size} labels")
    raw = RawImages(x, codes[:len(x)], names, str(path.resolve()))
    if has_test:
        raw.x_test, raw.y_test = _to_nchw(arrays["x_test"], "x_test", path), codes[len(x):]
        if len(raw.x_test) != len(raw.y_test) or raw.x_test.shape[1:] != x.shape[1:]:
            raise ValueError(f"{path}: x_test {tuple(raw.x_test.shape)} does not match "
                             f"y_test ({len(raw.y_test)}) and x {tuple(x.shape)}")
        _check_test_split(raw, path)
    return raw


def _check_test_split(raw: RawImages, path: Path) -> None:
    """Same pixel scale in x and x_test; a warning for test classes never seen in training."""
    train_max, test_max = _pixel_max(raw.x), _pixel_max(raw.x_test)
    if (train_max <= 1.0) != (test_max <= 1.0) and max(train_max, test_max) > 2.0:
        raise ValueError(f"{path}: x and x_test are on different pixel scales (largest value "
                         f"{train_max:g} vs {test_max:g} after integers are divided by 255); "
                         "store both as uint8 0..255 or both as floats in [0, 1]")
    unseen = sorted(set(raw.y_test.tolist()) - set(raw.y.tolist()))
    if unseen:
        names = [raw.class_names[c] for c in unseen]
        warnings.warn(f"{path}: class(es) {names} appear only in the test split; the model never "
                      "sees them in training", UserWarning, stacklevel=4)


def _open_image(path: Path):  # noqa: ANN202 - a PIL image
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: cannot be read as an image ({err}); remove or replace the "
                         "file") from None


def _is_grey(path: Path) -> bool:
    with _open_image(path) as img:  # reads the header only
        return img.mode in ("1", "L", "LA", "I", "I;16", "F")


def _read_image(path: Path, mode: str, image_size: int | None) -> np.ndarray:
    from PIL import Image

    with _open_image(path) as img:
        try:
            img = img.convert(mode)
            if image_size is not None:
                img = img.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
        except OSError as err:  # truncated or corrupt pixel data
            raise ValueError(f"{path}: cannot be read as an image ({err}); remove or replace "
                             "the file") from None


def load_image_folder(root: str | Path, *, image_size: int | None = None,
                      channels: int | None = None) -> RawImages:
    """Images from ``root/<class name>/*.png|jpg|jpeg`` (classes in sorted folder order).

    Images are read as grey when ``channels == 1`` or all images are grey, else as RGB; they must
    share one size unless ``image_size`` is given (then each is resized to it on loading).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}. Set data_root (--data-root on "
                                "the command line, root= in load_dataset) to a folder with one "
                                "sub-folder of PNG/JPEG images per class.")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"{root}: no {'/'.join(IMAGE_EXTENSIONS)} images in class sub-folders "
                         f"(found sub-folders {classes})")
    empty = [name for c, name in enumerate(classes) if not any(k == c for _, k in files)]
    if empty:
        raise ValueError(f"{root}: no images in class folder(s) {empty}; remove them or add "
                         f"{'/'.join(IMAGE_EXTENSIONS)} images")
    mode = "L" if channels == 1 or (channels is None and all(_is_grey(f) for f, _ in files)) \
        else "RGB"
    arrays = [_read_image(f, mode, image_size) for f, _ in files]
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"{root}: images differ in size ({sizes[0]} and {sizes[-1]}, ...); pass "
                         "image_size to resize them on loading")
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([c for _, c in files], dtype=torch.int64)
    return RawImages(x, y, classes, str(root.resolve()))


def image_splits(
    raw: RawImages,
    *,
    name: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    subset: int | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> DatasetSplits:
    """Split ``raw`` by ``seed`` (its own test split, if any, replaces ``test_fraction``), fit the
    normalisation on the training split and wrap each split in an :class:`ImageArrayDataset`."""
    transform = ImageTransform(raw.x.shape[1], channels=channels, image_size=image_size)
    has_test = raw.x_test is not None
    parts = make_split_indices(len(raw.x), seed=seed, val_fraction=val_fraction,
                               test_fraction=test_fraction, subset=subset, has_test=has_test)
    transform.fit(raw.x[parts.train[:STATS_SAMPLE]])
    train = ImageArrayDataset(raw.x, raw.y, parts.train, transform)
    val = ImageArrayDataset(raw.x, raw.y, parts.val, transform) if len(parts.val) else None
    if has_test:
        test = ImageArrayDataset(raw.x_test, raw.y_test, torch.arange(len(raw.x_test)), transform)
    else:
        test = ImageArrayDataset(raw.x, raw.y, parts.test, transform) if len(parts.test) else None
    height, width = (image_size, image_size) if image_size else tuple(raw.x.shape[-2:])
    info = {
        "name": name, "source": raw.source, "seed": seed, "val_fraction": val_fraction,
        "test_fraction": 0.0 if has_test else test_fraction, "subset": subset,
        "sizes": {"train": len(train), "val": len(val) if val else 0,
                  "test": len(test) if test else 0},
        "num_examples": len(raw.x), "own_test_split": has_test,
        "mean": transform.mean.tolist(), "std": transform.std.tolist(),
        "normalisation": "per-channel mean/std of the training split",
    }
    return DatasetSplits(
        train=train, val=val, test=test, num_classes=len(raw.class_names),
        class_names=list(raw.class_names), kind="image", collate=collate_images,
        input_shape=(transform.channels, int(height), int(width)), info=info)
