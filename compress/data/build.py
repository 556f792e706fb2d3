"""Choose and split a data set from the `dataset` config (a checked `DatasetConfig`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from compress import CompressError
from compress.config import DatasetConfig
from compress.data.base import Data, TensorSplit
from compress.data.cache import channel_stats, pixel_moments
from compress.data.cifar import detect_layout, load_cifar10
from compress.data.synthetic import make_synthetic

SYNTHETIC_MAX_BYTES = 512 * 2**20  # uint8 pixels of a generated data set
CIFAR_CLASSES = 10
STREAMED_STATS_SAMPLE = 2000  # images a null arch.mean / arch.std is computed from for dataset=imagenet
VAL_FRACTION = 10  # dataset.val_size=null holds out a tenth of the training images (at least 1)

log = logging.getLogger("compress")


def _find_root(name: str, root: str | None, search: Sequence[str]) -> tuple[Path, list[Path]]:
    """The configured root, or the first candidate under `paths.data` that holds the data set."""
    if root:
        return Path(root).expanduser(), [Path(root).expanduser()]
    tried = []
    for base in search:
        base_path = Path(base).expanduser()
        for cand in (base_path / name, base_path):
            tried.append(cand)
            if name == "cifar10" and detect_layout(cand):
                return cand, tried
            if name == "imagenet" and (cand / "train").is_dir() and (cand / "val").is_dir() and cand.name == name:
                return cand, tried
    return (Path(search[0]).expanduser() / name if search else Path(name)), tried


def val_count(n: int, val_size: int | None) -> int:
    """How many training images validate: `val_size`, or a tenth of the n (at least 1) when it is null."""
    return val_size if val_size is not None else max(1, n // VAL_FRACTION)


def _split_indices(n: int, val_size: int | None, train_size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    held = val_count(n, val_size)
    if held >= n:
        given = f"{val_size}" if val_size is not None else f"null (a tenth, at least 1: {held})"
        raise CompressError(f"dataset.val_size: {given} leaves no training images (the training set has {n})")
    val_size = held
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    if train_size is not None:
        train = train[:train_size]
    return train.sort().values, val.sort().values


def _halve(test_idx: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """val_from=test: a fixed random half of the test indices for validation, the rest for test (sorted).
    An odd count gives test the extra image."""
    perm = torch.randperm(len(test_idx), generator=torch.Generator().manual_seed(seed + 2))
    half = len(test_idx) // 2
    return test_idx[perm[:half]].sort().values, test_idx[perm[half:]].sort().values


def split_indices(n_train: int, n_test: int, cfg: DatasetConfig) -> dict[str, torch.Tensor]:
    """Indices of the train / val / test splits: val held out of the training set (val_from=train) or a
    fixed half of the (size-limited) test set (val_from=test). Rows into the training or the test tensors."""
    seed = cfg.split_seed
    test_idx = _limit(n_test, cfg.test_size, seed)
    if cfg.val_from == "test":
        if len(test_idx) < 2:
            raise CompressError(f"dataset.test_size: val_from=test halves the test set, which has {len(test_idx)} image(s)")
        val_idx, test_idx = _halve(test_idx, seed)
        train_idx = _limit(n_train, cfg.train_size, seed)
        return {"train": train_idx, "val": val_idx, "test": test_idx}
    train_idx, val_idx = _split_indices(n_train, cfg.val_size, cfg.train_size, seed)
    return {"train": train_idx, "val": val_idx, "test": test_idx}


def _limit(n: int, size: int | None, seed: int) -> torch.Tensor:
    """A fixed random subset (the folders are sorted by class, so a prefix would be one class)."""
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:size].sort().values


def normalisation(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                  moments: Callable[[], tuple[torch.Tensor, torch.Tensor]], pixels_per_image: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`arch.mean` / `arch.std` as given; either one null: computed per channel from the training split's
    pixels (`moments()`: their `pixel_moments`), and logged."""
    if mean is None or std is None:
        sums, squares = moments()
        computed_mean, computed_std = channel_stats(sums, squares, pixels_per_image)
        log.info("normalisation computed from the %d training images: mean [%s], std [%s]%s", sums.shape[0],
                 ", ".join(f"{v:.4f}" for v in computed_mean), ", ".join(f"{v:.4f}" for v in computed_std),
                 "" if mean is None and std is None else " (the given one of arch.mean / arch.std kept)")
        mean = computed_mean if mean is None else mean
        std = computed_std if std is None else std
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def load(cfg: DatasetConfig, *, mean: Optional[Sequence[float]], std: Optional[Sequence[float]], search: Sequence[str],
         cache_dir: Path, device: torch.device, channels_last: bool = True) -> Data:
    """The configured data set's train / val / test splits, normalised by `mean` / `std` (null: computed
    from the training split)."""
    name = cfg.name
    sizes = {"train_size": cfg.train_size, "val_size": cfg.val_size, "test_size": cfg.test_size}
    if name == "synthetic":
        # Generated in memory: bounded so that no setting can ask for more than a few hundred MB.
        size, classes = cfg.image_size, cfg.num_classes or CIFAR_CLASSES
        n_train = (sizes["train_size"] or 256) + ((sizes["val_size"] or 0) if cfg.val_from == "train" else 0)
        n_test = sizes["test_size"] or 128
        if (n_train + n_test) * 3 * size * size > SYNTHETIC_MAX_BYTES:
            counts = {"train_size": sizes["train_size"] or 0, "val_size": sizes["val_size"] or 0, "test_size": n_test}
            key = max(counts, key=counts.get)  # the setting that asks for most of it
            raise CompressError(f"dataset.{key}: a synthetic set of {n_train + n_test} images of {size}x{size} "
                                f"exceeds {SYNTHETIC_MAX_BYTES // 2**20} MiB; use fewer or smaller images")
        train_x, train_y = make_synthetic(n_train, classes, size, seed=cfg.split_seed)
        test_x, test_y = make_synthetic(n_test, classes, size, seed=cfg.split_seed + 1000)
        tensors = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        source = f"synthetic ({size}x{size}, {classes} classes)"
        identity = f"synthetic:{size}:{classes}:{cfg.split_seed}"
    elif name == "cifar10":
        if cfg.num_classes is not None and cfg.num_classes != CIFAR_CLASSES:
            raise CompressError(f"dataset.num_classes: {cfg.num_classes}, but CIFAR-10 has {CIFAR_CLASSES} classes; "
                                "leave it null")
        classes = CIFAR_CLASSES
        root, tried = _find_root("cifar10", cfg.root, search)
        if detect_layout(root) is None and not cfg.download:
            where = ", ".join(str(p) for p in tried)
            raise CompressError(
                f"dataset.root: CIFAR-10 not found (looked in: {where}); set dataset.root=/path/to/cifar10 "
                "(an ImageFolder tree or torchvision's cifar-10-batches-py), or dataset.download=true when online")
        tensors, source, content = load_cifar10(root, cfg.download, cache_dir / "data", cfg.bad_files)
        identity = f"cifar10:{content}"
    elif name == "imagefolder":
        return _load_imagefolder(cfg, mean, std, cache_dir, device, channels_last)
    elif name == "imagenet":
        return _load_imagenet(cfg, mean, std, search, channels_last)
    else:
        raise CompressError(f"dataset.name: unknown data set '{name}' (known: cifar10, imagefolder, imagenet, synthetic)")

    idx = split_indices(len(tensors["train_y"]), len(tensors["test_y"]), cfg)
    val_x, val_y = (tensors["test_x"], tensors["test_y"]) if cfg.val_from == "test" else (tensors["train_x"], tensors["train_y"])
    train_x = tensors["train_x"][idx["train"]]
    c, h, w = tensors["train_x"].shape[1:]
    mean_t, std_t = normalisation(mean, std, lambda: pixel_moments(train_x), int(h * w))

    def split(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None) -> TensorSplit:
        return TensorSplit((x if idx is None else x[idx]).to(device), (y if idx is None else y[idx]).to(device),
                           mean_t, std_t, channels_last)

    return Data(name=name, num_classes=classes, image_shape=(int(c), int(h), int(w)),
                train=split(train_x, tensors["train_y"][idx["train"]], None), val=split(val_x, val_y, idx["val"]),
                test=split(tensors["test_x"], tensors["test_y"], idx["test"]), source=source, identity=identity,
                val_from=cfg.val_from, mean=tuple(mean_t.tolist()), std=tuple(std_t.tolist()))


def _load_imagefolder(cfg: DatasetConfig, mean, std, cache_dir: Path, device: torch.device, channels_last: bool) -> Data:
    from compress.data.folder import StreamSplit, load_imagefolder

    loaded = load_imagefolder(cfg, cache_dir / "data")
    train, test = loaded.splits["train"], loaded.splits["test"]
    idx = split_indices(len(train["y"]), len(test["y"]), cfg)
    size = cfg.image_size
    mean_t, std_t = normalisation(mean, std, lambda: (train["sums"][idx["train"]], train["squares"][idx["train"]]),
                                  size * size)
    padding = max(1, size // 8)  # CIFAR's 4 pixels at 32, in proportion at other sizes

    def split(images: dict, rows: torch.Tensor):
        if loaded.streamed:
            return StreamSplit([images["paths"][i] for i in rows.tolist()], images["y"][rows], mean_t, std_t, size,
                               channels_last, padding, device)
        return TensorSplit(images["x"][rows].to(device), images["y"][rows].to(device), mean_t, std_t, channels_last, padding)

    return Data(name="imagefolder", num_classes=len(loaded.classes), image_shape=(3, size, size),
                train=split(train, idx["train"]), val=split(test if cfg.val_from == "test" else train, idx["val"]),
                test=split(test, idx["test"]), source=loaded.source, identity=loaded.identity, val_from=cfg.val_from,
                mean=tuple(mean_t.tolist()), std=tuple(std_t.tolist()), classes=tuple(loaded.classes))


def _load_imagenet(cfg, mean, std, search, channels_last) -> Data:
    from compress.data.folder import sample_moments
    from compress.data.imagenet import FolderSplit, imagenet_folders, imagenet_transforms

    root, tried = _find_root("imagenet", cfg.root, search)
    if not (root / "train").is_dir():
        where = ", ".join(str(p) for p in tried)
        raise CompressError(f"dataset.root: ImageNet not found (looked in: {where}); set dataset.root=/path/to/imagenet "
                            "(an ImageFolder tree with train/ and val/)")
    size = cfg.image_size
    train_ds, val_ds = imagenet_folders(root)
    idx = split_indices(len(train_ds), len(val_ds), cfg)
    # Streamed: a null arch.mean / arch.std is computed from a fixed random sample of the training split.
    sample = idx["train"][torch.randperm(len(idx["train"]), generator=torch.Generator().manual_seed(cfg.split_seed + 3))
                          [:STREAMED_STATS_SAMPLE]]
    sample_files = lambda: [Path(train_ds.samples[i][0]) for i in sample.tolist()]  # noqa: E731
    mean_t, std_t = normalisation(mean, std, lambda: sample_moments(sample_files(), size), size * size)
    train_tf, eval_tf = imagenet_transforms(mean_t.tolist(), std_t.tolist(), size)
    mk = lambda ds, i: FolderSplit(ds, i, train_tf, eval_tf, channels_last)  # noqa: E731
    # ImageNet's own val/ folder plays the test set; val_from=test halves it.
    return Data(name="imagenet", num_classes=cfg.num_classes or len(train_ds.classes), image_shape=(3, size, size),
                train=mk(train_ds, idx["train"]), val=mk(val_ds if cfg.val_from == "test" else train_ds, idx["val"]),
                test=mk(val_ds, idx["test"]), source=str(root), identity=f"imagenet:{root.resolve()}", val_from=cfg.val_from,
                mean=tuple(mean_t.tolist()), std=tuple(std_t.tolist()), classes=tuple(train_ds.classes))
