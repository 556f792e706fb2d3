"""dataset=imagefolder: what the first decode of a real folder costs (time, memory, cache on disk), against
a cache hit, and one epoch of streamed batches against the cached ones; measured side by side, interleaved,
each case in a fresh process (so that its peak RSS is its own), repeated.

    .venv/bin/python bench/imagefolder_decode.py --source ../shared/cifar10 --images 2000 --image-size 64 \
        --repeats 3 -o results/2026-12-02-imagefolder-decode.csv

The folder: a copy of `--images` CIFAR-10 PNGs (four fifths train/, one fifth test/, equal per class), every
third one re-encoded as JPEG (quality 90), read at `--image-size` (32x32 images upscaled).
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_copy(source: Path, dest: Path, images: int) -> None:
    from PIL import Image

    classes = sorted(d.name for d in (source / "train").iterdir() if d.is_dir())
    per_class = {"train": images * 4 // 5 // len(classes), "test": images // 5 // len(classes)}
    n = 0
    for split, count in per_class.items():
        for cls in classes:
            out = dest / split / cls
            out.mkdir(parents=True)
            for png in sorted((source / split / cls).glob("*.png"))[:count]:
                if n % 3 == 0:
                    with Image.open(png) as im:
                        im.convert("RGB").save(out / f"{png.stem}.jpg", quality=90)
                else:
                    shutil.copy(png, out / png.name)
                n += 1


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def case(kind: str, root: str, cache: str, size: int, queue) -> None:
    """One measurement in this (fresh) process: `cold` (decode + write the cache), `warm` (a cache hit),
    `epoch_cached` / `epoch_streamed` (one pass of augmented training batches of 128)."""
    import torch

    from compress.config import DatasetConfig
    from compress.data import build

    torch.set_num_threads(1)
    # First calls (imports of the decoders, torch.load's unpickler) before the clock starts: a tiny folder
    # of the same kinds of files, decoded and then read from its cache.
    warmup = DatasetConfig(name="imagefolder", root=str(Path(root).parent / "warmup"), image_size=size, val_size=None)
    for _ in range(2):
        build.load(warmup, mean=None, std=None, search=[], cache_dir=Path(cache).parent / f"warmup-{kind}-{Path(cache).name}",
                   device=torch.device("cpu"))
    streamed = kind == "epoch_streamed"
    cfg = DatasetConfig(name="imagefolder", root=root, image_size=size, val_size=None,
                        cache_max_mb=0 if streamed else DatasetConfig.cache_max_mb)
    load = lambda: build.load(cfg, mean=None, std=None, search=[], cache_dir=Path(cache), device=torch.device("cpu"))  # noqa: E731
    if kind.startswith("epoch"):
        data = load()  # cache / index already written by an earlier case: not timed
        before = rss_mb()
        started = time.perf_counter()
        batches = sum(1 for _ in data.train.batches(128, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0)))
        seconds = time.perf_counter() - started
        queue.put({"seconds": seconds, "peak_rss_mb_over_start": rss_mb() - before, "batches": batches,
                   "images": len(data.train)})
        return
    before = rss_mb()
    started = time.perf_counter()
    data = load()
    seconds = time.perf_counter() - started
    files = list((Path(cache) / "data").glob("imagefolder-*.pt"))
    queue.put({"seconds": seconds, "peak_rss_mb_over_start": rss_mb() - before,
               "decoded_mb": sum(s.images.numel() for s in (data.train, data.val, data.test)) / 2**20,
               "cache_file_mb": sum(f.stat().st_size for f in files) / 2**20,
               "images": len(data.train) + len(data.val) + len(data.test),
               # the copy lives in a temporary directory: name it by what it is, not where it was
               "source": data.source.replace(str(Path(root).parent), "<temporary copy>")})


def run_case(kind: str, root: Path, cache: Path, size: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=case, args=(kind, str(root), str(cache), size, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return {"case": kind, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=REPO.parent / "shared" / "cifar10")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imagefolder-bench-"))
    try:
        root = work / "folder"
        make_copy(args.source, root, args.images)
        make_copy(args.source, work / "warmup", 60)
        rows = []
        for r in range(args.repeats):
            cache = work / f"cache{r}"  # a fresh cache each repeat: `cold` decodes, `warm` hits it
            for kind in ("cold", "warm", "epoch_streamed", "epoch_cached"):
                row = {"repeat": r, **run_case(kind, root, cache, args.image_size)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        by = lambda k: [row["seconds"] for row in rows if row["case"] == k]  # noqa: E731
        cpu = os.popen("grep -m1 'model name' /proc/cpuinfo").read().split(":")[-1].strip()
        print(f"CPU: {cpu}, {len(os.sched_getaffinity(0))} cores visible (shared); {args.images} images at "
              f"{args.image_size}x{args.image_size}")
        for name in ("cold", "warm", "epoch_streamed", "epoch_cached"):
            print(f"{name:>15}: median {statistics.median(by(name)):.2f} s of {by(name)}")
        print(f"cold / warm: {statistics.median(c / w for c, w in zip(by('cold'), by('warm'))):.1f}x;  "
              "streamed / cached epoch: "
              f"{statistics.median(s / c for s, c in zip(by('epoch_streamed'), by('epoch_cached'))):.1f}x")
        if args.output:
            keys = sorted({k for row in rows for k in row}, key=lambda k: (k not in ("repeat", "case"), k))
            with args.output.open("w", newline="") as f:
                writer = csv.DictWriter(f, keys)
                writer.writeheader()
                writer.writerows(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
