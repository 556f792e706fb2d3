"""What a compressed model costs: parameters (total and non-zero), multiply-accumulates, CPU latency, stored
size. Pure functions of a model; no data. `model_costs` gathers them into the cost columns of a row.

MACs come from `torch.utils.flop_counter.FlopCounterMode` (every convolution and matrix product that runs,
functional calls included; FLOPs / 2), counted on the deployable model so that generating a kernel from
its coefficients is not counted as inference work. Latency comes from `torch.utils.benchmark.Timer`, with
an explicit thread count, as the median and interquartile range of repeated single forward passes.
"""
from __future__ import annotations

import io

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


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, int, int], batch: int, repeats: int = 7,
               threads: int | None = None) -> tuple[float, float]:
    """(median, interquartile range) of a forward pass's wall time on the CPU, in milliseconds.

    `model` is used as it is (give it a deployable CPU copy in eval mode: `compress.layers.deployable`).
    """
    benchmark = _benchmark()
    x = torch.randn(batch, *input_shape).contiguous(memory_format=torch.channels_last)
    timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                            num_threads=threads or torch.get_num_threads())
    timer.timeit(2)  # warm-up: first calls allocate and pick kernels
    runs = benchmark.Measurement.merge([timer.timeit(1) for _ in range(repeats)])[0]
    return 1000.0 * runs.median, 1000.0 * runs.iqr


def serialized_size(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def model_costs(model: nn.Module, input_shape: tuple[int, int, int], *, storage_bytes: int | None,
                latency: bool, latency_repeats: int, threads: int | None = None) -> dict:
    """The cost columns of a metrics row. `storage_bytes`: the method's own storage format, if any."""
    from compress.layers import deployable

    deploy = deployable(model).cpu().eval().to(memory_format=torch.channels_last)
    costs = {"params": count_params(model), "params_nonzero": count_nonzero(model),
             "macs": count_macs(deploy, input_shape)}
    nan = float("nan")
    for batch in (1, 64):
        median, iqr = latency_ms(deploy, input_shape, batch, latency_repeats, threads) if latency else (nan, nan)
        costs[f"latency_ms_b{batch}"] = round(median, 3)
        costs[f"latency_iqr_ms_b{batch}"] = round(iqr, 3)
    costs["size_bytes"] = storage_bytes if storage_bytes is not None else serialized_size(model)
    return costs
