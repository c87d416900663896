"""Membership detectors: one protocol (:mod:`fingerprint.detectors.base`), one module per family of kinds.

Kinds are registered by name (``kinds()``); ``PRESETS`` names the configurations that the benchmark, the
sweeps and the demo compare, each a (kind, settings) pair.
"""

from __future__ import annotations

from typing import Any

from fingerprint.detectors.base import (
    Detector,
    DetectorMeta,
    FitData,
    Scores,
    create_detector,
    finish_fit,
    fit_detector,
    is_detector_dir,
    kind,
    kinds,
    load_detector,
    register,
)
from fingerprint.detectors.calibrated import CalibratedNN
from fingerprint.detectors.domain import DomainClassifier
from fingerprint.detectors.ensemble import RankEnsemble, SelectedEnsemble
from fingerprint.detectors.neighbours import FeatureNN, GradientNN, PixelNN, SubspaceNN
from fingerprint.detectors.networks import FrozenNN, TripletNN
from fingerprint.detectors.ssim import SSIMNN

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "pixel_l2": ("pixel", {"metric": "l2", "k": 1}),
    "pixel_ncc": ("pixel", {"metric": "ncc", "k": 1}),
    "pixel_mass": ("pixel", {"metric": "l2", "k": 10}),
    "subspace_mass": ("subspace", {"k": 10, "variance": 0.95}),
    "gradient_nn": ("gradient", {"k": 10}),
    "pixel_ncc_cal": ("calibrated", {"features": "pixel_ncc", "k": 1}),
    "gradient_cal": ("calibrated", {"features": "gradient", "k": 10}),
    "ssim_cal": ("calibrated", {"features": "ssim", "k": 1}),
    "cal_ensemble": ("rank_ensemble", {"members": "gradient_cal,pixel_ncc_cal,ssim_cal"}),
    "domain_clf": ("domain", {}),
    "ssim": ("ssim", {}),
    "ab_rank": ("rank_ensemble", {"members": "gradient_nn,domain_clf"}),
    "best": ("selected_ensemble", {}),
}
"""Named configurations: what `fingerprint benchmark --detectors`, `fingerprint fit --preset` and the sweep use.
Network kinds (frozen, triplet) are added per backbone by the caller, since they need weights."""

__all__ = [
    "PRESETS", "Detector", "DetectorMeta", "FitData", "Scores", "create_detector", "fit_detector", "finish_fit",
    "is_detector_dir", "kind", "kinds", "load_detector", "register", "FeatureNN", "PixelNN", "GradientNN",
    "SubspaceNN", "CalibratedNN", "DomainClassifier", "SSIMNN", "FrozenNN", "TripletNN", "RankEnsemble",
    "SelectedEnsemble",
]
