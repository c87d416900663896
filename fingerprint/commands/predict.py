"""`fingerprint predict`: score the real images of a test set with a saved detector of any kind.

    fingerprint predict --model runs/s1 --data ../shared/bench/ctbench-s1 --out runs/s1/test

Writes `submission.csv` (one `<id>,<0|1>` line per real image, no header, as ImageCLEF expects), `scores.csv`
(`id,score,decision,nearest_ids,nearest_similarities`), `scores.jsonl` (one object per image with the same and
the threshold) and pictures of the evidence. The detector's gallery is the one it was fitted on; when `--data`
holds other generated images, the detector is re-indexed on them (what it learnt from labels is kept).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image

from fingerprint.config import ConfigError, Range, check_fields, flag, path_problems, to_dict, validate
from fingerprint.data import images as fpdata
from fingerprint.data.imagesets import benchmark_items, pool_groups
from fingerprint.detectors import Detector, Scores, is_detector_dir, load_detector
from fingerprint.evaluation import plots
from fingerprint.index_store import use_stored_index
from fingerprint.io import write_csv_atomic, write_text_atomic
from fingerprint.report import write_audit

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    model: str = ""
    """A saved detector: the folder written by `fingerprint fit`, `fingerprint train` (its --out, or
    <out>/detector), the benchmark's --out/detector, or a registry download."""
    data: str = ""
    """Test folder with generated/ and real_unknown/, or a benchmark folder with dev/ and test/ (then the test
    set's real images are scored; all generated images, dev and test, form the gallery)."""
    out: str = "runs/predict"
    """Output folder for submission.csv, scores.csv, scores.jsonl and pictures."""
    threshold: float | None = None
    """Decision threshold; None uses the detector's."""
    index: str = ""
    """A stored gallery index (`fingerprint embed`) searched instead of embedding the generated images; empty:
    <model>/index when present and made from the same generated images."""
    skip_bad: bool = False
    """Skip unreadable image files (listed in the log) instead of stopping."""
    evidence: Annotated[int, Range(0)] = 8
    """Highest-scoring images shown beside their nearest generated images in evidence.png (0 = no picture)."""
    labels: str = ""
    """CSV id,label (1 = used for training) of the scored images: with labels, the audit report (report.html) is
    written too. Empty: <data>/test_labels.csv when present, else no report (`fingerprint report` makes one)."""

    def problems(self) -> list[str]:
        return (check_fields(self) + path_problems(self, "model", "a saved detector folder (see --help)")
                + path_problems(self, "data", "a test folder or benchmark folder"))


def resolve_detector(path: str | Path) -> Path:
    """The detector folder inside a run folder (``<out>/detector``), or the folder itself."""
    path = Path(path)
    for candidate in (path, path / "detector"):
        if is_detector_dir(candidate):
            return candidate
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "not a folder"
    raise ConfigError([f"{flag('model')}: {path} holds no saved detector (meta.json + arrays.safetensors, "
                       f"here or in detector/; found {found}); give the --out of `fingerprint fit` or `train`"])


@dataclass
class Prediction:
    ids: list[str]
    scores: Scores
    threshold: float
    gallery_ids: list[str]
    images: list[Image.Image]
    detector: Detector
    generated: dict[str, fpdata.ImageItem]
    """The --data folder's generated images by id: the evidence picture reads the neighbours it shows from them."""

    @property
    def decisions(self) -> np.ndarray:
        return (self.scores.score >= self.threshold).astype(np.int64)

    def nearest_ids(self, row: int) -> list[str]:
        return [self.gallery_ids[j] for j in self.scores.nearest[row]]


def predict_folder(det: Detector, data: str | Path, threshold: float | None = None, skip_bad: bool = False,
                   keep_gallery: bool = False) -> Prediction:
    """Score the real images of a test or benchmark folder, re-indexing ``det`` when its gallery differs (unless
    ``keep_gallery``: a stored index given on purpose)."""
    items = benchmark_items(data, skip_bad=skip_bad)
    to_score = items.to_score()
    if not to_score:
        raise ConfigError([f"{flag('data')}: {data} holds no real images to score"])
    images, kept, _ = fpdata.load_images(to_score, skip_bad=skip_bad)
    ids = [it.id for it in kept]
    gen_ids = [it.id for it in items.generated]
    if gen_ids != det.gallery_ids and not keep_gallery:
        log.info("re-indexing %s on the %d generated and %d real images of %s", det.name, len(gen_ids),
                 len(items.real), data)
        gen, gen_kept, _ = fpdata.load_images(items.generated, skip_bad=skip_bad)
        ref, ref_kept, _ = fpdata.load_images(items.real, skip_bad=True)
        det.index(gen, [it.id for it in gen_kept], ref, [it.id for it in ref_kept], pool_groups(data, ref_kept, ref))
    t = det.threshold if threshold is None else float(threshold)
    log.info("scoring %d real images with %s (%s) against %d generated, threshold %.4f", len(ids), det.name,
             det.kind, len(det.gallery_ids), t)
    return Prediction(ids, det.score(images, ids), t, det.gallery_ids, images, det,
                      {it.id: it for it in items.generated})


def write_prediction(pred: Prediction, out: Path, evidence: int = 8) -> list[Path]:
    s = pred.scores
    dec = pred.decisions
    written = [write_csv_atomic(out / "submission.csv", zip(pred.ids, dec.tolist(), strict=True))]
    written.append(write_csv_atomic(
        out / "scores.csv",
        [(i, f"{s.score[n]:.6f}", int(dec[n]), ";".join(pred.nearest_ids(n)),
          ";".join(f"{v:.4f}" for v in s.nearest_similarity[n])) for n, i in enumerate(pred.ids)],
        header=("id", "score", "decision", "nearest_ids", "nearest_similarities"),
    ))
    written.append(write_text_atomic(out / "scores.jsonl", "".join(
        json.dumps({"id": i, "score": float(s.score[n]), "decision": int(dec[n]), "threshold": pred.threshold,
                    "kind": pred.detector.kind, "signal": pred.detector.meta.signal,
                    "nearest_ids": pred.nearest_ids(n),
                    "nearest_similarities": [float(v) for v in s.nearest_similarity[n]]}) + "\n"
        for n, i in enumerate(pred.ids))))
    written.append(plots.score_histogram(s.score, [None] * len(pred.ids), out / "scores.png",
                                         threshold=pred.threshold, title=f"{pred.detector.name}: test scores"))
    if evidence:
        # Only the neighbours shown are read back from disk: the gallery may be far larger than the picture.
        top = np.argsort(-s.score, kind="stable")[:evidence]
        rows_needed = sorted({int(j) for n in top for j in s.nearest[n][:4]})
        items = pred.generated
        found = [j for j in rows_needed if pred.gallery_ids[j] in items]
        images = fpdata.load_images([items[pred.gallery_ids[j]] for j in found], skip_bad=True)[0]
        gallery = dict(zip(found, images, strict=False))
        rows = plots.evidence_rows(pred.ids, pred.images, pred.gallery_ids, _Blank(gallery), s.score, s.nearest,
                                   s.nearest_similarity, rows=evidence)
        written.append(plots.evidence_grid(rows, out / "evidence.png", title="highest-scoring real images"))
    return written


class _Blank(dict):
    """Gallery images by row; a row whose file is gone shows as a blank cell instead of failing the picture."""

    def __missing__(self, key: int) -> np.ndarray:
        return np.zeros((8, 8), dtype=np.uint8)


def main(config: PredictConfig) -> Path:
    """Score the real images of `config.data`; return the submission file's path."""
    validate(config)
    out = Path(config.out)
    _check_writable(out)
    det_dir = resolve_detector(config.model)
    det = load_detector(det_dir)
    # Only whether there is one: the returned index's arrays are not kept alive beside the detector's gallery.
    has_index = use_stored_index(det, det_dir, config.index or None) is not None
    pred = predict_folder(det, config.data, config.threshold, config.skip_bad,
                          keep_gallery=has_index and bool(config.index))
    write_prediction(pred, out, config.evidence)
    write_audit(out, out / "scores.jsonl", config.data, labels=config.labels or None, model=det,
                require_labels=True, command="fingerprint predict", config=to_dict(config), skip_bad=config.skip_bad)
    log.info("wrote %s (%d lines, %d predicted used)", out / "submission.csv", len(pred.ids),
             int(pred.decisions.sum()))
    return out / "submission.csv"


def _check_writable(out: Path) -> None:
    """Fail before any work when the output folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fingerprint-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError([f"{flag('out')}: cannot write to {out} ({e.strerror or e}); choose another folder"]) from e
