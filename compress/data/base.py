"""Splits: iterate normalised float batches on a device. Augmentation runs on batched uint8 tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, for a whole (B, C, H, W) batch at once."""
    b, c, h, w = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(dev)
    rows = (offsets[0, :, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(w, device=dev))[:, None, None, :]
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    # Flipping = reading the crop's columns right to left.
    cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch_idx = torch.arange(b, device=dev)[:, None, None, None]
    chan_idx = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows, cols]


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float `(pixels / 255 - mean) / std`, channels-last when asked."""
    mean = mean.to(images.device).view(1, -1, 1, 1)
    std = std.to(images.device).view(1, -1, 1, 1)
    x = (images.float().div_(255.0) - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class Split(Protocol):
    """What training, evaluation and calibration need from a data split."""

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, *, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, max_batches: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class TensorSplit:
    """uint8 images (N, C, H, W) and int64 labels held in memory (on the training device)."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor  # (C,) on [0,1] scale
    std: torch.Tensor
    channels_last: bool = True
    padding: int = 4

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device) -> "TensorSplit":
        return TensorSplit(self.images.to(device), self.labels.to(device), self.mean, self.std,
                           self.channels_last, self.padding)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self.mean, self.std, self.channels_last)

    def batches(self, batch_size, *, shuffle=False, augment=False, generator=None, max_batches=None):
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        order = order.to(self.images.device)
        count = (n + batch_size - 1) // batch_size
        if max_batches is not None:
            count = min(count, max_batches)
        for i in range(count):
            idx = order[i * batch_size:(i + 1) * batch_size]
            images = self.images.index_select(0, idx)
            if augment:
                images = random_crop_flip(images, self.padding, generator)
            yield self.normalise(images), self.labels.index_select(0, idx)


@dataclass
class Data:
    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train: Split
    val: Split
    test: Split
    source: str  # where it came from, for the log
    identity: str  # what the images are (a content key, not a path): caches derived from the data are keyed by it
    val_from: str = "train"  # the validation images: held out of train, or a half of the test set
    mean: tuple[float, ...] = ()  # the normalisation the batches carry (arch.mean, or computed from train)
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()  # class names in label order, where the data names them
