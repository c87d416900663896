"""DDPM (Ho et al. 2020) with a small UNet, sampled with DDIM (Song et al. 2021).

The UNet has ``levels`` resolutions (channels ``width`` x 1, 2, 2, 4), one residual block per resolution on the way
down and up (group norm, SiLU, a sinusoidal time embedding added in every block), skip connections between them
and one block in the middle. Training predicts the noise (MSE) at a uniformly drawn step of a linear beta schedule;
an exponential moving average of the weights is what samples. DDIM sampling takes ``sample_steps`` evenly spaced
steps; ``eta`` = 0 is deterministic given the initial noise, 1 is DDPM-like. ``temperature`` scales the initial
noise and the noise added along the way. Diffusion models memorise small training sets when trained long.
"""

from __future__ import annotations

import math
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

_MULTS = (1, 2, 2, 4)


@dataclass
class DiffusionSettings:
    steps: Annotated[int, Range(1)] = 4000
    """Training iterations."""
    batch_size: Annotated[int, Range(1)] = 32
    """Images per iteration (at most the training-set size)."""
    width: Annotated[int, Range(4)] = 32
    """UNet channels at full resolution (x1, x2, x2, x4 at the lower ones); a multiple of 4."""
    levels: Annotated[int, Range(1, 4)] = 3
    """UNet resolutions (3 at 32 px: 32, 16, 8)."""
    timesteps: Annotated[int, Range(10)] = 1000
    """Diffusion steps T of the linear beta schedule (1e-4 .. 0.02, rescaled when T != 1000)."""
    lr: Annotated[float, Range(0, lo_open=True)] = 5e-4
    """Adam learning rate."""
    ema: Annotated[float, Range(0, 1, hi_open=True)] = 0.995
    """Decay of the exponential moving average of the weights used for sampling; 0 samples with the raw weights."""
    sample_steps: Annotated[int, Range(1)] = 50
    """DDIM steps per sample (at most timesteps)."""
    eta: Annotated[float, Range(0, 1)] = 0.0
    """DDIM stochasticity: 0 = deterministic given the initial noise, 1 = DDPM-like."""

    def problems(self) -> list[str]:
        return [f"--width: must be a multiple of 4 (group norm), got {self.width}"] if self.width % 4 else []


@register_family("diffusion")
class Diffusion(Generator):
    """DDPM with a small UNet and a DDIM sampler; temperature scales the initial and the added noise."""

    Settings = DiffusionSettings

    def _build(self, image_size: int) -> None:
        import copy

        s = self.settings
        if s.width % 4:
            raise ValueError(f"diffusion: width must be a multiple of 4 (group norm), got {s.width}")
        if image_size % 2 ** (s.levels - 1):
            raise ValueError(f"diffusion: {s.levels} levels need an image size divisible by {2 ** (s.levels - 1)}")
        self.net = _unet(s.width, s.levels)
        self.ema_net = copy.deepcopy(self.net)
        self.ema_net.requires_grad_(False)
        self._schedule()

    def _schedule(self) -> None:
        import torch

        t = self.settings.timesteps
        betas = torch.linspace(1e-4 * 1000 / t, 0.02 * 1000 / t, t, dtype=torch.float64).clamp(max=0.999)
        self.alpha_bar = torch.cumprod(1.0 - betas, 0)

    def _fit(self, x: np.ndarray, torch_gen: Any, seed: int, progress: bool, on_step: OnStep | None) -> History:
        import torch

        s = self.settings
        data = torch.from_numpy(x[:, None] * 2.0 - 1.0)
        opt = torch.optim.Adam(self.net.parameters(), lr=s.lr)
        rec = Recorder(self.family, s.steps, progress, on_step)
        ab = self.alpha_bar.float()
        self.net.train()
        for step, idx in enumerate(batches(len(x), s.batch_size, s.steps, torch_gen), 1):
            x0 = data[idx]
            t = torch.randint(0, s.timesteps, (len(x0),), generator=torch_gen)
            noise = torch.randn(x0.shape, generator=torch_gen)
            a = ab[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = ((self.net(xt, t.float()) - noise) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                decay = min(s.ema, (1 + step) / (10 + step))  # warm-up: early averages follow the weights
                for pe, p in zip(self.ema_net.parameters(), self.net.parameters(), strict=True):
                    pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
            rec.add(step, {"loss": loss.item()})
        self.net.eval()
        self.ema_net.eval()
        return rec.history

    def _sample(self, n: int, torch_gen: Any, rng: np.random.Generator, temperature: float) -> np.ndarray:
        import torch

        s = self.settings
        net = self.ema_net if s.ema > 0 else self.net
        net.eval()
        ab = self.alpha_bar
        k = min(s.sample_steps, s.timesteps)
        ts = np.unique(np.linspace(0, s.timesteps - 1, k).round().astype(np.int64))[::-1]
        out = []
        size = self.image_size
        assert size is not None
        for start in range(0, n, 256):
            b = min(256, n - start)
            x = torch.randn(b, 1, size, size, generator=torch_gen).double() * temperature
            for i, t in enumerate(ts):
                a_t = ab[t]
                a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
                eps = net(x.float(), torch.full((b,), float(t))).double()
                x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # consistent with the clipped x0
                sigma = s.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
                if s.eta > 0 and i + 1 < len(ts):
                    x = x + temperature * sigma * torch.randn(x.shape, generator=torch_gen).double()
            out.append(((x[:, 0] + 1.0) / 2.0).float().numpy())
        return np.concatenate(out)

    def arrays(self) -> dict[str, np.ndarray]:
        return module_arrays("net", self.ema_net if self.settings.ema > 0 else self.net)

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        load_module_arrays("net", self.net, arrays)
        load_module_arrays("net", self.ema_net, arrays)
        self.net.eval()
        self.ema_net.eval()


def _unet(width: int, levels: int) -> Any:
    import torch
    from torch import nn

    def norm(ch: int) -> nn.GroupNorm:
        return nn.GroupNorm(min(8, ch // 4) or 1, ch)

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, t_dim: int) -> None:
            super().__init__()
            self.n1, self.c1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
            self.t = nn.Linear(t_dim, c_out)
            self.n2, self.c2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
            self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

        def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
            h = self.c1(nn.functional.silu(self.n1(x))) + self.t(temb)[:, :, None, None]
            h = self.c2(nn.functional.silu(self.n2(h)))
            return self.skip(x) + h

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            t_dim = 4 * width
            self.width = width
            self.temb = nn.Sequential(nn.Linear(width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
            chs = [width * _MULTS[i] for i in range(levels)]
            self.inp = nn.Conv2d(1, width, 3, padding=1)
            self.down = nn.ModuleList()
            self.pool = nn.ModuleList()
            c = width
            for i, ch in enumerate(chs):
                self.down.append(Block(c, ch, t_dim))
                c = ch
                if i + 1 < levels:
                    self.pool.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            self.mid = Block(c, c, t_dim)
            self.up = nn.ModuleList()
            self.unpool = nn.ModuleList()
            for i in reversed(range(levels)):
                self.up.append(Block(c + chs[i], chs[i], t_dim))
                c = chs[i]
                if i > 0:
                    self.unpool.append(nn.Conv2d(c, c, 3, padding=1))
            self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, 1, 3, padding=1))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            half = self.width // 2
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
            arg = t[:, None] * freqs[None, :]
            temb = self.temb(torch.cat([arg.sin(), arg.cos()], dim=1))
            h = self.inp(x)
            skips = []
            for i, block in enumerate(self.down):
                h = block(h, temb)
                skips.append(h)
                if i < len(self.pool):
                    h = self.pool[i](h)
            h = self.mid(h, temb)
            for j, block in enumerate(self.up):
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
                if j < len(self.unpool):
                    h = self.unpool[j](nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
            return self.out(h)

    return UNet()
