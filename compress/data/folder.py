"""Any image folder (`dataset=imagefolder dataset.root=DIR`): DIR/train/<class>/... and DIR/test/<class>/...
(or DIR/val/<class>/...), images of any size and mode (grey, RGBA, palette; PNG, JPEG, WebP, ...).

Every image becomes RGB at `image_size` x `image_size` the way torchvision evaluates ImageNet models:
the shorter side resized to `image_size` (bilinear, antialiased), then the centre square cropped. That
uint8 image is what the cache holds and what evaluation sees; training adds the batched random crop
(zero padding of image_size / 8) and flip of `compress.data.base.random_crop_flip`.

When the decoded pixels fit `dataset.cache_max_mb`, the images are decoded once (in a thread pool: PIL
releases the GIL while it decodes and resizes) into a uint8 tensor cache keyed by the files' names, sizes
and modification times and the image size; otherwise one decoding pass writes an index (the readable
files, their labels and pixel sums) to the cache and `StreamSplit` decodes each batch from the files.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress import CompressError
from compress.config import DatasetConfig
from compress.data.base import normalise, random_crop_flip
from compress.data.cache import cached, log, pixel_moments, reason, skip_or_stop

CACHE_VERSION = 1       # part of the cache key: bump it when the decoding below changes what it produces
CHUNK_FILES = 2048      # files decoded per chunk of the first pass: bounds the pool's queue, not the work
TEST_FOLDERS = ("test", "val")


def decode_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(8, 2 * cores)  # decoders wait on the file system too: two threads a core


def image_files() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def decode(path: Path, size: int) -> torch.Tensor:
    """One file as a (3, size, size) uint8 tensor: RGB, shorter side resized to `size`, centre crop."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at the smallest DCT scale still >= size (much faster)
        rgb = im.convert("RGB")  # grey, palette, RGBA (alpha dropped), CMYK ...; loads, so truncation raises here
    return F.pil_to_tensor(F.center_crop(F.resize(rgb, size, antialias=True), [size, size]))


@dataclass
class Listing:
    """The image files of one split, sorted by class folder then name, with their class folder's index."""

    folder: Path
    classes: list[str]                 # every class folder, sorted
    files: list[Path]
    labels: torch.Tensor               # index into `classes`


def _list_split(folder: Path) -> Listing:
    extensions = image_files()
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = sorted(p for p in (folder / cls).rglob("*")
                       if p.suffix.lower() in extensions and not p.name.startswith(".") and p.is_file())
        files += found
        labels += [label] * len(found)
    return Listing(folder, classes, files, torch.tensor(labels, dtype=torch.int64))


def find_splits(root: Path) -> dict[str, Path]:
    """{"train": DIR/train, "test": DIR/test or DIR/val}, or one line saying what is missing."""
    if not root.is_dir():
        raise CompressError(f"dataset.root: {root} is not a folder (dataset=imagefolder needs DIR/train/<class>/ "
                            "and DIR/test/<class>/ or DIR/val/<class>/)")
    if not (root / "train").is_dir():
        raise CompressError(f"dataset.root: {root} has no train/ folder "
                            "(expected train/<class>/ and test/<class>/ or val/<class>/)")
    tests = [root / name for name in TEST_FOLDERS if (root / name).is_dir()]
    if not tests:
        raise CompressError(f"dataset.root: {root} has no test/ or val/ folder beside train/")
    if len(tests) > 1:
        raise CompressError(f"dataset.root: {root} has both test/ and val/; keep the one to report on "
                            "(the validation images are held out of train/, or dataset.val_from=test halves it)")
    return {"train": root / "train", "test": tests[0]}


def listing_key(listings: dict[str, Listing], root: Path, size: int) -> str:
    """The cache key: each file's path relative to DIR, byte size and modification time, and the decoding
    (image size, version). Stat only, no reads: a folder of large photos is not re-read to find its cache;
    a copy with new modification times decodes again."""
    h = hashlib.sha256(f"imagefolder:{CACHE_VERSION}:{size}".encode())
    for name, listing in listings.items():
        h.update(f"[{name}:{listing.folder.name}:{','.join(listing.classes)}]".encode())
        for p in listing.files:
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode_listing(listing: Listing, root: Path, size: int, keep_pixels: bool) -> dict:
    """One pass over a split's files: the readable ones' indices, pixel moments and (keep_pixels) images."""
    n = len(listing.files)
    pixels = torch.empty(n if keep_pixels else 0, 3, size, size, dtype=torch.uint8)
    sums, squares = torch.zeros(n, 3, dtype=torch.int64), torch.zeros(n, 3, dtype=torch.int64)
    errors: list[str | None] = [None] * n

    def one(i: int) -> None:
        try:
            image = decode(listing.files[i], size)
        except Exception as e:  # whatever the decoder says (not an image, truncated, too large): unreadable
            errors[i] = f"{listing.files[i].relative_to(root).as_posix()}: {reason(e)}"  # relative: a moved copy hits the cache
            return
        if keep_pixels:
            pixels[i] = image
        s, q = pixel_moments(image[None])
        sums[i], squares[i] = s[0], q[0]

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for start in range(0, n, CHUNK_FILES):
            list(pool.map(one, range(start, min(n, start + CHUNK_FILES))))
    good = torch.tensor([e is None for e in errors], dtype=torch.bool)
    out = {"files": [p.relative_to(root).as_posix() for p, e in zip(listing.files, errors) if e is None],
           "y": listing.labels[good], "sums": sums[good], "squares": squares[good],
           "bad": [e for e in errors if e is not None]}
    if keep_pixels:
        out["x"] = pixels if bool(good.all()) else pixels[good]  # a copy only when some files were unreadable
    return out


def sample_moments(paths: list[Path], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixel_moments` of the readable ones of `paths`, decoded as above (no pixels kept): the normalisation
    of a data set too large to decode whole, from a sample of it."""
    paths = [p.resolve() for p in paths]
    listing = Listing(Path("/"), ["sample"], paths, torch.zeros(len(paths), dtype=torch.int64))
    decoded = _decode_listing(listing, Path("/"), size, keep_pixels=False)
    return decoded["sums"], decoded["squares"]


@dataclass
class FolderImages:
    """A loaded image folder: per split (train, test) the uint8 images (cached) or the files (streamed),
    labels into `classes`, and per-image pixel moments (for the normalisation)."""

    classes: list[str]
    splits: dict[str, dict]
    streamed: bool
    source: str
    identity: str


def load_imagefolder(cfg: DatasetConfig, cache_dir: Path) -> FolderImages:
    if not cfg.root:
        raise CompressError("dataset.root: dataset=imagefolder needs dataset.root=DIR "
                            "(DIR/train/<class>/ and DIR/test/<class>/ or val/)")
    root = Path(cfg.root).expanduser()
    try:
        listings = {name: _list_split(folder) for name, folder in find_splits(root).items()}
    except OSError as e:  # a folder we may not list (permissions), a file vanishing while we look
        raise CompressError(f"dataset.root: cannot list {root}: {reason(e)}") from None
    size = cfg.image_size
    count = sum(len(listing.files) for listing in listings.values())
    decoded_mb = count * 3 * size * size / 2**20
    streamed = decoded_mb > cfg.cache_max_mb
    key = listing_key(listings, root, size)
    cache_file = cache_dir / f"imagefolder-{key}{'-index' if streamed else ''}.pt"

    def produce() -> dict:
        log.info("decoding %d images of %s once at %dx%d (%s; %.0f MiB decoded, dataset.cache_max_mb=%d): %s",
                 count, root, size, size, "index only, streamed" if streamed else "cached", decoded_mb,
                 cfg.cache_max_mb, cache_file)
        return {name: _decode_listing(listing, root, size, keep_pixels=not streamed) for name, listing in listings.items()}

    decoded, hit = cached(cache_file, produce)
    classes, splits = _classes(listings, decoded, cfg.bad_files)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise CompressError(f"dataset.num_classes: {cfg.num_classes}, but {root / 'train'} has {len(classes)} classes "
                            f"({_names(classes)}); leave it null to take the folders' count")
    for split in splits.values():
        if streamed:
            split["paths"] = [root / f for f in split["files"]]
    how = "streamed" if streamed else ("cached" if hit else "decoded")
    return FolderImages(classes, splits, streamed, f"{root} (imagefolder, {len(classes)} classes, {how})",
                        f"imagefolder:{key}")


def _names(classes: list[str], most: int = 8) -> str:
    shown = ", ".join(classes[:most])
    return shown + (f", ... ({len(classes) - most} more)" if len(classes) > most else "")


def _classes(listings: dict[str, Listing], decoded: dict, policy: str) -> tuple[list[str], dict[str, dict]]:
    """The classes (class folders with readable images, the same set in train and test) and each split's
    labels remapped onto them; unreadable files and empty class folders go through `dataset.bad_files`."""
    root = listings["train"].folder.parent
    bad = [f"{root / b}" for name in listings for b in decoded[name]["bad"]]
    empty, present = [], {}
    for name, listing in listings.items():
        counts = torch.bincount(decoded[name]["y"], minlength=len(listing.classes))
        present[name] = [c for c, k in zip(listing.classes, counts.tolist()) if k > 0]
        empty += [str(listing.folder / c) for c, k in zip(listing.classes, counts.tolist()) if k == 0]
    skip_or_stop(bad, empty, policy)
    for name, listing in listings.items():
        if not present[name]:
            raise CompressError(f"dataset.root: {listing.folder} holds no readable images "
                                f"(in class folders {listing.folder}/<class>/)")
    train, test = set(present["train"]), set(present["test"])
    if train != test:
        folder = listings["test"].folder
        only_train, only_test = sorted(train - test), sorted(test - train)
        differ = "; ".join(part for part in (f"only in train/: {_names(only_train)}" if only_train else "",
                                               f"only in {folder.name}/: {_names(only_test)}" if only_test else "") if part)
        raise CompressError(f"dataset.root: {folder} and {listings['train'].folder} hold different classes ({differ})")
    if len(train) < 2:
        raise CompressError(f"dataset.root: {listings['train'].folder} holds one class ({_names(sorted(train))}); "
                            "a classifier needs at least 2")
    classes = sorted(train)
    splits = {}
    for name, listing in listings.items():
        position = {c: i for i, c in enumerate(classes)}
        to_class = torch.tensor([position.get(c, -1) for c in listing.classes], dtype=torch.int64)
        splits[name] = {**decoded[name], "y": to_class[decoded[name]["y"]]}
    return classes, splits


@dataclass
class StreamSplit:
    """A split too large for the cache: each batch decoded from its files (thread pool, the next batch
    decoded while the current one is used), then augmented and normalised as `TensorSplit` does, with the
    same draws from the generator: the same batches as the cached path, in bounded memory."""

    paths: list[Path]
    labels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    image_size: int
    channels_last: bool = True
    padding: int = 4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _read(self, i: int) -> torch.Tensor:
        try:
            return decode(self.paths[i], self.image_size)
        except Exception as e:
            raise CompressError(f"{self.paths[i]}: unreadable while streaming ({reason(e)}); it was readable when "
                                "the folder was indexed: restore it, or touch the folder's files to index it again") from None

    def batches(self, batch_size, *, shuffle=False, augment=False, generator=None, max_batches=None):
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        count = (n + batch_size - 1) // batch_size
        if max_batches is not None:
            count = min(count, max_batches)
        labels = self.labels.to(self.device)
        with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
            submit = lambda b: [pool.submit(self._read, i) for i in order[b * batch_size:(b + 1) * batch_size].tolist()]  # noqa: E731
            pending = submit(0) if count else []
            for b in range(count):
                images = torch.stack([f.result() for f in pending]).to(self.device)
                pending = submit(b + 1) if b + 1 < count else []
                idx = order[b * batch_size:(b + 1) * batch_size].to(self.device)
                if augment:
                    images = random_crop_flip(images, self.padding, generator)
                yield normalise(images, self.mean, self.std, self.channels_last), labels.index_select(0, idx)
