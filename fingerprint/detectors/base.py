"""The one detector protocol: every kind fits, scores with evidence, saves and loads the same way.

    det = fit_detector("grad_nn", {"k": 10}, data)            # data: FitData (images, labels, groups, split)
    scores = det.score(images, ids)                            # Scores: score + nearest generated ids/similarities
    det.save("runs/grad")                                      # meta.json + arrays.safetensors + ids.json
    det = load_detector("runs/grad")                           # any kind, no pickle

A *kind* is a :class:`Detector` subclass registered under a name with :func:`register`, as timm registers
models; its settings are a dataclass (``Settings``) whose field docstrings document it. Fitting has two stages:
``fit`` learns whatever reads labels (only the ``train`` indices of :class:`FitData`) and then calls ``index``,
which prepares everything that depends only on images (gallery features, the real reference pool, label-free
classifiers). ``index`` can be called again on other images (``fingerprint predict --data``, a new gallery in
the service) without refitting what was learnt. :func:`fit_detector` adds the decision threshold (from the
training labels) and validation metrics (on the held-out ``val`` indices), so two kinds fitted on the same
:class:`FitData` are compared on the same locked split.

Saved state is JSON plus safetensors arrays: loading never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from PIL import Image

from fingerprint.config import ConfigError, check_fields, field_docs, from_dict, to_dict
from fingerprint.data.thumbnails import Thumbnails, load_thumbnails, make_thumbnails, save_thumbnails
from fingerprint.io import atomic_dir, jsonable

if TYPE_CHECKING:
    from fingerprint.evaluation.thresholds import FalsePositives

__all__ = [
    "SCHEMA_VERSION", "Detector", "DetectorMeta", "FitData", "Scores", "register", "kinds", "kind",
    "create_detector", "fit_detector", "finish_fit", "check_decision", "load_detector", "is_detector_dir",
    "threshold_for",
]

SCHEMA_VERSION = 1
META_FILE, ARRAYS_FILE, IDS_FILE = "meta.json", "arrays.safetensors", "ids.json"
Signal = Literal["per_image", "distribution"]


# ------------------------------------------------------------------------------------------------- data


@dataclass
class Scores:
    """Membership scores of N images with the evidence behind each."""

    score: np.ndarray
    """(N,) float64: higher = more likely in the generator's training set."""
    nearest: np.ndarray
    """(N, k) int64 rows of the detector's gallery (``Detector.gallery_ids``): the nearest generated images."""
    nearest_similarity: np.ndarray
    """(N, k) float32 their similarities in the kind's feature space (higher = closer), most similar first."""
    generated_similarity: np.ndarray | None = None
    """(N,) the reduced similarity to the generated images, where the score is built from one (else None)."""
    real_similarity: np.ndarray | None = None
    """(N,) the same against the real reference pool, for calibrated scores (else None)."""

    def __len__(self) -> int:
        return len(self.score)

    def take(self, rows: np.ndarray | Sequence[int]) -> Scores:
        rows = np.asarray(rows, dtype=np.int64)
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return Scores(self.score[rows], self.nearest[rows], self.nearest_similarity[rows],
                      pick(self.generated_similarity), pick(self.real_similarity))


@dataclass
class FitData:
    """What a detector is fitted on: the gallery, every real image, labels where known, groups and the split."""

    generated: list[Image.Image]
    generated_ids: list[str]
    real: list[Image.Image]
    """Every real image: labelled ones and unlabelled ones (the reference pool)."""
    real_ids: list[str]
    labels: np.ndarray
    """(R,) int64: 1 = used for training, 0 = not used, -1 = unknown."""
    groups: np.ndarray
    """(R,) int64 pseudo-patient ids: near-duplicate slices share one; splits keep groups whole."""
    train: np.ndarray
    """Indices into ``real`` whose labels fitting may read (learning, the threshold)."""
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Indices into ``real`` held out: validation metrics only, never read while fitting."""
    generated_source: np.ndarray | None = None
    """(G,) int64 0 = dev generated, 1 = test generated (triplet anchors are balanced between them)."""

    def __post_init__(self) -> None:
        r, g = len(self.real), len(self.generated)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.groups = np.asarray(self.groups, dtype=np.int64)
        self.train = np.asarray(self.train, dtype=np.int64)
        self.val = np.asarray(self.val, dtype=np.int64)
        if self.generated_source is None:
            self.generated_source = np.zeros(g, dtype=np.int64)
        problems = [f"FitData.{name} has {len(a)} entries for {n} images"
                    for name, a, n in (("real_ids", self.real_ids, r), ("labels", self.labels, r),
                                       ("groups", self.groups, r), ("generated_ids", self.generated_ids, g),
                                       ("generated_source", self.generated_source, g)) if len(a) != n]
        if r == 0 or g == 0:
            problems.append(f"FitData needs real and generated images (got {r} real, {g} generated)")
        if len(set(self.real_ids)) != r or len(set(self.generated_ids)) != g:
            problems.append("FitData ids must be unique within real and within generated images")
        if np.any(self.labels[self.train] < 0) or np.any(self.labels[self.val] < 0):
            problems.append("FitData.train and FitData.val may only hold labelled images")
        if np.intersect1d(self.train, self.val).size:
            problems.append("FitData.train and FitData.val overlap")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def split(self) -> dict[str, list[str]]:
        """Ids of the training and validation images: a version's validation split, locked by its hash."""
        return {"train": [self.real_ids[i] for i in self.train], "val": [self.real_ids[i] for i in self.val]}

    def subset(self, train: np.ndarray, val: np.ndarray | None = None) -> FitData:
        """The same images with another split (the harness's folds)."""
        return dataclasses.replace(self, train=np.asarray(train), val=np.zeros(0, np.int64) if val is None else val)


@dataclass
class DetectorMeta:
    """meta.json of a saved detector: all that is not an array, readable by people."""

    kind: str
    settings: dict[str, Any]
    """The kind's Settings, as a dict."""
    threshold: float = 0.0
    """Decision threshold: decide 'used' when score >= threshold."""
    threshold_method: str = "fpr"
    """How the threshold was set: 'fpr' (at most a target share of the training not-used images flagged),
    'fpr_bound' (the same share as an upper confidence bound) or 'max_f1'."""
    false_positives: FalsePositives | None = None
    """What the threshold did to labelled not-used images, with a confidence bound on the false-positive rate of
    new ones (None in detectors saved before it was recorded): the training images, or for kinds that learn from
    labels the held-out ones (the training ones, marked optimistic, when nothing is held out)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Validation metrics (val_auc, val_f1, ...) on the held-out split; empty without one."""
    split: dict[str, list[str]] = field(default_factory=dict)
    """Ids of the real images that fitting read labels of ('train') and that validated it ('val')."""
    signal: Signal = "per_image"
    """'per_image': the score measures how close one image sits to the generated images. 'distribution': it
    measures how generated-like the image is overall, which also rises with any distribution shift between the
    training set and the other real images, not with memorisation of that image."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific facts (data config of a network, ensemble members, what a selection chose)."""
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def name(self) -> str:
        return str(self.extra.get("name") or self.kind)


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Kind:
    name: str
    cls: type[Detector]
    description: str


_KINDS: dict[str, Kind] = {}


def register(name: str) -> Callable[[type[Detector]], type[Detector]]:
    """Class decorator: make a Detector subclass available as kind ``name``."""

    def wrap(cls: type[Detector]) -> type[Detector]:
        if name in _KINDS and _KINDS[name].cls is not cls:
            raise ValueError(f"detector kind {name!r} is registered twice ({_KINDS[name].cls} and {cls})")
        cls.kind = name
        _KINDS[name] = Kind(name, cls, " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()))
        return cls

    return wrap


def kinds() -> dict[str, Kind]:
    """Every registered kind by name."""
    return dict(_KINDS)


def kind(name: str) -> Kind:
    if name not in _KINDS:
        raise ConfigError([f"--kind: unknown detector kind {name!r}; known: {', '.join(sorted(_KINDS))}"])
    return _KINDS[name]


def create_detector(name: str, settings: Any = None) -> Detector:
    """An unfitted detector of kind ``name``; ``settings`` is its Settings, a dict of them, or None (defaults)."""
    cls = kind(name).cls
    if settings is None:
        settings = cls.Settings()
    elif isinstance(settings, dict):
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls.Settings)})
        if unknown:
            raise ConfigError([f"{name}: unknown setting(s) {', '.join(unknown)}; known: "
                               + ", ".join(f.name for f in dataclasses.fields(cls.Settings))])
        settings = from_dict(cls.Settings, settings)
    problems = [f"{name}: {p}" for p in check_fields(settings)]
    if problems:
        raise ConfigError(problems)
    return cls(settings)


# ------------------------------------------------------------------------------------------------ base


class Detector:
    """A membership detector kind. Subclasses set ``Settings`` and implement ``index``, ``score``, ``arrays``."""

    kind: ClassVar[str] = ""
    Settings: ClassVar[type] = type(None)
    family: ClassVar[str] = "?"
    """'a' pixel, 'b' SSIM, 'c' frozen features, 'd' triplet fine-tuning, 'e' this project's detectors, 'f' those
    that train shadow generators."""
    learns: ClassVar[bool] = False
    """True: ``fit`` reads the labels of the training images (the harness refits it per fold)."""
    costly: ClassVar[bool] = False
    """True: fitting trains a network (the harness refits it on fewer repeats)."""
    signal: ClassVar[Signal] = "per_image"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.meta = DetectorMeta(kind=self.kind, settings=to_dict(settings), signal=self.signal)
        self.gallery_ids: list[str] = []
        self.reference_ids: list[str] = []
        self.reference_groups: np.ndarray = np.zeros(0, dtype=np.int64)
        self.gallery_thumbnails: Thumbnails | None = None
        """Small pictures of the gallery (saved as thumbs.safetensors), to show a decision's evidence."""

    # -- what a kind implements

    def fit(self, data: FitData, progress: bool = False) -> None:
        """Learn from ``data`` (labels of ``data.train`` only), then index its images. Default: index only."""
        self.index(data.generated, data.generated_ids, data.real, data.real_ids, data.groups, progress=progress)

    def index(self, generated: Sequence[Image.Image], generated_ids: Sequence[str], reference: Sequence[Image.Image],
              reference_ids: Sequence[str], reference_groups: np.ndarray | None = None,
              progress: bool = False) -> None:
        """Prepare the gallery (and the real reference pool, where the kind uses one) from images; no labels."""
        raise NotImplementedError

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        """Scores with evidence for ``images``. ``ids`` name them: an image of the reference pool (same id) is
        never compared with itself or scored by a model that saw it."""
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        """The state to save (gallery features, weights) as named arrays."""
        raise NotImplementedError

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def choose_threshold(self, labels: np.ndarray, scores: Scores, method: str, target_fpr: float,
                         groups: np.ndarray | None = None) -> float:
        """Threshold from labelled scores (``groups``: their pseudo-patients); kinds with their own calibration
        override this."""
        return threshold_for(labels, scores.score, method, target_fpr, groups)

    def describe(self) -> str:
        """One line for tables and reports."""
        return kind(self.kind).description

    # -- shared

    @property
    def name(self) -> str:
        """The name shown in tables and reports (the kind, qualified where it has several variants)."""
        return self.meta.name

    @property
    def threshold(self) -> float:
        return float(self.meta.threshold)

    def decide(self, scores: Scores) -> np.ndarray:
        return (scores.score >= self.threshold).astype(np.int64)

    def _set_reference(self, ids: Sequence[str], groups: np.ndarray | None) -> None:
        self.reference_ids = list(ids)
        self.reference_groups = (np.arange(len(ids), dtype=np.int64) if groups is None
                                 else np.asarray(groups, dtype=np.int64))

    def self_rows(self, ids: Sequence[str] | None, n: int) -> np.ndarray:
        """Per query, its row in the reference pool (-1 when it is not there or has no id)."""
        if ids is None:
            return np.full(n, -1, dtype=np.int64)
        where = {r: i for i, r in enumerate(self.reference_ids)}
        return np.array([where.get(i, -1) for i in ids], dtype=np.int64)

    def save(self, path: str | Path) -> Path:
        """Write meta.json, arrays.safetensors and ids.json to ``path`` atomically."""
        from safetensors.numpy import save_file

        path = Path(path)
        self.meta.created_at = self.meta.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays().items()}
        with atomic_dir(path) as tmp:
            (tmp / META_FILE).write_text(json.dumps(to_dict(self.meta), indent=2, sort_keys=True, default=jsonable))
            save_file(arrays, str(tmp / ARRAYS_FILE), metadata={"kind": self.kind})
            (tmp / IDS_FILE).write_text(json.dumps({
                "gallery": self.gallery_ids, "reference": self.reference_ids,
                "reference_groups": self.reference_groups.tolist()}))
            if self.gallery_thumbnails is not None:
                save_thumbnails(self.gallery_thumbnails, tmp)
        return path


def is_detector_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / META_FILE).is_file() and (path / ARRAYS_FILE).is_file()


def load_detector(path: str | Path) -> Detector:
    """A saved detector of any kind, ready to score."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not is_detector_dir(path):
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "nothing (no such folder)"
        raise FileNotFoundError(
            f"{path}: not a saved fingerprint detector (needs {META_FILE} and {ARRAYS_FILE}; found {found}). "
            "Give the folder written by `fingerprint fit`, `fingerprint train` or a registry download.")
    raw = json.loads((path / META_FILE).read_text())
    if int(raw.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(f"{path}: saved by a newer fingerprint (schema {raw['schema_version']} > "
                         f"{SCHEMA_VERSION}); upgrade fingerprint to load it")
    if "kind" not in raw:
        raise ValueError(f"{path}/{META_FILE}: no 'kind'; this is not a detector's metadata")
    meta = from_dict(DetectorMeta, raw)
    if meta.false_positives is not None:
        from fingerprint.evaluation.thresholds import as_false_positives

        meta.false_positives = as_false_positives(meta.false_positives)
    # A detector runs where it is loaded: the device it was fitted on may not exist here.
    settings = {**meta.settings, "device": "auto"} if "device" in meta.settings else meta.settings
    det = create_detector(meta.kind, settings)
    det.meta = meta
    ids = json.loads((path / IDS_FILE).read_text()) if (path / IDS_FILE).is_file() else {}
    det.gallery_ids = list(ids.get("gallery", []))
    det._set_reference(ids.get("reference", []), np.asarray(ids.get("reference_groups", []), dtype=np.int64)
                       if ids.get("reference_groups") else None)
    det.load_arrays(load_file(str(path / ARRAYS_FILE)))
    det.gallery_thumbnails = load_thumbnails(path)  # optional pictures of the gallery (None without)
    return det


# ------------------------------------------------------------------------------------------------- fitting


THRESHOLD_METHOD, TARGET_FPR = "fpr", 0.05
"""The product's decision rule: flag an image only above all but 5% of the training not-used images' scores."""


def threshold_for(labels: np.ndarray, scores: np.ndarray, method: str = THRESHOLD_METHOD,
                  target_fpr: float = TARGET_FPR, groups: np.ndarray | None = None) -> float:
    from fingerprint.evaluation.thresholds import threshold_at_fpr, threshold_at_fpr_bound, threshold_max_f1

    if method == "fpr":
        return threshold_at_fpr(labels, scores, target_fpr)
    if method == "fpr_bound":
        return threshold_at_fpr_bound(labels, scores, target_fpr, groups)
    if method == "max_f1":
        return threshold_max_f1(labels, scores)
    raise ValueError(f"--threshold-method: {method!r} is not one of max_f1, fpr, fpr_bound")


def fit_detector(name: str, settings: Any, data: FitData, *, threshold_method: str = THRESHOLD_METHOD,
                 target_fpr: float = TARGET_FPR, progress: bool = False) -> Detector:
    """Fit kind ``name`` on ``data``: learn and index, threshold from the training labels, metrics on ``val``."""
    det = create_detector(name, settings)
    check_decision(data, threshold_method, target_fpr)
    det.fit(data, progress=progress)
    return finish_fit(det, data, threshold_method=threshold_method, target_fpr=target_fpr)


def check_decision(data: FitData, threshold_method: str, target_fpr: float) -> None:
    """Refuse before any learning a decision rule these labels cannot meet (``fpr_bound`` with too few not-used
    groups), rather than after hours of training."""
    if threshold_method == "fpr_bound":
        from fingerprint.evaluation.thresholds import require_groups_for_bound

        require_groups_for_bound(data.labels[data.train], data.groups[data.train], target_fpr)


def finish_fit(det: Detector, data: FitData, *, threshold_method: str = THRESHOLD_METHOD,
               target_fpr: float = TARGET_FPR) -> Detector:
    """Set the threshold (training labels) and validation metrics (``data.val``) of a fitted, indexed detector.

    Used by :func:`fit_detector` and by runners that learn elsewhere (a Ray Train run's network, then
    ``use_network`` and ``index``).
    """
    from fingerprint.evaluation.metrics import all_metrics
    from fingerprint.evaluation.thresholds import false_positives

    rows = np.concatenate([data.train, data.val])
    scores = det.score([data.real[i] for i in rows], [data.real_ids[i] for i in rows])
    y_train = data.labels[data.train]
    if len(np.unique(y_train)) < 2:
        raise ValueError(f"{det.kind}: the training images need both used and not-used labels to set a threshold")
    s_train, g_train = scores.score[: len(data.train)], data.groups[data.train]
    det.meta.threshold = float(det.choose_threshold(y_train, scores.take(np.arange(len(data.train))),
                                                    threshold_method, target_fpr, g_train))
    det.meta.threshold_method = threshold_method
    det.meta.split = data.split
    det.meta.metrics = {}
    y_val = data.labels[data.val]
    held_out = len(data.val) > 0 and len(np.unique(y_val)) == 2
    # A kind that learnt from the training labels scores those images in-sample: its record comes from the
    # held-out images where there are some, and says it is optimistic where there are none.
    if det.learns and held_out:
        det.meta.false_positives = false_positives(y_val, scores.score[len(data.train):], det.meta.threshold,
                                                   data.groups[data.val], held_out=True)
    else:
        det.meta.false_positives = false_positives(y_train, s_train, det.meta.threshold, g_train,
                                                   in_sample=det.learns)
    if held_out:
        m = all_metrics(y_val, scores.score[len(data.train):], threshold=det.meta.threshold)
        det.meta.metrics = {f"val_{k}": float(v) for k, v in m.items()}
    # Small pictures of the gallery, saved beside it, so a decision's nearest generated images can be shown.
    keep = set(det.gallery_ids) or set(data.generated_ids)
    rows = [i for i, g in enumerate(data.generated_ids) if g in keep]
    det.gallery_thumbnails = make_thumbnails([data.generated[i] for i in rows], [data.generated_ids[i] for i in rows])
    return det


def settings_help(name: str) -> dict[str, str]:
    """Field docstrings of a kind's Settings (for --help and the README)."""
    return field_docs(kind(name).cls.Settings)
