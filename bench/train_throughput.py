"""Fine-tuning throughput: the pipeline's training loop (compress.training.train.fit: batched on-device
augmentation, normalisation, channels_last, LR schedule, progress bar) against a bare loop over the same
model and batch size on pre-normalised in-memory tensors. Alternating repeats, medians, one run.

    python bench/train_throughput.py [--arch resnet20] [--batches 20] [--repeats 3] [--malloc tuned]

`--malloc tuned` (default) applies `compress.runtime.tune_allocator()` as `compress run` does; run once
with `--malloc default` to see what it is worth (both loops gain alike, so the ratio hardly moves).

Target: ratio >= 0.85 for ResNet-20 on a 2-core CPU.

`--distill W` times the pipeline loop with knowledge distillation (schedule.distill=W, a teacher of the
same architecture) against the same loop without, instead: what the teacher's forward per batch costs.
Expected ratio about 0.75 (a forward is about a third of a training step); target >= 0.65.

`--precision fp32|bf16|both` (with `--layout nchw|channels_last|both`) times the pipeline loop in each
precision and memory layout instead, interleaved in one run, and prints images/s and the bf16 / fp32 ratio
(bf16 = schedule.amp's autocast, which compress.runtime.training_dtype grants only on a CPU with native
bfloat16; elsewhere it says so and `bf16` trains in float32, as `compress run` would). Evaluation (the one
validation batch) is float32 in both. E.g. ResNet-56, one thread, as in docs/training-speed.md:

    python bench/train_throughput.py --arch resnet56 --precision both --layout both --threads 1 --batches 8
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time

# isort: off
import compress  # noqa: F401  first: the package sets OMP_WAIT_POLICY before torch loads OpenMP
import torch
import torch.nn.functional as F
# isort: on

from compress import models, runtime
from compress.config import ScheduleConfig
from compress.data import TensorSplit
from compress.data.synthetic import make_synthetic
from compress.runtime import tune_allocator
from compress.training import train


def bare_loop(model, images, labels, batch_size, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    for i in range(0, len(labels), batch_size):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def images_per_second(loops: dict, base, images: int, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Run each loop (name -> fn(model, rep)) on a fresh copy of `base`, alternating their order every
    repeat; the first pair warms up and is discarded. Median images/s per loop (per `clock` second)."""
    names = list(loops)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats + 1):
        for name in names if rep % 2 == 0 else names[::-1]:
            model = copy.deepcopy(base)
            t0 = clock()
            loops[name](model, rep)
            if rep:
                timings[name].append(clock() - t0)
    return {k: images / statistics.median(v) for k, v in timings.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--target", type=float, default=0.85)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--distill", type=float, default=None,
                   help="compare the loop with distillation at this weight against the loop without")
    p.add_argument("--precision", choices=("fp32", "bf16", "both"), default=None,
                   help="time the pipeline loop in these precisions (schedule.amp false / true) instead")
    p.add_argument("--layout", choices=("nchw", "channels_last", "both"), default="channels_last",
                   help="with --precision: the memory layouts (schedule.channels_last false / true)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tuned = args.malloc == "tuned" and tune_allocator()
    if args.precision is not None:
        return compare_precision(args, tuned)

    n = args.batches * args.batch_size
    raw, labels = make_synthetic(n, 10, 32, seed=0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    split = TensorSplit(raw, labels, mean, std, channels_last=True)
    val = TensorSplit(raw[:args.batch_size], labels[:args.batch_size], mean, std, channels_last=True)
    pre = split.normalise(raw)  # the bare loop gets its tensors ready-made, outside the timing
    sched = ScheduleConfig(epochs=1, batch_size=args.batch_size, amp=False)  # the finetune defaults otherwise
    base = models.build(args.arch, 10).to(memory_format=torch.channels_last)
    if args.distill is not None:
        return compare_distillation(args, split, val, sched, base)
    cpu = torch.device("cpu")
    ips = images_per_second({
        # fit() also evaluates one validation batch per epoch; that is part of its loop.
        "pipeline": lambda model, rep: train.fit(model, split, val, sched, cpu, seed=rep),
        "bare": lambda model, rep: bare_loop(model, pre, labels, args.batch_size, 0.01),
    }, base, n, args.repeats)
    ratio = ips["pipeline"] / ips["bare"]
    print(f"{args.arch}, batch {args.batch_size}, {args.batches} batches, {torch.get_num_threads()} threads, "
          f"malloc {'tuned' if tuned else 'as the C library sets it'}")
    print(f"pipeline loop: {ips['pipeline']:8.1f} images/s")
    print(f"bare loop:     {ips['bare']:8.1f} images/s")
    print(f"ratio pipeline/bare: {ratio:.3f} (target >= {args.target})")
    return 0 if ratio >= args.target else 1


def compare_distillation(args, split, val, sched, base) -> int:
    teacher = copy.deepcopy(base).eval()
    distilled = dataclasses.replace(sched, distill=args.distill)
    cpu = torch.device("cpu")
    ips = images_per_second({
        "plain": lambda model, rep: train.fit(model, split, val, sched, cpu, seed=rep),
        "distilled": lambda model, rep: train.fit(model, split, val, distilled, cpu, seed=rep, teacher=teacher),
    }, base, len(split), args.repeats)
    ratio = ips["distilled"] / ips["plain"]
    print(f"{args.arch}, batch {args.batch_size}, {args.batches} batches, {torch.get_num_threads()} threads")
    print(f"without distillation: {ips['plain']:8.1f} images/s")
    print(f"with distill={args.distill:g}:   {ips['distilled']:8.1f} images/s")
    print(f"ratio with/without: {ratio:.3f} (target >= 0.65)")
    return 0 if ratio >= 0.65 else 1


def compare_precision(args, tuned: bool) -> int:
    """The pipeline loop (compress.training.train.fit) per precision x layout, interleaved; bf16 / fp32 per layout and
    against float32 channels_last (the default before schedule.amp reached the CPU)."""
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    layouts = ["nchw", "channels_last"] if args.layout == "both" else [args.layout]
    cpu = torch.device("cpu")
    n = args.batches * args.batch_size
    raw, labels = make_synthetic(n, 10, 32, seed=0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    base = models.build(args.arch, 10)
    loops = {}
    for layout in layouts:
        last = layout == "channels_last"
        split = TensorSplit(raw, labels, mean, std, channels_last=last)
        val = TensorSplit(raw[:args.batch_size], labels[:args.batch_size], mean, std, channels_last=last)
        for precision in precisions:
            sched = ScheduleConfig(epochs=1, batch_size=args.batch_size, amp=precision == "bf16", channels_last=last)
            loops[f"{precision} {layout}"] = (lambda model, rep, split=split, val=val, sched=sched:
                                              train.fit(model, split, val, sched, cpu, seed=rep))
    # One thread: CPU-seconds of this process, which other work on a shared machine does not inflate; more
    # threads: wall seconds (CPU time would add up the threads).
    one_thread = torch.get_num_threads() == 1
    unit = "images per CPU-s" if one_thread else "images/s"
    ips = images_per_second(loops, base, n, args.repeats, time.process_time if one_thread else time.perf_counter)
    print(f"{args.arch}, batch {args.batch_size}, {args.batches} batches x {args.repeats} repeats (+1 warm-up), "
          f"{torch.get_num_threads()} threads, malloc {'tuned' if tuned else 'as the C library sets it'}")
    print(f"CPU: {runtime.cpu_description()}")
    print(runtime.training_precision(cpu, "bf16" in precisions))
    for name, value in ips.items():
        print(f"{name:<20} {value:8.1f} {unit}")
    for layout in layouts:
        if len(precisions) == 2:
            print(f"ratio bf16/fp32 ({layout}): {ips[f'bf16 {layout}'] / ips[f'fp32 {layout}']:.3f}")
    reference = "fp32 channels_last"
    if reference in ips:
        for name in ips:
            if name != reference:
                print(f"ratio {name} / {reference}: {ips[name] / ips[reference]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
