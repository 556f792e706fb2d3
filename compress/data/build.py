"""Choose and split a data set from the `dataset` config (a checked `DatasetConfig`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from compress import CompressError
from compress.config import DatasetConfig
from compress.data.base import Data, TensorSplit
from compress.data.cifar import detect_layout, load_cifar10
from compress.data.synthetic import make_synthetic

SYNTHETIC_MAX_BYTES = 512 * 2**20  # uint8 pixels of a generated data set

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


def _split_indices(n: int, val_size: int, train_size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if val_size >= n:
        raise CompressError(f"dataset.val_size: {val_size} leaves no training images (the training set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    if train_size is not None:
        train = train[:train_size]
    return train.sort().values, val.sort().values


def _limit(n: int, size: int | None, seed: int) -> torch.Tensor:
    """A fixed random subset (the folders are sorted by class, so a prefix would be one class)."""
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:size].sort().values


def load(cfg: DatasetConfig, *, mean: Sequence[float], std: Sequence[float], search: Sequence[str], cache_dir: Path,
         device: torch.device, channels_last: bool = True) -> Data:
    name = cfg.name
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    sizes = {"train_size": cfg.train_size, "val_size": cfg.val_size, "test_size": cfg.test_size}
    if name == "synthetic":
        # Generated in memory: bounded so that no setting can ask for more than a few hundred MB.
        size, classes = cfg.image_size, cfg.num_classes
        n_train = (sizes["train_size"] or 256) + sizes["val_size"]
        n_test = sizes["test_size"] or 128
        if (n_train + n_test) * 3 * size * size > SYNTHETIC_MAX_BYTES:
            counts = {"train_size": sizes["train_size"] or 0, "val_size": sizes["val_size"], "test_size": n_test}
            key = max(counts, key=counts.get)  # the setting that asks for most of it
            raise CompressError(f"dataset.{key}: a synthetic set of {n_train + n_test} images of {size}x{size} "
                                f"exceeds {SYNTHETIC_MAX_BYTES // 2**20} MiB; use fewer or smaller images")
        train_x, train_y = make_synthetic(n_train, classes, size, seed=cfg.split_seed)
        test_x, test_y = make_synthetic(n_test, classes, size, seed=cfg.split_seed + 1000)
        tensors = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
        source = f"synthetic ({size}x{size}, {classes} classes)"
    elif name == "cifar10":
        root, tried = _find_root("cifar10", cfg.root, search)
        if detect_layout(root) is None and not cfg.download:
            where = ", ".join(str(p) for p in tried)
            raise CompressError(
                f"dataset.root: CIFAR-10 not found (looked in: {where}); set dataset.root=/path/to/cifar10 "
                "(an ImageFolder tree or torchvision's cifar-10-batches-py), or dataset.download=true when online")
        tensors, source = load_cifar10(root, cfg.download, cache_dir / "data")
    elif name == "imagenet":
        return _load_imagenet(cfg, mean, std, search, sizes, channels_last)
    else:
        raise CompressError(f"dataset.name: unknown data set '{name}' (known: cifar10, imagenet, synthetic)")

    seed = cfg.split_seed
    train_idx, val_idx = _split_indices(len(tensors["train_y"]), sizes["val_size"], sizes["train_size"], seed)
    test_idx = _limit(len(tensors["test_y"]), sizes["test_size"], seed)

    def split(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> TensorSplit:
        return TensorSplit(x[idx].to(device), y[idx].to(device), mean_t, std_t, channels_last)

    c, h, w = tensors["train_x"].shape[1:]
    return Data(name=name, num_classes=cfg.num_classes, image_shape=(int(c), int(h), int(w)),
                train=split(tensors["train_x"], tensors["train_y"], train_idx),
                val=split(tensors["train_x"], tensors["train_y"], val_idx),
                test=split(tensors["test_x"], tensors["test_y"], test_idx), source=source)


def _load_imagenet(cfg, mean, std, search, sizes, channels_last) -> Data:
    from compress.data.imagenet import FolderSplit, imagenet_splits

    root, tried = _find_root("imagenet", cfg.root, search)
    if not (root / "train").is_dir():
        where = ", ".join(str(p) for p in tried)
        raise CompressError(f"dataset.root: ImageNet not found (looked in: {where}); set dataset.root=/path/to/imagenet "
                            "(an ImageFolder tree with train/ and val/)")
    size = cfg.image_size
    train_ds, val_ds, train_tf, eval_tf = imagenet_splits(root, mean, std, size)
    seed = cfg.split_seed
    train_idx, val_idx = _split_indices(len(train_ds), sizes["val_size"], sizes["train_size"], seed)
    test_idx = _limit(len(val_ds), sizes["test_size"], seed)
    mk = lambda ds, idx: FolderSplit(ds, idx, train_tf, eval_tf, channels_last)  # noqa: E731
    return Data(name="imagenet", num_classes=cfg.num_classes, image_shape=(3, size, size),
                train=mk(train_ds, train_idx), val=mk(train_ds, val_idx), test=mk(val_ds, test_idx), source=str(root))
