"""`fingerprint fit`: fit any detector kind on a benchmark and save it for `predict`, the registry and the service.

    fingerprint fit --data ../shared/bench/ctbench-s1 --preset gradient_nn --out runs/grad
    fingerprint fit --data data/sample --kind pixel --settings '{"metric": "l2", "k": 5}' --out runs/pix
    fingerprint fit --data data/sample --kind triplet \\
        --settings '{"backbone": "resnet18", "weights": "none", "epochs": 2}' --out runs/triplet

A quarter of the labelled dev images (whole pseudo-patient groups, `--val-fraction`) is held out: the detector
reads the labels of the rest only, and reports val_auc, val_f1, ... on the held-out ones in its metadata. The
split depends only on the images, `--val-fraction` and `--seed`, so detectors of different kinds fitted with the
same values are compared on the same images. Use `--val-fraction 0` for a final fit on every labelled image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fingerprint.config import BENCHMARK_HINT, DecisionConfig, Range, check_fields, flag, path_problems, validate
from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import PRESETS, Detector, fit_detector, kinds, resolve_settings
from fingerprint.io import write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class FitConfig(DecisionConfig):
    data: str = ""
    """Benchmark folder (dev/ with generated, used, not_used; optionally test/), or a labelled folder/manifest."""
    out: str = "runs/fit"
    """Folder the fitted detector is saved to (meta.json, arrays.safetensors, ids.json) with metrics.json."""
    preset: str = "best"
    """A named configuration (fingerprint.detectors.PRESETS: pixel_ncc, gradient_cal, cal_ensemble,
    shadow_gradient, best, ...); ignored when --kind is given."""
    kind: str = ""
    """A detector kind (pixel, gradient, calibrated, shadow, ssim, frozen, triplet, rank_ensemble, ...) with
    --settings, instead of --preset."""
    settings: str = ""
    """JSON object of the kind's settings (with --kind), or overrides of the preset's, e.g. '{"k": 5}'."""
    val_fraction: Annotated[float, Range(0, 0.9, hi_open=True)] = 0.25
    """Fraction of the labelled dev images (whole groups) held out for validation metrics; 0 = none."""
    seed: int = 0
    """Seed of the train/validation split."""
    group_threshold: Annotated[float, Range(-1, 1)] = 0.95
    """Near-duplicate grouping of real images without patient ids (thumbnail correlation at which slices join)."""
    skip_bad: bool = False
    """Skip unreadable image files (listed in the log) instead of stopping."""

    def problems(self) -> list[str]:
        out = check_fields(self) + path_problems(self, "data", BENCHMARK_HINT)
        if self.kind and self.kind not in kinds():
            out.append(f"{flag('kind')}: unknown kind {self.kind!r}; known: {', '.join(sorted(kinds()))}")
        if not self.kind and self.preset not in PRESETS:
            out.append(f"{flag('preset')}: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        try:
            self.overrides()
        except ValueError as e:
            out.append(f"{flag('settings')}: {e}")
        return out

    def overrides(self) -> dict[str, Any]:
        if not self.settings.strip():
            return {}
        value = json.loads(self.settings)
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object such as '{{\"k\": 5}}', got {self.settings!r}")
        return value

    def resolved(self) -> tuple[str, dict[str, Any]]:
        """(kind, settings) this config asks for. Shadow detectors (and shadow members of ensembles) on a zoo
        benchmark train their shadows with the target's recipe from its zoo.json; --settings still win."""
        kind_name, settings = (self.kind, {}) if self.kind else PRESETS[self.preset]
        return kind_name, {**resolve_settings(kind_name, settings, self.data), **self.overrides()}


def main(config: FitConfig) -> Detector:
    """Fit, save to --out, print the validation metrics; return the fitted detector."""
    validate(config)
    kind_name, settings = config.resolved()
    data = load_fit_data(config.data, config.val_fraction, config.seed, config.skip_bad, config.group_threshold)
    log.info("fitting %s %s on %d generated and %d real images (%d train, %d validation)", kind_name, settings,
             len(data.generated), len(data.real), len(data.train), len(data.val))
    det = fit_detector(kind_name, settings, data, threshold_method=config.threshold_method,
                       target_fpr=config.target_fpr, progress=True)
    if not config.kind:
        det.meta.extra["name"] = config.preset
    out = det.save(config.out)
    write_text_atomic(out / "metrics.json", json.dumps(det.meta.metrics, indent=2, sort_keys=True))
    shown = ", ".join(f"{k}={v:.4f}" for k, v in det.meta.metrics.items()
                      if k in ("val_auc", "val_f1", "val_tpr_at_1fpr"))
    print(f"{det.name} ({det.kind}): threshold {det.threshold:.4f}; {shown or 'no validation split'}; saved {out}")
    if det.meta.false_positives is not None:
        print(f"At fitting, {det.meta.false_positives.sentence()}.")
    return det
