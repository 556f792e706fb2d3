"""CPU latency of a structurally pruned CIFAR model next to the unpruned one, measured in one run.

Both models run in alternating blocks (`compress.deploy.measure.interleaved_ms`, the pipeline's own speed-up
columns) so that load on the machine hits both alike; per runtime (PyTorch eager, ONNX Runtime on the
exported models) and batch size it prints the median latencies, the paired speed-up next to the MACs
ratio, and their quotient (1.0 = the latency falls exactly as the MACs do; the target is >= 0.8 with
ONNX Runtime at batch 1; the exit status is 1 when it is missed and `--check` is given).

Beside them it times a floor model (every group at 1/8 of its width: almost no MACs, the same operators)
and prints each pruned model's ceiling: the quotient it would reach if its time were the floor's (the
per-operator overhead that pruning channels cannot remove) plus the dense model's time per MAC for the
rest, i.e. if narrower convolutions ran exactly as efficiently as the dense ones.

    .venv/bin/python bench/pruned_latency.py                      # ResNet-56 at "[0.]+[0.18]*29"
    .venv/bin/python bench/pruned_latency.py --target-macs 0.47 --allocation global   # ~2.1x fewer MACs
    .venv/bin/python bench/pruned_latency.py --arch vgg16_bn --rate "[0.21]*7+[0.75]*5" --threads 2
    .venv/bin/python bench/pruned_latency.py --target-macs 0.47 --runtimes ort --batches 1 --check
    .venv/bin/python bench/pruned_latency.py --target-macs 0.47 --round-to 1,8,16 --runtimes ort --batches 1
"""
from __future__ import annotations

import argparse
import sys

import torch

from compress.deploy import export
from compress.deploy.measure import count_macs, count_params, forward_call, interleaved_ms, ort_call
from compress.methods.base import Context
from compress.methods.structured import L1Options, L1Pruning
from compress.models import build

FLOOR_RATE = 0.875  # the floor model: every group at 1/8 of its width


def ceiling(t_dense: float, t_floor: float, macs_dense: int, macs_floor: int, macs: float) -> float:
    """Speed-up / MACs ratio of a model of `macs` MACs if its time were affine in the MACs through the floor
    and the dense model (fixed overhead + the dense model's time per MAC): what perfectly efficient narrow
    kernels would give."""
    per_mac = (t_dense - t_floor) / max(macs_dense - macs_floor, 1)
    ideal = t_floor + per_mac * (macs - macs_floor)
    return (t_dense / ideal) / (macs_dense / macs)


def prune(args, round_to: int, ctx: Context) -> torch.nn.Module:
    options = (L1Options(target_macs=args.target_macs, allocation=args.allocation, round_to=round_to)
               if args.target_macs else L1Options(compress_rate=args.rate, round_to=round_to))
    return L1Pruning(options).compress(build(args.arch, 10).eval(), ctx).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet56")
    parser.add_argument("--rate", default="[0.]+[0.18]*29", help="method.compress_rate (l1 scores, random weights)")
    parser.add_argument("--target-macs", type=float, default=None,
                        help="method.target_macs instead of --rate (fraction of the MACs to keep, e.g. 0.47)")
    parser.add_argument("--allocation", default="uniform", choices=("uniform", "global"), help="with --target-macs")
    parser.add_argument("--round-to", default="1",
                        help="method.round_to, comma-separated: one pruned model per value, all timed side by side "
                             "with the dense one (e.g. 1,8,16)")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--runtimes", default="eager,ort", help="comma-separated: eager (PyTorch), ort (ONNX Runtime)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when ONNX Runtime's batch-1 quotient of any pruned model is under 0.8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="memory format of the timed inputs and weights (the pipeline's latency uses channels_last)")
    args = parser.parse_args()
    try:
        units = [int(v) for v in args.round_to.split(",")]
    except ValueError:
        parser.error(f"--round-to: comma-separated integers, got {args.round_to!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (3, 32, 32)
    ctx = Context(device=torch.device("cpu"), arch=args.arch, num_classes=10, input_shape=shape)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dense = build(args.arch, 10).eval().to(memory_format=fmt)
    pruned = {unit: prune(args, unit, ctx).to(memory_format=fmt) for unit in units}
    floor = L1Pruning(L1Options(compress_rate=FLOOR_RATE)).compress(build(args.arch, 10).eval(), ctx).eval()
    floor = floor.to(memory_format=fmt)
    macs_dense, macs_floor = count_macs(dense, shape), count_macs(floor, shape)
    ratios = {unit: macs_dense / count_macs(model, shape) for unit, model in pruned.items()}
    budget = f"target_macs {args.target_macs} ({args.allocation})" if args.target_macs else f"rate {args.rate}"
    print(f"{args.arch} {budget}: dense {count_params(dense) / 1e6:.3f}M params, {macs_dense / 1e6:.2f}M MACs; "
          f"threads {args.threads}, {'channels_last' if args.channels_last else 'contiguous'}, median of "
          f"{args.repeats} interleaved repeats (dense and every pruned model side by side)")
    for unit, model in pruned.items():
        widths = sorted({m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)})
        print(f"  round_to {unit}: {count_params(model) / 1e6:.3f}M params, {count_macs(model, shape) / 1e6:.2f}M "
              f"MACs (ratio {ratios[unit]:.3f}); widths {widths if len(widths) <= 8 else f'{len(widths)} distinct'}")
    print(f"  floor (rate {FLOOR_RATE}): {macs_floor / 1e6:.2f}M MACs, the operators' overhead")
    print(f"{'runtime':>7} {'batch':>5} {'round_to':>8} {'dense ms':>9} {'pruned ms':>10} {'speed-up':>9} "
          f"{'MACs ratio':>10} {'speed-up/MACs':>13} {'ceiling':>8}")
    quotients = {}
    models = [dense, *pruned.values(), floor]
    for runtime in args.runtimes.split(","):
        if runtime == "ort":
            sessions = [export.ort_session(export.onnx_bytes(m, shape), args.threads) for m in models]
        for batch in (int(b) for b in args.batches.split(",")):
            if runtime == "ort":
                x = torch.randn(batch, *shape)
                calls = [ort_call(s, x) for s in sessions]
            else:
                x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
                calls = [forward_call(m, x) for m in models]
            timed = interleaved_ms(calls, args.repeats, args.threads)
            t_dense, t_floor = timed.median_ms[0], timed.median_ms[-1]
            for i, unit in enumerate(pruned, start=1):
                speedup = timed.speedup[i]
                quotients[runtime, batch, unit] = speedup / ratios[unit]
                bound = ceiling(t_dense, t_floor, macs_dense, macs_floor, macs_dense / ratios[unit])
                print(f"{runtime:>7} {batch:>5} {unit:>8} {t_dense:>9.2f} {timed.median_ms[i]:>10.2f} "
                      f"{speedup:>9.3f} {ratios[unit]:>10.3f} {speedup / ratios[unit]:>13.3f} {bound:>8.3f}")
    missed = []
    for unit in pruned:
        if ("ort", 1, unit) in quotients:
            quotient = quotients["ort", 1, unit]
            met = quotient >= 0.8
            missed += [] if met else [unit]
            print(f"ONNX Runtime, batch 1, round_to {unit}: speed-up / MACs ratio {quotient:.3f} "
                  f"({'meets' if met else 'misses'} the target 0.8)")
    if args.check and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
