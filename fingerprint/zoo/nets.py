"""Convolutional building blocks shared by the families: a strided-conv encoder and a transposed-conv decoder.

Both work on square images whose side is a power of two >= 16: the encoder halves the side down to 4 x 4,
doubling the channels from ``width`` (capped at 8 x width), and the decoder mirrors it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def n_halvings(image_size: int) -> int:
    """Stride-2 steps from ``image_size`` down to 4."""
    return int(math.log2(image_size)) - 2


def channels(width: int, n: int) -> list[int]:
    """Channels after each of ``n`` stride-2 steps of the encoder (the decoder reads them backwards)."""
    return [width * min(2**i, 8) for i in range(n)]


class ConvEncoder(nn.Module):
    """(B, 1, S, S) -> (B, out_dim): strided 4x4 convs with LeakyReLU (optional batch norm), then a linear map."""

    def __init__(self, image_size: int, width: int, out_dim: int, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch_in = 1
        for i, ch in enumerate(channels(width, n_halvings(image_size))):
            layers.append(nn.Conv2d(ch_in, ch, 4, 2, 1, bias=not (batch_norm and i > 0)))
            if batch_norm and i > 0:
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.LeakyReLU(0.2))
            ch_in = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch_in * 16, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, 1, S, S): a linear map to 4 x 4, then 4x4 transposed convs (ReLU, optional BN)."""

    def __init__(self, image_size: int, width: int, in_dim: int, batch_norm: bool = False,
                 out: str = "sigmoid") -> None:
        super().__init__()
        chs = channels(width, n_halvings(image_size))[::-1]
        self.top = chs[0]
        self.fc = nn.Linear(in_dim, chs[0] * 16, bias=not batch_norm)
        layers: list[nn.Module] = [nn.BatchNorm1d(chs[0] * 16)] if batch_norm else []
        layers.append(nn.ReLU())
        self.pre = nn.Sequential(*layers)
        ups: list[nn.Module] = []
        for ch, nxt in zip(chs, chs[1:], strict=False):
            ups.append(nn.ConvTranspose2d(ch, nxt, 4, 2, 1, bias=not batch_norm))
            if batch_norm:
                ups.append(nn.BatchNorm2d(nxt))
            ups.append(nn.ReLU())
        ups.append(nn.ConvTranspose2d(chs[-1], 1, 4, 2, 1))
        ups.append(nn.Sigmoid() if out == "sigmoid" else nn.Tanh())
        self.ups = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.pre(self.fc(z)).view(len(z), self.top, 4, 4)
        return self.ups(h)
