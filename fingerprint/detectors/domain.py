"""Domain classifier: how generated-like a real image looks to a linear classifier of generated vs real.

A generator reproduces its training distribution, not only single images: a classifier that tells generated
from real images rates training members as more generated-like. It reads no labels. Each real image of the
reference pool is scored by a model fitted without its whole group (cross-fitting), so near-duplicate slices
cannot leak its own answer; an image from outside the pool is scored by the mean of the fold models.

Its signal is distributional: it also rises for any real image that merely resembles the training set's
population (scanner, source, contrast), so its scores are marked ``signal = "distribution"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from PIL import Image

from fingerprint.config import Range
from fingerprint.detectors.base import Scores, register
from fingerprint.detectors.neighbours import GradientNN
from fingerprint.knn import topk_mean

__all__ = ["DomainClassifier"]


@dataclass
class DomainSettings:
    image_size: Annotated[int, Range(8)] = 64
    """Side images are resized to (bicubic) when read."""
    feature_size: Annotated[int, Range(4)] = 32
    """Side the images are area-averaged to before the Sobel filters."""
    c: Annotated[float, Range(0, lo_open=True)] = 0.01
    """Inverse L2 regularisation strength of the logistic regression."""
    folds: Annotated[int, Range(2)] = 10
    """Cross-fitting folds over the reference pool's groups."""
    k: Annotated[int, Range(1)] = 10
    """Nearest generated images (gradient NCC) kept as evidence."""
    seed: int = 0
    """Seed of the group-to-fold assignment."""


@register("domain")
class DomainClassifier(GradientNN):
    """Domain classifier: logistic regression generated vs real on gradient features, cross-fitted over groups
    of the real pool (no labels)."""

    Settings = DomainSettings
    family = "e"
    signal = "distribution"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.coef = np.zeros((0, 0))
        self.intercept = np.zeros(0)
        self.reference_fold = np.zeros(0, dtype=np.int64)

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        from sklearn.linear_model import LogisticRegression

        super().index(generated, generated_ids, reference, reference_ids, reference_groups, progress)
        s = self.settings
        g, q = self._gallery_features.astype(np.float64), self.features(reference).astype(np.float64)
        ug = np.unique(self.reference_groups)
        fold_of_group = dict(zip(ug.tolist(), np.random.default_rng(s.seed).integers(0, s.folds, len(ug)),
                                 strict=True))
        fold = np.array([fold_of_group[v] for v in self.reference_groups.tolist()], dtype=np.int64)
        coef, intercept = [], []
        for f in range(s.folds):
            keep = fold != f
            x = np.concatenate([g, q[keep]])
            t = np.r_[np.ones(len(g)), np.zeros(int(keep.sum()))]
            clf = LogisticRegression(C=s.c, max_iter=3000, class_weight="balanced").fit(x, t)
            coef.append(clf.coef_[0])
            intercept.append(clf.intercept_[0])
        self.coef, self.intercept, self.reference_fold = np.array(coef), np.array(intercept), fold

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        x = self.features(images)
        sims, idx = self.gallery.search(x, self.settings.k)
        per_fold = x.astype(np.float64) @ self.coef.T + self.intercept  # (N, folds)
        rows = self.self_rows(ids, len(x))
        own = rows >= 0
        s = per_fold.mean(axis=1)
        s[own] = per_fold[np.flatnonzero(own), self.reference_fold[rows[own]]]
        return Scores(s, idx, sims, generated_similarity=topk_mean(sims))

    def arrays(self) -> dict[str, np.ndarray]:
        return {**super().arrays(), "coef": self.coef, "intercept": self.intercept,
                "reference_fold": self.reference_fold}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_arrays(arrays)
        self.coef, self.intercept = arrays["coef"], arrays["intercept"]
        self.reference_fold = arrays["reference_fold"].astype(np.int64)
