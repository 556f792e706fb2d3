"""SCAP scoring cost: wall time and peak resident memory (ru_maxrss) of `SCAP.channel_scores`.

Each measurement runs in a fresh subprocess so that its peak RSS is its own; the peak before scoring
(model + calibration images loaded) is printed too, so the scoring's own share is the difference.
Random weights and random images by default (the cost does not depend on them).

    .venv/bin/python bench/scap_memory.py                        # VGG-16-BN and ResNet-56, 256 images
    .venv/bin/python bench/scap_memory.py --arch vgg16_bn --images 256 --chunk-size 8 --threads 1
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    import torch
    from torch import nn

    from compress.methods.base import Context
    from compress.methods.scap import SCAP, SCAPOptions
    from compress.models import build

    torch.set_num_threads(args.threads)
    arch = args.arch[0]
    model = build(arch, 10).eval()
    batch_size = min(args.batch_size, args.images)
    batches = args.images // batch_size
    data = torch.randn(batches * batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def calibration(n, size, augment=False):
        return iter(data[: n * size].split(size))

    ctx = Context(device=torch.device("cpu"), arch=arch, num_classes=10, input_shape=(3, 32, 32), seed=0,
                  calibration=calibration)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    method = SCAP(SCAPOptions(batches=batches, batch_size=batch_size, chunk_size=args.chunk_size or None))
    before = peak_mib()
    start = time.perf_counter()
    scores = method.channel_scores(model, ctx, layers)
    seconds = time.perf_counter() - start
    print(json.dumps({"arch": arch, "images": batches * batch_size, "batch_size": batch_size,
                      "chunk_size": args.chunk_size, "threads": args.threads, "layers": len(scores),
                      "seconds": round(seconds, 1), "peak_before_mib": round(before), "peak_mib": round(peak_mib())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="architecture(s) (default: vgg16_bn and resnet56)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=8, help="0 = whole layer at once")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    for arch in args.arch or ["vgg16_bn", "resnet56"]:
        cmd = [sys.executable, __file__, "--child", "--arch", arch, "--images", str(args.images),
               "--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
