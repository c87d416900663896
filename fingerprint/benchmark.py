"""Run membership detectors side by side on one benchmark: same images, same group-aware dev splits.

    fingerprint benchmark --data ../shared/bench/ctbench-s1 --weights-dir ../shared/weights \\
        --out benchmarks/results/ctbench-s1

Dev evaluation is repeated, stratified, group-aware k-fold cross-validation over the labelled dev images
(``--folds`` x ``--repeats``): every decision threshold, and every trained detector, is fitted on the training
folds and applied to the held-out fold, so nothing is tuned on the images it is scored on. Unsupervised detectors
compute their scores once without reading any label. Each metric gets a stratified bootstrap 95% interval.

Writes to ``--out``: ``results.md`` (table), ``results.json`` (everything, per repeat), ``roc.png`` and
``roc_log.png`` (out-of-fold dev ROC curves), ``dev_scores.csv`` (out-of-fold dev scores of every detector),
and for the ``--submit`` detector ``submission.csv`` (``<id>,<0|1>`` per test image, no header: the ImageCLEF
format; threshold from dev only) and ``scores.csv`` (``id,score``, higher = more likely used), plus
``COMMAND.md`` with the exact command and its runtime.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fingerprint import data as fpdata
from fingerprint import detectors as det
from fingerprint.config import ConfigError, flag, to_dict, validate
from fingerprint.io import write_csv_atomic, write_text_atomic
from fingerprint.metrics import bootstrap_ci, format_table
from fingerprint.plots import roc_plot

log = logging.getLogger(__name__)

FAMILIES = {
    "a": ("pixel_l2", "pixel_ncc"),
    "b": ("ssim",),
    "c": ("frozen",),
    "d": ("triplet",),
    "e": ("pixel_mass", "subspace_mass", "grad_nn", "domain_clf", "ab_rank", "best"),
}
NAMES = tuple(n for names in FAMILIES.values() for n in names)
BASELINE_FAMILIES = ("a", "b", "c")


@dataclass
class BenchmarkConfig:
    data: str = ""
    """Benchmark folder in the ImageCLEF layout: dev/{generated,used,not_used} and optionally
    test/{generated,real_unknown} (or any layout `fingerprint.data.open_folder` reads)."""
    out: str = "benchmarks/results/run"
    """Output folder (results.md/json, ROC pictures, dev_scores.csv, submission.csv, scores.csv, COMMAND.md)."""
    detectors: str = "all"
    """Comma-separated detectors and/or families: pixel_l2, pixel_ncc (a), ssim (b), frozen (c, one per backbone),
    triplet (d, one per backbone), pixel_mass, subspace_mass, grad_nn, domain_clf, ab_rank, best (e); or a, b, c, d,
    e; or 'all'."""
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
    """Repeats on which label-trained detectors (triplet) are refitted per fold (each repeat = --folds trainings;
    they dominate the runtime). The first repeats of the same splits are used."""
    image_size: int = 64
    """Side in pixels that every image is resized to for the pixel, SSIM and gradient detectors (and grad_nn's
    features); domain_clf works at half of it."""
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
    whose mean correlation is at least this (fingerprint.data.infer_groups)."""
    submit: str = "best"
    """Detector whose test predictions are written (submission.csv, scores.csv); 'auto' = highest mean dev AUC,
    'none' = write none."""
    n_boot: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    seed: int = 0
    """Seed for the splits, the bootstrap and training."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for the neural detectors (c, d)."""
    skip_bad: bool = False
    """Skip unreadable image files (listed in the log) instead of stopping at the first one."""

    def requested(self) -> list[str]:
        """Detector kinds asked for by --detectors, in table order (frozen/triplet not yet per backbone)."""
        asked: set[str] = set()
        for tok in (t.strip().lower() for t in self.detectors.split(",")):
            if not tok:
                continue
            if tok == "all":
                asked.update(NAMES)
            elif tok in FAMILIES:
                asked.update(FAMILIES[tok])
            else:
                asked.add(tok)
        return [n for n in NAMES if n in asked] + sorted(asked - set(NAMES))

    def problems(self) -> list[str]:
        out = []
        if not self.data:
            out.append(f"{flag('data')}: required, a benchmark folder such as ../shared/bench/ctbench-s1")
        elif not Path(self.data).exists():
            out.append(f"{flag('data')}: '{self.data}' does not exist")
        asked = self.requested()
        unknown = [n for n in asked if n not in NAMES]
        if unknown:
            out.append(f"{flag('detectors')}: unknown {', '.join(unknown)}; use some of {', '.join(NAMES)}, "
                       "the families a-e, or all")
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
                missing = [b for b in _split(self.backbones) if det.weights_file(self.weights_dir, b) is None]
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
        sub = self.submit.strip().lower()
        if sub not in ("auto", "none") and sub not in asked and not (
            sub.startswith(("frozen_", "triplet_")) and sub.split("_", 1)[0] in asked
        ):
            out.append(f"{flag('submit')}: '{self.submit}' is not among the detectors run ({', '.join(asked)}); "
                       "name one of them, auto or none")
        return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    pool: det.Pool
    n_test: int
    groups_from: str
    skipped: list[str] = field(default_factory=list)


def load_pool(config: BenchmarkConfig) -> Loaded:
    """Read the benchmark into a Pool: dev labelled real images first, then test real images, all generated."""
    dev, test = fpdata.open_benchmark(config.data, skip_bad=config.skip_bad)
    skipped = [f"{p} ({why})" for s in (dev, test) if s is not None for p, why in s.skipped]
    if skipped:
        log.warning("skipped %d unreadable file(s): %s", len(skipped), "; ".join(skipped[:10]))
    labelled = dev.role("used") + dev.role("not_used")
    if not dev.role("used") or not dev.role("not_used"):
        raise fpdata.DataError(f"{config.data}: the dev set needs used and not_used images to evaluate on")
    unknown = test.role("real_unknown") if test is not None else dev.role("real_unknown")
    gen_items = dev.role("generated") + (test.role("generated") if test is not None else [])
    if not gen_items:
        raise fpdata.DataError(f"{config.data}: no generated images found")
    real_items = labelled + unknown
    size = config.image_size
    real = fpdata.load_array(real_items, size=size)
    gen = fpdata.load_array(gen_items, size=size)
    labels = np.array([it.label if it.label is not None else -1 for it in real_items], dtype=np.int64)
    if all(it.group is not None for it in real_items):
        groups = np.unique([str(it.group) for it in real_items], return_inverse=True)[1].astype(np.int64)
        groups_from = "group ids from the manifest"
    else:
        groups = fpdata.infer_groups(real, threshold=config.group_threshold, thumb=32, linkage="average")
        groups_from = (f"inferred: average-linkage on 32x32 thumbnail correlation >= {config.group_threshold} "
                       "(fingerprint.data.infer_groups)")
    n_dev_gen = len(dev.role("generated"))
    source = np.r_[np.zeros(n_dev_gen), np.ones(len(gen_items) - n_dev_gen)].astype(np.int64)
    pool = det.Pool(generated=gen, real=real, labels=labels, groups=groups, generated_source=source,
                    real_ids=[it.id for it in real_items], generated_ids=[it.id for it in gen_items])
    return Loaded(pool, len(unknown), groups_from, skipped)


def build_detectors(config: BenchmarkConfig) -> list[det.Detector]:
    """The detectors --detectors asks for, in table order; frozen and triplet once per backbone."""
    asked = config.requested()
    backbones: list[tuple[str, str]] = []
    if {"frozen", "triplet"} & set(asked):
        if config.weights_dir in ("none", "hub"):
            backbones = [(b, config.weights_dir) for b in _split(config.backbones)]
        else:
            names = (sorted(p.stem for p in Path(config.weights_dir).glob("*.safetensors"))
                     if config.backbones.strip() == "auto" else _split(config.backbones))
            backbones = [(b, str(det.weights_file(config.weights_dir, b))) for b in names]
            if not backbones:
                raise ConfigError([f"{flag('weights_dir')}: no <backbone>.safetensors files in "
                                   f"'{config.weights_dir}'"])
    settings = det.TripletSettings(image_size=config.train_image_size, epochs=config.epochs,
                                   triplets_per_epoch=config.triplets_per_epoch, batch_size=config.batch_size,
                                   device=config.device, seed=config.seed)
    # One instance each, shared with the ensembles, which then reuse the scores computed for the table.
    grad = det.GradientNN(size=config.image_size, k=10)
    dom = det.DomainClassifier(size=max(config.image_size // 2, 8), c=0.01, folds=10, seed=config.seed)
    ncc = det.PixelNN("ncc")
    mass = det.GeneratedMass(k=10)
    subspace = det.GeneratedMass(k=10, subspace=True)
    out: list[det.Detector] = []
    for name in asked:
        if name == "pixel_l2":
            out.append(det.PixelNN("l2"))
        elif name == "pixel_ncc":
            out.append(ncc)
        elif name == "ssim":
            out.append(det.SSIMNN())
        elif name == "frozen":
            out += [det.FrozenNN(b, w, config.frozen_image_size, config.device) for b, w in backbones]
        elif name == "triplet":
            out += [det.TripletNN(b, w, settings) for b, w in backbones]
        elif name == "grad_nn":
            out.append(grad)
        elif name == "domain_clf":
            out.append(dom)
        elif name == "pixel_mass":
            out.append(mass)
        elif name == "subspace_mass":
            out.append(subspace)
        elif name == "ab_rank":
            out.append(det.RankEnsemble([grad, dom], name="ab_rank"))
        elif name == "best":
            out.append(det.SelectedEnsemble([ncc, mass, subspace, grad, dom], name="best"))
    return out


# ------------------------------------------------------------------------------------------- evaluation


@dataclass
class Run:
    """One detector's out-of-fold dev results."""

    detector: det.Detector
    oof: list[np.ndarray]
    """Per evaluated repeat: (n_labelled,) out-of-fold scores."""
    decisions: list[np.ndarray]
    thresholds: list[list[float]]
    seconds: float
    full_scores: np.ndarray | None = None
    """Unsupervised detectors: the scores of every real image (test ones included)."""
    metrics: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    per_repeat: list[dict[str, tuple[float, float, float]]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    """Detector-specific facts for the report, e.g. which members the selected ensemble chose."""


def evaluate_detector(
    d: det.Detector, pool: det.Pool, splits: list[tuple[np.ndarray, np.ndarray]], folds: int, trained_repeats: int,
) -> Run:
    """Score `d` out of fold on every split (trained detectors: on the first `trained_repeats` repeats)."""
    lab = pool.labelled
    t0 = time.perf_counter()
    full = None
    if not d.needs_labels:
        full = d.score(pool)
        if not np.all(np.isfinite(full)):
            raise RuntimeError(f"{d.name}: produced non-finite scores")
        use = splits
    elif d.costly:
        use = splits[: trained_repeats * folds]
    else:
        use = splits
    n_rep = len(use) // folds
    oof = [np.full(len(lab), np.nan) for _ in range(n_rep)]
    dec = [np.zeros(len(lab), dtype=np.int64) for _ in range(n_rep)]
    thr: list[list[float]] = [[] for _ in range(n_rep)]
    for i, (tr, te) in enumerate(use):
        r = i // folds
        if d.needs_labels:
            if d.costly:
                log.info("%s: repeat %d fold %d/%d: training on %d labelled images", d.name, r + 1,
                         i % folds + 1, folds, len(tr))
            s = d.score(pool, lab[tr])
        else:
            s = full
        t = d.threshold(pool, s, lab[tr])
        oof[r][te] = s[lab[te]]
        dec[r][te] = (s[lab[te]] >= t).astype(np.int64)
        thr[r].append(float(t))
    return Run(d, oof, dec, thr, time.perf_counter() - t0, full)


def summarise(run: Run, y: np.ndarray, n_boot: int, seed: int) -> None:
    """Bootstrap intervals per repeat; point and bounds averaged over repeats (identical AUCs when unsupervised)."""
    run.per_repeat = [bootstrap_ci(y, s, decisions=d, n_boot=n_boot, seed=seed)
                      for s, d in zip(run.oof, run.decisions, strict=True)]
    run.metrics = {k: tuple(float(np.mean([m[k][j] for m in run.per_repeat])) for j in range(3))  # type: ignore[misc]
                   for k in run.per_repeat[0]}


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


def _row(run: Run) -> dict[str, Any]:
    m = run.metrics
    return {
        "family": run.detector.family,
        "detector": run.detector.name,
        "auc": m["auc"],
        "tpr1": m["tpr_at_1fpr"],
        "tpr5": m["tpr_at_5fpr"],
        "f1": m["f1"],
        "acc": m["accuracy"],
        "kappa": m["kappa"],
        "reps": len(run.oof),
        "seconds": f"{run.seconds:.1f}",
    }


COLUMNS = [("family", "family"), ("detector", "detector"), ("auc", "AUC [95% CI]"), ("tpr1", "TPR@1%FPR"),
           ("tpr5", "TPR@5%FPR"), ("f1", "F1"), ("acc", "accuracy"), ("kappa", "kappa"), ("reps", "repeats"),
           ("seconds", "seconds")]


def goals(runs: list[Run], best_name: str | None) -> dict[str, Any]:
    """Issue #6 section 4 checks, from this run's numbers."""
    base = [r for r in runs if r.detector.family in BASELINE_FAMILIES]
    chosen = next((r for r in runs if r.detector.name == best_name), None)
    out: dict[str, Any] = {}
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


def _markdown(config: BenchmarkConfig, loaded: Loaded, runs: list[Run], g: dict[str, Any], n_splits: int,
              seconds: float, submit: str | None) -> str:
    pool = loaded.pool
    lab = pool.labelled
    n_used = int((pool.labels[lab] == 1).sum())
    lines = [
        f"# Benchmark: {Path(config.data).name}",
        "",
        f"Dev: {n_used} used vs {len(lab) - n_used} not-used images, {len(np.unique(pool.groups[lab]))} groups "
        f"({loaded.groups_from}); gallery: {len(pool.generated)} generated images; test: {loaded.n_test} real "
        "images (unlabelled).",
        f"Evaluation: {config.repeats} x {config.folds}-fold group-aware stratified CV ({n_splits} splits); "
        f"trained detectors on the first {config.trained_repeats} repeat(s). Scores out of fold, thresholds "
        "fitted on the training folds (max F1; SSIM: real-to-real quantile chosen by F1). Metrics averaged "
        f"over repeats, 95% stratified bootstrap intervals ({config.n_boot} resamples).",
        "",
        format_table([_row(r) for r in runs], COLUMNS),
    ]
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
        lines.append("")
    lines += ["Detectors:", ""]
    for r in runs:
        lines.append(f"- `{r.detector.name}` ({r.detector.family}): {r.detector.description}")
        for key, value in r.notes.items():
            text = ", ".join(f"{k} ({v}x)" for k, v in value.items()) if isinstance(value, dict) else value
            lines.append(f"  - {key.replace('_', ' ')}: {text}")
    lines += ["", "ROC curves (out-of-fold dev scores of the first repeat; the best detector of each family (a)-(d) "
              "and every (e) detector): `roc.png` (linear), `roc_log.png` (log FPR).", ""]
    if submit:
        lines.append(f"Test predictions: `submission.csv` and `scores.csv` from `{submit}`, threshold fitted on all "
                     "labelled dev images.")
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


def write_test_predictions(out: Path, pool: det.Pool, run: Run) -> float:
    """submission.csv (id,0|1, no header) and scores.csv (id,score) for the unlabelled real images.

    The threshold comes from all labelled dev images; trained detectors are refitted on all of them first.
    """
    lab = pool.labelled
    d = run.detector
    if d.needs_labels:
        log.info("%s: training on all %d labelled dev images for the test predictions", d.name, len(lab))
        s = d.score(pool, lab)
    else:
        s = run.full_scores
    assert s is not None
    t = d.threshold(pool, s, lab)
    test = np.flatnonzero(pool.labels < 0)
    write_csv_atomic(out / "submission.csv", [(pool.real_ids[i], int(s[i] >= t)) for i in test])
    write_csv_atomic(out / "scores.csv", [(pool.real_ids[i], f"{s[i]:.6g}") for i in test], header=("id", "score"))
    return float(t)


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
    log.info("loading %s", config.data)
    loaded = load_pool(config)
    pool = loaded.pool
    lab = pool.labelled
    y = pool.labels[lab]
    log.info("pool: %d generated, %d real (%d labelled, %d test), %d groups", len(pool.generated), len(pool.real),
             len(lab), loaded.n_test, len(np.unique(pool.groups)))
    splits = fpdata.repeated_group_kfold(y, pool.groups[lab], n_splits=config.folds, n_repeats=config.repeats,
                                         seed=config.seed)
    detectors = build_detectors(config)
    runs: list[Run] = []
    for i, d in enumerate(detectors, 1):
        log.info("[%d/%d] %s: %s", i, len(detectors), d.name, d.description)
        if isinstance(d, det.RankEnsemble | det.SelectedEnsemble):
            d.cache.update({r.detector.name: r.full_scores for r in runs if r.full_scores is not None})
        run = evaluate_detector(d, pool, splits, config.folds, config.trained_repeats)
        if isinstance(d, det.SelectedEnsemble):
            run.notes["chosen_on_training_folds"] = dict(Counter(" + ".join(c) for c in d.chosen).most_common())
        summarise(run, y, config.n_boot, config.seed)
        auc = run.metrics["auc"]
        log.info("[%d/%d] %s: AUC %.3f [%.3f, %.3f] in %.1f s", i, len(detectors), d.name, *auc, run.seconds)
        runs.append(run)

    sub = config.submit.strip().lower()
    if sub == "auto":
        sub = max(runs, key=lambda r: r.metrics["auc"][0]).detector.name
    submit_run = next((r for r in runs if r.detector.name == sub), None) if sub != "none" else None
    if sub != "none" and submit_run is None:
        raise ConfigError([f"{flag('submit')}: '{config.submit}' did not run; choose one of "
                           f"{', '.join(r.detector.name for r in runs)}"])
    # The goals judge our detector ("best") when it ran, whatever --submit says.
    judged = "best" if any(r.detector.name == "best" for r in runs) else (
        submit_run.detector.name if submit_run else None)
    g = goals(runs, judged)

    out.mkdir(parents=True, exist_ok=True)
    threshold = None
    if submit_run is not None and loaded.n_test:
        threshold = write_test_predictions(out, pool, submit_run)
        if isinstance(submit_run.detector, det.SelectedEnsemble):
            submit_run.notes["chosen_for_test"] = " + ".join(submit_run.detector.chosen[-1])
    elif submit_run is not None:
        log.warning("no unlabelled test images in %s: no submission written", config.data)
    write_roc_plots(out, Path(config.data).name, y, {r.detector.name: r.oof[0] for r in runs},
                    {r.detector.name: r.detector.family for r in runs},
                    {r.detector.name: r.metrics["auc"][0] for r in runs})
    write_csv_atomic(out / "dev_scores.csv",
                     [(pool.real_ids[j], int(y[i]), int(pool.groups[j]), *(f"{r.oof[0][i]:.6g}" for r in runs))
                      for i, j in enumerate(lab)],
                     header=("id", "label", "group", *(r.detector.name for r in runs)))
    seconds = time.perf_counter() - t_start
    md = _markdown(config, loaded, runs, g, len(splits), seconds, submit_run.detector.name if submit_run else None)
    write_text_atomic(out / "results.md", md)
    result = {
        "config": to_dict(config),
        "data": {"generated": len(pool.generated), "real": len(pool.real), "labelled": len(lab),
                 "used": int((y == 1).sum()), "test": loaded.n_test, "groups": int(len(np.unique(pool.groups))),
                 "groups_from": loaded.groups_from, "skipped": loaded.skipped},
        "splits": len(splits),
        "detectors": [{
            "name": r.detector.name, "family": r.detector.family, "description": r.detector.description,
            "needs_labels": r.detector.needs_labels, "seconds": r.seconds, "metrics": r.metrics,
            "per_repeat": r.per_repeat, "thresholds": r.thresholds, "notes": r.notes,
        } for r in runs],
        "goals": g,
        "submission": {"detector": submit_run.detector.name, "threshold": threshold} if submit_run else None,
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
    log.info("wrote %s in %.1f min", out, seconds / 60)
    return result
