"""Convolutional VAE (Kingma and Welling 2014) with a Gaussian decoder of fixed standard deviation.

Encoder and decoder are the strided / transposed conv stacks of :mod:`fingerprint.zoo.nets`. The loss per image
is ``||x - mean||^2 / (2 decoder_std^2) + beta * KL``; a sample is the decoder's mean at a latent drawn from
``N(0, temperature^2 I)``. A small ``decoder_std`` (sharp reconstructions) and long training on a small set push it
towards memorising; a low temperature draws from the middle of the latent space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from fingerprint.config import Range
from fingerprint.zoo.base import (
    Generator,
    History,
    OnStep,
    Recorder,
    batches,
    load_module_arrays,
    module_arrays,
    register_family,
)


@dataclass
class VAESettings:
    steps: Annotated[int, Range(1)] = 2000
    """Training iterations."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per iteration (at most the training-set size)."""
    latent_dim: Annotated[int, Range(1)] = 32
    """Dimension of the latent."""
    width: Annotated[int, Range(4)] = 32
    """Channels of the first encoder / last decoder layer (doubling towards 4 x 4, up to 8x)."""
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-3
    """Adam learning rate."""
    decoder_std: Annotated[float, Range(0, lo_open=True)] = 0.1
    """Standard deviation of the Gaussian decoder (pixels in [0, 1]); smaller weighs reconstruction more."""
    beta: Annotated[float, Range(0)] = 1.0
    """Weight of the KL term (1 = the plain VAE)."""


@register_family("vae")
class VAE(Generator):
    """Convolutional VAE (Gaussian decoder mean as sample); temperature scales the latent's standard deviation."""

    Settings = VAESettings

    def _build(self, image_size: int) -> None:
        from fingerprint.zoo.nets import ConvDecoder, ConvEncoder

        s = self.settings
        self.enc = ConvEncoder(image_size, s.width, 2 * s.latent_dim)
        self.dec = ConvDecoder(image_size, s.width, s.latent_dim)

    def _fit(self, x: np.ndarray, torch_gen: Any, seed: int, progress: bool, on_step: OnStep | None) -> History:
        import torch

        s = self.settings
        data = torch.from_numpy(x[:, None])
        opt = torch.optim.Adam([*self.enc.parameters(), *self.dec.parameters()], lr=s.lr)
        rec = Recorder(self.family, s.steps, progress, on_step)
        n_pix = x.shape[1] * x.shape[2]
        self.enc.train()
        self.dec.train()
        for step, idx in enumerate(batches(len(x), s.batch_size, s.steps, torch_gen), 1):
            real = data[idx]
            mu, logvar = self.enc(real).chunk(2, dim=1)
            logvar = logvar.clamp(-12.0, 8.0)
            z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch_gen)
            mean = self.dec(z)
            sq = ((real - mean) ** 2).flatten(1).sum(1)
            recon = sq / (2 * s.decoder_std**2)
            kl = 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).sum(1)
            loss = (recon + s.beta * kl).mean() / n_pix
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.add(step, {"loss": loss.item(), "mse": sq.mean().item() / n_pix, "kl": kl.mean().item()})
        self.enc.eval()
        self.dec.eval()
        return rec.history

    def _sample(self, n: int, torch_gen: Any, rng: np.random.Generator, temperature: float) -> np.ndarray:
        import torch

        self.dec.eval()
        out = []
        for start in range(0, n, 500):
            z = torch.randn(min(500, n - start), self.settings.latent_dim, generator=torch_gen) * temperature
            out.append(self.dec(z)[:, 0].numpy())
        return np.concatenate(out)

    def arrays(self) -> dict[str, np.ndarray]:
        return {**module_arrays("enc", self.enc), **module_arrays("dec", self.dec)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays("enc", self.enc, arrays)
        load_module_arrays("dec", self.dec, arrays)
        self.enc.eval()
        self.dec.eval()
