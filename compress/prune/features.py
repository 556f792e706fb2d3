"""Per-channel scores computed from feature maps, collected with forward hooks in one pass per batch.

Data-driven pruning criteria (HRank, CFDP, ...) look at what each output channel of a layer produces on
calibration images. `feature_scores` runs the model once per batch with hooks on every layer at the same
time and hands each layer's maps to a scoring function, so the cost is one forward pass per batch however
many layers are scored, and no feature map outlives its hook.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from compress import CompressError
from compress.models.introspect import evaluating

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
FEATURES = ("conv", "relu")


def _relu_nchw(maps: torch.Tensor) -> torch.Tensor:
    """relu(maps) as a contiguous (N, C, H, W) tensor: one pass, whatever the input's memory format
    (scorers work per map, so channels_last activations would otherwise be copied a second time)."""
    return torch.clamp_min(maps, 0, out=torch.empty(maps.shape, dtype=maps.dtype, device=maps.device))


def run_hooked(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    on_layer: Callable[[str, torch.Tensor, torch.Tensor], None],
    feature: str = "conv",
    key: str = "method.feature",
) -> int:
    """Run `model` (eval, no_grad) once over each batch, calling `on_layer(name, layer_input, maps)` for
    every layer of `layers` inside the same forward pass. Returns the number of batches.

    feature "conv": maps = the layer's own output; "relu": relu(BatchNorm(conv output)), the BatchNorm
    being the module that receives the conv's output tensor directly (found during the forward pass, not
    from names); a layer that feeds no BatchNorm gets relu(its own output). The relu maps are handed
    over as contiguous (N, C, H, W) tensors (made in the same pass as the relu). `key` names the option in errors.
    """
    if feature not in FEATURES:
        raise CompressError(f"{key}: must be one of {', '.join(FEATURES)}, got '{feature}'")
    module_names = {id(module): name for name, module in layers.items()}
    # Outputs of the hooked layers in the current batch, by tensor identity, waiting for a BatchNorm
    # (the tuple keeps the tensor alive so that its id cannot be reused).
    pending: dict[int, tuple[str, torch.Tensor, torch.Tensor]] = {}

    def on_conv(module: nn.Module, inputs, output: torch.Tensor) -> None:
        name = module_names[id(module)]
        if feature == "conv":
            on_layer(name, inputs[0], output)
        else:
            pending[id(output)] = (name, inputs[0], output)

    def on_batchnorm(_module: nn.Module, inputs, output: torch.Tensor) -> None:
        entry = pending.pop(id(inputs[0]), None)
        if entry is not None:
            on_layer(entry[0], entry[1], _relu_nchw(output))

    handles = [module.register_forward_hook(on_conv) for module in layers.values()]
    if feature == "relu":
        handles += [
            module.register_forward_hook(on_batchnorm)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
        ]
    seen_batches = 0
    try:
        with evaluating(model), torch.no_grad():
            for batch in batches:
                model(batch)
                for name, layer_input, output in pending.values():  # layers not followed by a BatchNorm
                    on_layer(name, layer_input, _relu_nchw(output))
                pending.clear()
                seen_batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen_batches == 0:
        raise CompressError("method.batches: no calibration batches were given")
    return seen_batches


def feature_scores(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    score_fn: ScoreFn,
    feature: str = "conv",
) -> dict[str, torch.Tensor]:
    """Average per-channel scores of the feature maps of `layers` over all images of `batches`.

    Args:
        model: the network; it is run in eval mode under no_grad (its training flag is restored after).
        layers: name -> module (usually the nn.Conv2d layers to prune, as in `model.named_modules()`).
        batches: input batches (N, C, H, W) already on the model's device and normalised.
        score_fn: maps a layer's feature maps `(N, C, H, W)` float -> `(C,)`, the MEAN score of each
            channel over the N images of that batch (e.g. `lambda m: m.abs().mean((0, 2, 3))`).
            It is called inside the hook, once per layer and batch.
        feature: which maps a layer's channels are judged by (see `run_hooked`): "conv" or "relu".

    Returns:
        name -> float32 CPU tensor (C,): the batch scores averaged over all images, each batch weighted by
        its number of images. Every name of `layers` is present.

    Raises:
        CompressError: unknown `feature`, no batches, or a layer that never ran in the forward pass.
    """
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {name: 0 for name in layers}

    def accumulate(name: str, _layer_input: torch.Tensor, maps: torch.Tensor) -> None:
        score = score_fn(maps.float()).detach().to("cpu", torch.float32) * maps.shape[0]
        totals[name] = totals[name] + score if name in totals else score
        counts[name] += maps.shape[0]

    run_hooked(model, layers, batches, accumulate, feature)
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        raise CompressError(f"method: layers never ran in the forward pass: {', '.join(missing[:5])}")
    return {name: totals[name] / counts[name] for name in layers}
