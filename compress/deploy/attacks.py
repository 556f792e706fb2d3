"""Adversarial robustness: FGSM and PGD (L-inf) on the [0, 1] pixel scale, and robust top-1.

The data pipeline yields normalised batches `(pixels - mean) / std`. An attack works on the pixels: it
un-normalises the batch with the arch's mean/std, perturbs the pixels within the L-inf ball of radius
`eps` and within [0, 1], and re-normalises them for the model. So `eps` is in pixel units (8/255 =
0.0314 is one grey level step of 8), whatever the normalisation.

- FGSM (Goodfellow et al., 2014): `x + eps * sign(grad_x loss)`, clamped to [0, 1].
- PGD (Madry et al., 2017): `steps` steps of that ascent of size `step_size` (null: `2.5 * eps / steps`,
  so that the walk can cross the ball; the MadryLab `robustness` library's rule), each projected back
  onto the eps-ball and [0, 1], from a uniformly random point of the ball (`random_start`) or from x.

The loss is the summed cross-entropy, the model is in eval mode (BatchNorm uses its running statistics),
so each image's attack depends on that image only, not on its batch mates or the batch size. Gradients are
taken with respect to the images alone (`torch.autograd.grad`): no parameter's `.grad` is touched.

`robust_columns` gives the final row's columns, one per (attack, epsilon): `robust_top1_<attack>_eps<eps>`,
with eps written as Python writes the float, without a trailing `.0` (`robust_top1_fgsm_eps0`,
`robust_top1_pgd_eps0.05`, `robust_top1_fgsm_eps0.03137254901960784` for 8/255). Epsilon 0 is the
clean top-1 of the same images, computed on the batch exactly as `compress.training.train.evaluate` does.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.config import ATTACKS
from compress.training.train import autocast

log = logging.getLogger("compress")

COLUMN_PREFIX = "robust_top1_"


def eps_label(eps: float) -> str:
    """How an epsilon is written in a column name: Python's shortest exact repr, without a trailing `.0`."""
    text = repr(float(eps) + 0.0)  # + 0.0: -0.0 is written 0
    return text[:-2] if text.endswith(".0") else text


def column(attack: str, eps: float) -> str:
    """`robust_top1_<attack>_eps<eps>`, e.g. `robust_top1_fgsm_eps0.05`."""
    return f"{COLUMN_PREFIX}{attack}_eps{eps_label(eps)}"


def default_step_size(eps: float, steps: int) -> float:
    """PGD's step size when none is given: 2.5 * eps / steps."""
    return 2.5 * eps / steps


# -- pixels <-> model input ----------------------------------------------------------------------------------
def _stats(values: Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)


def to_pixels(x: torch.Tensor, mean, std) -> torch.Tensor:
    """A normalised batch back on the [0, 1] pixel scale."""
    return (x * _stats(std, x) + _stats(mean, x)).clamp_(0.0, 1.0)


def normalise(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 1] pixels as the model's input (its memory format is kept)."""
    return (pixels - _stats(mean, pixels)) / _stats(std, pixels)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _grad_sign(model: nn.Module, pixels: torch.Tensor, y: torch.Tensor, mean, std) -> torch.Tensor:
    """sign of d(summed cross-entropy)/d(pixels), in float32; parameters' .grad untouched."""
    with torch.enable_grad():
        p = pixels.detach().requires_grad_(True)
        loss = F.cross_entropy(model(normalise(p, mean, std)).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, p)
    return grad.sign()


def _check(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0.0 <= eps <= 1.0):
        raise ValueError(f"eps must be in [0, 1] (pixel scale), got {eps!r}")


# -- the attacks (pixels in, pixels out) --------------------------------------------------------------------------
def _fgsm_from_sign(pixels: torch.Tensor, sign: torch.Tensor, eps: float) -> torch.Tensor:
    return (pixels + eps * sign).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, mean, std) -> torch.Tensor:
    """FGSM adversarial images for [0, 1] images `x` (N, C, H, W) with labels `y`: one signed-gradient
    step of size `eps`, clamped to [0, 1]. `mean`/`std` normalise the images for the model."""
    _check(eps)
    if eps == 0:
        return x.detach().clone()
    with _eval_mode(model):
        return _fgsm_from_sign(x.detach(), _grad_sign(model, x, y, mean, std), eps).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float | None,
        mean, std, generator: torch.Generator | None = None, random_start: bool = True) -> torch.Tensor:
    """PGD (L-inf) adversarial images for [0, 1] images `x`: `steps` signed-gradient steps of `step_size`
    (None: 2.5 * eps / steps), each projected onto {|x' - x| <= eps} and [0, 1]; started from a uniform
    point of the ball drawn with `generator` (CPU), or from x when `random_start` is false."""
    _check(eps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    x = x.detach()
    if eps == 0:
        return x.clone()
    alpha = default_step_size(eps, steps) if step_size is None else step_size
    # The ball and the pixel range in one box. min/max, not a clamped delta: with one step of size eps
    # and no random start, this is bit for bit FGSM.
    low, high = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1).mul_(eps)
        adv = torch.minimum(torch.maximum(adv + noise.to(x.device), low), high)
    with _eval_mode(model):
        for _ in range(steps):
            adv = adv + alpha * _grad_sign(model, adv, y, mean, std)
            adv = torch.minimum(torch.maximum(adv, low), high)
    return adv.detach()


# -- robust top-1 over a split ------------------------------------------------------------------------------------------
@torch.no_grad()
def _hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> int:
    with autocast(x.device, amp):  # as compress.training.train.evaluate runs the model, so epsilon 0 = clean top-1
        logits = model(x)
    k = min(5, logits.shape[1])  # top-1 read off top-k exactly as compress.training.train.evaluate reads it
    return int(logits.float().topk(k, dim=1).indices[:, 0].eq(y).sum().item())


def _batches(split, batch_size: int, images: int | None, device: torch.device
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `images` test images (None: all), in order, in batches."""
    left = len(split) if images is None else min(images, len(split))
    for x, y in split.batches(batch_size, max_batches=math.ceil(left / batch_size) if left else 0):
        if left <= 0:
            return
        x, y = x[:left].to(device, non_blocking=True), y[:left].to(device, non_blocking=True)
        left -= y.numel()
        yield x, y


def robust_accuracies(model: nn.Module, split, attacks: Sequence[str], epsilons: Sequence[float], *, mean, std,
                      images: int | None = None, batch_size: int = 500, pgd_steps: int = 10,
                      pgd_step_size: float | None = None, pgd_random_start: bool = True, seed: int = 0,
                      amp: bool = False, device: torch.device | None = None) -> dict[tuple[str, float], float]:
    """Top-1 (%) under each attack at each epsilon, {(attack, eps): top1}, over the first `images` images of
    `split` (None: all). One pass over the data: FGSM's gradient is taken once per batch for every
    epsilon; epsilon 0 is the clean top-1 (no attack). PGD's random starts come from a generator seeded
    with `seed`."""
    for attack in attacks:
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r} (known: {', '.join(ATTACKS)})")
    for eps in epsilons:
        _check(eps)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    correct = {(a, e): 0 for a in attacks for e in epsilons}
    n = 0
    total = len(split) if images is None else min(images, len(split))
    with _eval_mode(model):
        for x, y in tqdm(_batches(split, batch_size, images, device), total=math.ceil(total / batch_size),
                         desc="attacks", leave=False, disable=None):
            pixels = to_pixels(x, mean, std)
            clean = _hits(model, x, y, amp) if 0 in epsilons else 0
            sign = (_grad_sign(model, pixels, y, mean, std)
                    if "fgsm" in attacks and any(e > 0 for e in epsilons) else None)
            for attack in attacks:
                for eps in epsilons:
                    if eps == 0:
                        hits = clean
                    elif attack == "fgsm":
                        hits = _hits(model, normalise(_fgsm_from_sign(pixels, sign, eps), mean, std), y, amp)
                    else:
                        adv = pgd(model, pixels, y, eps, pgd_steps, pgd_step_size, mean, std, generator,
                                  pgd_random_start)
                        hits = _hits(model, normalise(adv, mean, std), y, amp)
                    correct[(attack, eps)] += hits
            n += y.numel()
    return {key: (100.0 * hits / n if n else float("nan")) for key, hits in correct.items()}


def robust_top1(model: nn.Module, split, attack: str, eps: float, **options) -> float:
    """Top-1 (%) of `model` on `split` under one attack at one epsilon (options: see `robust_accuracies`)."""
    return robust_accuracies(model, split, [attack], [eps], **options)[(attack, eps)]


def robust_columns(model: nn.Module, split, measure, *, mean, std, seed: int = 0, amp: bool = False,
                   device: torch.device | None = None) -> dict[str, float]:
    """The final row's robust columns for a `MeasureConfig` (`measure.attacks`, `measure.epsilons`, ...),
    in the config's order, attack by attack: {"robust_top1_<attack>_eps<eps>": top1 (%, 3 decimals)}."""
    if not measure.attacks:
        return {}
    accuracies = robust_accuracies(
        model, split, measure.attacks, measure.epsilons, mean=mean, std=std, images=measure.attack_images,
        batch_size=measure.eval_batch_size, pgd_steps=measure.pgd_steps, pgd_step_size=measure.pgd_step_size,
        pgd_random_start=measure.pgd_random_start, seed=seed, amp=amp, device=device)
    columns = {column(a, e): round(top1, 3) for (a, e), top1 in accuracies.items()}
    log.info("robust top-1: %s", ", ".join(f"{k[len(COLUMN_PREFIX):]} {v:.2f}" for k, v in columns.items()))
    return columns
