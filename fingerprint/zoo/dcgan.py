"""DCGAN (Radford et al. 2016): transposed-conv generator and strided-conv discriminator, non-saturating BCE.

The architecture of the shared ctbench benchmarks' generator, sized by ``width``: the generator maps a standard
normal latent to 4 x 4 x (8 or fewer) x width channels and doubles the side with 4x4 transposed convolutions
(batch norm, ReLU, tanh output); the discriminator mirrors it with strided convolutions (batch norm except on the
first, LeakyReLU 0.2). Memorisation grows with training length and capacity on a small training set.
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
class DCGANSettings:
    steps: Annotated[int, Range(1)] = 2000
    """Training iterations (one discriminator and one generator update each)."""
    batch_size: Annotated[int, Range(2)] = 64
    """Real images per iteration (at most the training-set size)."""
    latent_dim: Annotated[int, Range(1)] = 64
    """Dimension of the standard normal latent."""
    width: Annotated[int, Range(4)] = 32
    """Channels of the generator's last and the discriminator's first layer (doubling towards 4 x 4, up to 8x)."""
    lr: Annotated[float, Range(0, lo_open=True)] = 2e-4
    """Adam learning rate of both networks."""
    beta1: Annotated[float, Range(0, 1, hi_open=True)] = 0.5
    """Adam beta1 (DCGAN's 0.5)."""
    label_smoothing: Annotated[float, Range(0, 0.5)] = 0.1
    """One-sided label smoothing: the discriminator's target for real images is 1 - this."""


@register_family("dcgan")
class DCGAN(Generator):
    """DCGAN (Radford et al.), non-saturating BCE loss; temperature scales the latent's standard deviation."""

    Settings = DCGANSettings

    def _build(self, image_size: int) -> None:
        from fingerprint.zoo.nets import ConvDecoder, ConvEncoder

        s = self.settings
        self.g = ConvDecoder(image_size, s.width, s.latent_dim, batch_norm=True, out="tanh")
        self.d = ConvEncoder(image_size, s.width, 1, batch_norm=True)
        for m in (*self.g.modules(), *self.d.modules()):
            _dcgan_init(m)

    def _fit(self, x: np.ndarray, torch_gen: Any, seed: int, progress: bool, on_step: OnStep | None) -> History:
        import torch
        import torch.nn.functional as F

        s = self.settings
        data = torch.from_numpy(x[:, None] * 2.0 - 1.0)
        opt_g = torch.optim.Adam(self.g.parameters(), lr=s.lr, betas=(s.beta1, 0.999))
        opt_d = torch.optim.Adam(self.d.parameters(), lr=s.lr, betas=(s.beta1, 0.999))
        rec = Recorder(self.family, s.steps, progress, on_step)
        self.g.train()
        self.d.train()
        for step, idx in enumerate(batches(len(x), s.batch_size, s.steps, torch_gen), 1):
            real = data[idx]
            b = len(real)
            z = torch.randn(b, s.latent_dim, generator=torch_gen)
            fake = self.g(z)
            out_real, out_fake = self.d(real).squeeze(1), self.d(fake.detach()).squeeze(1)
            loss_d = (F.binary_cross_entropy_with_logits(out_real, torch.full_like(out_real, 1 - s.label_smoothing))
                      + F.binary_cross_entropy_with_logits(out_fake, torch.zeros_like(out_fake)))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            out = self.d(fake).squeeze(1)
            loss_g = F.binary_cross_entropy_with_logits(out, torch.ones_like(out))  # non-saturating
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            rec.add(step, {"loss": loss_g.item() + loss_d.item(), "loss_g": loss_g.item(), "loss_d": loss_d.item(),
                           "d_real": float(torch.sigmoid(out_real.detach()).mean()),
                           "d_fake": float(torch.sigmoid(out_fake.detach()).mean())})
        self.g.eval()
        self.d.eval()
        return rec.history

    def _sample(self, n: int, torch_gen: Any, rng: np.random.Generator, temperature: float) -> np.ndarray:
        import torch

        self.g.eval()
        out = []
        for start in range(0, n, 500):
            z = torch.randn(min(500, n - start), self.settings.latent_dim, generator=torch_gen) * temperature
            out.append(((self.g(z)[:, 0] + 1.0) / 2.0).numpy())
        return np.concatenate(out)

    def arrays(self) -> dict[str, np.ndarray]:
        return module_arrays("g", self.g)

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays("g", self.g, arrays)
        self.g.eval()


def _dcgan_init(m: Any) -> None:
    """Radford et al.: conv weights N(0, 0.02), batch-norm scales N(1, 0.02), biases 0."""
    from torch import nn

    if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
