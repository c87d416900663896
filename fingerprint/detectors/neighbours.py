"""Nearest-generated-neighbour detectors: a feature map, a metric, and the mean similarity of the k nearest.

A generator that memorises puts samples near its training images: the closer a real image's nearest generated
images, the likelier it was a training image. Kinds differ only in the feature map (:meth:`FeatureNN.features`)
and the metric; the search is :class:`fingerprint.knn.Gallery` for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from PIL import Image

from fingerprint.config import Range
from fingerprint.detectors.base import Detector, Scores, register
from fingerprint.features.handcrafted import gradient_features, images_to_array, ncc_rows
from fingerprint.knn import Gallery, Metric, topk_mean

__all__ = ["FeatureNN", "PixelNN", "GradientNN", "SubspaceNN"]


class FeatureNN(Detector):
    """Base of the k-NN kinds: score = mean similarity to the k nearest generated images (higher = closer)."""

    metric: Metric = "cosine"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.gallery: Gallery | None = None
        self._gallery_features: np.ndarray | None = None

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def fit_features(self, generated: Sequence[Image.Image]) -> None:
        """Fit a label-free feature map on the generated images (e.g. a projection); default: nothing to fit."""

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        self.fit_features(generated)
        self._set_gallery(self.features(generated), generated_ids)
        self._set_reference(reference_ids, reference_groups)

    def _set_gallery(self, vectors: np.ndarray, ids: Sequence[str]) -> None:
        self._gallery_features = np.asarray(vectors, dtype=np.float32)
        self.gallery = Gallery(self._gallery_features, self.metric)
        self.gallery_ids = list(ids)

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        if self.gallery is None:
            raise RuntimeError(f"{self.kind}: fit or load the detector before scoring")
        sims, idx = self.gallery.search(self.features(images), self.settings.k)
        s = topk_mean(sims)
        return Scores(s, idx, sims, generated_similarity=s)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"gallery": self._gallery_features}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self._set_gallery(arrays["gallery"], self.gallery_ids)


@dataclass
class PixelSettings:
    image_size: Annotated[int, Range(8)] = 64
    """Side in pixels every image is resized to (bicubic) before comparing."""
    metric: Literal["ncc", "l2"] = "ncc"
    """'ncc': normalised cross-correlation; 'l2': negative squared Euclidean distance."""
    k: Annotated[int, Range(1)] = 1
    """Nearest generated images averaged into the score (k > 1 measures generated mass around the image)."""


@register("pixel")
class PixelNN(FeatureNN):
    """Pixel nearest neighbour: NCC or L2 to the k nearest generated images at a fixed resolution."""

    Settings = PixelSettings
    family = "a"

    @property
    def metric(self) -> Metric:  # type: ignore[override]
        return "cosine" if self.settings.metric == "ncc" else "l2"

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = images_to_array(images, self.settings.image_size).reshape(len(images), -1)
        return (ncc_rows(x) if self.settings.metric == "ncc" else x).astype(np.float32)


@dataclass
class GradientSettings:
    image_size: Annotated[int, Range(8)] = 64
    """Side images are resized to (bicubic) when read."""
    feature_size: Annotated[int, Range(4)] = 64
    """Side the images are area-averaged to before the Sobel filters."""
    k: Annotated[int, Range(1)] = 10
    """Nearest generated images averaged into the score."""


@register("gradient")
class GradientNN(FeatureNN):
    """Gradient nearest neighbours: mean NCC of Sobel-gradient images with the k nearest generated images."""

    Settings = GradientSettings
    family = "e"

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        x = images_to_array(images, self.settings.image_size)
        return gradient_features(x, self.settings.feature_size).astype(np.float32)


@dataclass
class SubspaceSettings:
    image_size: Annotated[int, Range(8)] = 64
    """Side images are resized to (bicubic) when read."""
    variance: Annotated[float, Range(0, 1, lo_open=True)] = 0.95
    """Share of the generated images' variance the principal subspace keeps."""
    k: Annotated[int, Range(1)] = 10
    """Nearest generated images averaged into the score."""


@register("subspace")
class SubspaceNN(FeatureNN):
    """Generated mass in the generator's principal subspace: negative mean squared L2 to the k nearest generated
    images, after projecting on the principal components of the generated images.

    The subspace holds the directions the generator actually varies in, which drops pixel detail it never
    reproduces. It is fitted on generated images only, never on labels.
    """

    Settings = SubspaceSettings
    family = "e"
    metric: Metric = "l2"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None

    def _pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        return images_to_array(images, self.settings.image_size).reshape(len(images), -1).astype(np.float64)

    def fit_features(self, generated: Sequence[Image.Image]) -> None:
        g = self._pixels(generated)
        mu = g.mean(axis=0)
        _, sv, vt = np.linalg.svd(g - mu, full_matrices=False)
        m = int(np.searchsorted(np.cumsum(sv**2) / np.sum(sv**2), self.settings.variance)) + 1
        self.mean, self.components = mu, vt[:m]

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return ((self._pixels(images) - self.mean) @ self.components.T).astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {**super().arrays(), "mean": self.mean, "components": self.components}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean, self.components = arrays["mean"], arrays["components"]
        super().load_arrays(arrays)
