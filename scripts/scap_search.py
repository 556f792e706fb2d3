"""Search readings of the SCAP abstract for the one under which threshold 0.6 gives the paper's shape.

Two steps (docs/scap.md, "Readings of the threshold"):

    # 1. score once: raw per-channel fidelities of every conv, per autoencoder setting (the expensive part)
    .venv/bin/python scripts/scap_search.py score --arch vgg16_bn --ae center=true --out cache/scap
    # 2. evaluate readings cheaply from the cache: params / MACs removed at one threshold
    .venv/bin/python scripts/scap_search.py table --cache cache/scap --out results/x.md

Step 1 runs the pipeline's own data, model and calibration batches (seed 0, 4 x 64 training images) and
`SCAP.fidelities`; step 2 feeds the cached fidelities to `SCAP.group_scores` (the method's own code) and
counts parameters and MACs with the engine's exact cost model (compress/prune/allocation.py).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import config as configs  # noqa: E402  (after the sys.path insert above)
from compress.deploy import measure  # noqa: E402
from compress.job import sources  # noqa: E402
from compress.job.pipeline import Run  # noqa: E402
from compress.methods.scap import L1_NORMS, NORMALISE, SCAP, SCAPOptions  # noqa: E402
from compress.prune import allocation, engine  # noqa: E402
from compress.prune.rates import RateSpec  # noqa: E402

SHARED = ROOT.parent / "shared"
ARCHS = {
    "vgg16_bn": [],
    "resnet56": [f"arch.checkpoint={SHARED / 'pretrained' / 'resnet56-4bfd9763.th'}"],
}


def setup(arch: str, method: list[str]):
    """The pipeline's config, data, context and starting model for `arch` (threads=1, seed 0)."""
    overrides = [f"arch={arch}", f"dataset.root={SHARED / 'cifar10'}", "threads=1", "method=scap",
                 *ARCHS[arch], *(f"method.{m}" for m in method)]
    config = configs.compose(overrides)
    torch.set_num_threads(1)
    run = Run(config, Path(tempfile.mkdtemp()))
    run.data = run._load_data()
    ctx = run._context()
    model = sources.starting_model(config, run.data, run.device).eval()
    return config, ctx, model


def score(args) -> None:
    ae = [a for a in args.ae.split(",") if a]
    tag = "-".join([args.arch, *(a.replace("=", "") for a in ae)]) if ae else args.arch
    out = Path(args.out) / f"{tag}.pt"
    config, ctx, model = setup(args.arch, [f"ae_{a}" if not a.startswith(("spectrum", "output", "balance")) else a for a in ae])
    method = SCAP(config.method)
    plan = method._plan(model, ctx)
    layers = dict(plan.convs)
    started = time.perf_counter()
    with torch.no_grad():
        fidelity = method.fidelities(model, ctx, layers)
    seconds = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": args.arch, "ae": ae, "fidelity": fidelity, "seconds": seconds}, out)
    print(f"{out}: {len(fidelity)} layers in {seconds:.0f} s")
    for name, f in fidelity.items():
        print(f"  {name}: {f.numel()} ch, fidelity {torch.nanmean(f):.4f} [{f[~f.isnan()].min():.4f}, {f[~f.isnan()].max():.4f}]")


# The paper's shape (VGG-16 / CIFAR-10 at threshold 0.6, before fine-tuning) and the band issue 26 accepts.
PAPER = {"params": 96.30, "macs": 90.11}
BAND = {"params": 1.5, "macs": 2.5}
GRID = {"normalise": NORMALISE, "l1_weight": (0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75), "l1_norm": L1_NORMS,
        "compress_rate": (1.0, 0.95, 0.9, 0.85, 0.8)}


class Scorer:
    """One architecture's model, plans and exact cost models; `shape` evaluates a reading from cached fidelities."""

    def __init__(self, arch: str):
        self.config, self.ctx, self.model = setup(arch, [])
        self.base = {"params": measure.count_params(self.model), "macs": measure.count_macs(self.model, self.ctx.input_shape)}
        self.plans, self.costs = {}, {}

    def plan(self, rate: float):
        if rate not in self.plans:
            plan = engine.PruningPlan.build(self.model, self.ctx.input_shape, RateSpec.parse(rate))
            self.plans[rate] = plan
            self.costs[rate] = {m: allocation.CostModel.build(plan, self.ctx.input_shape, m, self.base[m]) for m in self.base}
        return self.plans[rate], self.costs[rate]

    def shape(self, fidelity: dict, threshold: float, **reading) -> dict:
        """Params / MACs removed (%) and kept channels per group when SCAP prunes at `threshold` under `reading`."""
        method = SCAP(SCAPOptions(threshold=threshold, **reading))
        method.fidelities = lambda model, ctx, layers: {name: fidelity[name] for name in layers}
        plan, costs = self.plan(reading.get("compress_rate", 1.0))
        targets = plan.target_keep()
        scores = method._group_scores(self.model, self.ctx, plan, targets)
        keep = method._rounded(plan, plan.keep_counts(targets, scores, method.threshold))
        row = {"keep": {g: keep.get(g, plan.channels[g]) for g in plan.channels}}
        for metric, cost in costs.items():
            widths = torch.tensor([float(row["keep"][g]) for g in cost.groups])
            row[metric] = 100 * (1 - float(cost.cost(widths)) / self.base[metric])
        return row


def readings(ae_tags: list[str]):
    """Every combination of the grid; the L1 normalisation only where the L1 term has a weight, and not
    under minmax_layer, whose group re-normalisation makes `max` the same as `minmax`."""
    for ae, normalise, weight, norm, rate in itertools.product(ae_tags, *GRID.values()):
        if norm != L1_NORMS[0] and (weight == 0 or normalise == "minmax_layer"):
            continue
        yield ae, {"normalise": normalise, "l1_weight": weight, "l1_norm": norm, "compress_rate": rate}


def in_band(row: dict) -> bool:
    return all(abs(row[m] - PAPER[m]) <= BAND[m] for m in PAPER)


def table(args) -> None:
    cache = Path(args.cache)
    scorers = {arch: Scorer(arch) for arch in ("vgg16_bn", "resnet56")}
    tags = sorted({p.stem.split("-", 1)[1] if "-" in p.stem else "" for p in cache.glob("*.pt")})
    tags = [t for t in tags if all((cache / "-".join(filter(None, [a, t]))).with_suffix(".pt").exists() for a in scorers)]
    fid = {(a, t): torch.load(cache / ("-".join(filter(None, [a, t])) + ".pt"))["fidelity"] for a in scorers for t in tags}
    lines = ["| # | autoencoder | normalise | l1_weight | l1_norm | compress_rate (cap) | VGG-16-BN params | VGG-16-BN MACs "
             "| ResNet-56 params | ResNet-56 MACs | VGG in band | ResNet-56 < VGG |", "|" + "---|" * 12]
    rows, hits = [], []
    for index, (tag, reading) in enumerate(readings(tags), 1):
        vgg = scorers["vgg16_bn"].shape(fid["vgg16_bn", tag], args.threshold, **reading)
        r56 = scorers["resnet56"].shape(fid["resnet56", tag], args.threshold, **reading)
        ok, less = in_band(vgg), r56["params"] < vgg["params"]
        rows.append((index, tag, reading, vgg, r56))
        if ok and less:
            hits.append(index)
        lines.append(f"| {index} | {tag or 'default'} | {reading['normalise']} | {reading['l1_weight']:g} | "
                     f"{reading['l1_norm'] if reading['l1_weight'] else '-'} | {reading['compress_rate']:g} | "
                     f"-{vgg['params']:.2f} % | -{vgg['macs']:.2f} % | -{r56['params']:.2f} % | -{r56['macs']:.2f} % | "
                     f"{'**yes**' if ok else 'no'} | {'yes' if less else 'no'} |")
    print("\n".join(lines))
    print(f"\n{len(hits)} of {len(rows)} readings in the band with ResNet-56 below VGG-16-BN: {hits}")
    for index, tag, reading, vgg, r56 in rows:
        if index in hits:
            print(f"#{index} {tag} {reading}: VGG kept {list(vgg['keep'].values())}; ResNet-56 kept {list(r56['keep'].values())}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + f"\n\n{len(hits)} of {len(rows)} readings hit the band with ResNet-56 "
                                  f"below VGG-16-BN: {', '.join(f'#{h}' for h in hits) or 'none'}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score")
    s.add_argument("--arch", choices=sorted(ARCHS), required=True)
    s.add_argument("--ae", default="", help="comma-separated method.ae_<key>=value (or spectrum=...)")
    s.add_argument("--out", default=str(ROOT / "cache" / "scap"))
    t = sub.add_parser("table")
    t.add_argument("--cache", default=str(ROOT / "cache" / "scap"))
    t.add_argument("--threshold", type=float, default=0.6)
    t.add_argument("--out", default="")
    args = parser.parse_args(argv)
    (score if args.command == "score" else table)(args)


if __name__ == "__main__":
    main()
