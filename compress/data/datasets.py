"""Splits from the user's own `torch.utils.data.Dataset`s (the Python API, compress/api.py).

Each item is `(image, label)`: the image as the model takes it (a CHW float tensor: the dataset's own
transforms normalise and, for the training set, augment it) and an integer label. Batches are collated by
a DataLoader over index subsets, so memory stays at one batch whatever the data set's size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compress import CompressError
from compress.data.base import Data


@dataclass
class DatasetSplit:
    """Rows `indices` of `dataset`. `augment` is the dataset's business (its transforms), so it is ignored."""

    dataset: torch.utils.data.Dataset
    indices: torch.Tensor
    channels_last: bool = True

    def __len__(self) -> int:
        return int(self.indices.numel())

    def batches(self, batch_size, *, shuffle=False, augment=False, generator=None, max_batches=None):
        order = self.indices[torch.randperm(len(self), generator=generator)] if shuffle else self.indices
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.dataset, order.tolist()),
                                             batch_size=batch_size, num_workers=0)
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = x.float()
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x), \
                torch.as_tensor(y, dtype=torch.int64)


def _first_item(dataset, role: str) -> tuple[torch.Tensor, int]:
    try:
        n = len(dataset)
    except TypeError:
        raise CompressError(f"data.{role}: a map-style Dataset with a length is needed, got {type(dataset).__name__}") from None
    if n == 0:
        raise CompressError(f"data.{role}: the dataset is empty")
    item = dataset[0]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise CompressError(f"data.{role}: items must be (image, label) pairs, got {type(item).__name__}")
    image, label = item
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        what = f"a {image.dim()}-d {image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image).__name__
        raise CompressError(f"data.{role}: images must be CHW float tensors as the model takes them "
                            f"(add torchvision's ToTensor/Normalize to its transform), got {what}")
    if not isinstance(label, int) and not (isinstance(label, torch.Tensor) and label.numel() == 1):
        raise CompressError(f"data.{role}: labels must be integers, got {type(label).__name__}")
    return image, int(label)


def from_datasets(train, test, val=None, *, num_classes: int, val_size: int = 5000, split_seed: int = 0,
                  channels_last: bool = True, name: str = "") -> Data:
    """A `Data` bundle from map-style Datasets. Without `val`, `val_size` items are held out of `train`
    (a fixed split by `split_seed`, as for the image folders): decisions never use the test set."""
    from compress.data.build import _split_indices

    image, _ = _first_item(train, "train")
    for role, ds in (("test", test), ("val", val)):
        if ds is not None:
            other, _ = _first_item(ds, role)
            if other.shape != image.shape:
                raise CompressError(f"data.{role}: images of shape {tuple(other.shape)}, but the training images "
                                    f"are {tuple(image.shape)}")
    n_train = len(train)
    if val is None:
        train_idx, val_idx = _split_indices(n_train, val_size, None, split_seed)
        val_split = DatasetSplit(train, val_idx, channels_last)
    else:
        train_idx = torch.arange(n_train)
        val_split = DatasetSplit(val, torch.arange(len(val)), channels_last)
    label = name or type(train).__name__
    c, h, w = (int(s) for s in image.shape)
    return Data(name=label, num_classes=num_classes, image_shape=(c, h, w),
                train=DatasetSplit(train, train_idx, channels_last), val=val_split,
                test=DatasetSplit(test, torch.arange(len(test)), channels_last),
                source=f"{label} (in memory: train {n_train}, test {len(test)})",
                identity=f"memory:{label}:{n_train}:{len(test)}:{id(train)}", val_from="train" if val is None else "given")
