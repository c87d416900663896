"""How often the memorisation test raises a false alarm: its rejection rate on null splits of a real pool.

    fingerprint null-calibration --pool ../shared/bench/ctbench-s0,../shared/bench/ctbench-s1 --out benchmarks/results

Each split is drawn as `fingerprint zoo --null-control` draws one: whole pseudo-patient groups labelled used and
not used (dev and test), and a hidden training set of other groups. Every labelled image is scored by a perfect
memoriser of the hidden set, minus the pixel L2 distance to its nearest training image, and the memorisation test
runs on each side. Nothing labelled used was trained on, so at level alpha the test should reject on about alpha of
the splits; far more would mean the pseudo-patient groups are too fine (one patient's slices in several groups) and
its p-values too small.

The same splits check the false-positive bound every fitted detector records: the product's threshold (5% of the
dev not-used images flagged) is set on the dev side, and since no labelled image was trained on, the share of test
images it flags is its false-positive rate on new images. The bound should be at least that on about 95% of the
splits or more. No generator is trained: it takes about a minute, not hours.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from fingerprint.config import Range, check_fields, flag, to_dict, validate
from fingerprint.evaluation.memorisation import ALPHA, memorisation_test
from fingerprint.evaluation.metrics import format_table
from fingerprint.io import write_text_atomic

log = logging.getLogger(__name__)

SIDES = ("dev", "test")


@dataclass
class NullCalibrationConfig:
    pool: str = ""
    """Real images, comma-separated, as for `fingerprint zoo --pool`: benchmark folders (every real image, labels
    ignored), folders of PNG/JPEG images, or manifest CSVs (with a group column, its groups are used)."""
    out: str = "benchmarks/results"
    """Folder for null_calibration.json and null_calibration.md."""
    members: Annotated[int, Range(2)] = 100
    """Images labelled used per split (whole groups), and about as many in the hidden training set."""
    splits: Annotated[int, Range(1)] = 100
    """Null splits to draw; each is tested twice, on its dev side and on its test side."""
    first_seed: Annotated[int, Range(0)] = 300
    """Seed of the first split; split i uses first_seed + i, as `fingerprint zoo --seed` would."""
    image_size: Annotated[int, Range(16)] = 32
    """Side the pool's images are resized to for grouping and distances (as the zoo's)."""
    group_threshold: Annotated[float, Range(-1, 1)] = 0.95
    """Pseudo-patient grouping of images without group ids (as the zoo's)."""
    n_permutations: Annotated[int, Range(20)] = 500
    """Group permutations per memorisation test."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        if not self.pool.strip():
            out.append(f"{flag('pool')}: required: benchmark folders, image folders or manifests, comma-separated")
        return out


def null_calibration(pool: Any, members: int, seeds: list[int],
                     n_permutations: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Null splits of ``pool`` (a :class:`fingerprint.zoo.build.PoolImages`): one record per (seed, side) with
    sizes, the perfect memoriser's AUC and the memorisation test's p-value; and one per seed with the product
    threshold's false-positive bound from the dev side against the share of test images it flags."""
    from fingerprint.detectors.base import TARGET_FPR, THRESHOLD_METHOD, threshold_for
    from fingerprint.evaluation.thresholds import false_positives
    from fingerprint.knn import Gallery
    from fingerprint.zoo.build import BuildSettings, split_groups, stage_seeds

    x = pool.pixels.reshape(len(pool.pixels), -1).astype(np.float32) / 255.0
    rows, bounds = [], []
    for seed in seeds:
        scored = {}
        parts = split_groups(pool.groups, BuildSettings(members=members, null_control=True, seed=seed),
                             stage_seeds(seed)["split"])
        gallery = Gallery(x[parts["trained"]], "l2")
        for side in SIDES:
            idx = np.r_[parts[f"{side}_used"], parts[f"{side}_not_used"]]
            y = np.r_[np.ones(len(parts[f"{side}_used"])), np.zeros(len(parts[f"{side}_not_used"]))]
            score = gallery.search(x[idx], k=1)[0][:, 0]  # higher = nearer a hidden training image
            t = memorisation_test(y, score, pool.groups[idx], n_permutations=n_permutations, seed=seed)
            rows.append({"seed": seed, "side": side, "used": int(y.sum()), "not_used": int(len(y) - y.sum()),
                         "groups": int(len(np.unique(pool.groups[idx]))), "auc": t.auc, "p": t.p_value})
            scored[side] = (y, score, pool.groups[idx])
        y, score, groups = scored["dev"]
        threshold = threshold_for(y, score, THRESHOLD_METHOD, TARGET_FPR)
        fp, fp_images = false_positives(y, score, threshold, groups), false_positives(y, score, threshold)
        test_rate = float(np.mean(scored["test"][1] >= threshold))  # every test image is a non-member
        bounds.append({"seed": seed, "dev_not_used": fp.not_used, "dev_groups": fp.groups, "dev_rate": fp.rate,
                       "bound": fp.bound, "bound_images": fp_images.bound, "test_images": len(scored["test"][1]),
                       "test_rate": test_rate})
    return rows, bounds


def bound_coverage(bounds: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """How often the test images' false-positive rate stayed within each bound (and within the target rate the
    threshold was set to), with 95% Clopper-Pearson intervals."""
    from scipy.stats import binomtest

    test = np.array([b["test_rate"] for b in bounds])
    out = []
    for what, limit in (("recorded bound (patients and images)", np.array([b["bound"] for b in bounds])),
                        ("bound counting images only", np.array([b["bound_images"] for b in bounds])),
                        (f"target rate {target:.0%}", np.full(len(bounds), target))):
        k = int((test <= limit).sum())
        ci = binomtest(k, len(test)).proportion_ci()
        out.append({"limit": what, "splits": len(test), "held": k, "rate": k / len(test),
                    "ci": f"[{ci.low:.3f}, {ci.high:.3f}]", "mean_limit": float(limit.mean())})
    return out


def rejection_rates(rows: list[dict[str, Any]], levels: tuple[float, ...] = (ALPHA, 0.1)) -> list[dict[str, Any]]:
    """Per side and level: the share of null splits the test rejects, with a 95% binomial (Clopper-Pearson)
    interval."""
    from scipy.stats import binomtest

    out = []
    for side in SIDES:
        p = np.array([r["p"] for r in rows if r["side"] == side])
        for level in levels:
            k = int((p <= level).sum())
            ci = binomtest(k, len(p)).proportion_ci()
            out.append({"side": side, "level": level, "splits": len(p), "rejected": k, "rate": k / len(p),
                        "ci": f"[{ci.low:.3f}, {ci.high:.3f}]"})
    return out


def main(config: NullCalibrationConfig) -> dict[str, Any]:
    validate(config)
    from fingerprint.zoo.build import load_pool

    pool = load_pool([p.strip() for p in config.pool.split(",") if p.strip()], config.image_size,
                     config.group_threshold)
    seeds = list(range(config.first_seed, config.first_seed + config.splits))
    from fingerprint.detectors.base import TARGET_FPR

    rows, bounds = null_calibration(pool, config.members, seeds, config.n_permutations)
    rates = rejection_rates(rows)
    coverage = bound_coverage(bounds, TARGET_FPR)
    aucs = np.array([r["auc"] for r in rows])
    test_rates = np.array([b["test_rate"] for b in bounds])
    result = {"config": to_dict(config), "pool_images": len(pool.sources),
              "pool_groups": int(len(np.unique(pool.groups))), "rates": rates, "splits": rows,
              "auc_mean": float(aucs.mean()), "auc_sd": float(aucs.std()), "bound_coverage": coverage,
              "bounds": bounds, "test_rate_mean": float(test_rates.mean()),
              "test_rate_max": float(test_rates.max())}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "null_calibration.json", json.dumps(result, indent=1) + "\n")
    md = "\n".join([
        "# The memorisation test on null splits",
        "",
        f"{config.splits} null splits of {len(pool.sources)} real images in {result['pool_groups']} pseudo-patient "
        f"groups ({config.members} labelled used per split, a hidden training set of other groups; seeds "
        f"{seeds[0]}-{seeds[-1]}), each scored by a perfect memoriser of the hidden set (minus the pixel L2 "
        f"distance to its nearest training image, {config.image_size} px). Nothing labelled used was trained on, "
        "so a calibrated test rejects at level alpha on about alpha of the splits. "
        f"{config.n_permutations} group permutations per test; 95% Clopper-Pearson intervals.",
        "",
        format_table(rates, [("side", "side"), ("level", "level alpha"), ("splits", "splits"),
                             ("rejected", "rejected (p <= alpha)"), ("rate", "rejection rate"),
                             ("ci", "95% CI")]),
        f"The memoriser's AUC over all splits and sides: mean {result['auc_mean']:.3f}, standard deviation "
        f"{result['auc_sd']:.3f} (how far a null benchmark's AUC wanders by chance).",
        "",
        "## The false-positive bound",
        "",
        f"On each split the product's threshold is set on the dev side (at most {TARGET_FPR:.0%} of the "
        f"{np.mean([b['dev_not_used'] for b in bounds]):.0f} dev not-used images, in "
        f"{np.mean([b['dev_groups'] for b in bounds]):.0f} groups, on average, flagged), and the share of the "
        f"test images it flags is its false-positive rate on new images: mean {result['test_rate_mean']:.3f}, "
        f"max {result['test_rate_max']:.3f}. A bound that means what it says holds on at least 95% of the splits.",
        "",
        format_table(coverage, [("limit", "limit"), ("mean_limit", "mean limit"), ("splits", "splits"),
                                ("held", "test rate within it"), ("rate", "share"), ("ci", "95% CI")]),
        f"Command: `fingerprint null-calibration --pool {config.pool} --members {config.members} --splits "
        f"{config.splits} --first-seed {config.first_seed}` on {os.cpu_count()} CPU core(s).",
        "",
    ])
    write_text_atomic(out / "null_calibration.md", md)
    for r in rates:
        log.info("%s side, alpha %.2f: rejected %d of %d null splits (%.3f, 95%% CI %s)", r["side"], r["level"],
                 r["rejected"], r["splits"], r["rate"], r["ci"])
    return result
