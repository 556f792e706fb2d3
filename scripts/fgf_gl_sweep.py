"""How much of a pretrained kernel an FGF can hold, by the Grunwald-Letnikov truncation (`method.terms`) and
step (`method.step`): the relative fit error ||W_fgf - W|| / ||W|| of every stride-1 3x3 conv of a
pretrained CIFAR ResNet, for each (terms, step) pair, fitted as `method=fgfp` fits it (Adam, 100 steps at
0.05, starts at orders 0.25 / 1 / 1.75). No training: what the conversion hands its recovery round.

    .venv/bin/python scripts/fgf_gl_sweep.py --checkpoint ../shared/pretrained/resnet20-12fca82f.th \
        -o results/2026-12-02-fgf-gl-sweep-resnet20.csv

Beside each layer, two references that need no FGF: `copy_error`, the error of keeping only each output
channel's strongest input channel exactly (an FGF's channel factor is one bump, so that is about what it can
reach), and `rank1_error`, the best rank-1 (separable in channel x space) approximation of each output
channel's kernel (an FGF kernel is rank 1 and smooth on top). Measured in docs/fgfp.md, section "Which layers
lose least, and the GL truncation".
"""
from __future__ import annotations

import argparse
import csv
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

from compress.job import sources
from compress.layers import fgf
from compress.runtime import cpu_description

FIT = dict(fit_steps=100, fit_lr=0.05, fit_init_orders=[0.25, 1.0, 1.75])  # FGFPOptions' defaults


def reference_errors(kernel: torch.Tensor) -> tuple[float, float]:
    """(copy_error, rank1_error) of one layer's kernel (Cout, C, K, K), relative to its norm."""
    energy = kernel.pow(2)
    total = energy.sum()
    per_channel = energy.sum((2, 3))                                   # (Cout, C)
    copy = (total - per_channel.max(dim=1).values.sum()) / total
    singular = torch.linalg.svdvals(kernel.flatten(2))                 # (Cout, min(C, K*K))
    rank1 = (total - singular[:, 0].pow(2).sum()) / total
    return float(copy.clamp_min(0).sqrt()), float(rank1.clamp_min(0).sqrt())


def fit_error(kernel: torch.Tensor, terms: int, step: float, grid: str) -> float:
    layer = fgf.FractionalGaussianKernel(tuple(kernel.shape), terms, step, grid, False, **FIT)
    with torch.no_grad():
        raw = layer.right_inverse(kernel)
        return float((layer(raw) - kernel).norm() / kernel.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--terms", default="5,15,30", help="GL terms L")
    parser.add_argument("--steps", default="0.1,0.25,0.5,1.0", help="GL steps h, in grid units")
    parser.add_argument("--grid", default="pixel", choices=fgf.GRIDS)
    parser.add_argument("-o", "--output", type=Path, required=True, help="CSV of one row per layer and setting")
    args = parser.parse_args()
    try:
        terms = [int(t) for t in args.terms.split(",")]
        steps = [float(s) for s in args.steps.split(",")]
    except ValueError:
        print(f"--terms / --steps: comma-separated numbers expected, got '{args.terms}' / '{args.steps}'",
              file=sys.stderr)
        return 2
    if not Path(args.checkpoint).is_file():
        print(f"--checkpoint: no file {args.checkpoint}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = sources.from_file(args.checkpoint, args.arch, 10, [], Path.home() / ".cache" / "compress")
    convs = {name: m.weight.detach().float() for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)}
    cpu = cpu_description()
    print(f"{args.arch}: {len(convs)} stride-1 3x3 convs, grid {args.grid}; CPU: {cpu}")
    rows = []
    for name, kernel in convs.items():
        copy, rank1 = reference_errors(kernel)
        errors = {(t, s): fit_error(kernel, t, s, args.grid) for t, s in itertools.product(terms, steps)}
        best = min(errors, key=errors.get)
        print(f"{name:16s} copy {copy:.3f} rank-1 {rank1:.3f}  default (15, 0.25) "
              f"{errors.get((15, 0.25), float('nan')):.3f}  best {errors[best]:.3f} at terms {best[0]}, step {best[1]}")
        rows += [dict(layer=name, shape="x".join(map(str, kernel.shape)), terms=t, step=s, grid=args.grid,
                      fit_error=round(e, 4), copy_error=round(copy, 4), rank1_error=round(rank1, 4), cpu=cpu)
                 for (t, s), e in errors.items()]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.output} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
