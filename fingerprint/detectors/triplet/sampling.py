"""The seed's triplets: anchor = generated image, positive = used real image, negative = unused real image."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


def balanced_weights(sources: Sequence[int]) -> np.ndarray:
    """Sampling weights that give each source (e.g. dev generated, test generated) the same total mass.

    The seed copied the 500 dev generated images until they matched the 10,000 test ones; weighting samples the
    same mixture without materialising copies.
    """
    sources = np.asarray(sources)
    counts = {s: int((sources == s).sum()) for s in np.unique(sources)}
    w = np.array([1.0 / counts[s] for s in sources])
    return w / w.sum()


class TripletDataset(Dataset):
    """`length` triplets per epoch, each drawn from a seed that depends on (seed, epoch, index).

    Deterministic per index, so every data-parallel worker that receives index i draws the same triplet, and a
    resumed run sees exactly the triplets it would have seen.
    """

    def __init__(
        self,
        anchors: Sequence[Image.Image],
        positives: Sequence[Image.Image],
        negatives: Sequence[Image.Image],
        length: int,
        transform: Callable[[Image.Image], torch.Tensor],
        positive_transform: Callable[[Image.Image], torch.Tensor] | None = None,
        anchor_weights: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        for name, items in (("anchors (generated)", anchors), ("positives (used)", positives),
                            ("negatives (not_used)", negatives)):
            if len(items) == 0:
                raise ValueError(f"triplet training needs at least one image among the {name}")
        self.anchors, self.positives, self.negatives = anchors, positives, negatives
        self.length = length
        self.transform = transform
        self.positive_transform = positive_transform or transform
        self.anchor_weights = anchor_weights
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        a = rng.choice(len(self.anchors), p=self.anchor_weights)
        p = rng.integers(len(self.positives))
        n = rng.integers(len(self.negatives))
        # torchvision's augmentations draw from torch's global RNG: seed it from the triplet seed inside a fork,
        # so the triplet is reproducible and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            return (
                self.transform(self.anchors[a]),
                self.positive_transform(self.positives[p]),
                self.transform(self.negatives[n]),
            )
