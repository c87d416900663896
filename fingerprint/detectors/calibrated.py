"""Difficulty-calibrated nearest neighbours: how much closer a real image is to the generated set than to other
patients' real images.

A plain nearest-neighbour score mixes two things: memorisation, and how typical an image is (a featureless slice
is close to many generated images whether or not it was trained on). Subtracting the image's similarity to real
images of *other* patients, in the same feature space, removes the second (per-image difficulty calibration, as in
Watson et al., ICLR 2022, with the real pool standing in for shadow models). The own patient is left out because
neighbouring slices are near duplicates and would make every image look typical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from PIL import Image

from fingerprint.config import Range
from fingerprint.detectors.base import Detector, Scores, create_detector, register
from fingerprint.detectors.neighbours import FeatureNN
from fingerprint.detectors.ssim import SSIMNN
from fingerprint.knn import Gallery, SSIMGallery, make_gallery, topk_mean

__all__ = ["CalibratedNN", "CalibratedSettings"]

BASES: dict[str, tuple[str, dict]] = {
    "pixel_ncc": ("pixel", {"metric": "ncc"}),
    "pixel_l2": ("pixel", {"metric": "l2"}),
    "gradient": ("gradient", {}),
    "ssim": ("ssim", {}),
}


@dataclass
class CalibratedSettings:
    features: Literal["pixel_ncc", "pixel_l2", "gradient", "ssim"] = "gradient"
    """Feature map and similarity: pixel NCC, pixel L2, Sobel-gradient NCC or SSIM (as the kinds of those
    names)."""
    image_size: Annotated[int, Range(8)] = 64
    """Side in pixels every image is resized to before its features are taken."""
    k: Annotated[int, Range(1)] = 10
    """Nearest neighbours averaged on each side: generated images, and what the score is calibrated against
    (real images of other patients; for shadow, each shadow generator's samples)."""


@register("calibrated")
class CalibratedNN(Detector):
    """Calibrated nearest neighbours: similarity to the k nearest generated images minus similarity to the k
    nearest real images of other patients."""

    Settings = CalibratedSettings
    family = "e"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        kind, base = BASES[settings.features]
        self.inner: FeatureNN | SSIMNN = create_detector(kind, {**base, "image_size": settings.image_size,
                                                                 "k": settings.k})
        self._reference_features: np.ndarray | None = None
        self.reference: Gallery | SSIMGallery | None = None

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        self.inner.index(generated, generated_ids, reference, reference_ids, reference_groups, progress=progress)
        self.gallery_ids = self.inner.gallery_ids
        self._set_reference(reference_ids, reference_groups)
        self._set_reference_features(self.inner.features(reference))

    def _set_reference_features(self, vectors: np.ndarray) -> None:
        self._reference_features = np.asarray(vectors, dtype=np.float32)
        self.reference = make_gallery(self._reference_features, self.inner.metric)

    def real_similarity(self, features: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """(N,) mean similarity to the k nearest reference images outside each query's group (``rows``: the
        query's row in the reference pool, -1 when it is not there: nothing is left out)."""
        n_ref = len(self.reference_ids)
        groups = self.reference_groups
        own = np.where(rows >= 0, groups[np.maximum(rows, 0)], -1)
        largest = int(np.bincount(groups).max()) if n_ref else 0
        k = min(self.settings.k, max(1, n_ref - largest))
        # The k nearest outside the group are among the k + |group| nearest overall.
        sims, idx = self.reference.search(features, min(n_ref, k + largest))
        outside = groups[idx] != own[:, None]
        out = np.empty(len(features), dtype=np.float64)
        for i in range(len(features)):
            keep = sims[i][outside[i]][:k]
            # A group holding the whole pool has no outside reference: compare with every other image instead.
            out[i] = keep.mean() if len(keep) else sims[i][idx[i] != rows[i]][:k].mean()
        return out

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        if self.inner.gallery is None or self.reference is None:
            raise RuntimeError(f"{self.kind}: fit or load the detector before scoring")
        feats = self.inner.features(images)
        sims, idx = self.inner.gallery.search(feats, self.settings.k)
        gen = topk_mean(sims)
        real = self.real_similarity(feats, self.self_rows(ids, len(images)))
        return Scores(gen - real, idx, sims, generated_similarity=gen, real_similarity=real)

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"inner.{k}": v for k, v in self.inner.arrays().items()}, "reference": self._reference_features}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.inner.gallery_ids = self.gallery_ids
        self.inner.load_arrays({k.removeprefix("inner."): v for k, v in arrays.items() if k.startswith("inner.")})
        self._set_reference_features(arrays["reference"])
