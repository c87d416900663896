"""How often the memorisation test raises a false alarm: its rejection rate on null splits of a real pool.

    fingerprint null-calibration --pool ../shared/bench/ctbench-s0,../shared/bench/ctbench-s1 --out benchmarks/results

Each split is drawn as `fingerprint zoo --null-control` draws one: whole pseudo-patient groups labelled used and
not used (dev and test), and a hidden training set of other groups. Every labelled image is scored by a perfect
memoriser of the hidden set, minus the pixel L2 distance to its nearest training image, and the memorisation test
runs on each side. Nothing labelled used was trained on, so at level alpha the test should reject on about alpha of
the splits; far more would mean the pseudo-patient groups are too fine (one patient's slices in several groups) and
its p-values too small. No generator is trained: it takes about a minute, not hours.
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


def null_calibration(pool: Any, members: int, seeds: list[int], n_permutations: int) -> list[dict[str, Any]]:
    """One record per (seed, side) of null splits of ``pool`` (a :class:`fingerprint.zoo.build.PoolImages`):
    sizes, the perfect memoriser's AUC and the memorisation test's p-value."""
    from fingerprint.knn import Gallery
    from fingerprint.zoo.build import BuildSettings, _seeds, split_groups

    x = pool.pixels.reshape(len(pool.pixels), -1).astype(np.float32) / 255.0
    rows = []
    for seed in seeds:
        parts = split_groups(pool.groups, BuildSettings(members=members, null_control=True, seed=seed),
                             _seeds(seed)["split"])
        gallery = Gallery(x[parts["trained"]], "l2")
        for side in SIDES:
            idx = np.r_[parts[f"{side}_used"], parts[f"{side}_not_used"]]
            y = np.r_[np.ones(len(parts[f"{side}_used"])), np.zeros(len(parts[f"{side}_not_used"]))]
            score = gallery.search(x[idx], k=1)[0][:, 0]  # higher = nearer a hidden training image
            t = memorisation_test(y, score, pool.groups[idx], n_permutations=n_permutations, seed=seed)
            rows.append({"seed": seed, "side": side, "used": int(y.sum()), "not_used": int(len(y) - y.sum()),
                         "groups": int(len(np.unique(pool.groups[idx]))), "auc": t.auc, "p": t.p_value})
    return rows


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
    rows = null_calibration(pool, config.members, seeds, config.n_permutations)
    rates = rejection_rates(rows)
    aucs = np.array([r["auc"] for r in rows])
    result = {"config": to_dict(config), "pool_images": len(pool.sources),
              "pool_groups": int(len(np.unique(pool.groups))), "rates": rates, "splits": rows,
              "auc_mean": float(aucs.mean()), "auc_sd": float(aucs.std())}
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
        f"Command: `fingerprint null-calibration --pool {config.pool} --members {config.members} --splits "
        f"{config.splits} --first-seed {config.first_seed}` on {os.cpu_count()} CPU core(s).",
        "",
    ])
    write_text_atomic(out / "null_calibration.md", md)
    for r in rates:
        log.info("%s side, alpha %.2f: rejected %d of %d null splits (%.3f, 95%% CI %s)", r["side"], r["level"],
                 r["rejected"], r["splits"], r["rate"], r["ci"])
    return result
