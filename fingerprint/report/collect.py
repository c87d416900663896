"""Gather a report's inputs from what the commands write: scores (scores.jsonl or scores.csv), the data folder
(thumbnails, counts, hashes), labels and patient groups, the detector's metadata, and the provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fingerprint.config import ConfigError
from fingerprint.data import images as fpdata
from fingerprint.data.imagesets import GROUPS_FILE, BenchmarkItems, benchmark_items, real_groups
from fingerprint.io import lookup_ids, read_csv, read_groups, read_labels
from fingerprint.report.render import ReportInputs, labelled, write_report

log = logging.getLogger(__name__)

LABELS_FILE = "test_labels.csv"
"""The labels a benchmark keeps beside dev/ and test/ (the sample data and the generator zoo write it)."""
REPORT_FILE = "report.html"
PACKAGES = ("fingerprint", "torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "pillow", "matplotlib",
            "safetensors")


# -------------------------------------------------------------------------------------------------- scores


def read_scores(path: str | Path) -> list[dict[str, Any]]:
    """Rows of `fingerprint predict`'s scores.jsonl (or scores.csv): id, score, decision, threshold (jsonl),
    nearest_ids, nearest_similarities (lists), kind and signal (jsonl). A bad line is an error naming it."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "scores.jsonl", path / "scores.csv") if p.is_file()]
        if not found:
            raise ConfigError([f"--scores: {path} holds neither scores.jsonl nor scores.csv; give the --out folder "
                               "of `fingerprint predict`"])
        path = found[0]
    if not path.is_file():
        raise ConfigError([f"--scores: {path}: no such file"])
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({"id": str(row["id"]), "score": float(row["score"]),
                             **{k: row[k] for k in ("decision", "threshold", "nearest_ids", "nearest_similarities",
                                                    "kind", "signal") if k in row}})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {n}: not a score record with id and score ({e}); write it again "
                                 "with `fingerprint predict`") from None
    else:
        rows = []
        for n, r in enumerate(read_csv(path, ("id", "score")), start=2):
            try:
                row: dict[str, Any] = {"id": r["id"], "score": float(r["score"])}
                if r.get("decision") not in (None, ""):
                    row["decision"] = int(r["decision"])
                if r.get("nearest_ids"):
                    row["nearest_ids"] = r["nearest_ids"].split(";")
                    row["nearest_similarities"] = [float(v) for v in r["nearest_similarities"].split(";")]
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: line {n}: {e}") from None
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no scores; score some real images with `fingerprint predict` first")
    return rows


# ---------------------------------------------------------------------------------------------------- data


class LazyImages(Mapping[str, Image.Image | None]):
    """Images by id, decoded only when a thumbnail asks for one; an unreadable file gives None (no thumbnail)."""

    def __init__(self, items: Sequence[fpdata.ImageItem], loaded: Mapping[str, Image.Image] | None = None) -> None:
        self.items = {it.id: it for it in items}
        self.loaded: dict[str, Image.Image | None] = dict(loaded or {})

    def __getitem__(self, key: str) -> Image.Image | None:
        if key not in self.loaded:
            if key not in self.items:
                raise KeyError(key)
            try:
                self.loaded[key] = fpdata.load_image(self.items[key].path)
            except fpdata.DataError as e:
                log.warning("report: no thumbnail for %s (%s)", key, e)
                self.loaded[key] = None
        return self.loaded[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    return h.hexdigest()


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def data_hashes(items: BenchmarkItems, scored: Sequence[str]) -> dict[str, Any]:
    """sha256 of the sorted id lists and of the file bytes (per file, in id order) of the generated images and of
    the real images: the same data give the same hashes wherever they are copied."""
    gen = sorted(items.generated, key=lambda it: it.id)
    real = sorted(items.real, key=lambda it: it.id)
    return {"generated": {"n": len(gen), "ids_sha256": ids_digest([it.id for it in gen]),
                          "files_sha256": file_digest([it.path for it in gen])},
            "real": {"n": len(real), "ids_sha256": ids_digest([it.id for it in real]),
                     "files_sha256": file_digest([it.path for it in real])},
            "scored_ids_sha256": ids_digest(list(scored))}


def image_sizes(items: Sequence[fpdata.ImageItem], limit: int = 5000) -> dict[str, int]:
    """Count of each ``WxH`` among the images (headers only; the first ``limit`` files)."""
    sizes: Counter[str] = Counter()
    for it in items[:limit]:
        try:
            with Image.open(it.path) as im:
                sizes[f"{im.width}x{im.height}"] += 1
        except OSError:
            sizes["unreadable"] += 1
    return dict(sizes.most_common())


def dataset_summary(items: BenchmarkItems, generator: str = "") -> dict[str, Any]:
    return {
        "root": str(items.root),
        "generated": len(items.generated),
        "real": len(items.real),
        "used": sum(1 for it in items.labelled if it.label == 1),
        "not_used": sum(1 for it in items.labelled if it.label == 0),
        "unknown": len(items.unknown),
        "image_sizes": image_sizes(items.generated + items.real),
        "generator": generator,
    }


def labels_for(ids: Sequence[str], path: str | Path | None, items: BenchmarkItems | None = None
               ) -> tuple[np.ndarray | None, str]:
    """(N,) labels (1/0, -1 unknown) of ``ids`` from an id,label CSV, or from the data's own used/not_used roles;
    None when none of the ids has a label. Also says where they came from."""
    found: list[str | None] = [None] * len(ids)
    source = ""
    if path:
        if not Path(path).is_file():
            raise ConfigError([f"--labels: {path} is not a file; give a CSV id,label of the scored images"])
        table = {k: str(v) for k, v in read_labels(path).items()}
        found = lookup_ids(table, list(ids))
        source = str(path)
    if items is not None:
        roles = {it.id: str(it.label) for it in items.labelled}
        from_roles = [roles.get(i) for i in ids]
        if any(v is not None for v in from_roles):
            found = [f if f is not None else r for f, r in zip(found, from_roles, strict=True)]
            source = (source + " and " if source else "") + "the data's used/not_used folders"
    if all(v is None for v in found):
        return None, ""
    return np.array([-1 if v is None else int(v) for v in found], dtype=np.int64), source


def groups_for(ids: Sequence[str], path: str | Path | None, root: str | Path | None,
               items: Sequence[fpdata.ImageItem] = (), images: Mapping[str, Any] | None = None
               ) -> tuple[list[str] | None, str]:
    """Patient of each id: an id,group CSV (``path``, else ``<root>/groups.csv``), else near-duplicate clusters of
    the images (fingerprint.data.imagesets.real_groups); None when neither is possible."""
    for candidate in ([path] if path else []) + ([Path(root) / GROUPS_FILE] if root else []):
        if candidate and Path(candidate).is_file():
            found = lookup_ids(read_groups(candidate), list(ids))
            if all(g is not None for g in found):
                return [str(g) for g in found], str(candidate)
            missing = [i for i, g in zip(ids, found, strict=True) if g is None]
            if path and Path(candidate) == Path(path):
                raise ConfigError([f"--groups: {path} has no group for {len(missing)} scored id(s), e.g. "
                                   f"{missing[:3]}"])
    if items and images is not None:
        imgs = [images.get(it.id) for it in items]
        if all(im is not None for im in imgs):
            g = real_groups(list(items), imgs)
            return [f"cluster {v}" for v in g.tolist()], "near-duplicate clusters of the images (no groups.csv)"
    return None, ""


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(command: str = "", config: Mapping[str, Any] | None = None,
               registry: Mapping[str, Any] | None = None, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
            "config": dict(config or {}), "registry": dict(registry or {}), "data": dict(data or {}),
            "versions": package_versions()}


def detector_info(model: Any = None, rows: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A detector's meta as the report shows it, from a Detector, a saved detector folder (or the run folder
    holding it), or (without either) the kind and signal recorded in scores.jsonl."""
    if model is None:
        first = rows[0] if rows else {}
        return {"name": first.get("kind", "unknown detector"), "kind": first.get("kind", "?"),
                "signal": first.get("signal", "per_image")}
    where: dict[str, Any] = {}
    if hasattr(model, "meta"):
        m = model.meta
    else:  # only the metadata is needed: the arrays are not loaded
        from fingerprint.commands.predict import resolve_detector
        from fingerprint.config import from_dict
        from fingerprint.detectors.base import META_FILE, DetectorMeta

        folder = resolve_detector(model)
        m = from_dict(DetectorMeta, json.loads((folder / META_FILE).read_text()))
        where = {"path": str(folder)}
    fp = m.false_positives
    return {"name": m.name, **where, "kind": m.kind, "signal": m.signal, "threshold": m.threshold,
            "threshold_method": m.threshold_method, "settings": m.settings, "metrics": m.metrics,
            "false_positives": dataclasses.asdict(fp) if dataclasses.is_dataclass(fp) else fp,
            "created_at": m.created_at}


# ------------------------------------------------------------------------------------------------- folders


def inputs_from_scores(
    scores: str | Path, data: str | Path | None = None, labels: str | Path | None = None,
    groups: str | Path | None = None, model: Any = None, *, generator: str = "", title: str = "",
    command: str = "", config: Mapping[str, Any] | None = None, registry: Mapping[str, Any] | None = None,
    threshold: float | None = None, skip_bad: bool = True, **options: Any,
) -> ReportInputs:
    """ReportInputs from a scores file (or predict's --out folder) and, optionally, the data folder it scored
    (thumbnails, counts, hashes; its groups.csv and labels when none are given), labels, groups and the
    detector (a Detector or a saved folder). ``options`` go to ReportInputs (n_boot, seed, thumbnails, ...)."""
    rows = read_scores(scores)
    sibling = Path(scores).with_name("scores.jsonl")
    if "signal" not in rows[0] and Path(scores).suffix == ".csv" and sibling.is_file():
        # predict writes both files: the JSONL records the detector's kind, signal and threshold, the CSV does not.
        first = read_scores(sibling)[0]
        rows = [{**{k: first[k] for k in ("kind", "signal", "threshold") if k in first}, **r} for r in rows]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise ValueError(f"{scores}: id {dup!r} is scored more than once")
    s = np.array([r["score"] for r in rows], dtype=float)
    det = detector_info(model, rows)
    recorded = rows[0].get("threshold")
    t = threshold if threshold is not None else recorded if recorded is not None else det.get("threshold")
    t = None if t is None else float(t)
    if threshold is not None or not all("decision" in r for r in rows):
        if t is None:
            raise ConfigError(["--threshold: the scores carry no decisions and no threshold; give one"])
        dec = (s >= t).astype(np.int64)
    else:
        dec = np.array([int(r["decision"]) for r in rows], dtype=np.int64)
    nearest = [list(r.get("nearest_ids", [])) for r in rows]
    sims = [[float(v) for v in r.get("nearest_similarities", [])] for r in rows]
    items = None
    real_images: Mapping[str, Any] = {}
    gen_images: Mapping[str, Any] = {}
    dataset: dict[str, Any] = {"generator": generator}
    hashes: dict[str, Any] = {"scored_ids_sha256": ids_digest(ids)}
    scored_items: list[fpdata.ImageItem] = []
    if data:
        items = benchmark_items(data, skip_bad=skip_bad)
        by_id = {it.id: it for it in items.real}
        scored_items = [by_id[i] for i in ids if i in by_id]
        if not scored_items:
            raise ConfigError([f"--data: none of the {len(ids)} scored ids is a real image of {data}, e.g. "
                               f"{ids[:3]}; give the folder that was scored"])
        real_images = LazyImages(items.real)
        gen_images = LazyImages(items.generated)
        dataset = dataset_summary(items, generator)
        hashes = data_hashes(items, ids)
        if labels is None and (Path(data) / LABELS_FILE).is_file():
            labels = Path(data) / LABELS_FILE
    y, labels_from = labels_for(ids, labels, items)
    g = None
    groups_from = ""
    if y is not None or groups:
        need_images = len(scored_items) == len(ids)
        g, groups_from = groups_for(ids, groups, data, scored_items if need_images else (),
                                    real_images if need_images else None)
    dataset["labels_from"] = labels_from or "none"
    if g is not None:
        dataset["groups"] = f"{len(set(g))} ({groups_from})"
    return ReportInputs(
        ids=ids, scores=s, decisions=dec, threshold=t, detector=det, labels=y, groups=g, nearest_ids=nearest,
        nearest_similarities=sims, real_images=real_images, generated_images=gen_images, dataset=dataset,
        provenance=provenance(command, config, registry, hashes),
        title=title or f"Membership audit: {det.get('name')} on {Path(data).name if data else Path(scores).name}",
        **options)


def write_audit(out: str | Path, scores: str | Path, data: str | Path | None = None, *,
                require_labels: bool = False, **kwargs: Any) -> Path | None:
    """Build the report of :func:`inputs_from_scores` and write it to ``out`` (a .html path, or a folder to hold
    report.html); return the path written. With ``require_labels``, write nothing (and return None) unless labels
    of both classes cover some scored images: what `fingerprint predict` does."""
    out = Path(out)
    path = out if out.suffix.lower() in (".html", ".htm") else out / REPORT_FILE
    inputs = inputs_from_scores(scores, data, **kwargs)
    if require_labels and labelled(inputs) is None:
        log.info("no labels of both classes for the scored images: no audit report (give labels to get one)")
        return None
    written = write_report(path, inputs)
    log.info("wrote the audit report %s", written)
    return written


def write_benchmark_audit(
    out: str | Path, root: str | Path, data: Any, scores: np.ndarray, decisions: np.ndarray, detector: Any,
    signal: str, memorisation: Any = None, threshold: float | None = None, *, command: str = "",
    config: Mapping[str, Any] | None = None, n_boot: int = 1000, seed: int = 0,
) -> Path:
    """The harness's report of one detector: its out-of-fold scores and decisions of the labelled dev images
    (``data.train`` of a FitData), thresholds fitted on the training folds, and the memorisation test already run
    on them. ``detector``, when fitted, supplies the nearest generated images shown beside each image;
    ``threshold`` is the one fitted on all dev labels for the test predictions (shown, not used for the table)."""
    lab = np.asarray(data.train)
    ids = [data.real_ids[i] for i in lab]
    nearest: list[list[str]] | None = None
    sims: list[list[float]] | None = None
    if getattr(detector, "gallery_ids", None):
        s = detector.score([data.real[i] for i in lab], ids)
        nearest = [[detector.gallery_ids[j] for j in row] for row in s.nearest]
        sims = [[float(v) for v in row] for row in s.nearest_similarity]
    items = benchmark_items(root, skip_bad=True)
    dataset = dataset_summary(items)
    dataset["labels_from"] = "the data's used/not_used folders (scores out of fold)"
    dataset["groups"] = f"{len(np.unique(data.groups[lab]))} among the labelled images"
    info = detector_info(detector)
    info["signal"] = signal
    how = f"the test predictions use {threshold:.4g}, fitted on all dev labels" if threshold is not None else ""
    inputs = ReportInputs(
        ids=ids, scores=np.asarray(scores, dtype=float), decisions=np.asarray(decisions), threshold=None,
        detector=info, labels=np.asarray(data.labels)[lab], groups=[str(g) for g in np.asarray(data.groups)[lab]],
        nearest_ids=nearest, nearest_similarities=sims, real_images=dict(zip(data.real_ids, data.real, strict=True)),
        generated_images=dict(zip(data.generated_ids, data.generated, strict=True)), dataset=dataset,
        provenance=provenance(command, config, None, data_hashes(items, ids)),
        title=f"Membership audit: {info.get('name')} on {Path(root).name} (benchmark, dev out of fold)",
        threshold_note=how, memorisation=memorisation, n_boot=n_boot, seed=seed)
    out = Path(out)
    path = write_report(out if out.suffix.lower() in (".html", ".htm") else out / REPORT_FILE, inputs)
    log.info("wrote the audit report %s", path)
    return path
