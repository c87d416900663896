"""Run membership detectors side by side on one benchmark: same images, same group-aware dev splits.

    fingerprint benchmark --data ../shared/bench/ctbench-s1 --weights-dir ../shared/weights \\
        --out benchmarks/results/ctbench-s1

Every detector in the table is a kind of :mod:`fingerprint.detectors` (a preset, or ``frozen``/``triplet`` once per
backbone), fitted with ``fit`` (which reads only the training labels, then indexes the images) and scored with
``score``. The benchmark is loaded once (:func:`fingerprint.data.imagesets.load_fit_data`): every real image, labelled
dev and unlabelled test, is in the reference pool.

Dev evaluation is repeated, stratified, group-aware k-fold cross-validation over the labelled dev images
(``--folds`` x ``--repeats``): every decision threshold, and every detector that learns from labels, is fitted on
the training folds and applied to the held-out fold, so nothing is tuned on the images it is scored on.
Label-free detectors are fitted once on all images without reading any label and score every real image once;
detectors that learn (triplet, the selected ensemble ``best``) are refitted per split, the costly ones (triplet)
on the first ``--trained-repeats`` repeats only. Ensembles reuse the member detectors fitted for the table
(``RankEnsemble.prefitted``), and the members' scores, so nothing is computed twice. Each metric gets a
bootstrap 95% interval that resamples whole pseudo-patient groups (stratified by class), and each detector's
out-of-fold scores (first repeat) get a group-level permutation test of "no memorisation"
(:mod:`fingerprint.evaluation.memorisation`): per-image decisions of a detector whose p > 0.05 cannot be told from
chance on the dev labels (which does not clear the generator: the table gives the AUC the test would have
detected).

Writes to ``--out``: ``results.md`` (table), ``results.json`` (everything, per repeat), ``roc.png`` and
``roc_log.png`` (out-of-fold dev ROC curves), ``dev_scores.csv`` (out-of-fold dev scores of every detector),
and for the ``--submit`` detector, fitted on all labelled dev images with its threshold from all dev labels,
``report.html`` (the audit report of that detector's out-of-fold dev scores, :mod:`fingerprint.report`),
``submission.csv`` (``<id>,<0|1>`` per test image, no header: the ImageCLEF format), ``scores.csv``
(``id,score``, higher = more likely used) and ``detector/`` (the fitted detector, for
``fingerprint predict --model <out>/detector``), plus ``COMMAND.md`` with the exact command and its runtime.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image

from fingerprint.config import ConfigError, Range, flag, to_dict, validate
from fingerprint.data import images as fpdata
from fingerprint.data.imagesets import GROUPS_FILE, load_fit_data
from fingerprint.detectors import (
    Detector,
    FitData,
    RankEnsemble,
    Scores,
    SelectedEnsemble,
    create_detector,
    finish_fit,
    kind,
    preset_settings,
)
from fingerprint.evaluation.memorisation import (
    ALPHA,
    N_PERMUTATIONS,
    POWER,
    MemorisationTest,
    format_p,
    memorisation_test,
    power_text,
)
from fingerprint.evaluation.metrics import bootstrap_ci, format_table, resampling_unit
from fingerprint.evaluation.plots import roc_plot
from fingerprint.features.backbones import weights_file
from fingerprint.io import write_csv_atomic, write_text_atomic
from fingerprint.report import write_benchmark_audit
from fingerprint.zoo.build import generator_recipe

log = logging.getLogger(__name__)

FAMILIES = {
    "a": ("pixel_l2", "pixel_ncc"),
    "b": ("ssim",),
    "c": ("frozen",),
    "d": ("triplet",),
    "e": ("pixel_mass", "subspace_mass", "gradient_nn", "pixel_ncc_cal", "gradient_cal", "ssim_cal", "cal_ensemble",
          "domain_clf", "ab_rank", "best"),
    "f": ("shadow_gradient", "shadow_ensemble"),
}
NAMES = tuple(n for names in FAMILIES.values() for n in names)
ALIASES = {"grad_nn": "gradient_nn"}
"""Old table names still accepted by --detectors and --submit."""
BASELINE_FAMILIES = ("a", "b", "c")
SUBMISSION_THRESHOLD, SUBMISSION_TARGET_FPR = "max_f1", 0.05
"""The harness's decision rule by default (the challenge scores F1), unlike the product's
(:data:`fingerprint.detectors.base.THRESHOLD_METHOD`)."""
FLAG_WARNING = 0.2
"""results.md points to --threshold-method fpr when max F1 flags more than this share of dev not-used images."""
DETECTOR_DIR = "detector"


@dataclass
class BenchmarkConfig:
    data: str = ""
    """Benchmark folder in the ImageCLEF layout: dev/{generated,used,not_used} and optionally
    test/{generated,real_unknown} (or any layout `fingerprint.data.images.open_folder` reads)."""
    out: str = "benchmarks/results/run"
    """Output folder (results.md/json, ROC pictures, dev_scores.csv, submission.csv, scores.csv, detector/,
    COMMAND.md)."""
    detectors: str = "all"
    """Comma-separated detectors and/or families: pixel_l2, pixel_ncc (a), ssim (b), frozen (c, one per backbone),
    triplet (d, one per backbone), pixel_mass, subspace_mass, gradient_nn (alias grad_nn), pixel_ncc_cal,
    gradient_cal, ssim_cal, cal_ensemble, domain_clf, ab_rank, best (e), shadow_gradient, shadow_ensemble (f:
    they train shadow generators); or a, b, c, d, e, f; or 'all'. Each is a preset of
    fingerprint.detectors.PRESETS."""
    backbones: str = "auto"
    """Comma-separated timm backbones for frozen/triplet; 'auto' = every <name>.safetensors in --weights-dir."""
    weights_dir: str = ""
    """Folder with offline timm weights named <backbone>.safetensors (e.g. ../shared/weights); 'none' = random
    initialisation (smoke tests only), 'hub' = download timm's defaults. Needed for frozen/triplet."""
    folds: int = 5
    """Folds of the group-aware stratified cross-validation over the labelled dev images."""
    repeats: int = 3
    """Repeats of the k-fold with different seeds; metrics are averaged over repeats."""
    trained_repeats: int = 1
    """Repeats on which costly label-trained detectors (triplet) are refitted per fold (each repeat = --folds
    trainings; they dominate the runtime). The first repeats of the same splits are used."""
    image_size: int = 64
    """Side in pixels that every image is resized to for the pixel, SSIM, subspace, gradient and domain
    detectors (gradient_nn's features at this size, domain_clf's at half of it)."""
    frozen_image_size: int = 128
    """Input size of the frozen backbones (c)."""
    train_image_size: int = 64
    """Input size of the triplet-trained backbones (d); small keeps CPU training fast."""
    epochs: int = 3
    """Triplet training epochs per fold (d)."""
    triplets_per_epoch: int = 512
    """Triplets per epoch (d)."""
    batch_size: int = 32
    """Triplets per step (d)."""
    group_threshold: float = 0.95
    """Pseudo-patient grouping of real images without group ids: average-linkage clusters of 32x32 thumbnails
    whose mean correlation is at least this (fingerprint.data.images.infer_groups)."""
    recipe: str = ""
    """How the benchmark's generator was trained, for the shadow detectors (family f) where the benchmark has no
    zoo.json: a JSON file shaped like one, {"family": "dcgan", "settings": {...}, "build": {"temperature": 1.0,
    "image_size": 64}} (benchmarks/recipes/ holds the shared ctbench sets'). Empty: the benchmark's zoo.json, else
    the presets' stand-in."""
    submit: str = "best"
    """Detector whose test predictions are written (submission.csv, scores.csv, detector/); 'auto' = highest
    mean dev AUC, 'none' = write none."""
    threshold_method: Literal["max_f1", "fpr"] = SUBMISSION_THRESHOLD
    """Decision threshold, from dev labels, of the out-of-fold decisions (F1, accuracy, kappa) and of
    submission.csv: 'max_f1' (the ImageCLEF 2023 metric; where memorisation is weak it flags nearly every image,
    innocent ones included) or 'fpr' (flag only above all but --target-fpr of the not-used images). results.md
    gives the share of dev not-used images that the submitted detector flags."""
    target_fpr: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = SUBMISSION_TARGET_FPR
    """Target false-positive rate for --threshold-method fpr."""
    n_boot: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed for the splits, the bootstrap, the domain classifier's cross-fitting and training."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the neural detectors (c, d)."""
    skip_bad: bool = False
    """Skip unreadable image files (listed in the log) instead of stopping at the first one."""

    def requested(self) -> list[str]:
        """Detector names asked for by --detectors, in table order (frozen/triplet not yet per backbone)."""
        asked: set[str] = set()
        for tok in (t.strip().lower() for t in self.detectors.split(",")):
            if not tok:
                continue
            if tok == "all":
                asked.update(NAMES)
            elif tok in FAMILIES:
                asked.update(FAMILIES[tok])
            else:
                asked.add(ALIASES.get(tok, tok))
        return [n for n in NAMES if n in asked] + sorted(asked - set(NAMES))

    def submit_name(self) -> str:
        sub = self.submit.strip().lower()
        return ALIASES.get(sub, sub)

    def problems(self) -> list[str]:
        out = []
        if not self.data:
            out.append(f"{flag('data')}: required, a benchmark folder such as ../shared/bench/ctbench-s1")
        elif not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist")
        out += recipe_problems(self.recipe, "recipe")
        asked = self.requested()
        unknown = [n for n in asked if n not in NAMES]
        if unknown:
            out.append(f"{flag('detectors')}: unknown {', '.join(unknown)}; use some of {', '.join(NAMES)}, "
                       "the families a-f, or all")
        if not asked:
            out.append(f"{flag('detectors')}: name at least one detector")
        if {"frozen", "triplet"} & set(asked):
            if not self.weights_dir:
                out.append(f"{flag('weights_dir')}: frozen/triplet detectors need pretrained weights: give a folder "
                           "such as ../shared/weights, or 'none' for random weights")
            elif self.weights_dir not in ("none", "hub") and not Path(self.weights_dir).is_dir():
                out.append(f"{flag('weights_dir')}: '{self.weights_dir}' is not a folder")
            elif self.backbones.strip() == "auto" and self.weights_dir in ("none", "hub"):
                out.append(f"{flag('backbones')}: 'auto' reads the backbones from a weights folder; with "
                           f"{flag('weights_dir')} {self.weights_dir} name them, e.g. resnet18")
            elif self.backbones.strip() not in ("", "auto") and self.weights_dir not in ("none", "hub"):
                missing = [b for b in _split(self.backbones) if weights_file(self.weights_dir, b) is None]
                if missing:
                    out.append(f"{flag('backbones')}: no weights file <backbone>.safetensors in "
                               f"'{self.weights_dir}' for {', '.join(missing)}")
        for name, low in (("folds", 2), ("repeats", 1), ("epochs", 1), ("triplets_per_epoch", 1),
                          ("batch_size", 1), ("n_boot", 10)):
            if getattr(self, name) < low:
                out.append(f"{flag(name)}: must be >= {low} (got {getattr(self, name)})")
        if not 0 <= self.trained_repeats <= max(self.repeats, 0):
            out.append(f"{flag('trained_repeats')}: must be between 0 and {flag('repeats')} ({self.repeats})")
        if "triplet" in asked and self.trained_repeats < 1:
            out.append(f"{flag('trained_repeats')}: triplet detectors need at least 1")
        if self.image_size < 16:
            out.append(f"{flag('image_size')}: must be >= 16 (SSIM uses an 11-pixel window)")
        for name in ("frozen_image_size", "train_image_size"):
            if getattr(self, name) < 16:
                out.append(f"{flag(name)}: must be >= 16 pixels")
        if not -1.0 <= self.group_threshold <= 1.0:
            out.append(f"{flag('group_threshold')}: a correlation in [-1, 1] (got {self.group_threshold})")
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(f"{flag('device')}: one of auto, cpu, cuda (got {self.device!r})")
        sub = self.submit_name()
        if sub not in ("auto", "none") and sub not in asked and not (
            sub.startswith(("frozen_", "triplet_")) and sub.split("_", 1)[0] in asked
        ):
            out.append(f"{flag('submit')}: '{self.submit}' is not among the detectors run ({', '.join(asked)}); "
                       "name one of them, auto or none")
        return out


def recipe_problems(recipe: str, name: str) -> list[str]:
    """Problems of a generator recipe file given with flag ``name`` (none when it is empty)."""
    if recipe and not Path(recipe).is_file():
        return [f"{flag(name)}: '{recipe}' is not a file; give a JSON generator recipe such as "
                "benchmarks/recipes/ctbench-s0.json"]
    if recipe and generator_recipe(recipe) is None:
        return [f"{flag(name)}: '{recipe}' is not a generator recipe: a JSON object with 'family', 'settings' (an "
                "object) and optionally 'build' (temperature, image_size), as zoo.json"]
    return []


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------------------------- detectors


def preset(name: str, config: BenchmarkConfig) -> tuple[str, dict[str, Any]]:
    """(kind, settings) of preset ``name`` at the harness's image size (and seed, for the domain classifier)."""
    kind_name, settings = preset_settings(name, config.recipe or config.data)
    size = config.image_size
    if kind_name in ("pixel", "subspace", "ssim", "gradient", "domain"):
        settings["image_size"] = size
    if kind_name == "gradient":
        settings["feature_size"] = size
    elif kind_name == "domain":
        settings.update(feature_size=max(size // 2, 8), seed=config.seed)
    elif kind_name == "shadow":
        settings.update(image_size=size, seed=config.seed)
    return kind_name, settings


def named(kind_name: str, settings: dict[str, Any], name: str) -> Detector:
    """An unfitted detector whose ``name`` (tables, reports) is ``name``."""
    d = create_detector(kind_name, settings)
    d.meta.extra["name"] = name
    return d


def family_of(d: Detector) -> str:
    """The table's family (a-f) of ``d``: its place in FAMILIES (pixel_mass is one of ours, e, although its kind
    is the pixel baseline's), else its kind's."""
    base = d.kind if d.kind in ("frozen", "triplet") else d.name
    return next((f for f, names in FAMILIES.items() if base in names), d.family)


def fresh(d: Detector) -> Detector:
    """An unfitted copy of ``d``: same kind, settings and name."""
    return named(d.kind, d.meta.settings, d.name)


def backbones(config: BenchmarkConfig) -> list[tuple[str, str]]:
    """(backbone, weights) pairs for frozen/triplet: a weights file per backbone, or 'none'/'hub'."""
    if config.weights_dir in ("none", "hub"):
        return [(b, config.weights_dir) for b in _split(config.backbones)]
    names = (sorted(p.stem for p in Path(config.weights_dir).glob("*.safetensors"))
             if config.backbones.strip() == "auto" else _split(config.backbones))
    out = [(b, str(weights_file(config.weights_dir, b))) for b in names]
    if not out:
        raise ConfigError([f"{flag('weights_dir')}: no <backbone>.safetensors files in '{config.weights_dir}'"])
    return out


def build_detectors(config: BenchmarkConfig) -> list[Detector]:
    """Unfitted detectors for --detectors, in table order; frozen and triplet once per backbone."""
    asked = config.requested()
    pairs = backbones(config) if {"frozen", "triplet"} & set(asked) else []
    out: list[Detector] = []
    for name in asked:
        if name == "frozen":
            out += [named("frozen", {"backbone": b, "weights": w, "image_size": config.frozen_image_size,
                                     "device": config.device}, f"frozen_{b}") for b, w in pairs]
        elif name == "triplet":
            out += [named("triplet", {"backbone": b, "weights": w, "image_size": config.train_image_size,
                                      "epochs": config.epochs, "triplets_per_epoch": config.triplets_per_epoch,
                                      "train_batch_size": config.batch_size, "device": config.device,
                                      "seed": config.seed}, f"triplet_{b}") for b, w in pairs]
        else:
            out.append(named(*preset(name, config), name))
    return out


def remember_scores(d: Detector, ids: Sequence[str], scores: Scores) -> None:
    """Let fitted, label-free ``d`` answer ``score`` for images of ``ids`` from ``scores`` instead of recomputing.

    Within the harness an id names one image of the one FitData, and a label-free detector fitted once gives
    each image one score, so this is a cache: the ensembles (and the submission's threshold) reuse the scores
    of the table. Images without ids, or with others, are scored as usual. Not saved with the detector.
    """
    row = {i: r for r, i in enumerate(ids)}
    compute = d.score

    def score(images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        rows = [row.get(i, -1) for i in ids] if ids is not None else []
        if rows and min(rows) >= 0:
            return scores.take(rows)
        return compute(images, ids)

    d.score = score  # type: ignore[method-assign]


class Fitted:
    """Label-free detectors fitted once on every image of the benchmark, by name, with the scores of every real
    image; the ensembles take their members from here (fitting any the table does not hold)."""

    def __init__(self, data: FitData, config: BenchmarkConfig) -> None:
        self.data, self.config = data, config
        self.by_name: dict[str, Detector] = {}
        self.scores: dict[str, Scores] = {}

    def fit(self, d: Detector) -> Scores:
        if d.learns:
            raise ValueError(f"{d.name} learns from labels: it is refitted per split, not shared")
        self.share_members(d)
        d.fit(self.data)
        s = d.score(self.data.real, self.data.real_ids)
        if not np.all(np.isfinite(s.score)):
            raise RuntimeError(f"{d.name}: produced non-finite scores")
        remember_scores(d, self.data.real_ids, s)
        self.by_name[d.name], self.scores[d.name] = d, s
        return s

    def get(self, name: str) -> Detector:
        if name not in self.by_name:
            log.info("fitting ensemble member %s", name)
            self.fit(named(*preset(name, self.config), name))
        return self.by_name[name]

    def share_members(self, d: Detector) -> None:
        if isinstance(d, RankEnsemble):
            d.prefitted = {n: self.get(n) for n in d.names}


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Run:
    """One detector's out-of-fold dev results."""

    detector: Detector
    """Label-free: the detector fitted on all images. Learning: an unfitted prototype (refitted per split)."""
    oof: list[np.ndarray]
    """Per evaluated repeat: (n_labelled,) out-of-fold scores."""
    decisions: list[np.ndarray]
    thresholds: list[list[float]]
    seconds: float
    full_scores: Scores | None = None
    """Label-free detectors: the scores of every real image (test ones included)."""
    metrics: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    per_repeat: list[dict[str, tuple[float, float, float]]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    """Detector-specific facts for the report, e.g. which members the selected ensemble chose."""
    distribution_members: set[str] = field(default_factory=set)
    """Ensembles: members with a distributional signal that a fit used."""
    memorisation: MemorisationTest | None = None
    """Group-level permutation test of the first repeat's out-of-fold scores (set by :func:`summarise`)."""

    @property
    def family(self) -> str:
        return family_of(self.detector)


def _used_members(d: Detector) -> list[Detector]:
    return [d.members[i] for i in d.chosen] if isinstance(d, RankEnsemble) and d.members else []


def evaluate_detector(d: Detector, data: FitData, splits: list[tuple[np.ndarray, np.ndarray]], folds: int,
                      trained_repeats: int, fitted: Fitted, threshold_method: str = SUBMISSION_THRESHOLD,
                      target_fpr: float = SUBMISSION_TARGET_FPR) -> Run:
    """Score ``d`` out of fold on every split (costly learning detectors: on the first ``trained_repeats``).

    Split indices are positions in ``data.train`` (the labelled dev images). A label-free ``d`` is fitted once
    (``fitted``); a learning one is refitted on each split's training rows and scores its held-out rows.
    Thresholds come from the training rows' labels only.
    """
    lab = data.train
    y = data.labels[lab]
    t0 = time.perf_counter()
    full = None
    chosen: list[str] = []
    distribution: set[str] = set()
    if not d.learns:
        full = fitted.fit(d)
        distribution |= {m.name for m in _used_members(d) if m.signal == "distribution"}
        use = splits
    else:
        use = splits[: trained_repeats * folds] if d.costly else splits
    n_rep = len(use) // folds
    oof = [np.full(len(lab), np.nan) for _ in range(n_rep)]
    dec = [np.zeros(len(lab), dtype=np.int64) for _ in range(n_rep)]
    thr: list[list[float]] = [[] for _ in range(n_rep)]
    for i, (tr, te) in enumerate(use):
        r = i // folds
        if d.learns:
            if d.costly:
                log.info("%s: repeat %d fold %d/%d: training on %d labelled images", d.name, r + 1,
                         i % folds + 1, folds, len(tr))
            model = fresh(d)
            fitted.share_members(model)
            model.fit(data.subset(lab[tr]))
            rows = np.concatenate([lab[tr], lab[te]])
            s = model.score([data.real[j] for j in rows], [data.real_ids[j] for j in rows])
            s_tr, s_te = s.take(np.arange(len(tr))), s.take(np.arange(len(tr), len(rows)))
            if isinstance(model, SelectedEnsemble):
                chosen.append(" + ".join(model.meta.extra["chosen"]))
            distribution |= {m.name for m in _used_members(model) if m.signal == "distribution"}
        else:
            model, s_tr, s_te = d, full.take(lab[tr]), full.take(lab[te])
        t = model.choose_threshold(y[tr], s_tr, threshold_method, target_fpr)
        if not np.all(np.isfinite(s_te.score)):
            raise RuntimeError(f"{d.name}: produced non-finite scores")
        oof[r][te] = s_te.score
        dec[r][te] = (s_te.score >= t).astype(np.int64)
        thr[r].append(float(t))
    run = Run(d, oof, dec, thr, time.perf_counter() - t0, full, distribution_members=distribution)
    if chosen:
        run.notes["chosen_on_training_folds"] = dict(Counter(chosen).most_common())
    return run


def summarise(run: Run, y: np.ndarray, n_boot: int, seed: int, groups: np.ndarray | None = None) -> None:
    """Bootstrap intervals per repeat; point and bounds averaged over repeats (identical AUCs when label-free);
    and the memorisation test on the first repeat's out-of-fold scores.

    ``groups`` (the labelled images' pseudo-patients, aligned with ``y``) makes both resample whole groups;
    without them images are the unit, which gives too narrow intervals and too small p-values when
    neighbouring slices of one patient are among the images.
    """
    run.per_repeat = [bootstrap_ci(y, s, decisions=d, n_boot=n_boot, seed=seed, groups=groups)
                      for s, d in zip(run.oof, run.decisions, strict=True)]
    run.metrics = {k: tuple(float(np.mean([m[k][j] for m in run.per_repeat])) for j in range(3))  # type: ignore[misc]
                   for k in run.per_repeat[0]}
    run.memorisation = memorisation_test(y, run.oof[0], groups, n_permutations=N_PERMUTATIONS, seed=seed)


# ---------------------------------------------------------------------------------------------- outputs


def command_line(config: BenchmarkConfig) -> str:
    """The `fingerprint benchmark` command that reproduces `config` (flags that differ from the defaults)."""
    default = BenchmarkConfig()
    parts = ["fingerprint benchmark"]
    for f in fields(BenchmarkConfig):
        v = getattr(config, f.name)
        if f.name not in ("data", "out") and v == getattr(default, f.name):
            continue
        if isinstance(v, bool):
            parts.append(flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
        else:
            parts.append(f"{flag(f.name)} {v}")
    return " \\\n    ".join(parts)


def signal_of(run: Run) -> str:
    """'distribution' for a distributional detector, 'mixed (<members>)' for an ensemble that used one."""
    if run.detector.signal == "distribution":
        return "distribution"
    if run.distribution_members:
        return f"mixed ({', '.join(sorted(run.distribution_members))})"
    return "per_image"


def _row(run: Run) -> dict[str, Any]:
    m = run.metrics
    return {
        "family": run.family,
        "detector": run.detector.name,
        "signal": signal_of(run),
        "auc": m["auc"],
        "tpr1": m["tpr_at_1fpr"],
        "tpr5": m["tpr_at_5fpr"],
        "f1": m["f1"],
        "acc": m["accuracy"],
        "kappa": m["kappa"],
        "p_mem": format_p(run.memorisation.p_value) if run.memorisation else None,
        "detectable": f"{run.memorisation.detectable_auc:.3f}" if run.memorisation else None,
        "reps": len(run.oof),
        "seconds": f"{run.seconds:.1f}",
    }


COLUMNS = [("family", "family"), ("detector", "detector"), ("signal", "signal"), ("auc", "AUC [95% CI]"),
           ("tpr1", "TPR@1%FPR"), ("tpr5", "TPR@5%FPR"), ("f1", "F1"), ("acc", "accuracy"), ("kappa", "kappa"),
           ("p_mem", "p (memorisation)"), ("detectable", "detectable AUC"), ("reps", "repeats"),
           ("seconds", "seconds")]


def goals(runs: list[Run], best_name: str | None, submitted: str | None = None) -> dict[str, Any]:
    """Issue #6 section 4 checks, from this run's numbers, and the memorisation verdict for the submitted detector
    (``submitted``, else ``best_name``)."""
    base = [r for r in runs if r.family in BASELINE_FAMILIES]
    chosen = next((r for r in runs if r.detector.name == best_name), None)
    out: dict[str, Any] = {}
    tested = next((r for r in runs if r.detector.name == (submitted or best_name)), None)
    if tested is not None and tested.memorisation is not None:
        out["memorisation"] = {"detector": tested.detector.name, "signal": signal_of(tested),
                               "submitted": submitted is not None, **tested.memorisation.to_dict()}
    if base:
        b = max(base, key=lambda r: r.metrics["auc"][0])
        out["best_baseline"] = {"detector": b.detector.name, "auc": b.metrics["auc"][0]}
    if chosen is not None:
        auc = chosen.metrics["auc"]
        out["best"] = {"detector": chosen.detector.name, "auc": auc[0], "auc_ci": [auc[1], auc[2]],
                       "tpr_at_1fpr": chosen.metrics["tpr_at_1fpr"][0], "f1": chosen.metrics["f1"][0]}
        out["signal_ci_above_chance"] = bool(auc[1] > 0.5)
        if base:
            out["margin_over_baselines"] = auc[0] - out["best_baseline"]["auc"]
            out["margin_goal_met"] = bool(out["margin_over_baselines"] >= 0.05)
            if out["best_baseline"]["auc"] >= 0.7:
                out["strong_goals_met"] = bool(auc[0] >= 0.97 and chosen.metrics["tpr_at_1fpr"][0] >= 0.5
                                               and chosen.metrics["f1"][0] >= 0.9)
    return out


def memorisation_warning(g: dict[str, Any]) -> str | None:
    """The warning for a submission whose scores show no evidence of memorisation (p > 0.05), else None."""
    m = g.get("memorisation")
    if not m or m["evidence"]:
        return None
    what = "the submission's per-image decisions (submission.csv)" if m.get("submitted") else \
        "its per-image decisions"
    return (f"WARNING: {m['detector']} shows no evidence of memorisation on the dev images (permutation test over "
            f"{m['n_groups']} {m['unit']}s, p = {format_p(m['p_value'])} > {ALPHA}): {what} are not supported by "
            "evidence: these labels cannot tell them from chance. This is not an all-clear: "
            f"{power_text(m.get('detectable_auc', math.nan))}.")


def settings_text(d: Detector) -> str:
    """The settings of ``d`` that differ from its kind's defaults, as ``key=value`` pairs."""
    default = to_dict(kind(d.kind).cls.Settings())
    return ", ".join(f"{k}={v}" for k, v in d.meta.settings.items() if default.get(k) != v)


def groups_from(config: BenchmarkConfig) -> str:
    """Where the pseudo-patient groups come from (fingerprint.data.imagesets.pool_groups)."""
    inferred = (f"inferred: average-linkage on 32x32 thumbnail correlation >= {config.group_threshold} "
                "(fingerprint.data.images.infer_groups)")
    root = Path(config.data)
    if (root / GROUPS_FILE).is_file():
        return f"{GROUPS_FILE} (patient ids) where it names every real image, else " + inferred
    manifests = [root] if root.is_file() else [p / fpdata.MANIFEST_NAME for p in (root, root / "dev", root / "test")]
    if any(p.is_file() for p in manifests):
        return "the manifest's group ids where every real image has one, else " + inferred
    return inferred


def threshold_text(method: str, target_fpr: float, ssim: bool = True) -> str:
    """A decision rule in words, for the harness's and the suite's reports."""
    if method == "max_f1":
        return "max F1" + ("; SSIM: real-to-real quantile chosen by F1" if ssim else "")
    return f"flagging at most {target_fpr:.0%} of the not-used images"


def decisions_text(config: BenchmarkConfig, run: Run, y: np.ndarray, flagged_test: tuple[int, int] | None,
                   groups: np.ndarray | None = None) -> str:
    """What the submitted detector's threshold does to the dev images out of fold (first repeat): how many
    innocent (not-used) images it flags, with the upper bound that shows on the false-positive rate of new ones,
    and how many used ones; and how many test images submission.csv flags."""
    from fingerprint.evaluation.thresholds import false_positives

    dec = run.decisions[0]
    neg, pos = y == 0, y == 1
    fp, tp = int(dec[neg].sum()), int(dec[pos].sum())
    bound = false_positives(y, dec.astype(np.float64), 0.5, groups)  # decisions are 0/1 scores: flagged >= 0.5
    rule = threshold_text(config.threshold_method, config.target_fpr, ssim=run.detector.kind == "ssim")
    text = (f"Decisions of `{run.detector.name}` (threshold on the training folds: {rule}): out of fold, first "
            f"repeat, they flag {fp} of {int(neg.sum())} dev not-used images ({fp / max(neg.sum(), 1):.0%}, "
            f"wrongly accused; in {bound.flagged_groups} of {bound.groups} pseudo-patient groups, so with "
            f"{bound.confidence:.0%} confidence these fold thresholds flag at most {bound.bound:.0%} of new "
            "not-used images like them) and "
            f"{tp} of {int(pos.sum())} used ones ({tp / max(pos.sum(), 1):.0%}).")
    if flagged_test is not None:
        text += f" `submission.csv` flags {flagged_test[0]} of {flagged_test[1]} test images."
    if config.threshold_method == "max_f1" and fp > FLAG_WARNING * neg.sum():
        text += (" Max F1 buys recall with false accusations here; `--threshold-method fpr` flags at most "
                 "`--target-fpr` of the training folds' not-used images.")
    return text


def _markdown(config: BenchmarkConfig, data: FitData, runs: list[Run], g: dict[str, Any], n_splits: int,
              seconds: float, submit: str | None, flagged_test: tuple[int, int] | None = None) -> str:
    lab = data.train
    n_used = int((data.labels[lab] == 1).sum())
    n_test = int((data.labels < 0).sum())
    lines = [
        f"# Benchmark: {Path(config.data).name}",
        "",
        f"Dev: {n_used} used vs {len(lab) - n_used} not-used images, {len(np.unique(data.groups[lab]))} groups "
        f"({groups_from(config)}); gallery: {len(data.generated)} generated images; test: {n_test} real "
        "images (unlabelled).",
        f"Evaluation: {config.repeats} x {config.folds}-fold group-aware stratified CV ({n_splits} splits); "
        "label-free detectors fitted once on all images, learning ones refitted per split (costly ones on the "
        f"first {config.trained_repeats} repeat(s)). Scores out of fold, thresholds fitted on the training folds "
        f"({threshold_text(config.threshold_method, config.target_fpr)}). Metrics averaged over repeats, 95% bootstrap "
        f"intervals ({config.n_boot} resamples); resampling unit: {resampling_unit(data.groups[lab])}, so "
        "near-duplicate slices of one pseudo-patient are never counted as independent.",
        "",
        format_table([_row(r) for r in runs], COLUMNS),
        "signal: `distribution` = a score driven by how the generator's training set differs from the other real "
        "images as a population (how generated-like an image looks overall), not by memorisation of individual "
        "images; `mixed` = an ensemble that used such a member.",
        f"p (memorisation): one-sided permutation test of \"the scores do not separate used from not-used\" on "
        f"the out-of-fold dev AUC of the first repeat, labels permuted among whole groups ({N_PERMUTATIONS} "
        f"permutations; smallest possible p {format_p(1 / (N_PERMUTATIONS + 1))}). p > {ALPHA}: no evidence of "
        "memorisation: the dev labels cannot tell the detector's per-image decisions from chance. Not an "
        f"all-clear: detectable AUC = the AUC the test finds with {POWER:.0%} power for these scores, labels and "
        "groups; it says little about weaker separations. A small p for a `distribution` or `mixed` detector shows a "
        "population difference, not that single images were memorised.",
        "",
    ]
    warning = memorisation_warning(g)
    if warning:
        lines += [f"**{warning}**", ""]
    submit_run = next((r for r in runs if r.detector.name == submit), None)
    if submit_run is not None:
        lines += [decisions_text(config, submit_run, data.labels[lab], flagged_test, data.groups[lab]), ""]
    if g:
        lines.append("Goals (issue #6, section 4):")
        if "best" in g and "best_baseline" in g:
            lines.append(f"- {g['best']['detector']} AUC {g['best']['auc']:.3f} vs best of (a)-(c) "
                         f"{g['best_baseline']['detector']} {g['best_baseline']['auc']:.3f}: margin "
                         f"{g['margin_over_baselines']:+.3f} (goal >= +0.05: "
                         f"{'met' if g['margin_goal_met'] else 'NOT met'}).")
        if "best" in g:
            lo, hi = g["best"]["auc_ci"]
            lines.append(f"- 95% interval on {g['best']['detector']}'s AUC: [{lo:.3f}, {hi:.3f}] "
                         f"({'above' if g['signal_ci_above_chance'] else 'NOT above'} chance 0.5).")
        if "strong_goals_met" in g:
            lines.append(f"- Baselines reach AUC >= 0.7 here, so AUC >= 0.97, TPR@1% >= 0.5, F1 >= 0.90 apply: "
                         f"{'met' if g['strong_goals_met'] else 'NOT met'}.")
        if "memorisation" in g:
            m = g["memorisation"]
            lines.append(f"- Memorisation test on {m['detector']} (signal {m['signal']}; {m['n_groups']} "
                         f"{m['unit']}s, {m['n_permutations']} permutations): {m['verdict']}.")
        lines.append("")
    lines += ["Detectors:", ""]
    for r in runs:
        d = r.detector
        extra = settings_text(d)
        lines.append(f"- `{d.name}` ({r.family}; kind `{d.kind}`{'; ' + extra if extra else ''}): {d.describe()}")
        for key, value in r.notes.items():
            text = ", ".join(f"{k} ({v}x)" for k, v in value.items()) if isinstance(value, dict) else value
            lines.append(f"  - {key.replace('_', ' ')}: {text}")
    lines += ["", "ROC curves (out-of-fold dev scores of the first repeat; the best detector of each family (a)-(d) "
              "and every (e) detector): `roc.png` (linear), `roc_log.png` (log FPR).", ""]
    if submit:
        lines.append(f"Test predictions: `submission.csv` and `scores.csv` from `{submit}`, fitted on all labelled "
                     f"dev images with its threshold from them; the fitted detector is in `{DETECTOR_DIR}/` "
                     f"(`fingerprint predict --model <out>/{DETECTOR_DIR}`).")
    lines.append(f"Runtime: {seconds / 60:.1f} min on {os.cpu_count()} CPU core(s).")
    return "\n".join(lines) + "\n"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return None if not np.isfinite(v) else float(v)
    return v


def fit_for_submission(run: Run, data: FitData, fitted: Fitted, threshold_method: str = SUBMISSION_THRESHOLD,
                       target_fpr: float = SUBMISSION_TARGET_FPR) -> Detector:
    """The detector of ``run`` fitted on all labelled dev images (``data.train``), threshold from their labels.

    A label-free detector is the one already fitted for the table; a learning one is fitted once more on every
    labelled image.
    """
    d = run.detector
    if d.learns:
        log.info("%s: fitting on all %d labelled dev images for the test predictions", d.name, len(data.train))
        d = fresh(d)
        fitted.share_members(d)
        d.fit(data)
    return finish_fit(d, data, threshold_method=threshold_method, target_fpr=target_fpr)


def write_test_predictions(out: Path, data: FitData, d: Detector) -> tuple[float, int]:
    """submission.csv (id,0|1, no header) and scores.csv (id,score) for the unlabelled real images, and ``d``
    saved in ``out/detector``. Returns the threshold and how many images it flags."""
    test = np.flatnonzero(data.labels < 0)
    ids = [data.real_ids[i] for i in test]
    s = d.score([data.real[i] for i in test], ids)
    decisions = d.decide(s)
    write_csv_atomic(out / "submission.csv", [(i, int(v)) for i, v in zip(ids, decisions, strict=True)])
    write_csv_atomic(out / "scores.csv", [(i, f"{v:.6g}") for i, v in zip(ids, s.score, strict=True)],
                     header=("id", "score"))
    d.save(out / DETECTOR_DIR)
    return d.threshold, int(np.sum(decisions))


def write_roc_plots(out: Path, title: str, labels: np.ndarray, scores: dict[str, np.ndarray],
                    families: dict[str, str], aucs: dict[str, float]) -> list[str]:
    """roc.png and roc_log.png: the best detector (mean dev AUC) of each baseline family (a)-(d), and every (e).

    One curve per family keeps the picture readable (matplotlib's palette repeats after ten curves); the table
    has every detector. Returns the names drawn.
    """
    names: list[str] = []
    for fam in sorted(set(families.values())):
        members = [n for n in scores if families[n] == fam]
        names += members if fam == "e" else [max(members, key=lambda n: aucs[n])]
    curves = {n: (labels, scores[n]) for n in names}
    roc_plot(curves, out / "roc.png", title=f"{title}: dev ROC (out of fold)")
    roc_plot(curves, out / "roc_log.png", log_fpr=True, title=f"{title}: dev ROC, log FPR")
    return names


def main(config: BenchmarkConfig) -> dict[str, Any]:
    """Run the detectors, write the report files into --out and return the results as a dict."""
    validate(config)
    t_start = time.perf_counter()
    out = Path(config.out)
    detectors = build_detectors(config)
    log.info("loading %s", config.data)
    data = load_fit_data(config.data, val_fraction=0.0, seed=config.seed, skip_bad=config.skip_bad,
                         group_threshold=config.group_threshold)
    lab = data.train
    y = data.labels[lab]
    n_test = int((data.labels < 0).sum())
    log.info("benchmark: %d generated, %d real (%d labelled, %d test), %d groups", len(data.generated),
             len(data.real), len(lab), n_test, len(np.unique(data.groups)))
    splits = fpdata.repeated_group_kfold(y, data.groups[lab], n_splits=config.folds, n_repeats=config.repeats,
                                         seed=config.seed)
    fitted = Fitted(data, config)
    runs: list[Run] = []
    for i, d in enumerate(detectors, 1):
        log.info("[%d/%d] %s: %s", i, len(detectors), d.name, d.describe())
        run = evaluate_detector(d, data, splits, config.folds, config.trained_repeats, fitted,
                                config.threshold_method, config.target_fpr)
        summarise(run, y, config.n_boot, config.seed, groups=data.groups[lab])
        log.info("[%d/%d] %s: AUC %.3f [%.3f, %.3f], memorisation p = %s, in %.1f s", i, len(detectors), d.name,
                 *run.metrics["auc"], format_p(run.memorisation.p_value), run.seconds)
        runs.append(run)

    sub = config.submit_name()
    if sub == "auto":
        sub = max(runs, key=lambda r: r.metrics["auc"][0]).detector.name
    submit_run = next((r for r in runs if r.detector.name == sub), None) if sub != "none" else None
    if sub != "none" and submit_run is None:
        raise ConfigError([f"{flag('submit')}: '{config.submit}' did not run; choose one of "
                           f"{', '.join(r.detector.name for r in runs)}"])
    # The goals judge our detector ("best") when it ran, whatever --submit says.
    judged = "best" if any(r.detector.name == "best" for r in runs) else (
        submit_run.detector.name if submit_run else None)
    g = goals(runs, judged, submitted=submit_run.detector.name if submit_run else None)

    out.mkdir(parents=True, exist_ok=True)
    threshold, final, flagged_test = None, None, None
    if submit_run is not None and n_test:
        final = fit_for_submission(submit_run, data, fitted, config.threshold_method, config.target_fpr)
        threshold, flagged = write_test_predictions(out, data, final)
        flagged_test = (flagged, n_test)
        if isinstance(final, SelectedEnsemble):
            submit_run.notes["chosen_for_test"] = " + ".join(final.meta.extra["chosen"])
    elif submit_run is not None:
        log.warning("no unlabelled test images in %s: no submission written", config.data)
    write_roc_plots(out, Path(config.data).name, y, {r.detector.name: r.oof[0] for r in runs},
                    {r.detector.name: r.family for r in runs},
                    {r.detector.name: r.metrics["auc"][0] for r in runs})
    write_csv_atomic(out / "dev_scores.csv",
                     [(data.real_ids[j], int(y[i]), int(data.groups[j]), *(f"{r.oof[0][i]:.6g}" for r in runs))
                      for i, j in enumerate(lab)],
                     header=("id", "label", "group", *(r.detector.name for r in runs)))
    if submit_run is not None:
        shown = final if final is not None else submit_run.detector
        write_benchmark_audit(out, config.data, data, submit_run.oof[0], submit_run.decisions[0], shown,
                              signal_of(submit_run), submit_run.memorisation, threshold, command=command_line(config),
                              config=to_dict(config), n_boot=config.n_boot, seed=config.seed)
    seconds = time.perf_counter() - t_start
    md = _markdown(config, data, runs, g, len(splits), seconds, submit_run.detector.name if submit_run else None,
                   flagged_test)
    write_text_atomic(out / "results.md", md)
    result = {
        "config": to_dict(config),
        "data": {"generated": len(data.generated), "real": len(data.real), "labelled": len(lab),
                 "used": int((y == 1).sum()), "test": n_test, "groups": int(len(np.unique(data.groups))),
                 "groups_from": groups_from(config)},
        "splits": len(splits),
        "detectors": [{
            "name": r.detector.name, "kind": r.detector.kind, "settings": r.detector.meta.settings,
            "family": r.family, "description": r.detector.describe(), "learns": r.detector.learns,
            "signal": signal_of(r), "seconds": r.seconds, "metrics": r.metrics, "per_repeat": r.per_repeat,
            "thresholds": r.thresholds, "notes": r.notes,
            "memorisation": r.memorisation.to_dict() if r.memorisation else None,
        } for r in runs],
        "bootstrap": {"unit": "group", "groups": int(len(np.unique(data.groups[lab]))), "n_boot": config.n_boot,
                      "stratified": True, "description": resampling_unit(data.groups[lab])},
        "goals": g,
        "submission": ({"detector": submit_run.detector.name, "threshold": threshold,
                        "saved": DETECTOR_DIR if threshold is not None else None} if submit_run else None),
        "seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    write_text_atomic(out / "results.json", json.dumps(_jsonable(result), indent=2))
    write_text_atomic(out / "COMMAND.md", (
        f"# How {out.name} was made\n\n```\n{command_line(config)}\n```\n\n"
        f"Runtime: {seconds:.0f} s ({seconds / 60:.1f} min) on {os.cpu_count()} CPU core(s), "
        f"{platform.machine()}; per detector: "
        + ", ".join(f"{r.detector.name} {r.seconds:.0f} s" for r in runs) + ".\n"
    ))
    print(md)
    warning = memorisation_warning(g)
    if warning:
        print(warning)
        log.warning(warning)
    log.info("wrote %s in %.1f min", out, seconds / 60)
    return result
