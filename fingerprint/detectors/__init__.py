"""Membership detectors: one protocol (:mod:`fingerprint.detectors.base`), one module per family of kinds.

Kinds are registered by name (``kinds()``); ``PRESETS`` names the configurations that the benchmark, the
sweeps and the demo compare, each a (kind, settings) pair.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fingerprint.detectors.base import (
    Detector,
    DetectorMeta,
    FitData,
    Scores,
    check_decision,
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
from fingerprint.detectors.shadow import ShadowNN
from fingerprint.detectors.ssim import SSIMNN

log = logging.getLogger(__name__)

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
    # Shadows of a stand-in family (a small 32 px DCGAN) unless the harness knows the target's recipe (zoo.json).
    "shadow_gradient": ("shadow", {"features": "gradient", "k": 10, "family": "dcgan", "generator_size": 32,
                                   "generator_settings": '{"latent_dim": 64, "steps": 2500, "width": 16}'}),
    "shadow_ensemble": ("rank_ensemble", {"members": "gradient_cal,shadow_gradient"}),
}
"""Named configurations: what `fingerprint benchmark --detectors`, `fingerprint fit --preset` and the sweep use.
Network kinds (frozen, triplet) are added per backbone by the caller, since they need weights."""


def resolve_settings(kind_name: str, settings: dict[str, Any], data: str | Path = "") -> dict[str, Any]:
    """``settings`` of kind ``kind_name`` for the benchmark at ``data``: a shadow detector, or an ensemble's shadow
    members, on a zoo benchmark trains its shadows with the target's recipe (family, settings, temperature, size
    from ``zoo.json``); elsewhere the settings are kept, stand-in and all, with a warning."""
    from fingerprint.zoo.build import generator_recipe

    settings = dict(settings)
    ensemble = kind_name in ("rank_ensemble", "selected_ensemble")
    shadows = [m for m in str(settings.get("members", "")).split(",") if needs_recipe(m.strip())] if ensemble else []
    if not data or not (kind_name == "shadow" or shadows):
        return settings
    recipe = generator_recipe(data)
    if recipe is None:
        log.warning("%s: no generator recipe (zoo.json) in %s; its shadows are of the stand-in family %s", kind_name,
                    data, settings.get("family") or PRESETS["shadow_gradient"][1]["family"])
    elif kind_name == "shadow":
        settings.update(recipe)
    else:
        given = json.loads(settings.get("member_settings") or "{}")
        filled = {m.strip(): {**recipe, **given.get(m.strip(), {})} for m in shadows}
        settings["member_settings"] = json.dumps({**given, **filled}, sort_keys=True)
    return settings


def preset_settings(name: str, data: str | Path = "") -> tuple[str, dict[str, Any]]:
    """(kind, settings) of preset ``name`` for the benchmark at ``data`` (see :func:`resolve_settings`)."""
    kind_name, settings = PRESETS[name]
    return kind_name, resolve_settings(kind_name, settings, data)


def needs_recipe(name: str) -> bool:
    """Whether preset ``name`` trains shadow generators (itself or an ensemble member), so that it measures what
    it should only where the target generator's recipe is known."""
    kind_name, settings = PRESETS.get(name, ("", {}))
    if kind_name == "shadow":
        return True
    members = str(settings.get("members", "")) if kind_name.endswith("ensemble") else ""
    return any(needs_recipe(m.strip()) for m in members.split(",") if m.strip() and m.strip() != name)

__all__ = [
    "PRESETS", "preset_settings", "resolve_settings", "needs_recipe", "Detector", "DetectorMeta", "FitData", "Scores",
    "check_decision", "create_detector", "fit_detector", "finish_fit", "is_detector_dir", "kind", "kinds",
    "load_detector", "register",
    "FeatureNN", "PixelNN", "GradientNN", "SubspaceNN", "CalibratedNN", "DomainClassifier", "SSIMNN", "FrozenNN",
    "TripletNN", "RankEnsemble", "SelectedEnsemble", "ShadowNN",
]
