"""The seed's triplet loss (Eq. 1), composable with a miner as in pytorch-metric-learning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fingerprint.detectors.triplet.miners import Miner, NoMiner


def triplet_margin_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-triplet Eq. (1): max(0, ||a - p||^2 - ||a - n||^2 + margin)."""
    return torch.relu((a - p).pow(2).sum(-1) - (a - n).pow(2).sum(-1) + margin)


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Mean over all selected triplets (inactive ones count as zero, as in the seed)."""
    active_fraction: float
    """Fraction of selected triplets with a positive loss: when it falls to 0 the model stops learning."""
    triplets: int
    """Number of triplets the miner selected."""


class TripletLoss(nn.Module):
    """Anchor = generated image, positive = used image, negative = unused image."""

    def __init__(self, margin: float, miner: Miner | None = None) -> None:
        super().__init__()
        self.margin = margin
        self.miner = miner or NoMiner()

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        if not (anchors.shape == positives.shape == negatives.shape and anchors.ndim == 2):
            raise ValueError(
                f"anchors, positives and negatives must all be (batch, dim); got {tuple(anchors.shape)}, "
                f"{tuple(positives.shape)}, {tuple(negatives.shape)}"
            )
        ai, pi, ni = self.miner(anchors, positives, negatives, self.margin)
        per = triplet_margin_loss(anchors[ai], positives[pi], negatives[ni], self.margin)
        return LossOutput(per.mean(), float((per > 0).float().mean()), int(per.numel()))
