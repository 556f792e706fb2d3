"""ImageNet from an ImageFolder tree (train/, val/), streamed through torchvision transforms.

It is far too large for an in-memory tensor, so batches come from a DataLoader with worker processes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from compress import CompressError


@dataclass
class FolderSplit:
    dataset: torch.utils.data.Dataset
    indices: torch.Tensor
    train_transform: object
    eval_transform: object
    channels_last: bool = True
    workers: int = max(1, (os.cpu_count() or 2) - 1)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def batches(self, batch_size, *, shuffle=False, augment=False, generator=None, max_batches=None):
        order = self.indices[torch.randperm(len(self), generator=generator)] if shuffle else self.indices
        ds = _Transformed(self.dataset, order.tolist(), self.train_transform if augment else self.eval_transform)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=self.workers)
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            yield (x.contiguous(memory_format=torch.channels_last) if self.channels_last else x), y


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, base, indices, transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        path, label = self.base.samples[self.indices[i]]
        return self.transform(self.base.loader(path)), label


def imagenet_folders(root: Path):
    """torchvision ImageFolders of train/ and val/."""
    from torchvision import datasets

    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise CompressError(f"dataset.root: no ImageNet ImageFolder tree (train/, val/) at {root}")
    return datasets.ImageFolder(str(root / "train")), datasets.ImageFolder(str(root / "val"))


def imagenet_transforms(mean, std, image_size: int):
    """torchvision's ImageNet recipe: RandomResizedCrop + flip for training; resize to 256/224 of the size,
    centre crop, for evaluation."""
    from torchvision import transforms

    norm = transforms.Normalize(mean, std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    eval_tf = transforms.Compose([transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size),
                                  transforms.ToTensor(), norm])
    return train_tf, eval_tf
