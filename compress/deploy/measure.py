"""What a compressed model costs: parameters (total and non-zero), multiply-accumulates, CPU latency, stored
size. Pure functions of a model; no data. `model_costs` gathers them into the cost columns of a row.

MACs come from `torch.utils.flop_counter.FlopCounterMode` (every convolution and matrix product that runs,
functional calls included; FLOPs / 2), counted on the deployable model so that generating a kernel from
its coefficients is not counted as inference work. Latency comes from `torch.utils.benchmark.Timer`, with
an explicit thread count, as the median and interquartile range of repeated timed blocks of forward passes.

Speed-up is measured, not divided out of two separate measurements: the compressed model and the baseline
are timed in alternating blocks (`interleaved_ms`), so both see the same machine load, and the speed-up is
the median of the per-repeat ratios. On a busy CPU the absolute latencies drift by tens of percent between
rows; the paired ratio does not (bench/pruned_latency.py). With ONNX Runtime (`measure.ort_latency`), the
same pairing on the two models exported to ONNX gives the deployment speed-up at batch 1.
"""
from __future__ import annotations

import io
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Trainable numbers the model stores: coefficients of generated kernels, not the kernels."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Non-zero parameters, with unstructured-pruning masks (torch.nn.utils.prune's `<name>_mask`
    buffers) applied to their `<name>_orig` parameters."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            mask = getattr(module, name[: -len("_orig")] + "_mask", None) if name.endswith("_orig") else None
            total += int(torch.count_nonzero(p.detach() * mask if mask is not None else p.detach()))
    return total


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one image's forward pass: convolutions and matrix products (the papers'
    FLOPs convention: CIFAR ResNet-56 = 125,485,696). Give it a deployable model (plain kernels)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def _benchmark():
    """torch.utils.benchmark, imported when first needed: it pulls in the C++ extension builder, which warns
    about a missing CUDA toolkit on CPU machines (not our users' concern: silenced)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    return benchmark


def latency_ms(model: nn.Module, input_shape: tuple[int, int, int], batch: int, repeats: int = 7,
               threads: int | None = None) -> tuple[float, float]:
    """(median, interquartile range) of a forward pass's wall time on the CPU, in milliseconds.

    `model` is used as it is (give it a deployable CPU copy in eval mode: `compress.layers.deployable`).
    """
    x = torch.randn(batch, *input_shape).contiguous(memory_format=torch.channels_last)
    timed = interleaved_ms([forward_call(model, x)], repeats, threads)
    return timed.median_ms[0], timed.iqr_ms[0]


@dataclass
class Interleaved:
    """Per candidate: median and interquartile range of a call's wall time (ms), and the speed-up over the
    first candidate (the median of per-repeat ratios; 1.0 for the first itself)."""
    median_ms: list[float]
    iqr_ms: list[float]
    speedup: list[float]


def interleaved_ms(calls: Sequence[Callable[[], Any]], repeats: int = 7, threads: int | None = None,
                   block_s: float = 0.05) -> Interleaved:
    """Time `calls` in alternating blocks: repeat r times call 0, call 1, ... back to back, each block long
    enough (about `block_s`, at least one call) for the timer's resolution; then compare within each repeat."""
    benchmark = _benchmark()
    timers = [benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=threads or torch.get_num_threads())
              for call in calls]
    numbers = []
    for timer in timers:
        timer.timeit(2)  # warm-up: first calls allocate and pick kernels
        single = timer.timeit(1).median
        numbers.append(max(1, min(1000, int(block_s / max(single, 1e-7)))))
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, timer in enumerate(timers):
            times[i].append(timer.timeit(numbers[i]).median)  # seconds per call in this block
    quartiles = [statistics.quantiles(t, n=4) if len(t) > 1 else [t[0], t[0], t[0]] for t in times]
    return Interleaved(
        median_ms=[1000.0 * statistics.median(t) for t in times],
        iqr_ms=[1000.0 * (q[2] - q[0]) for q in quartiles],
        speedup=[statistics.median(base / own for base, own in zip(times[0], t)) for t in times])


def forward_call(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call():
        with torch.inference_mode():
            return model(x)
    return call


def ort_call(session, x: torch.Tensor) -> Callable[[], Any]:
    feed = {"images": x.contiguous().numpy()}
    return lambda: session.run(None, feed)


def serialized_size(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def deployable_cpu(model: nn.Module) -> nn.Module:
    """The form that is timed and counted: `compress.layers.deployable` on the CPU, eval mode, channels_last."""
    from compress.layers import deployable

    return deployable(model).cpu().eval().to(memory_format=torch.channels_last)


def latency_columns(deploy: nn.Module, input_shape: tuple[int, int, int], *, reference: nn.Module | None,
                    repeats: int, threads: int | None = None, ort: bool = False) -> dict:
    """latency_ms_b1/_b64 (+ iqr) of a deployable model (`deployable_cpu`) and, beside a `reference` (the
    baseline, deployable too), speedup_b1/_b64 timed in alternation with it; with `ort`, ort_latency_ms_b1 and
    ort_speedup_b1 of both exported to ONNX and run by ONNX Runtime. Without a reference (the baseline row)
    the speed-ups are 1."""
    pair = [reference, deploy] if reference is not None else [deploy]
    columns = {}
    for batch in (1, 64):
        x = torch.randn(batch, *input_shape).contiguous(memory_format=torch.channels_last)
        timed = interleaved_ms([forward_call(m, x) for m in pair], repeats, threads)
        columns[f"latency_ms_b{batch}"] = round(timed.median_ms[-1], 3)
        columns[f"latency_iqr_ms_b{batch}"] = round(timed.iqr_ms[-1], 3)
        columns[f"speedup_b{batch}"] = round(timed.speedup[-1], 3)
    if ort:
        from compress.deploy import export

        sessions = [export.ort_session(export.onnx_bytes(m, input_shape), threads) for m in pair]
        x = torch.randn(1, *input_shape)
        timed = interleaved_ms([ort_call(s, x) for s in sessions], repeats, threads)
        columns["ort_latency_ms_b1"] = round(timed.median_ms[-1], 3)
        columns["ort_speedup_b1"] = round(timed.speedup[-1], 3)
    return columns


LATENCY_COLUMNS = ("latency_ms_b1", "latency_ms_b64", "latency_iqr_ms_b1", "latency_iqr_ms_b64", "speedup_b1",
                   "speedup_b64", "ort_latency_ms_b1", "ort_speedup_b1")


def model_costs(model: nn.Module, input_shape: tuple[int, int, int], *, storage_bytes: int | None,
                latency: bool, latency_repeats: int, threads: int | None = None, reference: nn.Module | None = None,
                ort: bool = False) -> dict:
    """The cost columns of a metrics row. `storage_bytes`: the method's own storage format, if any;
    `reference`: the baseline's `deployable_cpu` form, which the speed-ups are measured against."""
    deploy = deployable_cpu(model)  # one copy for the MACs and the timings
    costs = {"params": count_params(model), "params_nonzero": count_nonzero(model),
             "macs": count_macs(deploy, input_shape)}
    costs.update(dict.fromkeys(LATENCY_COLUMNS, float("nan")))
    if latency:
        costs.update(latency_columns(deploy, input_shape, reference=reference, repeats=latency_repeats,
                                     threads=threads, ort=ort))
    costs["size_bytes"] = storage_bytes if storage_bytes is not None else serialized_size(model)
    return costs
