"""`dataset=imagefolder`: any folder of images (issue 24), and bad files in it or in the CIFAR-10 folder.

Folders are built in tmp_path with PIL: each class is a solid colour (plus a little noise), so that a
decoded image's mean colour says which class it was read as, whatever its size, mode or format."""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress import CompressError
from compress.config import DatasetConfig
from compress.data import build
from compress.data.cifar import load_cifar10
from compress.data.folder import StreamSplit
from compress.job.compose import compose
from tests.conftest import CIFAR, needs_shared

# Class folder names, created out of order: classes are the sorted folder names.
COLOURS = {"cat": (200, 40, 40), "ant": (40, 200, 40), "bee": (40, 40, 200)}
SIZES = [(20, 30), (48, 17), (64, 64), (33, 90), (16, 16), (40, 25)]   # (width, height): any size
KINDS = [("png", "RGB"), ("jpg", "RGB"), ("webp", "RGB"), ("png", "L"), ("png", "RGBA"), ("png", "P")]
CPU = torch.device("cpu")


def _image(colour, size, mode, rng) -> Image.Image:
    w, h = size
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode == "L":  # grey: every class keeps its own brightness, so the class is still legible
        return image.convert("L")
    if mode == "RGBA":
        return Image.fromarray(np.dstack([pixels, np.full((h, w), 128, np.uint8)]), "RGBA")
    if mode == "P":
        return image.quantize(16)
    return image


def make_folder(root: Path, test_name: str = "test", per_class: int = 6, classes=COLOURS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", test_name):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                ext, mode = KINDS[i % len(KINDS)]
                _image(COLOURS[cls], SIZES[i % len(SIZES)], mode, rng).save(folder / f"{i}.{ext}")
    return root


def spoil(root: Path) -> list[Path]:
    """A text file named like a PNG, a truncated PNG and an empty class folder, in train/."""
    text = root / "train" / "ant" / "x.png"
    text.write_text("not an image\n")
    whole = (root / "train" / "bee" / "0.png").read_bytes()
    truncated = root / "train" / "bee" / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    (root / "train" / "empty").mkdir()
    return [text, truncated]


def load(root: Path, tmp_path: Path, mean=None, std=None, **keys):
    cfg = DatasetConfig(name="imagefolder", root=str(root), **{"val_size": None, "image_size": 16, **keys})
    return build.load(cfg, mean=mean, std=std, search=[], cache_dir=tmp_path / "cache", device=CPU, channels_last=False)


def all_images(split) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split, un-normalised back to uint8, and its labels, in order."""
    xs, ys = zip(*split.batches(7))
    x = torch.cat(xs) * split.std.view(1, -1, 1, 1) + split.mean.view(1, -1, 1, 1)
    return (x * 255).round().to(torch.uint8), torch.cat(ys)


def class_of(images: torch.Tensor) -> torch.Tensor:
    """The class whose colour is nearest each image's mean colour (grey images: by brightness)."""
    names = sorted(COLOURS)
    colours = torch.tensor([COLOURS[c] for c in names], dtype=torch.float32)
    means = images.float().mean((2, 3))
    grey = (means.max(1).values - means.min(1).values) < 4
    by_colour = torch.cdist(means, colours).argmin(1)
    luma = colours @ torch.tensor([0.299, 0.587, 0.114])
    by_luma = (means[:, :1] - luma[None]).abs().argmin(1)
    return torch.where(grey, by_luma, by_colour)


def test_images_of_any_size_mode_and_format_become_rgb_at_image_size_with_their_folders_labels(tmp_path):
    data = load(make_folder(tmp_path / "f"), tmp_path, val_from="test")
    assert data.classes == ("ant", "bee", "cat") and data.num_classes == 3 and data.image_shape == (3, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 9, 9)
    for split in (data.train, data.val, data.test):
        images, labels = all_images(split)
        assert images.shape[1:] == (3, 16, 16)
        assert torch.equal(class_of(images), labels)  # every image read as its own folder's class
    _, labels = all_images(data.train)
    assert torch.bincount(labels).tolist() == [6, 6, 6]


def test_val_folder_instead_of_test_and_a_tenth_of_train_validates_by_default(tmp_path):
    data = load(make_folder(tmp_path / "f", test_name="val", per_class=10), tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (27, 3, 30)  # val_size=null: 30 // 10
    assert compose(["dataset=imagefolder", "dataset.root=x"]).dataset.val_size is None  # the preset's choice
    assert compose([]).dataset.val_size == 5000  # CIFAR-10's default unchanged


def test_a_val_size_that_leaves_no_training_images_is_refused(tmp_path):
    root = make_folder(tmp_path / "f", per_class=1)
    with pytest.raises(CompressError, match=r"^dataset.val_size: 3 leaves no training images \(the training set has 3\)"):
        load(root, tmp_path, val_size=3)


def test_class_folders_must_be_the_same_set_in_train_and_test(tmp_path):
    root = make_folder(tmp_path / "f")
    shutil.rmtree(root / "test" / "bee")
    (root / "test" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "dog" / "0.png")
    with pytest.raises(CompressError, match=r"^dataset.root: .*/test and .*/train hold different classes "
                                            r"\(only in train/: bee; only in test/: dog\)$"):
        load(root, tmp_path)


def test_num_classes_comes_from_the_folders_and_a_disagreeing_value_is_refused(tmp_path):
    root = make_folder(tmp_path / "f", per_class=2)
    assert load(root, tmp_path, num_classes=3).num_classes == 3
    with pytest.raises(CompressError, match=r"^dataset.num_classes: 5, but .*/train has 3 classes \(ant, bee, cat\)"):
        load(root, tmp_path, num_classes=5)


def test_mean_and_std_are_computed_from_the_training_split_unless_given(tmp_path):
    root = make_folder(tmp_path / "f")
    cfg = DatasetConfig(name="imagefolder", root=str(root), val_size=5, image_size=16)
    data = build.load(cfg, mean=None, std=None, search=[], cache_dir=tmp_path / "cache", device=CPU)
    pixels = data.train.images.double() / 255  # the training split only: not val, not test
    assert torch.allclose(torch.tensor(data.mean, dtype=torch.float64), pixels.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(torch.tensor(data.std, dtype=torch.float64), pixels.std((0, 2, 3), correction=0), atol=1e-6)
    assert 0.05 < min(data.std) and max(data.mean) < 0.8  # three colours: a real spread, not a constant
    given = build.load(cfg, mean=[0.5, 0.5, 0.5], std=None, search=[], cache_dir=tmp_path / "cache", device=CPU)
    assert given.mean == (0.5, 0.5, 0.5) and given.std == pytest.approx(data.std)


def test_mean_and_std_computed_for_cifar_layout_data_too():
    data = build.load(DatasetConfig(name="synthetic", train_size=64, val_size=16, test_size=16), mean=None, std=None,
                      search=[], cache_dir=Path("."), device=CPU)
    pixels = data.train.images.double() / 255
    assert torch.allclose(data.train.mean.double(), pixels.mean((0, 2, 3)), atol=1e-6)


def test_unreadable_files_and_an_empty_class_folder_are_skipped_with_one_warning(tmp_path, caplog):
    root = make_folder(tmp_path / "f")
    text, truncated = spoil(root)
    with caplog.at_level(logging.WARNING, logger="compress"):
        data = load(root, tmp_path, val_from="test")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"dataset.bad_files=skip: skipped 2 unreadable files (first: {text}: ")
    assert f"and 1 empty class folder (first: {root / 'train' / 'empty'})" in warnings[0]
    assert len(data.train) == 18 and data.classes == ("ant", "bee", "cat")  # the readable images, the real classes
    images, labels = all_images(data.train)
    assert torch.equal(class_of(images), labels)
    # the cached copy remembers them: the same warning on a cache hit
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress"):
        assert "cached" in load(root, tmp_path, val_from="test").source
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == warnings


def test_bad_files_error_stops_on_the_first_naming_it(tmp_path):
    root = make_folder(tmp_path / "f")
    text, _ = spoil(root)
    with pytest.raises(CompressError, match=rf"^{text}: UnidentifiedImageError: .*; dataset.bad_files=skip skips"):
        load(root, tmp_path, bad_files="error")
    (text.unlink(), (root / "train" / "bee" / "truncated.png").unlink())
    with pytest.raises(CompressError, match=rf"^{root / 'train' / 'empty'}: an empty class folder"):
        load(root, tmp_path, bad_files="error")


def test_a_split_without_readable_images_and_missing_folders_are_one_line(tmp_path):
    root = make_folder(tmp_path / "f", per_class=1)
    for png in (root / "test").rglob("*.*"):
        png.write_bytes(b"\x89PNG broken")
    with pytest.raises(CompressError, match=r"^dataset.root: .*/test holds no readable images"):
        load(root, tmp_path)
    with pytest.raises(CompressError, match=r"^dataset.root: dataset=imagefolder needs dataset.root=DIR"):
        build.load(DatasetConfig(name="imagefolder"), mean=None, std=None, search=[], cache_dir=tmp_path, device=CPU)
    (tmp_path / "g" / "train").mkdir(parents=True)
    with pytest.raises(CompressError, match=r"^dataset.root: .*/g has no test/ or val/ folder"):
        load(tmp_path / "g", tmp_path)
    (tmp_path / "g" / "test").mkdir()
    (tmp_path / "g" / "val").mkdir()
    with pytest.raises(CompressError, match=r"^dataset.root: .*/g has both test/ and val/"):
        load(tmp_path / "g", tmp_path)


def test_the_second_load_hits_the_cache_and_a_changed_file_decodes_again(tmp_path):
    root = make_folder(tmp_path / "f")
    first = load(root, tmp_path)
    again = load(root, tmp_path)
    assert "decoded" in first.source and "cached" in again.source and first.identity == again.identity
    assert torch.equal(first.train.images, again.train.images)
    assert len(list((tmp_path / "cache" / "data").glob("imagefolder-*.pt"))) == 1
    os.utime(root / "train" / "ant" / "0.png", ns=(1, 1))
    changed = load(root, tmp_path)
    assert "decoded" in changed.source and changed.identity != first.identity


def test_streaming_under_a_tiny_memory_bound_gives_the_cached_paths_batches(tmp_path):
    root = make_folder(tmp_path / "f")
    spoil(root)
    cached = load(root, tmp_path)
    streamed = load(root, tmp_path, cache_max_mb=0)
    assert isinstance(streamed.train, StreamSplit) and "streamed" in streamed.source
    assert streamed.mean == cached.mean and streamed.std == cached.std  # exact: integer pixel sums
    for split in ("train", "val", "test"):
        for augment in (False, True):
            a = getattr(cached, split).batches(5, shuffle=True, augment=augment, generator=torch.Generator().manual_seed(3))
            b = getattr(streamed, split).batches(5, shuffle=True, augment=augment, generator=torch.Generator().manual_seed(3))
            pairs = list(zip(a, b, strict=True))
            assert pairs and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)
    assert len(list(streamed.train.batches(4, max_batches=2))) == 2


def test_a_file_gone_while_streaming_is_one_line(tmp_path):
    root = make_folder(tmp_path / "f", per_class=2)
    data = load(root, tmp_path, cache_max_mb=0)
    (root / "test" / "ant" / "0.png").write_bytes(b"")
    with pytest.raises(CompressError, match=r"/test/ant/0.png: unreadable while streaming"):
        list(data.test.batches(4))


def test_new_keys_refuse_hostile_values_naming_the_key():
    for override, key in [("dataset.bad_files=maybe", "dataset.bad_files"), ("dataset.cache_max_mb=-1", "dataset.cache_max_mb"),
                          ("dataset.num_classes=1", "dataset.num_classes"),
                          ("dataset.name=folder", "dataset.name"), ("arch.mean=[1,2]", "arch.mean"),
                          ("arch.std=[1,0,1]", "arch.std"), ("dataset.cache_max_mb=99999999999", "dataset.cache_max_mb")]:
        with pytest.raises(CompressError, match=rf"^{key}: "):
            compose([override])
    assert compose(["arch.mean=null", "arch.std=null"]).arch.mean is None


def test_error_mode_through_the_cli_is_exit_2_and_one_line(tmp_path, capsys, monkeypatch):
    from hydra.core.global_hydra import GlobalHydra

    from compress import cli

    root = make_folder(tmp_path / "f", per_class=2)
    text, _ = spoil(root)
    monkeypatch.setattr(sys, "argv", [
        "compress", "run", "dataset=imagefolder", f"dataset.root={root}", "dataset.bad_files=error", "arch=resnet20",
        "arch.checkpoint=random", "method=none", "schedule.epochs=0", "measure.latency=false", "threads=1",
        f"paths.cache={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {text}: UnidentifiedImageError"), lines


# -- the CIFAR-10 folder: a bad PNG is skipped or named, never a traceback --------------------------------
@needs_shared
def test_a_corrupted_copy_of_the_cifar_folder_skips_or_names_the_bad_files(tmp_path, caplog):
    root = tmp_path / "cifar10"
    for split in ("train", "test"):
        for folder in sorted((CIFAR / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for png in sorted(folder.glob("*.png"))[:3]:
                shutil.copy(png, root / split / folder.name / png.name)
    first = sorted((root / "train").rglob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:100])  # truncated
    Image.new("RGB", (64, 64)).save(root / "train" / first.parent.name / "big.png")  # another size
    with pytest.raises(CompressError, match=rf"^{root}/train/.*: .*; dataset.bad_files=skip skips such files$"):
        load_cifar10(root, False, tmp_path / "cache", bad_files="error")
    with caplog.at_level(logging.WARNING, logger="compress"):
        data = build.load(DatasetConfig(root=str(root), val_size=3), mean=[0.5] * 3, std=[0.25] * 3, search=[],
                          cache_dir=tmp_path / "cache", device=CPU)
    assert len(data.train) + len(data.val) == 30 - 1 and len(data.test) == 30
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"dataset.bad_files=skip: skipped 2 unreadable files (first: {first}: ")


def test_an_image_already_at_image_size_is_read_pixel_exact(tmp_path):
    """Resize and crop are the identity at the image's own size: a CIFAR-like 32x32 PNG folder reads the same
    pixels as the CIFAR-10 loader's decoder (torchvision.io), so a CIFAR checkpoint sees what it was trained on."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    from compress.data.folder import decode

    rng = np.random.default_rng(1)
    path = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    assert torch.equal(decode(path, 32), decode_png(read_file(str(path)), ImageReadMode.RGB))
    wide = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(wide)  # 48 wide, 32 high
    assert torch.equal(decode(wide, 32), decode_png(read_file(str(wide)), ImageReadMode.RGB)[:, :, 8:40])  # centre crop


def test_imagenet_computes_a_null_normalisation_from_a_sample_of_its_training_split(tmp_path):
    """dataset=imagenet streams: its sample (here every training image: fewer than the sample's size) gives
    the same exact pixel sums, hence the same values, as the cached imagefolder path on the same split."""
    root = make_folder(tmp_path / "f", test_name="val")
    common = dict(root=str(root), val_size=None, image_size=16)
    streamed = build.load(DatasetConfig(name="imagenet", **common), mean=None, std=None, search=[],
                          cache_dir=tmp_path / "cache", device=CPU)
    cached = load(root, tmp_path)
    assert streamed.mean == cached.mean and streamed.std == cached.std
    assert streamed.num_classes == 3 and streamed.classes == cached.classes
    given = build.load(DatasetConfig(name="imagenet", **common), mean=[0.5] * 3, std=[0.2] * 3, search=[],
                       cache_dir=tmp_path / "cache", device=CPU)
    assert given.mean == pytest.approx((0.5,) * 3) and given.std == pytest.approx((0.2,) * 3)


def test_a_corrupted_torchvision_cifar_batch_is_one_line(tmp_path):
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    (batches / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(CompressError, match=r"^dataset.root: .*cifar-10-batches-py is unreadable \("):
        load_cifar10(tmp_path, False, tmp_path / "cache")
