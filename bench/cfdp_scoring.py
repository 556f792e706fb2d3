"""CFDP scoring speed, measured side by side (alternating rounds, medians):

1. the vectorised scorer `compress.methods.cfdp.channel_scores` vs a plain per-map loop written from the
   formula (per image, per channel, per block, scipy's dctn / gaussian_filter: for the reference variant
   this is the public code's own structure) on the same tensors: one calibration batch per ResNet-56
   stage (128 images by default, the batch size `method=cfdp` scores);
2. scoring every conv of ResNet-56 on 640 images (`feature_scores`, one forward pass per batch with hooks
   on all layers) vs the bare forward passes over the same batches.

    .venv/bin/python bench/cfdp_scoring.py [--threads 1] [--rounds 3] [--scorer-images 128] [--malloc tuned]

`--malloc tuned` (the default) applies `compress.runtime.tune_allocator()` as `compress run` does;
`--malloc default` leaves glibc's malloc as it is, to see what that setting is worth.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from compress.methods import cfdp
from compress.models import build
from compress.prune.features import feature_scores
from compress.runtime import tune_allocator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the per-map oracles live beside the tests
from tests.cfdp_oracles import loop_scores, paper_map_score, reference_map_score  # noqa: E402

CHECKPOINT = REPO.parent / "shared" / "pretrained" / "resnet56-4bfd9763.th"


# -- per-map loops (the baseline): the same oracles the tests check the scorer against -------------------
LOOPS = {"reference": reference_map_score, "paper": paper_map_score}


def bench_loop(maps: torch.Tensor, variant: str, lam: float = 0.03) -> torch.Tensor:
    return torch.from_numpy(loop_scores(maps, LOOPS[variant], lam=lam))


# -- timing helpers -----------------------------------------------------------------------------------------
def seconds(fn, repeats: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds per call. With one thread the process's CPU time is the compute itself, which
    other users of a shared machine inflate far less than the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def bench_scorer(rounds: int, images: int) -> None:
    g = torch.Generator().manual_seed(0)
    # One tensor per ResNet-56 stage (post-ReLU maps: non-negative with exact zeros).
    tensors = [torch.randn(images, c, s, s, generator=g).relu() for c, s in ((16, 32), (32, 16), (64, 8))]
    maps = sum(t.shape[0] * t.shape[1] for t in tensors)
    print(f"1. scorer vs per-map loop on {maps} maps ({images} images x 16ch 32x32, 32ch 16x16, 64ch 8x8)")
    for variant in cfdp.VARIANTS:
        loop_t, vec_t = [], []
        for _ in range(rounds):  # alternate, so that both see the same machine load
            loop_t.append(seconds(lambda variant=variant: [bench_loop(t, variant) for t in tensors]))
            vec_t.append(seconds(lambda variant=variant: [cfdp.channel_scores(t, variant) for t in tensors],
                                 repeats=max(5, 1600 // images)))
        # Agreement on the first images (the tests check it thoroughly; the loop is slow).
        err = max(
            float(((cfdp.channel_scores(part, variant) - expected).abs() / expected).max())
            for part in (t[:4].double() for t in tensors)
            for expected in [bench_loop(part, variant).double()]
        )
        (loop_s, loop_c), (vec_s, vec_c) = medians(loop_t), medians(vec_t)
        print(f"   {variant:9s}: loop {loop_s * 1e3:8.1f} ms ({loop_s / maps * 1e6:7.1f} us/map)  "
              f"vectorised {vec_s * 1e3:6.3f} ms ({vec_s / maps * 1e6:5.2f} us/map)  "
              f"ratio {loop_s / vec_s:6.0f}x wall, {loop_c / vec_c:6.0f}x CPU  (max rel. diff, float64: {err:.1e})  "
              f"target >= 1000x: {'met' if loop_s / vec_s >= 1000 else 'MISSED'}")


def resnet56() -> nn.Module:
    model = build("resnet56", 10)
    if CHECKPOINT.exists():  # real weights give realistic ReLU sparsity; timing hardly depends on it
        state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval()


def bench_model(rounds: int, images: int, batch_size: int) -> None:
    model = resnet56()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    g = torch.Generator().manual_seed(1)
    # channels_last, as the pipeline's calibration batches: the hooked maps are then channels_last too.
    batches = [torch.randn(batch_size, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
               for _ in range(images // batch_size)]

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(batch)

    print(f"2. ResNet-56, {len(layers)} convs scored on {images} images (batches of {batch_size}) "
          f"vs bare forward passes ({'pretrained' if CHECKPOINT.exists() else 'random'} weights)")
    runs = {"forward only": forward}
    # The hook machinery with a trivial score (mean |x|): what any feature-map criterion pays.
    runs["hooks, mean|x| feature=relu"] = lambda: feature_scores(
        model, layers, batches, lambda maps: maps.abs().mean((0, 2, 3)), "relu")
    for variant in cfdp.VARIANTS:
        for feature in ("relu", "conv"):
            score_fn = partial(cfdp.channel_scores, variant=variant)
            name = f"cfdp {variant} feature={feature}"
            runs[name] = partial(feature_scores, model, layers, batches, score_fn, feature)
    forward()  # warm-up
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):  # alternate every configuration within each round
        for name, fn in runs.items():
            samples[name].append(seconds(fn))
    fwd_s, fwd_c = medians(samples["forward only"])
    for name, sample in samples.items():
        wall, cpu = medians(sample)
        verdict = f"  target < 3x: {'met' if wall / fwd_s < 3 else 'MISSED'}" if name.startswith("cfdp") else ""
        print(f"   {name:30s} {wall:6.2f} s ({cpu:5.2f} s CPU)  ratio to forward {wall / fwd_s:4.2f}x wall, "
              f"{cpu / fwd_c:4.2f}x CPU{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--scorer-images", type=int, default=128, help="images per tensor in part 1")
    parser.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = args.malloc == "tuned" and tune_allocator()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, "
          f"malloc {'tuned (compress.runtime)' if tuned else 'as the C library sets it'}")
    bench_scorer(args.rounds, args.scorer_images)
    bench_model(args.rounds, args.images, args.batch_size)


if __name__ == "__main__":
    main()
