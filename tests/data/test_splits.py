"""Splits by seed, subset sampling, label encoding and load_dataset's argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padnet.data import list_datasets, load_dataset, split_indices, subset_indices
from padnet.data.splits import encode_labels, make_split_indices


def test_split_is_a_partition_fixed_by_seed():
    parts = split_indices(100, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert (len(parts.train), len(parts.val), len(parts.test)) == (70, 10, 20)
    joined = torch.cat([parts.train, parts.val, parts.test])
    assert sorted(joined.tolist()) == list(range(100))
    assert all(torch.equal(p, p.sort().values) for p in (parts.train, parts.val, parts.test))
    again = split_indices(100, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert torch.equal(parts.val, again.val) and torch.equal(parts.test, again.test)
    other = split_indices(100, seed=4, val_fraction=0.1, test_fraction=0.2)
    assert not torch.equal(parts.val, other.val)


def test_split_sizes_at_the_edges():
    assert len(split_indices(5, val_fraction=0.01).val) == 1  # a positive fraction holds one
    parts = split_indices(5, val_fraction=0.0)
    assert len(parts.val) == 0 and len(parts.train) == 5
    with pytest.raises(ValueError, match="leave no training examples out of 2"):
        split_indices(2, val_fraction=0.5, test_fraction=0.5)


def test_subset_is_nested_and_leaves_val_and_test_alone():
    full = make_split_indices(200, seed=1, val_fraction=0.1, test_fraction=0.1, subset=None,
                              has_test=False)
    small = make_split_indices(200, seed=1, val_fraction=0.1, test_fraction=0.1, subset=20,
                               has_test=False)
    smaller = subset_indices(full.train, 10, seed=1)
    assert len(small.train) == 20 and torch.equal(small.val, full.val)
    assert torch.equal(small.test, full.test)
    assert set(smaller.tolist()) <= set(small.train.tolist()) <= set(full.train.tolist())
    assert torch.equal(subset_indices(full.train, 1000, seed=1), full.train)
    own_test = make_split_indices(200, seed=1, val_fraction=0.1, test_fraction=0.3, subset=None,
                                  has_test=True)
    assert len(own_test.test) == 0 and len(own_test.train) == 180  # test_fraction ignored


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


def test_labels_map_to_sorted_codes():
    with pytest.warns(UserWarning, match=r"not 0\.\.3"):  # -1/1/2/10: kept, with a warning
        codes, names, mapping = encode_labels(["10", "-1", "2", "1", "2"])
    assert names == ["-1", "1", "2", "10"] and codes.tolist() == [3, 0, 2, 1, 2]
    assert mapping == {"-1": 0, "1": 1, "2": 2, "10": 3}
    codes, names, _ = encode_labels(np.array(["pos", "neg", "neutral", "neg"]))
    assert names == ["neg", "neutral", "pos"] and codes.tolist() == [2, 0, 1, 0]
    with pytest.warns(UserWarning, match="not 0..1"):
        codes, names, _ = encode_labels(np.array([7, 3, 7]))
    assert names == ["3", "7"] and codes.dtype == torch.int64 and codes.tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="empty"):
        encode_labels([])


def test_load_dataset_checks_its_arguments(tmp_path):
    assert list_datasets() == ["conll2010", "csv", "fashion_mnist", "image_folder", "npz",
                               "polarity", "rotten_tomatoes"]
    with pytest.raises(ValueError, match=r"unknown data set 'mnist': data set must be one of"):
        load_dataset("mnist")
    bad = [({"val_fraction": 1.5}, "val_fraction must be a number in \\[0, 1\\), got 1.5"),
           ({"test_fraction": -1}, "test_fraction .* got -1"),
           ({"subset": 0}, "subset must be None or an int >= 1, got 0"),
           ({"seed": -1}, "seed must be an int >= 0, got -1"),
           ({"image_size": 0}, "image_size must be an int >= 1, got 0"),
           ({"max_length": 1}, "max_length must be an int >= 2, got 1")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            load_dataset("fashion_mnist", root=tmp_path, **kwargs)
    with pytest.raises(ValueError, match="'npz' reads the user's own data: set data_root"):
        load_dataset("npz")
    with pytest.raises(ValueError, match="tokenizer is for text data sets"):
        load_dataset("fashion_mnist", root=tmp_path, tokenizer="bert")
    with pytest.raises(ValueError, match="image_size/channels are for image data sets"):
        load_dataset("polarity", root=tmp_path, image_size=32)
