"""The data entry point: ``load_dataset(name, ...) -> DatasetSplits`` and ``list_datasets()``.

Names: ``fashion_mnist``, ``npz``, ``image_folder`` (image data), ``rotten_tomatoes``, ``polarity``,
``conll2010``, ``csv`` (text data). ``root`` is where the files are: a directory for the built-in
data sets (default: ``$PADNET_DATA/<dir>``, then ``./data/<dir>``, as filled by
``python -m padnet.data.fetch``), the ``.npz`` file, the image-folder directory, or for ``csv``
the user's text data: a CSV, TSV or JSON-lines file or a directory saved by Hugging Face
``datasets`` (:func:`padnet.data.text.load_text_file`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from padnet.data import images, text
from padnet.data.splits import DatasetSplits, check_fraction, check_subset
from padnet.registry import Registry
from padnet.utils.checks import check_int, check_optional

__all__ = ["DATASETS", "DatasetEntry", "list_datasets", "load_dataset", "register_dataset"]


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: ``load(root, **options)`` returns raw images or texts."""

    load: Callable[..., Any]
    kind: str  # "image" or "text"
    needs_root: bool = False  # the user's own data: root= is required


#: The data set table (``padnet list``, config validation and :func:`load_dataset` read it).
DATASETS: Registry[DatasetEntry] = Registry("data set")


def register_dataset(name: str, load: Callable[..., Any], *, kind: str,
                     needs_root: bool = False) -> DatasetEntry:
    """Add a data set: ``load(root, image_size=, channels=)`` (images) or ``load(root,
    text_column=, label_column=)`` (text; also ``text_encoding=`` and ``text_delimiter=`` where
    those are set) returns :class:`~padnet.data.images.RawImages` (``kind='image'``) or
    :class:`~padnet.data.text.RawTexts` (``kind='text'``)."""
    return DATASETS.register(name, DatasetEntry(load, kind, needs_root))


register_dataset("fashion_mnist", lambda root, **_: images.load_fashion_mnist_images(root),
                 kind="image")
register_dataset("npz", lambda root, **_: images.load_npz(root), kind="image", needs_root=True)
register_dataset("image_folder", lambda root, image_size, channels, **_:
                 images.load_image_folder(root, image_size=image_size, channels=channels),
                 kind="image", needs_root=True)
register_dataset("rotten_tomatoes", lambda root, **_: text.load_rotten_tomatoes(root),
                 kind="text")
register_dataset("polarity", lambda root, **_: text.load_pattern_corpus("polarity", root),
                 kind="text")
register_dataset("conll2010", lambda root, **_: text.load_pattern_corpus("conll2010", root),
                 kind="text")
register_dataset("csv", lambda root, text_column, label_column, text_encoding="utf-8",
                 text_delimiter=None, **_: text.load_text_file(
                     root, text_column=text_column, label_column=label_column,
                     encoding=text_encoding, delimiter=text_delimiter),
                 kind="text", needs_root=True)


def list_datasets() -> list[str]:
    """The names ``load_dataset`` accepts, sorted."""
    return sorted(DATASETS.names())


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    subset: int | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    text_column: str = "text",
    label_column: str = "label",
    text_encoding: str = "utf-8",
    text_delimiter: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> DatasetSplits:
    """Load data set ``name`` and split it deterministically by ``seed``.

    ``val_fraction``/``test_fraction`` of the examples are held out (the test fraction is ignored
    where the data set has its own test split: Fashion-MNIST's 10k test files, a ``.npz`` with
    ``x_test``/``y_test``); ``subset`` caps the training examples (chosen by ``seed``; val and test
    are unchanged). Images come out as float ``(C, H, W)``, ``image_size``/``channels`` resize and
    repeat/average them; text is tokenised with ``tokenizer`` (an HF tokenizer, or a path/name for
    ``AutoTokenizer.from_pretrained``) truncated to ``max_length``. ``text_encoding`` (default
    UTF-8, a byte-order mark skipped) and ``text_delimiter`` (default: by extension, tab for
    ``.tsv``) apply to the user's text files; the splits of a saved ``DatasetDict`` are used as
    given (its validation/test split replaces ``val_fraction``/``test_fraction``). Missing files
    raise FileNotFoundError saying how to get them; bad arguments raise ValueError.
    """
    entry = DATASETS.get(name)
    check_fraction("val_fraction", val_fraction)
    check_fraction("test_fraction", test_fraction)
    check_subset(subset)
    for arg, value, low in (("seed", seed, 0), ("max_length", max_length, 2),
                            ("image_size", image_size, 1), ("channels", channels, 1)):
        check_optional(value, check_int, arg, low)
    if root is None and entry.needs_root:
        raise ValueError(f"data set {name!r} reads the user's own data: set data_root "
                         "(--data-root on the command line, root= in load_dataset) to its path")
    common = {"name": name, "seed": seed, "val_fraction": val_fraction,
              "test_fraction": test_fraction, "subset": subset}
    if entry.kind == "image":
        if tokenizer is not None:
            raise ValueError(f"tokenizer is for text data sets; {name!r} holds images")
        raw = entry.load(root, image_size=image_size, channels=channels)
        _check_classes(raw.class_names, raw.y, raw.source)
        return images.image_splits(raw, image_size=image_size, channels=channels, **common)
    if image_size is not None or channels is not None:
        raise ValueError(f"image_size/channels are for image data sets; {name!r} holds text")
    options = {"text_column": text_column, "label_column": label_column}
    if text.resolve_encoding(text_encoding) != "utf-8-sig":  # passed only where set
        options["text_encoding"] = text_encoding
    if text_delimiter is not None:
        text.resolve_delimiter(text_delimiter, root or "")
        options["text_delimiter"] = text_delimiter
    raw = entry.load(root, **options)
    _check_classes(raw.class_names, raw.labels, raw.source)
    return text.text_splits(raw, tokenizer=tokenizer, max_length=max_length, **common)


def _check_classes(class_names: list[str], labels: Any, source: str) -> None:
    """A classifier needs at least two classes among the training examples."""
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        names = [class_names[c] for c in present]
        raise ValueError(f"{source}: a classification data set needs at least two classes, "
                         f"found {len(present)} ({names}); check the label column or files")
