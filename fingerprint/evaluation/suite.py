"""Choose a detector across a suite of benchmarks and report it on benchmarks it was not chosen on.

    fingerprint suite --suite benchmarks/zoo --extra ../shared/bench/ctbench-s0 --out benchmarks/suite

Why: dev cross-validation on one benchmark promised AUC 0.84 where its withheld test labels gave 0.68, because the
detector designs were chosen by looking at those dev scores. Here every choice is made on *other* benchmarks.

For every benchmark of ``--suite`` (a sub-folder in the shared layout, ``dev/`` and ``test/``, with
``test_labels.csv``) and every ``--candidates`` detector (presets of :data:`fingerprint.detectors.PRESETS`, plus
``frozen`` per ``--backbones``):

1. **dev-CV AUC**: the harness's group-aware repeated k-fold (:func:`fingerprint.evaluation.benchmark.
   evaluate_detector`), reading no labels beyond each split's training folds;
2. **test scores**: the candidate fitted on all dev labels (threshold from them), scoring ``test/real_unknown``.

Both are cached per (benchmark, candidate) in ``<out>/cache/<benchmark>/<candidate>.json``, keyed by the
benchmark's image content (``dev/``, ``test/``, a root manifest; not ``test_labels.csv`` nor ``groups.csv``) and
every setting that changes them, so a rerun skips finished work. ``test_labels.csv`` is read only afterwards, by
:func:`report`, to turn the cached test scores into a test AUC; nothing that fits or chooses reads it.

**Leave one benchmark out**: for each benchmark B, a rule picks a candidate from the dev-CV AUCs of the *other*
benchmarks only ('mean': highest mean AUC; 'worst': highest worst-case AUC; ties within :data:`TIE` go to the
simpler candidate, :data:`SIMPLICITY`). On B the report puts that candidate's dev-CV AUC (what a user tuning on B
sees) beside its test AUC (what it does), with a 95% interval from resampling whole pseudo-patient groups
(``groups.csv`` when it covers the test images, else the benchmark's inferred groups), and the best simple
baseline's test AUC on B (pixel NN, SSIM NN, frozen features). Rows are grouped by the generator family and
memorisation level of the benchmark's ``zoo.json`` (``unknown``/``?`` without one).

The candidate the rule picks on *all* suite benchmarks is fitted on each ``--extra`` benchmark's dev labels and
writes ``<out>/<benchmark>/submission.csv``, ``scores.csv`` and ``detector/``, as the harness's ``--submit`` does.

Writes ``<out>/suite.md``, ``<out>/suite.json`` and ``<out>/suite_auc.png``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from fingerprint.config import ConfigError, Range, check_fields, flag, to_dict, validate
from fingerprint.data import images as fpdata
from fingerprint.data.imagesets import GROUPS_FILE, groups_file, load_fit_data
from fingerprint.detectors import PRESETS, Detector, FitData, finish_fit, needs_recipe
from fingerprint.detectors.base import TARGET_FPR, THRESHOLD_METHOD
from fingerprint.evaluation.benchmark import (
    ALIASES,
    BASELINE_FAMILIES,
    SUBMISSION_TARGET_FPR,
    SUBMISSION_THRESHOLD,
    BenchmarkConfig,
    Fitted,
    build_detectors,
    evaluate_detector,
    family_of,
    fit_for_submission,
    recipe_problems,
    summarise,
    threshold_text,
    write_test_predictions,
)
from fingerprint.evaluation.memorisation import ALPHA, POWER, format_p
from fingerprint.evaluation.metrics import bootstrap_ci, format_table
from fingerprint.evaluation.thresholds import false_positives
from fingerprint.features.backbones import weights_file
from fingerprint.io import read_labels, write_text_atomic
from fingerprint.zoo.build import NULL_LEVEL, generator_recipe

log = logging.getLogger(__name__)

__all__ = [
    "SuiteConfig", "Bench", "discover", "run", "evaluate_benchmark", "report", "choose",
    "read_test_labels", "zoo_info", "content_hash", "COUNTERS",
]

DEFAULT_CANDIDATES = ("pixel_l2,pixel_ncc,pixel_mass,subspace_mass,gradient_nn,domain_clf,ssim,best,pixel_ncc_cal,"
                      "gradient_cal,ssim_cal,cal_ensemble,shadow_gradient,shadow_ensemble")
SIMPLICITY = ("pixel_l2", "pixel_ncc", "ssim", "pixel_mass", "subspace_mass", "gradient_nn", "pixel_ncc_cal",
              "gradient_cal", "ssim_cal", "cal_ensemble", "shadow_gradient", "shadow_ensemble", "frozen",
              "domain_clf", "ab_rank", "triplet", "best")
"""Simplest first: a tie in a rule goes to the candidate earliest here (frozen_*/triplet_* by their kind)."""
TIE = 1e-3
"""Rule values (mean or worst-case dev-CV AUC) within this of the best count as a tie."""
RULES = ("mean", "worst")
CACHE_VERSION = 3
CACHE_DIR = "cache"
LABELS_FILE, ZOO_FILE = "test_labels.csv", "zoo.json"

COUNTERS: dict[str, int] = {"evaluated": 0, "reused": 0, "loaded": 0, "submitted": 0}
"""Work done by this process: (benchmark, candidate) pairs evaluated and reused from the cache, benchmarks
loaded, extra submissions written. Tests read it to check that a rerun refits nothing."""


# ----------------------------------------------------------------------------------------------- config


@dataclass
class SuiteConfig:
    suite: str = ""
    """Folder whose sub-folders are benchmarks in the shared layout (dev/, test/) each with test_labels.csv
    (id,label) next to them, as `fingerprint sample-data` and the generator zoo write; optional zoo.json
    (family, memorisation) and groups.csv (id,group). test_labels.csv is read only to report test AUCs."""
    extra: str = ""
    """Comma-separated benchmark folders without test labels (e.g. ../shared/bench/ctbench-s0): the detector
    chosen on the whole suite is fitted on their dev labels and writes <out>/<name>/submission.csv, scores.csv
    and detector/."""
    extra_recipes: str = ""
    """Comma-separated generator recipes (JSON files shaped like zoo.json, as `fingerprint benchmark --recipe`),
    one per --extra benchmark in order, an empty entry for none: with one, the suite's choice may train shadow
    generators there; without, a benchmark lacking zoo.json gets the best candidate that trains none."""
    out: str = "benchmarks/suite"
    """Output folder: suite.md, suite.json, suite_auc.png, cache/ (per benchmark and candidate), and one folder
    per --extra benchmark."""
    candidates: str = DEFAULT_CANDIDATES
    """Comma-separated presets of fingerprint.detectors.PRESETS to choose among (a fixed, small set: every
    one is run on every benchmark); 'triplet' adds the triplet network per --backbones (slow on CPU). The shadow
    presets train 4 generators of each benchmark's family per benchmark: most of the suite's time."""
    backbones: str = ""
    """Comma-separated timm backbones: each adds a frozen_<backbone> candidate (frozen features, cosine);
    'auto' = every <name>.safetensors in --weights-dir; empty = no network candidates."""
    weights_dir: str = ""
    """Folder with offline timm weights <backbone>.safetensors (e.g. ../shared/weights), 'none' (random weights,
    smoke tests) or 'hub'; needed with --backbones."""
    rule: Literal["mean", "worst"] = "mean"
    """The rule whose choice is reported first and picks the detector for --extra: 'mean' = highest mean dev-CV
    AUC over the benchmarks chosen on, 'worst' = highest worst-case; ties go to the simpler candidate. Both are
    reported."""
    folds: Annotated[int, Range(2)] = 5
    """Folds of the group-aware stratified dev cross-validation on each benchmark."""
    repeats: Annotated[int, Range(1)] = 3
    """Repeats of the k-fold; dev-CV AUC is the mean over repeats."""
    trained_repeats: Annotated[int, Range(1)] = 1
    """Repeats on which costly label-trained candidates (triplet) are refitted per fold."""
    image_size: Annotated[int, Range(16)] = 64
    """Side in pixels for the pixel, SSIM, subspace, gradient and domain detectors."""
    frozen_image_size: Annotated[int, Range(16)] = 128
    """Input size of the frozen backbones."""
    group_threshold: Annotated[float, Range(-1, 1)] = 0.95
    """Pseudo-patient grouping of real images without group ids (fingerprint.data.images.infer_groups)."""
    n_boot: Annotated[int, Range(10)] = 1000
    """Bootstrap resamples for the intervals (whole pseudo-patient groups for the test AUC)."""
    seed: int = 0
    """Seed for the splits, the bootstrap and the domain classifier's cross-fitting."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for network candidates."""
    skip_bad: bool = False
    """Skip unreadable image files instead of stopping at the first one."""

    # -- parsed flags

    def candidate_names(self) -> list[str]:
        """Preset names asked for (aliases resolved), plus 'triplet' when asked; frozen comes from --backbones."""
        out: list[str] = []
        for tok in (t.strip().lower() for t in self.candidates.split(",")):
            tok = ALIASES.get(tok, tok)
            if tok and tok not in out:
                out.append(tok)
        return out

    def extras(self) -> list[Path]:
        return [Path(p) for p in _split(self.extra)]

    def recipes(self) -> list[str]:
        """--extra-recipes, one entry per --extra benchmark ('' for none)."""
        given = [r.strip() for r in self.extra_recipes.split(",")] if self.extra_recipes.strip() else []
        return given + [""] * (len(self.extras()) - len(given))

    def benchmark_config(self, data: str | Path = "", recipe: str = "") -> BenchmarkConfig:
        """The harness's settings for one benchmark of this suite (presets, splits, fitting)."""
        asked = [n for n in self.candidate_names() if n in PRESETS] + (["frozen"] if self.backbones.strip() else [])
        asked += ["triplet"] if "triplet" in self.candidate_names() else []
        return BenchmarkConfig(
            data=str(data), detectors=",".join(asked), backbones=self.backbones.strip() or "auto",
            weights_dir=self.weights_dir, folds=self.folds, repeats=self.repeats,
            trained_repeats=min(self.trained_repeats, self.repeats), image_size=self.image_size,
            frozen_image_size=self.frozen_image_size, group_threshold=self.group_threshold, n_boot=self.n_boot,
            seed=self.seed, device=self.device, skip_bad=self.skip_bad, submit="none", recipe=recipe)

    def problems(self) -> list[str]:
        out = check_fields(self)
        out += suite_problems(self.suite)
        names = [b.name for b in discover(self.suite)] if not out else []
        for p in self.extras():
            if not (p / "dev").is_dir() or not (p / "test" / "real_unknown").is_dir():
                out.append(f"{flag('extra')}: '{p}' is not a benchmark folder with dev/ and test/real_unknown/")
            elif p.name in names or p.name == CACHE_DIR:
                out.append(f"{flag('extra')}: '{p}' is named like a --suite benchmark or '{CACHE_DIR}'; its "
                           f"outputs go to <out>/{p.name}: rename or copy it")
            names.append(p.name)
        if self.extra_recipes.strip() and len(self.extra_recipes.split(",")) > len(self.extras()):
            out.append(f"{flag('extra_recipes')}: {len(self.extra_recipes.split(','))} entries for "
                       f"{len(self.extras())} {flag('extra')} benchmark(s); give one per benchmark, in order")
        for r in self.recipes():
            out += recipe_problems(r, "extra_recipes")
        asked = self.candidate_names()
        known = [*PRESETS, "triplet"]
        unknown = [n for n in asked if n not in known]
        if unknown:
            out.append(f"{flag('candidates')}: unknown {', '.join(unknown)}; use some of {', '.join(PRESETS)} "
                       f"(frozen features come from {flag('backbones')})")
        if not asked and not self.backbones.strip():
            out.append(f"{flag('candidates')}: name at least one candidate")
        if self.backbones.strip() or "triplet" in asked:
            if not self.weights_dir:
                out.append(f"{flag('weights_dir')}: network candidates need weights: a folder such as "
                           "../shared/weights, 'none' or 'hub'")
            elif self.weights_dir not in ("none", "hub") and not Path(self.weights_dir).is_dir():
                out.append(f"{flag('weights_dir')}: '{self.weights_dir}' is not a folder")
            elif self.backbones.strip() in ("", "auto") and self.weights_dir in ("none", "hub"):
                out.append(f"{flag('backbones')}: name the backbones (e.g. resnet18) with "
                           f"{flag('weights_dir')} {self.weights_dir}")
            elif self.backbones.strip() not in ("", "auto") and self.weights_dir not in ("none", "hub"):
                missing = [b for b in _split(self.backbones) if weights_file(self.weights_dir, b) is None]
                if missing:
                    out.append(f"{flag('backbones')}: no <backbone>.safetensors in '{self.weights_dir}' for "
                               f"{', '.join(missing)}")
        if self.trained_repeats > self.repeats:
            out.append(f"{flag('trained_repeats')}: at most {flag('repeats')} ({self.repeats})")
        return out


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def discover(suite: str | Path) -> list[Path]:
    """The benchmark sub-folders of ``suite`` (those with ``dev/``), sorted by name; hidden folders skipped."""
    root = Path(suite)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "dev").is_dir())


def suite_problems(suite: str) -> list[str]:
    """What is wrong with --suite: missing, no benchmarks, fewer than two, or a benchmark that cannot be reported."""
    f = flag("suite")
    if not suite:
        return [f"{f}: required, a folder of benchmark sub-folders (each with dev/, test/ and {LABELS_FILE})"]
    root = Path(suite)
    if not root.is_dir():
        return [f"{f}: '{suite}' is not a folder"]
    benches = discover(root)
    if not benches:
        hint = (" (it is itself one benchmark: put it in a folder with others and give that folder)"
                if (root / "dev").is_dir() else "")
        return [f"{f}: '{suite}' holds no benchmark sub-folders (each with dev/ and test/){hint}"]
    out = []
    if len(benches) < 2:
        out.append(f"{f}: '{suite}' holds one benchmark ({benches[0].name}); leaving one out needs at least two")
    for b in benches:
        if not (b / LABELS_FILE).is_file():
            out.append(f"{f}: benchmark '{b}' has no {LABELS_FILE} (id,label for test/real_unknown); a suite "
                       f"benchmark needs test labels to be reported on (give it with {flag('extra')} instead)")
        if not (b / "test" / "real_unknown").is_dir():
            out.append(f"{f}: benchmark '{b}' has no test/real_unknown/ folder")
    return out


# ------------------------------------------------------------------------------------------- benchmarks


@dataclass
class Bench:
    """A benchmark of the suite (or an --extra one) and what its zoo.json says about its generator."""

    path: Path
    family: str = "unknown"
    memorisation: str = "?"
    zoo: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def split_key(self) -> str | None:
        """Digest of the zoo's images labelled used (``split.json``), None where unknown: benchmarks with the same
        key share their real images' split, so one cannot be held out while choosing on the other.

        The released labels, not the training set: a null control's labelled used images are those of an ordinary
        build with its seed, while its training set is another draw."""
        file = self.path / "split.json"
        try:
            split = json.loads(file.read_text()) if file.is_file() else {}
            files = split.get("files")
            members = ([f["source"] for f in files.values() if f.get("label") == 1] if isinstance(files, dict)
                       else split.get("members"))
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return None
        return hashlib.sha256(json.dumps(sorted(map(str, members))).encode()).hexdigest()[:16] if members else None


def zoo_info(path: str | Path) -> tuple[str, str, dict[str, Any]]:
    """(family, memorisation level, raw) from ``<path>/zoo.json``; ('unknown', '?', {}) without a usable one.

    The memorisation level is looked for at the top level and then in any nested settings dict, under a key
    that starts with 'memoris' or 'memoriz' (memorisation, memorization, memorisation_level), else a top-level
    'level', else from the zoo's own pixel-NN check (:func:`memorisation_level`).
    """
    file = Path(path) / ZOO_FILE
    try:
        raw = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); family unknown", file, e)
        raw = {}
    if not isinstance(raw, dict):
        raw = {}
    family = str(raw.get("family") or raw.get("generator") or "unknown")

    def find(d: dict[str, Any]) -> Any:
        for k, v in d.items():
            if str(k).lower().startswith(("memoris", "memoriz")) and not isinstance(v, dict):
                return v
        for v in d.values():
            if isinstance(v, dict) and (hit := find(v)) is not None:
                return hit
        return None

    mem = find(raw)
    mem = raw.get("level") if mem is None and not isinstance(raw.get("level"), dict) else mem
    if mem is None and isinstance(raw.get("checks"), dict) and "nn_l2_auc_test" in raw["checks"]:
        mem = memorisation_level(float(raw["checks"]["nn_l2_auc_test"]))
    level = "?" if mem is None else (f"{mem:g}" if isinstance(mem, int | float) else str(mem))
    return family, level, raw


def memorisation_level(nn_auc: float) -> str:
    """A zoo benchmark's memorisation level from its own check (pixel-NN test AUC, from the answer key): only
    to group the report, never to choose."""
    return "strong" if nn_auc >= 0.9 else "moderate" if nn_auc >= 0.65 else "weak"


def make_bench(path: str | Path) -> Bench:
    family, mem, raw = zoo_info(path)
    return Bench(Path(path), family, mem, raw)


def content_hash(path: str | Path) -> str:
    """sha256 of every file under ``dev/`` and ``test/`` (relative path and bytes), a root manifest.csv and
    groups.csv (the folds and intervals follow it).

    ``test_labels.csv``, ``zoo.json`` and the README are left out: what a shadow candidate reads from zoo.json (the
    generator's recipe) is part of its settings, hence of the cache key.
    """
    root = Path(path)
    h = hashlib.sha256()
    files = [p for sub in ("dev", "test") for p in (root / sub).rglob("*") if p.is_file()]
    files += [root / name for name in (fpdata.MANIFEST_NAME, GROUPS_FILE) if (root / name).is_file()]
    for p in sorted(files):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def read_test_labels(bench: Path) -> dict[str, int]:
    """``test_labels.csv`` (id,label) of a suite benchmark. Only :func:`report` calls this."""
    try:
        return read_labels(bench / LABELS_FILE)
    except ValueError as e:
        raise ConfigError([f"{flag('suite')}: {e}"]) from None


def test_groups(bench: Path, ids: Sequence[str]) -> tuple[np.ndarray, str] | None:
    """Patient groups of ``ids`` from the benchmark's ``groups.csv``, or None when it is absent or misses one."""
    found = groups_file(bench, list(ids))
    return None if found is None else (found, GROUPS_FILE)


# ------------------------------------------------------------------------------------------- candidates


def build_candidates(config: SuiteConfig, data: str | Path = "", recipe: str = "") -> list[Detector]:
    """Unfitted candidates in --candidates order (frozen_<backbone> after the presets, then triplet_*)."""
    bconf = config.benchmark_config(data, recipe)
    built = {d.name: d for d in build_detectors(bconf)}
    order = [n for n in config.candidate_names() if n in PRESETS]
    nets = [n for n in built if n.startswith("frozen_")] + [n for n in built if n.startswith("triplet_")]
    return [built[n] for n in order + nets]


def simplicity(name: str) -> int:
    base = name.split("_", 1)[0] if name.startswith(("frozen_", "triplet_")) else name
    return SIMPLICITY.index(base) if base in SIMPLICITY else len(SIMPLICITY)


@functools.cache
def code_digest() -> str:
    """sha256 of the code that makes scores (detectors, features, k-NN, image loading): a change refits."""
    import fingerprint

    root = Path(fingerprint.__file__).parent
    h = hashlib.sha256()
    # zoo/: shadow candidates train its generators.
    for p in sorted([*root.glob("detectors/**/*.py"), *root.glob("features/*.py"), root / "knn.py",
                     *root.glob("data/*.py"), *root.glob("zoo/*.py")]):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_key(config: SuiteConfig, d: Detector, digest: str) -> dict[str, Any]:
    """Everything a cached (benchmark, candidate) result depends on, the scoring code included."""
    return {"version": CACHE_VERSION, "code": code_digest(), "content": digest, "kind": d.kind,
            "settings": d.meta.settings, "folds": config.folds, "repeats": config.repeats,
            "trained_repeats": min(config.trained_repeats, config.repeats), "group_threshold": config.group_threshold,
            "n_boot": config.n_boot, "seed": config.seed, "skip_bad": config.skip_bad}


def _cache_file(out: Path, bench: str, candidate: str) -> Path:
    return out / CACHE_DIR / bench / f"{candidate}.json"


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # Round-trip the key through JSON so tuples and lists compare equal.
    return cached if cached.get("key") == json.loads(json.dumps(key, default=str)) else None


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return None if not np.isfinite(v) else float(v)
    return v


# ------------------------------------------------------------------------------------------- evaluation


def evaluate_benchmark(config: SuiteConfig, bench: Bench, out: Path) -> dict[str, dict[str, Any]]:
    """Dev-CV results and test scores of every candidate on ``bench``: from the cache, or computed and cached.

    Reads the benchmark's images and dev labels only (``load_fit_data``); the data are loaded only when some
    candidate is not cached.
    """
    digest = content_hash(bench.path)
    candidates = build_candidates(config, bench.path)
    results: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Detector, dict[str, Any]]] = []
    for d in candidates:
        key = cache_key(config, d, digest)
        cached = _read_cache(_cache_file(out, bench.name, d.name), key)
        if cached is not None:
            COUNTERS["reused"] += 1
            results[d.name] = cached
        else:
            todo.append((d, key))
    if not todo:
        log.info("%s: every candidate cached", bench.name)
        return results
    log.info("loading %s (%d candidate(s) to evaluate)", bench.path, len(todo))
    COUNTERS["loaded"] += 1
    bconf = config.benchmark_config(bench.path)
    data = load_fit_data(bench.path, val_fraction=0.0, seed=config.seed, skip_bad=config.skip_bad,
                         group_threshold=config.group_threshold)
    lab = data.train
    y = data.labels[lab]
    test = np.flatnonzero(data.labels < 0)
    if not len(test):
        raise ConfigError([f"{flag('suite')}: benchmark '{bench.path}' has no test/real_unknown images"])
    splits = fpdata.repeated_group_kfold(y, data.groups[lab], n_splits=config.folds, n_repeats=config.repeats,
                                         seed=config.seed)
    fitted = Fitted(data, bconf)
    for d, key in todo:
        t0 = time.perf_counter()
        run_ = evaluate_detector(d, data, splits, config.folds, bconf.trained_repeats, fitted)
        summarise(run_, y, config.n_boot, config.seed, groups=data.groups[lab])
        final = fit_for_submission(run_, data, fitted)
        s = final.score([data.real[i] for i in test], [data.real_ids[i] for i in test])
        # The product's decision rule (fit, the registry, the service) beside the submission's max F1, so the
        # report can count the false accusations each makes.
        dev_s = final.score([data.real[i] for i in lab], [data.real_ids[i] for i in lab])
        product_threshold = float(final.choose_threshold(y, dev_s, THRESHOLD_METHOD, TARGET_FPR))
        product_fp = false_positives(y, dev_s.score, product_threshold, data.groups[lab])
        result = {
            "key": key,
            "benchmark": bench.name,
            "candidate": d.name,
            "kind": d.kind,
            "settings": d.meta.settings,
            "family": family_of(d),
            "signal": d.signal,
            "learns": d.learns,
            "dev": {
                "auc": list(run_.metrics["auc"]),
                "per_repeat_auc": [m["auc"][0] for m in run_.per_repeat],
                "tpr_at_1fpr": run_.metrics["tpr_at_1fpr"][0],
                "f1": run_.metrics["f1"][0],
                "memorisation_p": run_.memorisation.p_value,
                "memorisation_detectable_auc": run_.memorisation.detectable_auc,
                "labelled": int(len(lab)),
                "used": int((y == 1).sum()),
                "splits": len(splits),
            },
            "test": {
                "ids": [data.real_ids[i] for i in test],
                "scores": s.score.tolist(),
                "decisions": final.decide(s).tolist(),
                "groups": data.groups[test].tolist(),
                "threshold": final.threshold,
                "product_decisions": (s.score >= product_threshold).astype(np.int64).tolist(),
                "product_threshold": product_threshold,
                "product_dev_not_used_flagged": product_fp.rate,
                # What that rate on the dev set can promise about new images: the bound, counted over
                # pseudo-patient groups.
                "product_false_positives": to_dict(product_fp),
            },
            "notes": run_.notes,
            "seconds": time.perf_counter() - t0,
        }
        result = _plain(result)
        result["key"] = json.loads(json.dumps(key, default=str))
        write_text_atomic(_cache_file(out, bench.name, d.name), json.dumps(result))
        COUNTERS["evaluated"] += 1
        log.info("%s / %s: dev-CV AUC %.3f in %.1f s", bench.name, d.name, result["dev"]["auc"][0],
                 result["seconds"])
        results[d.name] = result
    return results


# --------------------------------------------------------------------------------------------- choosing


def choose(dev_auc: dict[str, dict[str, float]], on: Sequence[str], rule: str,
           among: Sequence[str] | None = None) -> tuple[str, float]:
    """The candidate ``rule`` picks from the dev-CV AUCs of benchmarks ``on`` (``dev_auc[bench][candidate]``).

    'mean': highest mean AUC over ``on``; 'worst': highest minimum. Values within :data:`TIE` of the best tie,
    and a tie goes to the simplest candidate (:data:`SIMPLICITY`, then name). Returns (candidate, its value).
    Only the benchmarks in ``on`` are read.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not on:
        raise ValueError("choose: no benchmarks to choose on")
    names = list(among) if among is not None else list(dev_auc[on[0]])
    agg = np.mean if rule == "mean" else np.min
    value = {c: float(agg([dev_auc[b][c] for b in on])) for c in names}
    top = max(value.values())
    pick = min((c for c in names if value[c] >= top - TIE), key=lambda c: (simplicity(c), c))
    return pick, value[pick]


# --------------------------------------------------------------------------------------------- intervals


# ----------------------------------------------------------------------------------------------- report


def _flag_shares(decisions: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Shares of all images and of the non-members (label 0) that ``decisions`` flag."""
    return float(decisions.mean()), int(((decisions == 1) & (y == 0)).sum()) / max(int((y == 0).sum()), 1)


def held_out_metrics(bench: Bench, result: dict[str, Any], labels: dict[str, int], n_boot: int,
                 seed: int) -> dict[str, Any]:
    """Test AUC [group-bootstrap interval], and at the dev threshold F1, the share of test images flagged and the
    share of test non-members flagged (false accusations), of one cached result, against ``labels``; the same two
    shares at the product's threshold (``*_product``)."""
    ids = result["test"]["ids"]
    missing = [i for i in ids if i not in labels]
    if missing:
        raise ConfigError([f"{flag('suite')}: {bench.path / LABELS_FILE} has no label for {len(missing)} test "
                           f"image(s), e.g. {missing[:3]}"])
    y = np.array([labels[i] for i in ids], dtype=np.int64)
    if len(np.unique(y)) < 2:
        raise ConfigError([f"{flag('suite')}: {bench.path / LABELS_FILE}: the test images need both labels 0 "
                           "and 1 for an AUC"])
    s = np.asarray(result["test"]["scores"], dtype=np.float64)
    found = test_groups(bench.path, ids)
    groups, source = found if found else (np.asarray(result["test"]["groups"]), "inferred")
    boot = bootstrap_ci(y, s, groups=groups, n_boot=n_boot, seed=seed)
    auc = boot["auc"]
    d = np.asarray(result["test"]["decisions"], dtype=np.int64)
    tp, fp, fn = int(((d == 1) & (y == 1)).sum()), int(((d == 1) & (y == 0)).sum()), int(((d == 0) & (y == 1)).sum())
    flagged, accused = _flag_shares(d, y)
    flagged_product, accused_product = _flag_shares(
        np.asarray(result["test"]["product_decisions"], dtype=np.int64), y)
    return {"auc": list(auc), "tpr_at_1fpr": list(boot["tpr_at_1fpr"]), "f1": 2 * tp / max(2 * tp + fp + fn, 1),
            "flagged": flagged, "false_accusations": accused,
            "flagged_product": flagged_product, "false_accusations_product": accused_product,
            "n": int(len(y)), "used": int(y.sum()),
            "groups": int(len(np.unique(groups))), "groups_from": source}


def report(config: SuiteConfig, benches: list[Bench], results: dict[str, dict[str, dict[str, Any]]]
           ) -> dict[str, Any]:
    """The leave-one-benchmark-out report from cached results; the only reader of ``test_labels.csv``."""
    names = [b.name for b in benches]
    cands = list(results[names[0]])
    info = {c: results[names[0]][c] for c in cands}
    baselines = [c for c in cands if info[c]["family"] in BASELINE_FAMILIES]
    dev = {b: {c: float(results[b][c]["dev"]["auc"][0]) for c in cands} for b in names}
    # The choices first, from dev-CV AUCs only; test labels are read below, for reporting.
    choices = {}
    split = {b.name: b.split_key for b in benches}
    # A null control's dev-CV AUCs are noise around 0.5, and the detectors scoring above it there pick up
    # something other than memorisation: they are reported, never chosen on (what is a null is known from the
    # build, not measured).
    choosable = [b.name for b in benches if b.memorisation != NULL_LEVEL] or names
    shared: dict[str, list[str]] = {}
    for b in names:
        # Benchmarks drawn on the same split share any chance difference between its members and non-members:
        # held out together, so the choice never rests on another copy of the same draw.
        shared[b] = [o for o in names if o != b and split[b] is not None and split[o] == split[b]]
        others = [o for o in choosable if o != b] or [o for o in names if o != b]
        rest = [o for o in others if o not in shared[b]] or others
        choices[b] = {rule: choose(dev, rest, rule) for rule in RULES}
        choices[b]["baseline"] = choose(dev, rest, config.rule, baselines) if baselines else None
        choices[b]["own_dev"] = choose(dev, [b], "mean")
    suite_choice = {rule: choose(dev, choosable, rule) for rule in RULES}

    test: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in benches:
        labels = read_test_labels(bench.path)
        test[bench.name] = {c: held_out_metrics(bench, results[bench.name][c], labels, config.n_boot, config.seed)
                            for c in cands}
    t_auc = {b: {c: test[b][c]["auc"][0] for c in cands} for b in names}

    rows = []
    for bench in benches:
        b = bench.name
        pick, rest_value = choices[b][config.rule]
        other_rule = next(r for r in RULES if r != config.rule)
        alt = choices[b][other_rule][0]
        row: dict[str, Any] = {
            "benchmark": b, "family": bench.family, "memorisation": bench.memorisation,
            "chosen": pick, "rule": config.rule, "rule_value_on_rest": rest_value,
            "dev_auc": dev[b][pick], "dev_auc_ci": results[b][pick]["dev"]["auc"],
            "test_auc": t_auc[b][pick], "test_auc_ci": test[b][pick]["auc"], "test_f1": test[b][pick]["f1"],
            "test_tpr_at_1fpr": test[b][pick]["tpr_at_1fpr"][0],
            "test_flagged": test[b][pick]["flagged"], "test_false_accusations": test[b][pick]["false_accusations"],
            "test_flagged_product": test[b][pick]["flagged_product"],
            "test_false_accusations_product": test[b][pick]["false_accusations_product"],
            # Absent from results cached before the bound was recorded.
            "dev_fpr_bound_product": (results[b][pick]["test"].get("product_false_positives") or {}).get("bound"),
            "dev_memorisation_p": results[b][pick]["dev"].get("memorisation_p"),
            "dev_memorisation_detectable_auc": results[b][pick]["dev"].get("memorisation_detectable_auc"),
            "optimism": dev[b][pick] - t_auc[b][pick],
            "other_rule": other_rule, "other_rule_chosen": alt, "other_rule_test_auc": t_auc[b][alt],
            "test_n": test[b][pick]["n"], "test_groups": test[b][pick]["groups"],
            "groups_from": test[b][pick]["groups_from"], "held_out_with": shared[b],
        }
        if baselines:
            best_base = max(baselines, key=lambda c: (t_auc[b][c], -simplicity(c)))
            fair = choices[b]["baseline"][0]
            row.update(best_baseline=best_base, best_baseline_test_auc=t_auc[b][best_base],
                       margin=t_auc[b][pick] - t_auc[b][best_base], baseline_chosen_on_rest=fair,
                       baseline_chosen_on_rest_test_auc=t_auc[b][fair],
                       margin_over_chosen_baseline=t_auc[b][pick] - t_auc[b][fair])
        own = choices[b]["own_dev"][0]
        oracle = max(cands, key=lambda c: (t_auc[b][c], -simplicity(c)))
        row.update(own_dev_pick=own, own_dev_pick_dev_auc=dev[b][own], own_dev_pick_test_auc=t_auc[b][own],
                   own_dev_optimism=dev[b][own] - t_auc[b][own], hindsight_best=oracle,
                   hindsight_best_test_auc=t_auc[b][oracle])
        rows.append(row)

    families = []
    levels = {fam: {r["memorisation"] for r in rows if r["family"] == fam} for fam in {r["family"] for r in rows}}
    levels = {fam: lv - {NULL_LEVEL} for fam, lv in levels.items()}  # a null control is never in "all"
    keys = sorted({(r["family"], r["memorisation"]) for r in rows}
                  | {(fam, "all") for fam, lv in levels.items() if len(lv) > 1})
    for key in keys:
        rs = [r for r in rows if r["family"] == key[0]
              and (r["memorisation"] == key[1] or (key[1] == "all" and r["memorisation"] != NULL_LEVEL))]
        fam = {"family": key[0], "memorisation": key[1], "benchmarks": len(rs),
               "dev_auc": float(np.mean([r["dev_auc"] for r in rs])),
               "test_auc": float(np.mean([r["test_auc"] for r in rs])),
               "optimism": float(np.mean([r["optimism"] for r in rs])),
               "above_chance": f"{sum(r['test_auc_ci'][1] > 0.5 for r in rs)}/{len(rs)}",
               "chosen": ", ".join(sorted({r["chosen"] for r in rs}))}
        if baselines:
            fam["margin"] = float(np.mean([r["margin"] for r in rs]))
        families.append(fam)
    per_image = [c for c in cands if info[c]["signal"] != "distribution"]
    for r in rows:
        # "Nothing to find" on B: a null control, or no per-image candidate's test AUC interval lies above chance
        # (read from test labels, so it only sorts the report, as the memorisation level does). A
        # distribution-level detector above chance shows a shift between the sets, not that single images were
        # memorised.
        r["signal_on_test"] = r["memorisation"] != NULL_LEVEL and any(
            test[r["benchmark"]][c]["auc"][1] > 0.5 for c in per_image)
    return {
        "goals": goal_checks(rows) if baselines else [],
        "benchmarks": [{"name": b.name, "path": str(b.path), "family": b.family, "memorisation": b.memorisation,
                        "zoo": b.zoo} for b in benches],
        "candidates": [{"name": c, "kind": info[c]["kind"], "family": info[c]["family"],
                        "signal": info[c]["signal"], "baseline": c in baselines} for c in cands],
        "dev_auc": dev,
        "test_auc": {b: {c: test[b][c]["auc"] for c in cands} for b in names},
        "leave_one_out": rows,
        "families": families,
        "suite_choice": {rule: {"candidate": v[0], "value": v[1]} for rule, v in suite_choice.items()},
        "rule": config.rule,
    }


STRONG_BASELINE, STRONG_AUC, STRONG_TPR = 0.9, 0.97, 0.6
"""Where the best baseline's test AUC reaches STRONG_BASELINE, the goal is AUC >= STRONG_AUC and TPR at 1% FPR
>= STRONG_TPR."""
AHEAD, FLOOR = 0.05, 0.45
"""Below STRONG_BASELINE the goal is a margin of AHEAD over the best baseline; no test AUC below FLOOR."""


def goal_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each held-out benchmark against the detector's goals: one record per (benchmark, goal) that applies.

    A null control (nothing labelled used was trained on) has nothing to find, so no baseline to beat: only the
    floor and the memorisation test's "no evidence" apply there."""
    out = []
    for r in rows:
        b, auc, base = r["benchmark"], r["test_auc"], r["best_baseline_test_auc"]
        if r["memorisation"] != NULL_LEVEL:
            need = base if base >= STRONG_BASELINE else base + AHEAD
            out.append({"benchmark": b, "target": need, "value": auc, "met": auc >= need,
                        "goal": f"test AUC >= best baseline{'' if base >= STRONG_BASELINE else ' + 0.05'}"})
            if base >= STRONG_BASELINE:
                out.append({"benchmark": b, "goal": f"test AUC >= {STRONG_AUC}", "target": STRONG_AUC, "value": auc,
                            "met": auc >= STRONG_AUC})
                tpr = r["test_tpr_at_1fpr"]
                out.append({"benchmark": b, "goal": f"test TPR at 1% FPR >= {STRONG_TPR}", "target": STRONG_TPR,
                            "value": tpr, "met": tpr >= STRONG_TPR})
        out.append({"benchmark": b, "goal": f"test AUC >= {FLOOR}", "target": FLOOR, "value": auc,
                    "met": auc >= FLOOR})
        p = r.get("dev_memorisation_p")
        if not r["signal_on_test"] and p is not None:
            out.append({"benchmark": b, "goal": f"no signal on test: dev memorisation test p > {ALPHA}",
                        "target": ALPHA, "value": p, "met": p > ALPHA})
    return out


def _over(gap: np.ndarray) -> str:
    """How often dev-CV promised more than the test gave, in words."""
    k = int((gap > 0.02).sum())
    return f"dev-CV promised over 0.02 AUC more than the test gave on {k} of {len(gap)} benchmarks"


def conclusions(rep: dict[str, Any]) -> list[str]:
    """What a user may conclude, in sentences built from the numbers (null controls apart)."""
    nulls = [r for r in rep["leave_one_out"] if r["memorisation"] == NULL_LEVEL]
    rows = [r for r in rep["leave_one_out"] if r["memorisation"] != NULL_LEVEL] or rep["leave_one_out"]
    n = len(rows)
    where = f" with something to find (the {len(nulls)} null control(s) below apart)" if nulls else ""
    dev = np.array([r["dev_auc"] for r in rows])
    tst = np.array([r["test_auc"] for r in rows])
    above = sum(r["test_auc_ci"][1] > 0.5 for r in rows)
    own_dev = np.array([r["own_dev_pick_dev_auc"] for r in rows])
    own_test = np.array([r["own_dev_pick_test_auc"] for r in rows])
    picks = sorted({r["chosen"] for r in rows})
    out = [
        f"- Chosen on the other benchmarks ({rep['rule']} rule), the detector reached a mean test AUC of "
        f"{tst.mean():.3f} (range {tst.min():.3f}-{tst.max():.3f}) over {n} held-out benchmarks{where}, where its "
        f"dev-CV AUC on the same benchmarks averaged {dev.mean():.3f} (dev - test {np.mean(dev - tst):+.3f}; "
        f"{_over(dev - tst)}).",
        f"- Its test AUC interval (whole pseudo-patient groups resampled) lies above 0.5 on {above} of {n} "
        "benchmarks; where it does not, this suite gives no evidence of membership signal for that benchmark.",
        f"- Tuning on each benchmark's own dev-CV instead would have promised {own_dev.mean():.3f} and delivered "
        f"{own_test.mean():.3f} (dev - test {np.mean(own_dev - own_test):+.3f}; {_over(own_dev - own_test)}): "
        "the number to quote is the held-out test AUC, not the best dev-CV AUC of the benchmark itself.",
        f"- The held-out choice was {'always ' + picks[0] if len(picks) == 1 else 'not stable: ' + ', '.join(picks)}"
        f"; on the whole suite the {rep['rule']} rule picks {rep['suite_choice'][rep['rule']]['candidate']}.",
    ]
    if rows and "margin" in rows[0]:
        m = np.array([r["margin"] for r in rows])
        mf = np.array([r["margin_over_chosen_baseline"] for r in rows])
        out.append(
            f"- Against the best simple baseline on each benchmark's test labels (chosen in hindsight, a hard bar) "
            f"the margin is {m.mean():+.3f} on average (positive on {int((m > 0).sum())} of {n}); against the "
            f"baseline the same rule picks on the other benchmarks, {mf.mean():+.3f} "
            f"(positive on {int((mf > 0).sum())} of {n}).")
    for r in nulls:
        p = r.get("dev_memorisation_p")
        verdict = ("no evidence of memorisation" if p is not None and p > ALPHA
                   else "evidence of memorisation, a false alarm here" if p is not None else "no test")
        out.append(
            f"- Null control `{r['benchmark']}` (its generator never saw the images labelled used): test AUC "
            f"{r['test_auc']:.3f} [{r['test_auc_ci'][1]:.3f}, {r['test_auc_ci'][2]:.3f}]; the memorisation "
            f"test on its dev labels says {verdict} (p = {format_p(p) if p is not None else '-'}). Every "
            f"image flagged there is a false accusation: {r['test_flagged']:.0%} of its test images at the "
            f"submission's threshold ({threshold_text(SUBMISSION_THRESHOLD, SUBMISSION_TARGET_FPR, ssim=False)}), "
            f"{r['test_flagged_product']:.0%} at the {THRESHOLD_METHOD} rule.")
    fams = {(r["family"], r["memorisation"]) for r in rows}
    if fams == {("unknown", "?")}:
        out.append("- No benchmark has a zoo.json, so results are not split by generator family or memorisation.")
    out.append("- These conclusions hold for generators like the suite's; a benchmark from another family or "
               "modality needs its own held-out check.")
    return out


def markdown(config: SuiteConfig, rep: dict[str, Any], extras: list[dict[str, Any]], seconds: float,
             work: dict[str, int]) -> str:
    rows = rep["leave_one_out"]
    has_base = bool(rows) and "margin" in rows[0]
    table_rows = []
    for r in rows:
        t = {"family": r["family"], "mem": r["memorisation"], "benchmark": r["benchmark"], "chosen": r["chosen"],
             "rest": r["rule_value_on_rest"], "dev": r["dev_auc"], "test": tuple(r["test_auc_ci"]),
             "opt": r["optimism"], "alt": f"{r['other_rule_chosen']} ({r['other_rule_test_auc']:.3f})",
             "tpr": r["test_tpr_at_1fpr"], "flagged": f"{r['test_flagged']:.0%}",
             "fa": f"{r['test_false_accusations']:.0%}",
             "fa_product": f"{r['test_false_accusations_product']:.0%}" + (
                 "" if r.get("dev_fpr_bound_product") is None else f" (bound {r['dev_fpr_bound_product']:.0%})"),
             "p": _p(r.get("dev_memorisation_p"), r.get("dev_memorisation_detectable_auc"))}
        if has_base:
            t.update(base=f"{r['best_baseline']} ({r['best_baseline_test_auc']:.3f})",
                     margin=f"{r['margin']:.3f}" if r["memorisation"] != NULL_LEVEL else "n/a (null)")
        table_rows.append(t)
    table_rows.sort(key=lambda t: (t["family"], t["mem"], t["benchmark"]))
    cols: list[tuple[str, str]] = [
        ("family", "family"), ("mem", "memorisation"), ("benchmark", "held-out benchmark B"),
        ("chosen", f"chosen on the rest ({rep['rule']})"), ("rest", f"{rep['rule']} dev-CV AUC on the rest"),
        ("dev", "dev-CV AUC on B"), ("p", "memorisation p (dev)"), ("test", "test AUC on B [95% CI]"),
        ("tpr", "test TPR at 1% FPR"), ("flagged", "test flagged"), ("fa", "test non-members flagged"),
        ("fa_product", f"test non-members flagged, {THRESHOLD_METHOD} rule"), ("opt", "dev - test")]
    if has_base:
        cols += [("base", "best baseline on B (test AUC)"), ("margin", "margin")]
    other = next(r for r in RULES if r != rep["rule"])
    cols.append(("alt", f"{other} rule: chosen (test AUC)"))

    own = [{"benchmark": r["benchmark"], "pick": r["own_dev_pick"], "dev": r["own_dev_pick_dev_auc"],
            "test": r["own_dev_pick_test_auc"], "opt": r["own_dev_optimism"],
            "oracle": f"{r['hindsight_best']} ({r['hindsight_best_test_auc']:.3f})"} for r in rows]
    fam_cols = [("family", "family"), ("memorisation", "memorisation"), ("benchmarks", "benchmarks"),
                ("chosen", "chosen"), ("dev_auc", "mean dev-CV AUC"), ("test_auc", "mean test AUC"),
                ("optimism", "mean dev - test"), ("above_chance", "test CI above 0.5")]
    if has_base:
        fam_cols.append(("margin", "mean margin over best baseline"))
    names = [b["name"] for b in rep["benchmarks"]]
    matrix = [{"candidate": c["name"] + (" (baseline)" if c["baseline"] else ""),
               **{b: f"{rep['dev_auc'][b][c['name']]:.3f} / {rep['test_auc'][b][c['name']][0]:.3f}" for b in names}}
              for c in rep["candidates"]]
    sc = rep["suite_choice"]
    groups_from = sorted({r["groups_from"] for r in rows})
    lines = [
        f"# Suite: {Path(config.suite).name} ({len(names)} benchmarks, {len(rep['candidates'])} candidates)",
        "",
        "Each benchmark B is held out in turn: a rule picks a candidate from the dev-CV AUCs of the *other* "
        "benchmarks, then B shows that candidate's dev-CV AUC (what a user tuning on B sees) beside its test AUC "
        "(fitted on all of B's dev labels, scored on test/real_unknown against test_labels.csv, which nothing "
        "fitted or chosen read). "
        f"Dev-CV: {config.repeats} x {config.folds}-fold group-aware stratified, mean AUC over repeats. "
        f"Test intervals: {config.n_boot} bootstrap resamples of whole pseudo-patient groups "
        f"({', '.join(groups_from)}). Rules: 'mean' = highest mean dev-CV AUC on the rest, 'worst' = highest "
        f"worst-case; values within {TIE:g} tie and go to the simpler candidate. Baselines: "
        + (", ".join(c["name"] for c in rep["candidates"] if c["baseline"]) or "none among the candidates")
        + "; margin = chosen test AUC - best baseline test AUC on B (the baseline picked in hindsight). "
        f"A memorisation p above {ALPHA} (no evidence) is followed by the AUC the test would have detected with "
        f"{POWER:.0%} power on B's dev labels and groups. 'test flagged' and 'test non-members flagged' (false "
        f"accusations): the decisions at the threshold set on B's dev labels "
        f"({threshold_text(SUBMISSION_THRESHOLD, SUBMISSION_TARGET_FPR, ssim=False)}, as in the submissions); "
        f"'{THRESHOLD_METHOD} rule': the same at the product's default threshold "
        f"({threshold_text(THRESHOLD_METHOD, TARGET_FPR, ssim=False)} of B's dev labels; the rule of `fit`, the "
        "registry and the service); '(bound X%)' after it: the 95% upper bound on the false-positive rate that "
        "the dev not-used images show at that threshold, counted over pseudo-patient groups, as every fitted "
        "detector records it (absent from results cached before it was recorded). "
        f"Memorisation '{NULL_LEVEL}': a null control, whose generator trained on other images than those "
        "labelled used, so every image flagged there is a false accusation and no baseline goal applies; nulls "
        "are held out like the others but never chosen on.",
        *([""] + [f"- `{r['benchmark']}` shares its split of the real images (split.json) with "
                  f"{', '.join(f'`{o}`' for o in r['held_out_with'])}: they are left out of its rest too, so its "
                  "choice never rests on another copy of the same draw." for r in rows if r["held_out_with"]]),
        "",
        "## Leave one benchmark out",
        "",
        format_table(table_rows, cols),
        "## By generator family and memorisation",
        "",
        format_table(rep["families"], fam_cols),
        "## Tuning on B's own dev labels (what the single-benchmark harness does)",
        "",
        format_table(own, [("benchmark", "benchmark"), ("pick", "best dev-CV on B"), ("dev", "its dev-CV AUC"),
                           ("test", "its test AUC"), ("opt", "dev - test"),
                           ("oracle", "best test AUC in hindsight")]),
        "## Every candidate: dev-CV AUC / test AUC",
        "",
        format_table(matrix, [("candidate", "candidate"), *((b, b) for b in names)]),
        "## Chosen on the whole suite",
        "",
        f"- mean rule: `{sc['mean']['candidate']}` (mean dev-CV AUC {sc['mean']['value']:.3f}); worst-case rule: "
        f"`{sc['worst']['candidate']}` (worst dev-CV AUC {sc['worst']['value']:.3f}).",
    ]
    for e in extras:
        lines.append(f"- `{e['benchmark']}` ({e['path']}): `{e['candidate']}` fitted on its {e['labelled']} dev "
                     f"labels, threshold {e['threshold']:.4g}; `{e['benchmark']}/submission.csv` "
                     f"({e['test']} images, {e['used_predicted']} predicted used), `scores.csv`, `detector/`"
                     f"{' (reused)' if e.get('reused') else ''}" + (f"; {e['why']}." if e.get("why") else "."))
    if rep.get("goals"):
        met = sum(g["met"] for g in rep["goals"])
        lines += ["", "## Goals, per held-out benchmark", "",
                  f"{met} of {len(rep['goals'])} checks met. Best baseline = the baseline with the highest test AUC "
                  "on B (hindsight). 'No signal on test' = no per-image candidate's test AUC interval lies above 0.5 "
                  "there.",
                  "", format_table([{**g, "met": "yes" if g["met"] else "NO"} for g in rep["goals"]],
                                   [("benchmark", "benchmark"), ("goal", "goal"), ("target", "target"),
                                    ("value", "value"), ("met", "met")])]
    lines += ["", "## What a user may conclude", "", *conclusions(rep), "",
              f"Runtime: {seconds / 60:.1f} min on {os.cpu_count()} CPU core(s); {work['evaluated']} (benchmark, "
              f"candidate) pair(s) evaluated, {work['reused']} reused from `{CACHE_DIR}/`.", ""]
    return "\n".join(lines)


def _p(value: float | None, detectable: float | None = None) -> str:
    """A p-value cell; without evidence, with the AUC the test would have found (80% power), where known."""
    if value is None:
        return "-"
    if value > ALPHA and detectable is not None and np.isfinite(detectable):
        return f"{format_p(value)} (detectable AUC {detectable:.2f})"
    return format_p(value)


def auc_picture(rep: dict[str, Any], path: Path) -> Path:
    """Dev-CV AUC against test AUC per held-out benchmark for the chosen detector (with the test interval), and
    for the pick tuned on the benchmark's own dev labels; the y = x line marks no optimism."""
    from fingerprint.evaluation.plots import new_figure, save_figure

    rows = rep["leave_one_out"]
    fig = new_figure(5.6, 5.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#888888", lw=1, ls="--", label="y = x (dev-CV = test)")
    ax.axhline(0.5, color="#bbbbbb", lw=0.8, ls=":")
    x = np.array([r["dev_auc"] for r in rows])
    y = np.array([r["test_auc"] for r in rows])
    lo = np.array([r["test_auc_ci"][1] for r in rows])
    hi = np.array([r["test_auc_ci"][2] for r in rows])
    ax.errorbar(x, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="o", color="#d62728",
                capsize=3, label=f"chosen on the other benchmarks ({rep['rule']} rule)")
    ax.scatter([r["own_dev_pick_dev_auc"] for r in rows], [r["own_dev_pick_test_auc"] for r in rows],
               facecolors="none", edgecolors="#1f77b4", label="best dev-CV on the benchmark itself")
    for r, xi, yi in zip(rows, x, y, strict=True):
        right = xi > 0.8  # labels of points near the right edge go to their left
        ax.annotate(f"{r['benchmark']}\n{r['chosen']}", (xi, yi), textcoords="offset points",
                    xytext=(-4 if right else 4, -12), ha="right" if right else "left", fontsize=7)
    low = float(max(0.0, min(0.4, np.nanmin(np.r_[x, y, lo]) - 0.05)))
    ax.set_xlim(low, 1.01)
    ax.set_ylim(low, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("dev-CV AUC on the held-out benchmark")
    ax.set_ylabel("test AUC on the held-out benchmark")
    ax.set_title("Leave one benchmark out: promised vs delivered")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ extras


def extra_choice(config: SuiteConfig, rep: dict[str, Any], path: Path, recipe: str = "") -> tuple[str, str]:
    """(candidate, why) for an --extra benchmark: the whole suite's choice, unless it trains shadow generators
    and the benchmark has no generator recipe (``recipe``, else its zoo.json): then the rule's choice among the
    other candidates, since stand-in shadows of a guessed family measure something else."""
    chosen = rep["suite_choice"][config.rule]["candidate"]
    if not needs_recipe(chosen) or generator_recipe(recipe or path) is not None:
        return chosen, ""
    among = [c["name"] for c in rep["candidates"] if not needs_recipe(c["name"])]
    if not among:
        return chosen, "no candidate without shadow generators; shadows of a stand-in family"
    pick = choose(rep["dev_auc"], list(rep["dev_auc"]), config.rule, among)[0]
    return pick, (f"the suite's choice `{chosen}` trains shadow generators and this benchmark has no recipe of its "
                  f"generator (zoo.json, {flag('extra_recipes')}): `{pick}` is the {config.rule} rule's choice among "
                  "the others")


def submit_extra(config: SuiteConfig, path: Path, candidate: str, why: str, out: Path, recipe: str = ""
                 ) -> dict[str, Any]:
    """Fit ``candidate`` on all dev labels of an --extra benchmark and write its submission, scores and detector
    to ``<out>/<name>/`` (skipped when already written for the same images and candidate). ``why``: the reason
    it is not the suite's choice, if it is not."""
    bench_out = out / path.name
    det = next(d for d in build_candidates(config, path, recipe) if d.name == candidate)
    key = {"version": CACHE_VERSION, "code": code_digest(), "content": content_hash(path), "candidate": candidate,
           "kind": det.kind, "settings": det.meta.settings, "seed": config.seed,
           "group_threshold": config.group_threshold, "skip_bad": config.skip_bad}
    key = json.loads(json.dumps(_plain(key), default=str))
    done_file = bench_out / "suite_submission.json"
    if done_file.is_file() and all((bench_out / f).exists() for f in ("submission.csv", "scores.csv", "detector")):
        done = json.loads(done_file.read_text())
        if done.get("key") == key:
            log.info("%s: submission of %s already written", path.name, candidate)
            return {**done["summary"], "why": why, "reused": True}
    COUNTERS["loaded"] += 1
    data: FitData = load_fit_data(path, val_fraction=0.0, seed=config.seed, skip_bad=config.skip_bad,
                                  group_threshold=config.group_threshold)
    if not (data.labels < 0).any():
        raise ConfigError([f"{flag('extra')}: '{path}' has no test/real_unknown images to submit for"])
    fitted = Fitted(data, config.benchmark_config(path, recipe))
    if det.learns:
        fitted.share_members(det)
        det.fit(data)
    else:
        fitted.fit(det)
    det = finish_fit(det, data, threshold_method=SUBMISSION_THRESHOLD, target_fpr=SUBMISSION_TARGET_FPR)
    threshold, used = write_test_predictions(bench_out, data, det)
    test = np.flatnonzero(data.labels < 0)
    summary = {"benchmark": path.name, "path": str(path), "candidate": candidate, "threshold": threshold,
               "labelled": int(len(data.train)), "test": int(len(test)), "used_predicted": used}
    if det.meta.extra.get("chosen"):
        summary["members"] = list(det.meta.extra["chosen"])
    write_text_atomic(done_file, json.dumps({"key": key, "summary": summary}, indent=2))
    COUNTERS["submitted"] += 1
    return {**summary, "why": why}


# --------------------------------------------------------------------------------------------------- run


def command_line(config: SuiteConfig) -> str:
    default = SuiteConfig()
    parts = ["fingerprint suite"]
    for f in fields(SuiteConfig):
        v = getattr(config, f.name)
        if f.name not in ("suite", "out") and v == getattr(default, f.name):
            continue
        parts.append((flag(f.name) if v else "--no-" + f.name.replace("_", "-")) if isinstance(v, bool)
                     else f"{flag(f.name)} {v}")
    return " \\\n    ".join(parts)


def run(config: SuiteConfig) -> dict[str, Any]:
    """Evaluate (or reuse) every (benchmark, candidate), report leave-one-benchmark-out, submit for --extra."""
    validate(config)
    t0 = time.perf_counter()
    before = dict(COUNTERS)
    out = Path(config.out)
    benches = [make_bench(p) for p in discover(config.suite)]
    results = {}
    for i, bench in enumerate(benches, 1):
        log.info("[%d/%d] %s (family %s, memorisation %s)", i, len(benches), bench.name, bench.family,
                 bench.memorisation)
        results[bench.name] = evaluate_benchmark(config, bench, out)
    rep = report(config, benches, results)
    extras = [submit_extra(config, p, *extra_choice(config, rep, p, r), out, r)
              for p, r in zip(config.extras(), config.recipes(), strict=True)]
    work = {k: COUNTERS[k] - before[k] for k in COUNTERS}
    seconds = time.perf_counter() - t0
    md = markdown(config, rep, extras, seconds, work)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "suite.md", md)
    auc_picture(rep, out / "suite_auc.png")
    result = {"config": to_dict(config), "command": command_line(config), **rep, "extras": extras,
              "work": work, "seconds": seconds}
    write_text_atomic(out / "suite.json", json.dumps(_plain(result), indent=2, default=str))
    log.info("wrote %s in %.1f min", out, seconds / 60)
    return {**result, "markdown": md}

