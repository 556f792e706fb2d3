"""The decoded-CIFAR cache and the pretrained-weights cache are keyed by what the images are, not by where
they lie or when they were copied: a pretraining that spans sessions (the shared data re-copied each time)
must find its partial file again."""
import dataclasses
import os
import shutil

import torch
from torchvision.io import write_png

from compress.config import DatasetConfig, ScheduleConfig
from compress.data.base import Data
from compress.data.cifar import load_cifar10
from compress.job.sources import pretrain_key


def _tiny_imagefolder(root, seed=0):
    g = torch.Generator().manual_seed(seed)
    for split in ("train", "test"):
        for c in range(10):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(2):
                write_png(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g), str(folder / f"{i}.png"))
    return root


def test_a_fresh_copy_of_the_same_images_hits_the_decoded_cache(tmp_path):
    first = _tiny_imagefolder(tmp_path / "a")
    tensors, source, key = load_cifar10(first, False, tmp_path / "cache")
    assert "cached" not in source and tensors["train_x"].shape == (20, 3, 32, 32)
    copy = tmp_path / "b"
    shutil.copytree(first, copy)  # another folder, new mtimes
    for png in copy.rglob("*.png"):
        os.utime(png, (1, 1))
    again, source, key_again = load_cifar10(copy, False, tmp_path / "cache")
    assert key_again == key and "cached" in source
    assert torch.equal(again["train_x"], tensors["train_x"]) and len(list((tmp_path / "cache").iterdir())) == 1


def test_changed_pixels_change_the_key(tmp_path):
    root = _tiny_imagefolder(tmp_path / "a")
    _, _, key = load_cifar10(root, False, tmp_path / "cache")
    write_png(torch.zeros(3, 32, 32, dtype=torch.uint8), str(root / "train" / "class3" / "1.png"))
    _, source, changed = load_cifar10(root, False, tmp_path / "cache")
    assert changed != key and "cached" not in source


def _data(source, identity):
    return Data(name="cifar10", num_classes=10, image_shape=(3, 32, 32), train=None, val=None, test=None,
                source=source, identity=identity)


def test_pretrain_key_follows_the_images_split_and_recipe_not_the_folder_or_the_log_line():
    recipe = ScheduleConfig(epochs=30, scheduler="onecycle", lr=0.1, label_smoothing=0.1)
    key = pretrain_key("vgg16_bn", _data("../shared/cifar10 (imagefolder, cached)", "cifar10:abc"),
                       DatasetConfig(root="../shared/cifar10"), recipe, 0)
    same = pretrain_key("vgg16_bn", _data("/elsewhere/cifar10 (imagefolder)", "cifar10:abc"),
                        DatasetConfig(root="/elsewhere/cifar10"), recipe, 0)
    assert same == key
    assert pretrain_key("vgg16_bn", _data("x", "cifar10:other"), DatasetConfig(), recipe, 0) != key
    assert pretrain_key("vgg16_bn", _data("x", "cifar10:abc"), DatasetConfig(train_size=1000), recipe, 0) != key
    assert pretrain_key("vgg16_bn", _data("x", "cifar10:abc"), DatasetConfig(),
                        dataclasses.replace(recipe, epochs=31), 0) != key
    assert pretrain_key("vgg16_bn", _data("x", "cifar10:abc"), DatasetConfig(), recipe, 1) != key
