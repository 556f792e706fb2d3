"""Speed only: how ResNet-56 pruned to half its MACs (L1, uniform, target_macs) runs in int8 for each round_to,
beside the float dense model, in ONNX Runtime at batch 1 and 64 (timed interleaved, one session each). No
fine-tune, so no top-1: it says which channel rounding lets pruned + int8 reach a speed target at all.

    .venv/bin/python bench/int8_roundto.py [--target-macs 0.5] [--round-to 8,16] [--repeats 11]
"""
from __future__ import annotations

import argparse

import torch

from compress.deploy import export, int8, measure
from compress.methods.base import Context
from compress.methods.structured import L1Options, L1Pruning
from compress.models import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--round-to", default="8,16")
    p.add_argument("--repeats", type=int, default=11)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (3, 32, 32)
    ctx = Context(device=torch.device("cpu"), arch=args.arch, num_classes=10, input_shape=shape)
    calibration = torch.randn(64, *shape, generator=torch.Generator().manual_seed(0))  # speed only
    dense = build(args.arch, 10).eval()
    names, blobs, macs = ["dense float", "dense int8"], [], []
    dense_blob = export.onnx_bytes(dense, shape)
    blobs += [dense_blob, int8.quantise(dense_blob, calibration, reduce_range=int8.choose_reduce_range())]
    macs += [measure.count_macs(dense, shape)] * 2
    for r in [int(v) for v in args.round_to.split(",")]:
        pruned = L1Pruning(L1Options(target_macs=args.target_macs, round_to=r)).compress(build(args.arch, 10).eval(), ctx).eval()
        blob = export.onnx_bytes(pruned, shape)
        names += [f"round_to={r} float", f"round_to={r} int8"]
        blobs += [blob, int8.quantise(blob, calibration, reduce_range=int8.choose_reduce_range())]
        macs += [measure.count_macs(pruned, shape)] * 2
    sessions = [export.ort_session(b, 1) for b in blobs]
    timed = int8.ort_speedups(sessions, shape, args.repeats, 1)
    print(f"CPU: {int8.cpu_label()}; {args.arch}, L1 target_macs={args.target_macs}, ONNX Runtime 1 thread, "
          f"interleaved, {args.repeats} repeats (speed-ups over dense float)")
    print("| model | MACs | ms b1 | speed-up b1 | ms b64 | speed-up b64 |\n|---|---|---|---|---|---|")
    for i, name in enumerate(names):
        print(f"| {name} | {macs[i] / 1e6:.2f}M | {timed[1].median_ms[i]:.3f} | {timed[1].speedup[i]:.2f}x | "
              f"{timed[64].median_ms[i]:.2f} | {timed[64].speedup[i]:.2f}x |")


if __name__ == "__main__":
    main()
