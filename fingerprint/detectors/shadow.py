"""Shadow-generator calibration: how much closer a real image is to the generated set than to the output of
generators of the same family that never saw it.

A nearest-neighbour score mixes memorisation with everything else that brings a generator's output near an
image: how typical the image is, and what the family tends to make (a blurry VAE sits near smooth slices whatever
it was trained on). Generators of the target's family trained on halves of the reference pool ("shadows", as in
LiRA, Carlini et al., S&P 2022) measure the second part per image: an image's score is its similarity to the
generated images minus its mean similarity to the samples of the shadows whose training half left it out (the
offline test; every image of the pool is left out by half of the shadows, since they come in complementary pairs).
An image from outside the pool was seen by no shadow, so all of them count. No labels are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from PIL import Image

from fingerprint.config import ConfigError, Range
from fingerprint.detectors.base import Detector, Scores, create_detector, register
from fingerprint.detectors.calibrated import BASES, CalibratedSettings
from fingerprint.detectors.neighbours import FeatureNN
from fingerprint.detectors.ssim import SSIMNN
from fingerprint.features.handcrafted import images_to_array
from fingerprint.knn import Gallery, SSIMGallery, make_gallery, topk_mean

__all__ = ["ShadowNN", "shadow_halves"]

log = logging.getLogger(__name__)


@dataclass
class ShadowSettings(CalibratedSettings):
    family: str = "dcgan"
    """Generator family of the shadows (`fingerprint zoo` families: dcgan, vae, diffusion, ae_gmm): the target's,
    where it is known."""
    generator_settings: str = "{}"
    """The shadows' training settings, as JSON (the family's settings, as `fingerprint zoo --settings` takes them):
    the target's, where they are known."""
    temperature: Annotated[float, Range(0, lo_open=True)] = 1.0
    """Sampler temperature of the shadows."""
    shadows: Annotated[int, Range(2, 100)] = 4
    """Shadow generators, in complementary pairs (an even number): each pool image is left out by half."""
    generator_size: Annotated[int, Range(0)] = 0
    """Side the shadows train and sample at (a power of two >= 16); 0: the reference images' own side. Their
    samples are saved with the detector (shadows x samples x side^2 bytes)."""
    samples: Annotated[int, Range(0)] = 0
    """Images sampled per shadow; 0: as many as the gallery holds (similarities grow with the gallery's size)."""
    seed: Annotated[int, Range(0)] = 0
    """Seed of the halves, the shadows' training and their samples."""


def shadow_halves(groups: np.ndarray, shadows: int, seed: int) -> np.ndarray:
    """(shadows, R) bool: which reference images each shadow trains on. Shadows 2j and 2j+1 split the pool's
    groups into complementary halves, so no group is on both sides of a pair: the groups, shuffled, each go to the
    side holding fewer images so far, so the halves differ by at most the largest group's size."""
    groups = np.asarray(groups)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    uniq, sizes = np.unique(groups, return_counts=True)
    out = np.zeros((shadows, len(groups)), dtype=bool)
    for j in range(0, shadows, 2):
        first, load = [], [0, 0]
        for g in rng.permutation(len(uniq)):
            side = int(load[1] < load[0])
            load[side] += int(sizes[g])
            if side == 0:
                first.append(uniq[g])
        out[j] = np.isin(groups, first)
        out[j + 1] = ~out[j]
    return out


@register("shadow")
class ShadowNN(Detector):
    """Shadow-calibrated nearest neighbours: similarity to the k nearest generated images minus that to the k
    nearest samples of same-family shadow generators trained without the image."""

    Settings = ShadowSettings
    family = "f"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        from fingerprint.zoo.base import settings_problems

        problems = []
        if settings.shadows % 2:
            problems.append(f"shadow.shadows: must be even (complementary pairs), got {settings.shadows}")
        try:
            gen = json.loads(settings.generator_settings)
            if not isinstance(gen, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            problems.append(f"shadow.generator_settings: not a JSON object of settings ({e}): "
                            f"{settings.generator_settings!r}")
            gen = {}
        try:
            problems += [p.replace("--settings", "shadow.generator_settings")
                         for p in settings_problems(settings.family, gen)]
        except ConfigError as e:
            problems += [p.replace("--family", "shadow.family") for p in e.problems]
        if problems:
            raise ConfigError(problems)
        self.generator_kwargs: dict[str, Any] = gen
        kind, base = BASES[settings.features]
        self.inner: FeatureNN | SSIMNN = create_detector(kind, {**base, "image_size": settings.image_size,
                                                                 "k": settings.k})
        self.members = np.zeros((0, 0), dtype=bool)
        self._shadow_pixels = np.zeros((0, 0, 0, 0), dtype=np.uint8)
        self._shadow_galleries: list[Gallery | SSIMGallery] = []

    # -- fitting

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        from fingerprint.zoo.base import create_generator

        s = self.settings
        self.inner.index(generated, generated_ids, reference, reference_ids, reference_groups, progress=progress)
        self.gallery_ids = self.inner.gallery_ids
        self._set_reference(reference_ids, reference_groups)
        size = s.generator_size or reference[0].size[0]
        why = create_generator(s.family, self.generator_kwargs).check_size(size)
        if why:
            raise ConfigError([f"shadow.generator_size: {s.family} {why}; set generator_size"])
        pool = images_to_array(reference, size)
        members = shadow_halves(self.reference_groups, s.shadows, s.seed)
        small = int(min(members.sum(axis=1).min(), (~members).sum(axis=1).min()))
        if small < 2:
            raise ConfigError([f"shadow.shadows: a shadow would train on {small} image(s): the reference pool's "
                               f"{len(pool)} images form {len(np.unique(self.reference_groups))} pseudo-patient "
                               "group(s), and each half needs at least 2 images. Give more real images (or "
                               "patients), or use another kind."])
        n = s.samples or len(generated)
        pixels = np.empty((s.shadows, n, size, size), dtype=np.uint8)
        for j in range(s.shadows):
            gen = create_generator(s.family, self.generator_kwargs)
            log.info("shadow %d/%d: training %s on %d of %d reference images", j + 1, s.shadows, s.family,
                     int(members[j].sum()), len(pool))
            gen.fit(pool[members[j]], seed=s.seed * 1000 + j, progress=progress)
            x = gen.sample(n, seed=s.seed * 1000 + j + 500, temperature=s.temperature)
            pixels[j] = np.rint(x * 255.0).astype(np.uint8)
        self.members = members
        self._set_shadows(pixels)

    def _set_shadows(self, pixels: np.ndarray) -> None:
        self._shadow_pixels = pixels
        self._shadow_galleries = []
        for block in pixels:
            self._shadow_galleries.append(make_gallery(
                self.inner.features([Image.fromarray(p, mode="L") for p in block]), self.inner.metric))

    # -- scoring

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        if self.inner.gallery is None or not self._shadow_galleries:
            raise RuntimeError(f"{self.kind}: fit or load the detector before scoring")
        k = self.settings.k
        feats = self.inner.features(images)
        sims, idx = self.inner.gallery.search(feats, k)
        gen = topk_mean(sims)
        shadow = np.stack([topk_mean(g.search(feats, k)[0]) for g in self._shadow_galleries], axis=1)
        rows = self.self_rows(ids, len(images))
        # Left out: every shadow for an image outside the pool; else those whose half does not hold it.
        out = np.where(rows[:, None] >= 0, ~self.members[:, np.maximum(rows, 0)].T, True)
        baseline = (shadow * out).sum(axis=1) / out.sum(axis=1)
        return Scores(gen - baseline, idx, sims, generated_similarity=gen, real_similarity=baseline)

    def describe(self) -> str:
        s = self.settings
        return (f"shadow-calibrated {s.features} NN: {s.shadows} {s.family} shadows trained on halves of the "
                "reference pool")

    # -- state

    def arrays(self) -> dict[str, np.ndarray]:
        return {**{f"inner.{k}": v for k, v in self.inner.arrays().items()},
                "shadow_pixels": self._shadow_pixels, "shadow_members": self.members.astype(np.uint8)}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.inner.gallery_ids = self.gallery_ids
        self.inner.load_arrays({k.removeprefix("inner."): v for k, v in arrays.items() if k.startswith("inner.")})
        self.members = arrays["shadow_members"].astype(bool)
        self._set_shadows(arrays["shadow_pixels"])
