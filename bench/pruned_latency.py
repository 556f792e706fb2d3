"""CPU latency of a structurally pruned CIFAR model next to the unpruned one, measured in one run.

Both models run in alternating blocks (`compress.measure.interleaved_ms`, the pipeline's own speed-up
columns) so that load on the machine hits both alike; per runtime (PyTorch eager, ONNX Runtime on the
exported models) and batch size it prints the median latencies, the paired speed-up next to the MACs
ratio, and their quotient (1.0 = the latency falls exactly as the MACs do; the target is >= 0.8 with
ONNX Runtime at batch 1; the exit status is 1 when it is missed and `--check` is given).

    .venv/bin/python bench/pruned_latency.py                      # ResNet-56 at "[0.]+[0.18]*29"
    .venv/bin/python bench/pruned_latency.py --target-macs 0.47 --allocation global   # ~2.1x fewer MACs
    .venv/bin/python bench/pruned_latency.py --arch vgg16_bn --rate "[0.21]*7+[0.75]*5" --threads 2
    .venv/bin/python bench/pruned_latency.py --target-macs 0.47 --runtimes ort --batches 1 --check
    .venv/bin/python bench/pruned_latency.py --target-macs 0.47 --round-to 8 --runtimes ort --batches 1
"""
from __future__ import annotations

import argparse
import sys

import torch

from compress import export
from compress.measure import count_macs, count_params, forward_call, interleaved_ms, ort_call
from compress.methods.base import Context
from compress.methods.structured import L1Options, L1Pruning
from compress.models import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--rate", default="[0.]+[0.18]*29", help="method.compress_rate (l1 scores, random weights)")
    parser.add_argument("--target-macs", type=float, default=None,
                        help="method.target_macs instead of --rate (fraction of the MACs to keep, e.g. 0.47)")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"), help="with --target-macs")
    parser.add_argument("--round-to", type=int, default=1,
                        help="method.round_to: every pruned width a multiple of this (e.g. 8)")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--runtimes", default="eager,ort", help="comma-separated: eager (PyTorch), ort (ONNX Runtime)")
    parser.add_argument("--check", action="store_true", help="exit 1 when ONNX Runtime's batch-1 quotient is under 0.8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="memory format of the timed inputs and weights (the pipeline's latency uses channels_last)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (3, 32, 32)
    dense = build(args.arch, 10).eval()
    ctx = Context(device=torch.device("cpu"), arch=args.arch, num_classes=10, input_shape=shape)
    options = (L1Options(target_macs=args.target_macs, allocation=args.allocation, round_to=args.round_to)
               if args.target_macs else L1Options(compress_rate=args.rate, round_to=args.round_to))
    pruned = L1Pruning(options).compress(build(args.arch, 10).eval(), ctx).eval()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dense, pruned = dense.to(memory_format=fmt), pruned.to(memory_format=fmt)
    macs = {"dense": count_macs(dense, shape), "pruned": count_macs(pruned, shape)}
    macs_ratio = macs["dense"] / macs["pruned"]
    budget = f"target_macs {args.target_macs} ({args.allocation})" if args.target_macs else f"rate {args.rate}"
    budget += f", round_to {args.round_to}" if args.round_to > 1 else ""
    print(f"{args.arch} {budget}: params {count_params(dense) / 1e6:.3f}M -> {count_params(pruned) / 1e6:.3f}M, "
          f"MACs {macs['dense'] / 1e6:.2f}M -> {macs['pruned'] / 1e6:.2f}M (ratio {macs_ratio:.3f}); "
          f"threads {args.threads}, {'channels_last' if args.channels_last else 'contiguous'}, median of {args.repeats}")
    print(f"{'runtime':>7} {'batch':>5} {'dense ms':>10} {'pruned ms':>10} {'speed-up':>9} {'MACs ratio':>10} "
          f"{'speed-up/MACs':>13}")
    quotients = {}
    for runtime in args.runtimes.split(","):
        if runtime == "ort":
            sessions = [export.ort_session(export.onnx_bytes(m, shape), args.threads) for m in (dense, pruned)]
        for batch in (int(b) for b in args.batches.split(",")):
            if runtime == "ort":
                x = torch.randn(batch, *shape)
                calls = [ort_call(s, x) for s in sessions]
            else:
                x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
                calls = [forward_call(dense, x), forward_call(pruned, x)]
            timed = interleaved_ms(calls, args.repeats, args.threads)
            speedup = timed.speedup[1]
            quotients[runtime, batch] = speedup / macs_ratio
            print(f"{runtime:>7} {batch:>5} {timed.median_ms[0]:>10.2f} {timed.median_ms[1]:>10.2f} {speedup:>9.3f} "
                  f"{macs_ratio:>10.3f} {speedup / macs_ratio:>13.3f}")
    if ("ort", 1) in quotients:
        met = quotients["ort", 1] >= 0.8
        print(f"ONNX Runtime, batch 1: speed-up / MACs ratio {quotients['ort', 1]:.3f} "
              f"({'meets' if met else 'misses'} the target 0.8)")
        if args.check and not met:
            sys.exit(1)


if __name__ == "__main__":
    main()
