"""SCAP's low-capacity autoencoder: D -> hidden (ReLU) -> D, fully connected, one per conv layer, trained on
that layer's unit-norm spectra; fidelity = cosine similarity between a spectrum and its reconstruction
(compress/methods/scap.py, docs/scap.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compress import CompressError

AE_LOSSES = ("mse", "cosine")
_EPS = 1e-12


def unit_norm(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def cosine_fidelity(spectra: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis; 0 where either vector is zero."""
    dot = (spectra * reconstruction).sum(-1)
    return dot / (spectra.norm(dim=-1) * reconstruction.norm(dim=-1)).clamp_min(_EPS)


# -- the low-capacity autoencoder --------------------------------------------------------------------------
@dataclass
class Autoencoder:
    """D -> hidden (ReLU) -> D, fully connected. With `centred`, `center` (the mean training spectrum) is
    subtracted from every input, which is then renormalised, so the cosine judges deviations from the mean.

    Parameters are (hidden, D), (hidden,), (D, hidden), (D,), (D,) for one layer, or carry a leading layer
    axis L ((L, hidden, D), (L, 1, hidden), (L, D, hidden), (L, 1, D), (L, 1, D)) when L layers are trained
    together on inputs (L, B, D); the same expressions serve both.
    """

    enc_w: torch.Tensor
    enc_b: torch.Tensor
    dec_w: torch.Tensor
    dec_b: torch.Tensor
    center: torch.Tensor
    centred: bool = False

    def prepare(self, spectra: torch.Tensor) -> torch.Tensor:
        """Unit-norm spectra -> the vectors the autoencoder sees (centred and renormalised when centring)."""
        return unit_norm(spectra - self.center) if self.centred else spectra

    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(torch.matmul(v, self.enc_w.mT) + self.enc_b)
        return torch.matmul(hidden, self.dec_w.mT) + self.dec_b

    def fidelity(self, spectra: torch.Tensor) -> torch.Tensor:
        v = self.prepare(spectra)
        return cosine_fidelity(v, self.reconstruct(v))

    def parameters(self) -> list[torch.Tensor]:
        return [self.enc_w, self.enc_b, self.dec_w, self.dec_b]

    def layer(self, index: int) -> "Autoencoder":
        """One layer's autoencoder out of a stack trained together."""
        return Autoencoder(self.enc_w[index], self.enc_b[index, 0], self.dec_w[index], self.dec_b[index, 0],
                           self.center[index, 0], self.centred)


def init_autoencoder(dim: int, hidden: int, generator: torch.Generator) -> Autoencoder:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)), drawn from `generator` for reproducibility."""

    def uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    return Autoencoder(
        enc_w=uniform((hidden, dim), dim),
        enc_b=uniform((hidden,), dim),
        dec_w=uniform((dim, hidden), hidden),
        dec_b=uniform((dim,), hidden),
        center=torch.zeros(dim),
    )


def bottleneck_width(dim: int, hidden: int, ratio: float) -> int:
    """`hidden`, but at most `ratio` of the spectrum length `dim` and at least 1: a bottleneck as wide as
    the input would reconstruct everything (the 2 x 2 maps of VGG's last stage have dim 4)."""
    return max(1, min(hidden, int(dim * ratio)))


def train_autoencoders(
    spectra: torch.Tensor,
    hidden: int,
    epochs: int,
    lr: float,
    batch_size: int,
    generators: list[torch.Generator],
    loss: str = "mse",
    center: bool = False,
) -> list[Autoencoder]:
    """Fit one autoencoder per layer to that layer's unit-norm spectra (L, S, D), all L at once.

    Each layer's init and minibatch order come from its own generator, and the summed loss gives every
    layer exactly its own gradient, so a layer's autoencoder does not depend on which layers train beside
    it (up to float rounding); stacking only saves the per-step overhead of L separate loops.
    """
    if loss not in AE_LOSSES:
        raise CompressError(f"method.ae_loss: must be one of {', '.join(AE_LOSSES)}, got '{loss}'")
    layers, count, dim = spectra.shape
    device = spectra.device
    single = [init_autoencoder(dim, hidden, g) for g in generators]
    ae = Autoencoder(
        enc_w=torch.stack([a.enc_w for a in single]).to(device),
        enc_b=torch.stack([a.enc_b for a in single])[:, None].to(device),
        dec_w=torch.stack([a.dec_w for a in single]).to(device),
        dec_b=torch.stack([a.dec_b for a in single])[:, None].to(device),
        center=spectra.mean(1, keepdim=True) if center else torch.zeros(layers, 1, dim, device=device),
        centred=center,
    )
    inputs = ae.prepare(spectra)
    rows = torch.arange(layers, device=device)[:, None]
    params = ae.parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            orders = torch.stack([torch.randperm(count, generator=g) for g in generators]).to(device)
            for columns in orders.split(batch_size, dim=1):
                batch = inputs[rows, columns]  # (L, B, D): each layer's own minibatch
                recon = ae.reconstruct(batch)
                if loss == "mse":
                    per_layer = (recon - batch).pow(2).sum(-1).mean(-1)
                else:
                    per_layer = (1 - cosine_fidelity(batch, recon)).mean(-1)
                optimizer.zero_grad(set_to_none=True)
                per_layer.sum().backward()
                optimizer.step()
    for p in params:
        p.requires_grad_(False)
    return [ae.layer(i) for i in range(layers)]


def train_autoencoder(spectra: torch.Tensor, hidden: int, epochs: int, lr: float, batch_size: int,
                      generator: torch.Generator, loss: str = "mse", center: bool = False) -> Autoencoder:
    """One layer's autoencoder from its spectra (S, D)."""
    return train_autoencoders(spectra[None], hidden, epochs, lr, batch_size, [generator], loss, center)[0]
