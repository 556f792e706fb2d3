"""Which images train, validate and test a run (`dataset.val_from`, sizes, split_seed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compress import CompressError
from compress.config import DatasetConfig
from compress.data import build


def test_val_from_train_holds_validation_out_of_the_training_set():
    idx = build.split_indices(1000, 400, DatasetConfig(val_size=100, train_size=300))
    assert len(idx["val"]) == 100 and len(idx["train"]) == 300 and len(idx["test"]) == 400
    assert not set(idx["val"].tolist()) & set(idx["train"].tolist())  # rows of the same (training) tensors
    assert torch.equal(idx["test"], torch.arange(400))


@pytest.mark.parametrize("test_size", [None, 301])
def test_val_from_test_halves_the_test_set_the_same_way_every_run(test_size):
    cfg = DatasetConfig(val_from="test", test_size=test_size, val_size=5000)
    idx = build.split_indices(1000, 600, cfg)
    limited = build.split_indices(1000, 600, DatasetConfig(test_size=test_size, val_size=100))["test"]
    val, test = set(idx["val"].tolist()), set(idx["test"].tolist())
    assert not val & test and val | test == set(limited.tolist())  # disjoint halves of the (limited) test set
    assert len(idx["test"]) - len(idx["val"]) == len(limited) % 2  # an odd image goes to test
    assert len(idx["train"]) == 1000  # val_size is not taken out of the training set
    again = build.split_indices(1000, 600, cfg)
    assert all(torch.equal(idx[k], again[k]) for k in idx)
    other = build.split_indices(1000, 600, DatasetConfig(val_from="test", test_size=test_size, split_seed=1))
    assert not torch.equal(other["val"], idx["val"])  # split_seed, and only it, chooses the half
    assert all(torch.equal(v, v.sort().values) for v in idx.values())


def test_val_from_test_on_synthetic_data_validates_on_test_images():
    data = build.load(DatasetConfig(name="synthetic", val_from="test", train_size=64, test_size=40),
                      mean=[0.5] * 3, std=[0.25] * 3, search=[], cache_dir=Path("."), device=torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test), data.val_from) == (64, 20, 20, "test")
    whole = build.load(DatasetConfig(name="synthetic", val_from="train", train_size=64, test_size=40),
                       mean=[0.5] * 3, std=[0.25] * 3, search=[], cache_dir=Path("."), device=torch.device("cpu"))
    test_images = {bytes(im.numpy()) for im in whole.test.images}
    assert {bytes(im.numpy()) for im in data.val.images} | {bytes(im.numpy()) for im in data.test.images} == test_images


def test_bad_val_from_and_too_small_a_test_set_name_the_key():
    with pytest.raises(CompressError, match="^dataset.val_from: "):
        DatasetConfig(val_from="holdout")
    with pytest.raises(CompressError, match="^dataset.test_size: val_from=test halves"):
        build.split_indices(100, 10, DatasetConfig(val_from="test", test_size=1))
