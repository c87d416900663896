"""Triplet selection within a batch. Each miner returns index tensors (anchor, positive, negative)."""

from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (N, M); clamped at 0 against rounding."""
    return (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2.0 * x @ y.T).clamp_min(0.0)


class Miner:
    """Base: the triplets as sampled (a_i, p_i, n_i)."""

    def __call__(
        self, anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # selection is not differentiated, as in pytorch-metric-learning
            return self.mine(anchors.detach(), positives.detach(), negatives.detach(), margin)

    def mine(self, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float):
        idx = torch.arange(a.shape[0], device=a.device)
        return idx, idx, idx


class NoMiner(Miner):
    """The seed's scheme: every sampled triplet is used as it is."""


class BatchHardMiner(Miner):
    """Each anchor with the farthest positive and the closest negative in the batch."""

    def mine(self, a, p, n, margin):
        idx = torch.arange(a.shape[0], device=a.device)
        return idx, squared_distances(a, p).argmax(1), squared_distances(a, n).argmin(1)


class SemiHardMiner(Miner):
    """All (a_i, p_i, n_j) with d(a_i, p_i) < d(a_i, n_j) < d(a_i, p_i) + margin (FaceNet).

    Falls back to the sampled triplets when a batch holds no semi-hard one, so a step is never empty.
    """

    def mine(self, a, p, n, margin):
        d_ap = (a - p).pow(2).sum(1, keepdim=True)
        d_an = squared_distances(a, n)
        ai, ni = torch.nonzero((d_an > d_ap) & (d_an < d_ap + margin), as_tuple=True)
        if ai.numel() == 0:
            return super().mine(a, p, n, margin)
        return ai, ai, ni


MINERS: dict[str, type[Miner]] = {"none": NoMiner, "batch_hard": BatchHardMiner, "semi_hard": SemiHardMiner}


def create_miner(name: str) -> Miner:
    try:
        return MINERS[name]()
    except KeyError:
        raise ValueError(f"--mining: unknown miner '{name}'; choose one of {', '.join(MINERS)}") from None
