"""Ensembles of detectors: member scores turned into ranks within the real reference pool, then averaged.

A member's score of an image becomes its rank among the member's scores of the reference pool, divided by the
pool's size (mid-rank for ties): no scale, no labels, and the same number whether the image is scored inside
the pool or uploaded alone. ``rank_ensemble`` averages every member; ``selected_ensemble`` averages the subset of
members with the best AUC on the training labels (ties go to the larger subset, averaging more is safer).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from PIL import Image

from fingerprint.config import ConfigError
from fingerprint.detectors.base import Detector, FitData, Scores, create_detector, register

__all__ = ["RankEnsemble", "SelectedEnsemble"]


@dataclass
class EnsembleSettings:
    members: str = "pixel_ncc,gradient_nn"
    """Comma-separated presets (see fingerprint.detectors.PRESETS), each a label-free detector."""
    member_settings: str = "{}"
    """JSON object: per member preset, settings that replace the preset's (e.g. the generator recipe of a shadow
    member, filled in from a zoo benchmark's zoo.json)."""


def _mid_rank(sorted_ref: np.ndarray, values: np.ndarray) -> np.ndarray:
    lo = np.searchsorted(sorted_ref, values, side="left")
    hi = np.searchsorted(sorted_ref, values, side="right")
    return (lo + hi + 1) / (2.0 * len(sorted_ref))


@register("rank_ensemble")
class RankEnsemble(Detector):
    """Rank average of label-free member detectors (ranks within the real reference pool)."""

    Settings = EnsembleSettings
    family = "e"

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        from fingerprint.detectors import PRESETS

        self.names = [m.strip() for m in settings.members.split(",") if m.strip()]
        unknown = [m for m in self.names if m not in PRESETS]
        if not self.names or unknown:
            raise ConfigError([f"--members: unknown preset(s) {', '.join(unknown) or '(none given)'}; "
                               f"known: {', '.join(PRESETS)}"])
        try:
            self.member_overrides: dict[str, dict[str, Any]] = json.loads(settings.member_settings)
            if not isinstance(self.member_overrides, dict) or not all(
                    isinstance(v, dict) for v in self.member_overrides.values()):
                raise ValueError("not an object of objects")
        except ValueError as e:
            raise ConfigError([f"--member-settings: a JSON object of settings per member, such as "
                               f"'{{\"gradient_cal\": {{\"k\": 5}}}}' ({e}): {settings.member_settings!r}"]) from e
        strangers = sorted(set(self.member_overrides) - set(self.names))
        if strangers:
            raise ConfigError([f"--member-settings: {', '.join(strangers)} not among --members "
                               f"({', '.join(self.names)})"])
        self.members: list[Detector] = []
        self.pool_scores = np.zeros((0, 0))
        """(members, R) each member's score of every reference image, in reference order."""
        self.reference_scores: list[np.ndarray] = []
        self.chosen: tuple[int, ...] = tuple(range(len(self.names)))
        self.prefitted: dict[str, Detector] = {}
        """Members already fitted on the same images (the harness shares them), used instead of refitting."""

    def _members(self) -> list[Detector]:
        from fingerprint.detectors import PRESETS

        out = []
        for name in self.names:
            kind_name, settings = PRESETS[name]
            d = create_detector(kind_name, {**settings, **self.member_overrides.get(name, {})})
            if d.learns:
                raise ConfigError([f"--members: {name} learns from labels; ensemble members must not"])
            d.meta.extra["name"] = name
            out.append(d)
        return out

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        self.members = []
        for m in self._members():
            pre = self.prefitted.get(m.name)
            # A prefitted member is used as it is (the harness's may differ in image size from the preset); the
            # members' actual settings are what the ensemble saves.
            if (pre is not None and pre.kind == m.kind and pre.gallery_ids == list(generated_ids)
                    and pre.reference_ids == list(reference_ids)):
                m = pre
            else:
                m.index(generated, generated_ids, reference, reference_ids, reference_groups, progress)
            self.members.append(m)
        self.gallery_ids = list(generated_ids)
        self._set_reference(reference_ids, reference_groups)
        self.pool_scores = np.array([m.score(reference, reference_ids).score for m in self.members])
        self.reference_scores = [np.sort(row) for row in self.pool_scores]
        self._update_signal()

    def member_ranks(self, images: Sequence[Image.Image], ids: Sequence[str] | None
                     ) -> tuple[np.ndarray, list[Scores]]:
        """(members, N) ranks and every member's scores (their evidence)."""
        out, scores = [], []
        rows = self.self_rows(ids, len(images))
        own = rows >= 0
        for i, (m, ref) in enumerate(zip(self.members, self.reference_scores, strict=True)):
            s = m.score(images, ids)
            scores.append(s)
            values = s.score.copy()
            # A pool image takes the very score its rank was computed from: a recomputed one may differ in the
            # last bits (another batch) and, tied with itself, move half a rank.
            values[own] = self.pool_scores[i, rows[own]]
            out.append(_mid_rank(ref, values))
        return np.array(out), scores

    def _update_signal(self) -> None:
        # An average with a distribution-level member inherits its caveat.
        chosen = [self.members[i] for i in self.chosen] if self.members else []
        self.meta.signal = "distribution" if any(m.signal == "distribution" for m in chosen) else "per_image"

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        ranks, scores = self.member_ranks(images, ids)
        # Evidence comes from the first chosen member: its neighbours, in its own feature space.
        ev = scores[self.chosen[0]]
        return Scores(ranks[list(self.chosen)].mean(axis=0), ev.nearest, ev.nearest_similarity,
                      ev.generated_similarity)

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, m in enumerate(self.members):
            out.update({f"m{i}.{k}": v for k, v in m.arrays().items()})
            out[f"m{i}.pool_scores"] = self.pool_scores[i]
        return out

    def _save_members(self) -> None:
        self.meta.extra["members"] = [{"name": m.name, "kind": m.kind, "settings": m.meta.settings,
                                       "extra": m.meta.extra} for m in self.members]
        self.meta.extra["chosen"] = [self.names[i] for i in self.chosen]

    def save(self, path):  # noqa: ANN001, ANN201
        self._save_members()
        return super().save(path)

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        saved: list[dict[str, Any]] = self.meta.extra.get("members", [])
        self.members, pool = [], []
        for i, info in enumerate(saved):
            m = create_detector(info["kind"], info["settings"])
            m.meta.extra = dict(info.get("extra") or {})
            m.gallery_ids, m.reference_ids, m.reference_groups = self.gallery_ids, self.reference_ids, \
                self.reference_groups
            prefix = f"m{i}."
            m.load_arrays({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
            self.members.append(m)
            pool.append(arrays[f"{prefix}pool_scores"])
        self.pool_scores = np.array(pool)
        self.reference_scores = [np.sort(row) for row in self.pool_scores]
        chosen = self.meta.extra.get("chosen", self.names)
        self.chosen = tuple(self.names.index(n) for n in chosen)


@dataclass
class SelectedSettings(EnsembleSettings):
    members: str = "pixel_ncc,pixel_mass,subspace_mass,gradient_nn,domain_clf"
    """Comma-separated presets the subset is chosen from (each label-free)."""


@register("selected_ensemble")
class SelectedEnsemble(RankEnsemble):
    """Rank average of the subset of members with the best AUC on the training labels."""

    Settings = SelectedSettings
    learns = True

    def fit(self, data: FitData, progress: bool = False) -> None:
        from fingerprint.evaluation.metrics import roc_auc

        self.index(data.generated, data.generated_ids, data.real, data.real_ids, data.groups, progress)
        y = data.labels[data.train]
        if len(np.unique(y)) < 2:
            raise ValueError("selected_ensemble chooses its members on labels: the training images need both "
                             "used and not-used ones")
        ranks, _ = self.member_ranks([data.real[i] for i in data.train], [data.real_ids[i] for i in data.train])
        subsets = [c for r in range(len(self.names), 0, -1) for c in combinations(range(len(self.names)), r)]
        # Larger subsets come first, and max() keeps the first of equals: ties go to more members.
        self.chosen = max(subsets, key=lambda c: roc_auc(y, ranks[list(c)].mean(axis=0)))
        self.meta.extra["chosen"] = [self.names[i] for i in self.chosen]
        self._update_signal()
