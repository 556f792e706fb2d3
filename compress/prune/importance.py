"""SCAP's importance: raw per-channel fidelities and filter L1 norms -> one score per channel, higher = keep.

The abstract fixes little: "an importance score (optionally fused with the filter L1 norm) that supports
simple threshold-based pruning [...] at a fixed threshold of 0.6"; the stored summary adds "cosine
fidelity with layer-normalized filter magnitude". The readings (docs/scap.md, "Readings of the threshold"):

- `normalise`, how the fidelity becomes a [0, 1] term (higher = keep, i.e. less compressible):
  `raw`: 1 - fidelity as it is (comparable across layers and networks: the cosine has one scale);
  `minmax_layer`: min-max of 1 - fidelity within each layer (each layer's least compressible channel 1,
  its most compressible 0: the threshold becomes a per-layer rate; the rule before issue 26);
  `minmax_global`: min-max over every scored channel of the network (one scale per network);
  `rank_global`: the channel's rank among every scored channel of the network, scaled to [0, 1].
- `l1_norm`, the "layer-normalized" filter L1 norm: `minmax` within the layer, or `max`: divided by the
  layer's largest (the lightest filter keeps its share, not 0).
- fusion: `(1 - l1_weight) * fidelity term + l1_weight * L1 term`.

A silent channel's fidelity is NaN (compress.methods.scap.silent_channels): its fidelity term is 0 and it
does not count towards any range.
"""
from __future__ import annotations

import torch

NORMALISE = ("raw", "minmax_layer", "minmax_global", "rank_global")
L1_NORMS = ("minmax", "max")
# Values of a layer whose spread is at most this fraction of their magnitude count as all equal: float
# rounding (about 1e-7 relative in float32) must not be stretched into a ranking.
DEGENERATE = 1e-6


def minmax(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalise (C,) to [0, 1]: the smallest value -> 0, the largest -> 1.

    Degenerate (every finite value equal, up to `DEGENERATE` of their magnitude): all 1 -- no value
    tells the channels apart, so none is marked for pruning. Non-finite values (NaN, +-inf) -> 0, the
    least important (the engine ranks NaN lowest too), and they do not count towards the range.
    """
    values = values.detach().float()
    finite = torch.isfinite(values)
    out = torch.zeros_like(values)
    if not bool(finite.any()):
        return out
    kept = values[finite]
    low, high = kept.min(), kept.max()
    span = high - low
    if float(span) <= DEGENERATE * float(torch.maximum(high.abs(), low.abs())):  # includes span 0
        out[finite] = 1.0
        return out
    out[finite] = ((kept - low) / span).clamp_(0.0, 1.0)
    return out


def fidelity_term(fidelity: torch.Tensor) -> torch.Tensor:
    """`minmax(1 - fidelity)` within a layer (computed as minmax(-fidelity), which is the same); a silent
    channel's NaN fidelity -> 0."""
    return minmax(-fidelity)


def fuse(fidelity_part: torch.Tensor, l1_part: torch.Tensor, l1_weight: float) -> torch.Tensor:
    """Convex fusion of two [0, 1] terms: `(1 - l1_weight) * fidelity_part + l1_weight * l1_part`.
    A weight of exactly 0 or 1 uses one term alone."""
    if l1_weight == 0:
        return fidelity_part.clone()
    if l1_weight == 1:
        return l1_part.clone()
    return (1 - l1_weight) * fidelity_part + l1_weight * l1_part


def importance(fidelity: torch.Tensor, l1: torch.Tensor, l1_weight: float) -> torch.Tensor:
    """One layer's channel importance in [0, 1] under `minmax_layer`, higher = keep:
    `(1 - l1_weight) * minmax(1 - fidelity) + l1_weight * minmax(l1)` (l1: raw filter L1 norms)."""
    return fuse(fidelity_term(fidelity), minmax(l1), l1_weight)


def fidelity_terms(fidelity: dict[str, torch.Tensor], normalise: str) -> dict[str, torch.Tensor]:
    """Per layer (name -> (C,) raw fidelity, NaN = silent), the fidelity term in [0, 1] (higher = keep)
    under `normalise` (see the module docstring); a silent channel -> 0."""
    if normalise == "minmax_layer":
        return {name: fidelity_term(f) for name, f in fidelity.items()}
    names = list(fidelity)
    flat = torch.cat([fidelity[n].detach().float().flatten() for n in names])
    live = torch.isfinite(flat)
    out = torch.zeros_like(flat)
    if normalise == "raw":
        out[live] = (1 - flat[live]).clamp(0.0, 1.0)
    elif normalise == "minmax_global":
        out = minmax(-flat)
    elif normalise == "rank_global":
        values = -flat[live]
        count = values.numel()
        ranks = torch.empty(count)
        ranks[torch.sort(values, stable=True).indices] = torch.arange(count, dtype=torch.float32)
        out[live] = ranks / max(count - 1, 1)
    else:
        raise ValueError(f"normalise: one of {', '.join(NORMALISE)}, got {normalise!r}")
    return dict(zip(names, out.split([fidelity[n].numel() for n in names])))


def l1_term(l1: torch.Tensor, norm: str) -> torch.Tensor:
    """A layer's filter L1 norms (C,) on [0, 1]: `minmax` within the layer, or `max`: over its largest."""
    if norm == "minmax":
        return minmax(l1)
    if norm == "max":
        return l1.float() / l1.float().max().clamp_min(1e-12)
    raise ValueError(f"l1_norm: one of {', '.join(L1_NORMS)}, got {norm!r}")
