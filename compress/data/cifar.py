"""CIFAR-10 from an ImageFolder tree (train/<class>/*.png, test/<class>/*.png) or torchvision's
cifar-10-batches-py, decoded once into a uint8 tensor cache keyed by the files' content."""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from compress import CompressError
from compress.config import DatasetConfig
from compress.data.cache import cached, reason, skip_or_stop

log = logging.getLogger("compress")


def detect_layout(root: Path) -> tuple[str, Path] | None:
    """('imagefolder', root) or ('torchvision', dir holding cifar-10-batches-py) or None."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder", root
    if (root / "cifar-10-batches-py" / "data_batch_1").is_file():
        return "torchvision", root
    if root.name == "cifar-10-batches-py" and (root / "data_batch_1").is_file():
        return "torchvision", root.parent
    return None


def _files(root: Path, layout: str) -> list[Path]:
    if layout == "torchvision":
        return sorted((root / "cifar-10-batches-py").iterdir())
    return sorted(p for split in ("train", "test") for p in (root / split).rglob("*.png"))


def content_key(root: Path, layout: str) -> str:
    """A hash of the files' relative names and bytes; not of where they lie or when they were copied, so a
    fresh copy of the same images (new mtimes, another folder) finds the same decoded cache, and weights
    pretrained on them keep their key across sessions. Reading the 135 MB of PNGs costs about 1.9 s."""
    files = _files(root, layout)
    h = hashlib.sha256(layout.encode())
    for p in files:  # sequential: a thread pool's futures cost more than the reads (5.5 s against 1.9 s)
        data = p.read_bytes()
        h.update(f"{p.relative_to(root).as_posix()}:{len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()[:16]


CIFAR_SHAPE = (3, 32, 32)


def _decode_folder(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The split's readable 32x32 PNGs as uint8 (N, 3, 32, 32), their labels, and the unreadable ones
    (`"<path>: <reason>"`: not a PNG, truncated, another size) for `dataset.bad_files`."""
    from torchvision.io import ImageReadMode, decode_png, read_file

    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if len(classes) != 10:
        raise CompressError(f"dataset.root: {split_dir} should hold 10 class folders, found {len(classes)}")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted((split_dir / cls).glob("*.png"))
        files += found
        labels += [label] * len(found)

    def name(p: Path) -> str:  # relative to the root: the cache is keyed by content, so a copy elsewhere hits it
        return p.relative_to(split_dir.parent).as_posix()

    def decode(p: Path) -> torch.Tensor | str:
        try:
            image = decode_png(read_file(str(p)), ImageReadMode.RGB)
        except Exception as e:  # libpng's errors (not a PNG, truncated) all mean: unreadable
            return f"{name(p)}: {reason(e)}"
        if tuple(image.shape) != CIFAR_SHAPE:
            return f"{name(p)}: {image.shape[2]}x{image.shape[1]}, not CIFAR-10's 32x32"
        return image

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        decoded = list(pool.map(decode, files, chunksize=256))
    good = [isinstance(d, torch.Tensor) for d in decoded]
    images = [d for d in decoded if isinstance(d, torch.Tensor)]
    if not images:
        raise CompressError(f"dataset.root: {split_dir} holds no readable 32x32 PNGs")
    kept = torch.tensor(labels, dtype=torch.int64)[torch.tensor(good, dtype=torch.bool)]
    return torch.stack(images), kept, [d for d in decoded if isinstance(d, str)]


def _decode_torchvision(root: Path, download: bool) -> dict[str, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = CIFAR10(str(root), train=train, download=download)
        out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.int64)
    return out


def load_cifar10(root: Path, download: bool, cache_dir: Path, bad_files: str = DatasetConfig.bad_files
                 ) -> tuple[dict[str, torch.Tensor], str, str]:
    """uint8 train/test tensors, a line for the log and the content key; decodes at most once per distinct
    content (cached under cache_dir)."""
    found = detect_layout(root)
    if found is None:
        if not download:
            raise CompressError(f"dataset.root: no CIFAR-10 at {root}")
        try:
            _decode_torchvision(root, download=True)
        except Exception as e:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
            raise CompressError(
                f"dataset.download: could not download CIFAR-10 into {root} ({type(e).__name__}: {e}); "
                "offline? point dataset.root at a local copy") from e
        found = detect_layout(root)
        assert found is not None
    layout, base = found
    key = content_key(base, layout)

    def produce() -> dict:
        log.info("decoding CIFAR-10 from %s (%s layout) once; cache: %s", base, layout, cache_dir / f"cifar10-{key}.pt")
        if layout == "torchvision":
            try:
                return _decode_torchvision(base, download=False)
            except Exception as e:  # torchvision's md5 check ("Dataset not found or corrupted"), a torn pickle
                raise CompressError(f"dataset.root: {base / 'cifar-10-batches-py'} is unreadable ({reason(e)}); "
                                    "restore it, or point dataset.root at another copy") from None
        tensors: dict = {"bad": []}
        for split in ("train", "test"):
            tensors[f"{split}_x"], tensors[f"{split}_y"], bad = _decode_folder(base / split)
            tensors["bad"] += bad
        return tensors

    tensors, hit = cached(cache_dir / f"cifar10-{key}.pt", produce)
    # Caches written before bad files were tracked hold none: every file of theirs was read.
    skip_or_stop([f"{base / b}" for b in tensors.pop("bad", [])], [], bad_files)
    return tensors, f"{base} ({layout}{', cached' if hit else ''})", key
