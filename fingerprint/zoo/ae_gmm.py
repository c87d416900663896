"""Deterministic conv autoencoder + a Gaussian mixture on its latents (a "memorising" generator by design).

The autoencoder (strided / transposed conv stacks of :mod:`fingerprint.zoo.nets`, MSE loss) maps each training
image to a latent code; ``sklearn.mixture.GaussianMixture`` is fitted to the codes of the training images. A sample
picks a component by its weight, draws from it with the covariance scaled by ``temperature^2`` and decodes. With
few components it generalises (a smooth density over the codes); with as many components as training images and a
low temperature each component sits on one training code, so samples are near-reconstructions of training images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

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
class AEGMMSettings:
    steps: Annotated[int, Range(1)] = 2000
    """Autoencoder training iterations."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per iteration (at most the training-set size)."""
    latent_dim: Annotated[int, Range(1)] = 16
    """Dimension of the autoencoder's code."""
    width: Annotated[int, Range(4)] = 32
    """Channels of the first encoder / last decoder layer (doubling towards 4 x 4, up to 8x)."""
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-3
    """Adam learning rate."""
    components: Annotated[int, Range(1)] = 10
    """Mixture components (capped at the number of training images; as many as images = one per image)."""
    covariance: Literal["full", "diag"] = "full"
    """Covariance type of each component."""
    reg_covar: Annotated[float, Range(0, lo_open=True)] = 1e-3
    """Added to the covariances' diagonal (relative to codes standardised to unit variance)."""


@register_family("ae_gmm")
class AEGMM(Generator):
    """Conv autoencoder + Gaussian mixture on the codes; temperature scales the components' standard deviations."""

    Settings = AEGMMSettings

    def _build(self, image_size: int) -> None:
        from fingerprint.zoo.nets import ConvDecoder, ConvEncoder

        s = self.settings
        self.enc = ConvEncoder(image_size, s.width, s.latent_dim)
        self.dec = ConvDecoder(image_size, s.width, s.latent_dim)
        self.gmm: dict[str, np.ndarray] = {}

    def _fit(self, x: np.ndarray, torch_gen: Any, seed: int, progress: bool, on_step: OnStep | None) -> History:
        import torch
        from sklearn.mixture import GaussianMixture

        s = self.settings
        data = torch.from_numpy(x[:, None])
        opt = torch.optim.Adam([*self.enc.parameters(), *self.dec.parameters()], lr=s.lr)
        rec = Recorder(self.family, s.steps, progress, on_step)
        self.enc.train()
        self.dec.train()
        for step, idx in enumerate(batches(len(x), s.batch_size, s.steps, torch_gen), 1):
            real = data[idx]
            loss = ((self.dec(self.enc(real)) - real) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec.add(step, {"loss": loss.item(), "mse": loss.item()})
        self.enc.eval()
        self.dec.eval()
        with torch.no_grad():
            codes = np.concatenate([self.enc(data[i : i + 500]).numpy() for i in range(0, len(x), 500)])
        codes = codes.astype(np.float64)
        # Standardised codes make reg_covar mean the same for every autoencoder.
        shift, scale = codes.mean(0), codes.std(0) + 1e-8
        k = min(s.components, len(x))
        gm = GaussianMixture(n_components=k, covariance_type=s.covariance, reg_covar=s.reg_covar,
                             random_state=int(np.random.SeedSequence([seed, 4]).generate_state(1)[0]), max_iter=200)
        gm.fit((codes - shift) / scale)
        self.gmm = {"weights": gm.weights_, "means": gm.means_, "covariances": gm.covariances_, "shift": shift,
                    "scale": scale}
        self.extra = {"components": k, "gmm_converged": bool(gm.converged_)}
        if history := rec.history:
            history[-1]["gmm_log_likelihood"] = float(gm.score((codes - shift) / scale))
        return rec.history

    def _sample(self, n: int, torch_gen: Any, rng: np.random.Generator, temperature: float) -> np.ndarray:
        import torch

        g = self.gmm
        w = g["weights"] / g["weights"].sum()
        comp = rng.choice(len(w), size=n, p=w)
        eps = rng.standard_normal((n, g["means"].shape[1]))
        cov = g["covariances"]
        if cov.ndim == 3:  # full
            chol = np.linalg.cholesky(cov)
            noise = np.einsum("nij,nj->ni", chol[comp], eps)
        else:  # diag
            noise = np.sqrt(cov[comp]) * eps
        codes = (g["means"][comp] + temperature * noise) * g["scale"] + g["shift"]
        self.dec.eval()
        z = torch.from_numpy(codes.astype(np.float32))
        return np.concatenate([self.dec(z[i : i + 500])[:, 0].numpy() for i in range(0, n, 500)])

    def arrays(self) -> dict[str, np.ndarray]:
        return {**module_arrays("enc", self.enc), **module_arrays("dec", self.dec),
                **{f"gmm.{k}": np.asarray(v, dtype=np.float64) for k, v in self.gmm.items()}}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays("enc", self.enc, arrays)
        load_module_arrays("dec", self.dec, arrays)
        self.gmm = {k[4:]: np.asarray(v) for k, v in arrays.items() if k.startswith("gmm.")}
        self.enc.eval()
        self.dec.eval()
