"""What the folder loaders share: the decoded-image cache (one file of tensors per distinct content, under
`paths.cache`), the bad-file policy (`dataset.bad_files`) and per-channel pixel statistics."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import torch

from compress import CompressError

log = logging.getLogger("compress")

REASON_CHARS = 160  # a decoder's message, cut so that the one line stays readable


def cached(cache_file: Path, produce: Callable[[], dict]) -> tuple[dict, bool]:
    """The tensors stored in `cache_file`, or `produce()`'s, then stored there (atomically: a run killed
    while writing leaves no half file); and whether they came from the cache."""
    if cache_file.is_file():
        try:
            return torch.load(cache_file, map_location="cpu", weights_only=True), True
        except Exception:  # a torn or foreign file: decoding again is the fix
            log.warning("data cache %s unreadable; decoding again", cache_file)
    tensors = produce()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    torch.save(tensors, tmp)
    os.replace(tmp, cache_file)
    return tensors, False


def reason(error: BaseException) -> str:
    """A decoder's exception as a short one-line reason."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:REASON_CHARS]


def skip_or_stop(bad: list[str], empty: list[str], policy: str) -> None:
    """Apply `dataset.bad_files` to the unreadable files (`"<path>: <reason>"`) and empty class folders
    found: `error` stops on the first, naming it; `skip` logs one warning line that counts them."""
    if not bad and not empty:
        return
    if policy == "error":
        if bad:
            raise CompressError(f"{bad[0]}; dataset.bad_files=skip skips such files")
        raise CompressError(f"{empty[0]}: an empty class folder (no readable images); dataset.bad_files=skip skips it")
    parts = []
    if bad:
        parts.append(f"{len(bad)} unreadable file{'s' if len(bad) > 1 else ''} (first: {bad[0]})")
    if empty:
        parts.append(f"{len(empty)} empty class folder{'s' if len(empty) > 1 else ''} (first: {empty[0]})")
    log.warning("dataset.bad_files=skip: skipped %s; dataset.bad_files=error stops on them instead", " and ".join(parts))


def pixel_moments(images: torch.Tensor, chunk_elements: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the sum of the uint8 pixels and of their squares, (N, C) int64 each: exact
    integers, so that statistics summed from them do not depend on how the images were batched (cached or
    streamed). Computed in chunks of at most `chunk_elements` pixels (float64 per image: exact below 2^53)."""
    n, c = images.shape[:2]
    per_image = max(1, images[0].numel()) if n else 1
    step = max(1, chunk_elements // per_image)
    sums, squares = torch.empty(n, c, dtype=torch.int64), torch.empty(n, c, dtype=torch.int64)
    for start in range(0, n, step):  # chunks of many images each: bounded float64 memory
        x = images[start:start + step].to("cpu", torch.float64).flatten(2)
        sums[start:start + step] = x.sum(2).to(torch.int64)
        squares[start:start + step] = x.square_().sum(2).to(torch.int64)
    return sums, squares


def channel_stats(sums: torch.Tensor, squares: torch.Tensor, pixels_per_image: int) -> tuple[list[float], list[float]]:
    """Mean and (population) standard deviation per channel on the [0, 1] scale, over every pixel of the
    images whose `pixel_moments` are given."""
    if sums.shape[0] == 0:
        raise CompressError("arch.mean: no training images to compute the normalisation from; give arch.mean and arch.std")
    count = sums.shape[0] * pixels_per_image
    total, total_sq = sums.sum(0).double(), squares.sum(0).double()
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    std = var.sqrt() / 255.0
    # A constant channel (every pixel the same) would divide by zero: such a channel carries nothing anyway.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (mean / 255.0).tolist(), std.tolist()
