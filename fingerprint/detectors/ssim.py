"""SSIM nearest neighbour with the best 2023 team's real-to-real calibration of the threshold.

Each real image's reference is its best SSIM with a real image outside its own group: an image counts as used
when it is closer to a generated image than real images typically are to one another. Which quantile of that
reference becomes the threshold is chosen on the training labels (max F1 over a grid). That calibration serves the
'max_f1' threshold method; under 'fpr' (the product's default) the threshold comes from the training not-used
images' scores, as for every kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from PIL import Image

from fingerprint.config import Range
from fingerprint.detectors.base import Detector, Scores, register
from fingerprint.evaluation.thresholds import best_f1_threshold, threshold_real_to_real
from fingerprint.features.handcrafted import images_to_array, ssim_matrix
from fingerprint.knn import SSIMGallery, topk_mean

__all__ = ["SSIMNN"]


@dataclass
class SSIMSettings:
    image_size: Annotated[int, Range(16)] = 64
    """Side in pixels every image is resized to (the SSIM window is 11 pixels)."""
    k: Annotated[int, Range(1)] = 1
    """Nearest generated images (by SSIM) averaged into the score."""
    quantiles: Annotated[int, Range(2)] = 49
    """Candidate quantiles of the real-to-real reference (evenly from 0.02 to 0.98) for the threshold."""


@register("ssim")
class SSIMNN(Detector):
    """SSIM nearest neighbour: mean SSIM to the k most similar generated images; max-F1 threshold = a real-to-real
    SSIM quantile."""

    Settings = SSIMSettings
    family = "b"
    metric = "ssim"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.gallery: SSIMGallery | None = None
        self.real_to_real = np.zeros(0)

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, side, side) float pixels in [0, 1]: what SSIM compares."""
        return images_to_array(images, self.settings.image_size)

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        self.gallery, self.gallery_ids = SSIMGallery(self.features(generated)), list(generated_ids)
        self._set_reference(reference_ids, reference_groups)
        ref = self.features(reference)
        rr = ssim_matrix(ref, ref)
        same = self.reference_groups[:, None] == self.reference_groups[None, :]
        np.fill_diagonal(rr, -np.inf)
        outside = np.where(same, -np.inf, rr).max(axis=1)
        # A group holding the whole pool has no outside reference; fall back to every other image.
        self.real_to_real = np.where(np.isfinite(outside), outside, rr.max(axis=1))

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        if self.gallery is None:
            raise RuntimeError(f"{self.kind}: fit or load the detector before scoring")
        sims, idx = self.gallery.search(self.features(images), self.settings.k)
        s = topk_mean(sims)
        return Scores(s, idx, sims, generated_similarity=s)

    def choose_threshold(self, labels: np.ndarray, scores: Scores, method: str, target_fpr: float,
                         groups: np.ndarray | None = None) -> float:
        if method != "max_f1":
            return super().choose_threshold(labels, scores, method, target_fpr, groups)
        qs = np.linspace(0.02, 0.98, self.settings.quantiles)
        cands = np.array([threshold_real_to_real(self.real_to_real, q) for q in qs])
        return best_f1_threshold(labels, scores.score, cands)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"gallery": self.gallery.pixels if self.gallery is not None else np.zeros((0, 0, 0), np.float32),
                "real_to_real": self.real_to_real}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.gallery, self.real_to_real = SSIMGallery(arrays["gallery"]), arrays["real_to_real"]
