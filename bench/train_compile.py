"""torch.compile (inductor) for CPU training: what it costs to compile and what it gains per step, to decide
whether a one-epoch fine-tune pays it back. The training step is compress.training.train.fit's (SGD with momentum,
channels_last, schedule.amp's autocast: bf16 where the CPU has it natively), on synthetic CIFAR-sized
batches; eager and compiled steps alternate in blocks, medians.

    OMP_NUM_THREADS=1 python bench/train_compile.py --arch resnet56 --threads 1 [--steps 6] [--blocks 3]

Compilation is timed twice in one run: cold (a fresh inductor cache directory, as on a first run) and
warm (torch._dynamo.reset() and compiling a fresh copy again, served from the on-disk caches, as on every
later run). Times are CPU-seconds of this process and the compilers it waits for (children), and wall
seconds; inductor compiles in-process (compile_threads=1) so that the CPU-seconds are all counted.
Break-even: compile seconds / seconds saved per step = steps before compiling pays; a one-epoch fine-tune
of the default job is ceil(45000 / 128) = 352 steps.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-cold-"))

# isort: off
import compress  # noqa: F401  first: the package sets OMP_WAIT_POLICY before torch loads OpenMP
import torch
import torch.nn.functional as F
# isort: on

from compress import models, runtime


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def step_fn(model, dtype):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)

    def step(x, y):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def timed(step, x, y, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = cpu_seconds()
        step(x, y).item()
        out.append(cpu_seconds() - t)
    return out


def first_step(base, dtype, x, y):
    """Compile a fresh copy and run its first step: (CPU-s, wall-s, the compiled step)."""
    model = torch.compile(copy.deepcopy(base))
    step = step_fn(model, dtype)
    c0, w0 = cpu_seconds(), time.perf_counter()
    step(x, y).item()
    return cpu_seconds() - c0, time.perf_counter() - w0, step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=6, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=3, help="eager / compiled blocks, alternating")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epoch-steps", type=int, default=352, help="steps of the fine-tune to break even on")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime.tune_allocator()
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1
    cpu = torch.device("cpu")
    dtype = runtime.training_dtype(cpu, True)
    print(f"{args.arch}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"CPU: {runtime.cpu_description()}")
    print(runtime.training_precision(cpu, True))
    print("inductor cache (cold): a fresh temporary directory (TORCHINDUCTOR_CACHE_DIR)", flush=True)
    torch.manual_seed(0)
    base = models.build(args.arch, 10).to(memory_format=torch.channels_last).train()
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))

    eager = step_fn(copy.deepcopy(base), dtype)
    timed(eager, x, y, 2)  # warm-up
    cold_cpu, cold_wall, compiled = first_step(base, dtype, x, y)
    print(f"cold compile + first step: {cold_cpu:.1f} CPU-s, {cold_wall:.1f} s wall", flush=True)
    timed(compiled, x, y, 2)  # the remaining lazy work (e.g. a recompile for the optimizer's state)
    torch._dynamo.reset()
    warm_cpu, warm_wall, compiled = first_step(base, dtype, x, y)
    print(f"warm compile + first step: {warm_cpu:.1f} CPU-s, {warm_wall:.1f} s wall", flush=True)
    timed(compiled, x, y, 2)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for block in range(args.blocks):
        for name in ("eager", "compiled") if block % 2 == 0 else ("compiled", "eager"):
            times[name] += timed(eager if name == "eager" else compiled, x, y, args.steps)
    t_eager, t_compiled = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"eager step:    {t_eager:.3f} CPU-s ({args.batch_size / t_eager:.1f} images per CPU-s)")
    print(f"compiled step: {t_compiled:.3f} CPU-s ({args.batch_size / t_compiled:.1f} images per CPU-s)")
    print(f"ratio compiled/eager speed: {t_eager / t_compiled:.3f}")
    saved = t_eager - t_compiled
    for label, cost in (("cold", cold_cpu - t_compiled), ("warm", warm_cpu - t_compiled)):
        if saved > 0:
            print(f"{label}: break-even after {cost / saved:.0f} steps; a {args.epoch_steps}-step epoch "
                  f"{'gains' if args.epoch_steps * saved > cost else 'loses'} {abs(args.epoch_steps * saved - cost):.1f} CPU-s")
        else:
            print(f"{label}: compiled steps are not faster; compiling costs {cost:.1f} CPU-s for nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
