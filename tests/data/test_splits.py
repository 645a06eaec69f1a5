"""Splits by seed, subset sampling, label encoding and load_dataset's argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padnet.data import list_datasets, load_dataset, split_indices, subset_indices
from padnet.data.splits import encode_labels, make_split_indices


def split_of_100(seed: int = 3):
    return split_indices(100, seed=seed, val_fraction=0.1, test_fraction=0.2)


def test_split_is_a_partition():
    parts = split_of_100()
    assert (len(parts.train), len(parts.val), len(parts.test)) == (70, 10, 20)
    joined = torch.cat([parts.train, parts.val, parts.test])
    assert sorted(joined.tolist()) == list(range(100))


def test_split_parts_are_sorted():
    parts = split_of_100()
    assert all(torch.equal(p, p.sort().values) for p in (parts.train, parts.val, parts.test))


def test_split_is_fixed_by_the_seed():
    parts, again, other = split_of_100(), split_of_100(), split_of_100(seed=4)
    assert torch.equal(parts.val, again.val) and torch.equal(parts.test, again.test)
    assert not torch.equal(parts.val, other.val)


def test_split_sizes_at_the_edges():
    assert len(split_indices(5, val_fraction=0.01).val) == 1  # a positive fraction holds one
    parts = split_indices(5, val_fraction=0.0)
    assert len(parts.val) == 0 and len(parts.train) == 5


def test_split_that_leaves_no_training_examples_raises():
    with pytest.raises(ValueError, match="leave no training examples out of 2"):
        split_indices(2, val_fraction=0.5, test_fraction=0.5)


def split_of_200(subset: int | None):
    return make_split_indices(200, seed=1, val_fraction=0.1, test_fraction=0.1, subset=subset,
                              has_test=False)


def test_subset_leaves_val_and_test_alone():
    full, small = split_of_200(None), split_of_200(20)
    assert len(small.train) == 20 and torch.equal(small.val, full.val)
    assert torch.equal(small.test, full.test)


def test_subsets_are_nested():
    full, small = split_of_200(None), split_of_200(20)
    smaller = subset_indices(full.train, 10, seed=1)
    assert set(smaller.tolist()) <= set(small.train.tolist()) <= set(full.train.tolist())


def test_a_subset_larger_than_the_training_set_is_all_of_it():
    full = split_of_200(None)
    assert torch.equal(subset_indices(full.train, 1000, seed=1), full.train)


def test_an_own_test_split_ignores_test_fraction():
    own_test = make_split_indices(200, seed=1, val_fraction=0.1, test_fraction=0.3, subset=None,
                                  has_test=True)
    assert len(own_test.test) == 0 and len(own_test.train) == 180


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"val_fraction": 1.0}, "val_fraction must be a number in \\[0, 1\\), got 1.0"),
    ({"val_fraction": -0.1}, "val_fraction must be .* got -0.1"),
    ({"test_fraction": True}, "test_fraction must be .* got True"),
])
def test_bad_fractions_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_indices(10, **kwargs)


@pytest.mark.parametrize("subset", [0, -3, 2.5, True])
def test_bad_subset_names_the_argument(subset):
    with pytest.raises(ValueError, match=f"subset must be None or an int >= 1, got {subset!r}"):
        subset_indices(torch.arange(5), subset)


def test_numeric_string_labels_sort_by_value():
    with pytest.warns(UserWarning, match=r"not 0\.\.3"):  # -1/1/2/10: kept, with a warning
        codes, names, mapping = encode_labels(["10", "-1", "2", "1", "2"])
    assert names == ["-1", "1", "2", "10"] and codes.tolist() == [3, 0, 2, 1, 2]
    assert mapping == {"-1": 0, "1": 1, "2": 2, "10": 3}


def test_string_labels_sort_alphabetically():
    codes, names, _ = encode_labels(np.array(["pos", "neg", "neutral", "neg"]))
    assert names == ["neg", "neutral", "pos"] and codes.tolist() == [2, 0, 1, 0]


def test_integer_labels_give_int64_codes():
    with pytest.warns(UserWarning, match="not 0..1"):
        codes, names, _ = encode_labels(np.array([7, 3, 7]))
    assert names == ["3", "7"] and codes.dtype == torch.int64 and codes.tolist() == [1, 0, 1]


def test_no_labels_raise():
    with pytest.raises(ValueError, match="empty"):
        encode_labels([])


def test_list_datasets():
    assert list_datasets() == ["conll2010", "csv", "fashion_mnist", "image_folder", "npz",
                               "polarity", "rotten_tomatoes"]


@pytest.mark.parametrize(
    ("name", "kwargs", "with_root", "match"),
    [
        ("mnist", {}, False, r"unknown data set 'mnist': data set must be one of"),
        ("fashion_mnist", {"val_fraction": 1.5}, True,
         "val_fraction must be a number in \\[0, 1\\), got 1.5"),
        ("fashion_mnist", {"test_fraction": -1}, True, "test_fraction .* got -1"),
        ("fashion_mnist", {"subset": 0}, True, "subset must be None or an int >= 1, got 0"),
        ("fashion_mnist", {"seed": -1}, True, "seed must be an int >= 0, got -1"),
        ("fashion_mnist", {"image_size": 0}, True, "image_size must be an int >= 1, got 0"),
        ("fashion_mnist", {"max_length": 1}, True, "max_length must be an int >= 2, got 1"),
        ("npz", {}, False, "'npz' reads the user's own data: set data_root"),
        ("fashion_mnist", {"tokenizer": "bert"}, True, "tokenizer is for text data sets"),
        ("polarity", {"image_size": 32}, True, "image_size/channels are for image data sets"),
    ],
    ids=["unknown-name", "val-fraction", "test-fraction", "subset", "seed", "image-size",
         "max-length", "npz-without-root", "tokenizer-for-images", "image-size-for-text"],
)
def test_load_dataset_checks_its_arguments(tmp_path, name, kwargs, with_root, match):
    if with_root:
        kwargs = {"root": tmp_path, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_dataset(name, **kwargs)
