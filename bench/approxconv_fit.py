"""Time ApproxConv's kernel fit on every approximable conv of a torchvision ResNet-18 (random weights:
the fit's cost does not depend on the values) and compare lstsq with the public code's Adam fit.

    .venv/bin/python bench/approxconv_fit.py [--harmonics 6,3,3,3,2] [--series cos] [--threads 1]
        [--adam-layers 2]

Prints: the closed-form fit of all layers (pure tensor work, best of 5), the whole `compress` call
(parametrisations registered, one fit each), and for the first --adam-layers layers the fit MSE and
time of lstsq vs 600 Adam steps, side by side (layers with N < K; N = K is exact either way).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch
import torchvision

from compress.layers.series import basis_matrix, fit_adam, fit_lstsq, fit_mse, initial_coefficients
from compress.methods.approxconv import ApproxConv, parse_harmonics, plan_orders
from compress.methods.base import Context


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harmonics", default="6,3,3,3,2")
    ap.add_argument("--series", default="cos", choices=("cos", "cheb"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adam-layers", type=int, default=1, help="layers with N < K to fit with Adam too (slow: 600 steps each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = torchvision.models.resnet18(num_classes=1000).eval()
    orders, _ = plan_orders(model, parse_harmonics(args.harmonics), {})
    modules = dict(model.named_modules())
    layers = [(name, modules[name].weight.detach().clone(), order) for name, order in orders.items()]
    bases = {(w.shape[-1], n): basis_matrix(args.series, w.shape[-1], n).float() for _, w, n in layers}
    n_weights = sum(w.numel() for _, w, _ in layers)

    def fit_all() -> None:
        for _, w, n in layers:
            fit_lstsq(w, bases[(w.shape[-1], n)])

    fit_s = best_of(fit_all, 5)
    print(f"resnet18 {args.series} harmonics {args.harmonics}: {len(layers)} layers, {n_weights / 1e6:.2f}M "
          f"kernel weights, threads {args.threads}")
    print(f"  lstsq fit, all layers (best of 5):            {fit_s * 1000:8.1f} ms")

    ctx = Context(device=torch.device("cpu"), arch="resnet18_imagenet", num_classes=1000, input_shape=(3, 224, 224),
                  log=logging.getLogger("bench"))
    fresh = torchvision.models.resnet18(num_classes=1000).eval()
    t0 = time.perf_counter()
    ApproxConv(ApproxConv.Options(series=args.series, harmonics=args.harmonics)).compress(fresh, ctx)
    print(f"  method.compress (register + fit, all layers):  {(time.perf_counter() - t0) * 1000:8.1f} ms")

    print(f"  first {args.adam_layers} layers with N < K, lstsq vs Adam (600 steps, lr 0.1/0.01/0.001):")
    print(f"    {'layer':24s} {'N':>2s} {'lstsq MSE':>11s} {'adam MSE':>11s} {'lstsq ms':>9s} {'adam ms':>9s}")
    generator = torch.Generator().manual_seed(0)
    compressed = [(name, w, n) for name, w, n in layers if n < w.shape[-1]]  # N = K is exact either way
    for name, w, n in compressed[: args.adam_layers]:
        basis = bases[(w.shape[-1], n)]
        t0 = time.perf_counter()
        a_ls = fit_lstsq(w, basis)
        t_ls = time.perf_counter() - t0
        t0 = time.perf_counter()
        a_adam = fit_adam(w, basis, initial_coefficients(args.series, w, n, generator))
        t_adam = time.perf_counter() - t0
        print(f"    {name:24s} {n:2d} {fit_mse(w, a_ls, basis).mean():11.4e} {fit_mse(w, a_adam, basis).mean():11.4e} "
              f"{t_ls * 1000:9.1f} {t_adam * 1000:9.1f}")


if __name__ == "__main__":
    main()
