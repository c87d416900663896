"""Report pictures: ROC curves, score histograms, confusion matrices, evidence grids, training curves.

Every function draws on a private ``matplotlib.figure.Figure`` attached to a ``FigureCanvasAgg`` instead of
going through ``pyplot``. pyplot keeps a global figure registry and picks a backend on first import, which
breaks headless Ray workers (and is not thread-safe); a bare Figure needs neither, so importing this
module never changes matplotlib's global state and any number of threads may plot at once.

Each function writes its PNG atomically (temp file + ``os.replace``) so a reader such as an MLflow artifact
upload or a web page never sees half a file, and returns the final ``Path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fingerprint.evaluation import metrics

__all__ = ["roc_plot", "score_histogram", "confusion_plot", "evidence_grid", "training_curves"]

# Fixed colours per meaning so every picture in a report uses the same code for "used" / "not used".
_USED = "#d62728"
_NOT_USED = "#1f77b4"
_UNLABELLED = "#555555"
_DPI = 120
_MAX_EVIDENCE_ROWS = 12


# ----------------------------------------------------------------------------------------------- helpers


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no pyplot, no global backend switch
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` to ``path`` via a sibling temp file so a crash never leaves a truncated PNG."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        # Drop the renderer's buffers now; long-running workers draw many figures.
        fig.clear()
    return final


def _scores_array(scores: Any, what: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=float).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what}: no scores given; pass at least one score per image.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"{what}: {bad} score(s) are NaN or infinite; drop or fix them before plotting.")
    return arr


def _labels_array(labels: Any, n: int, what: str) -> np.ndarray:
    """Labels as int array with 1 = used, 0 = not used, -1 = unknown (from -1, None or NaN)."""
    raw = list(labels) if not isinstance(labels, np.ndarray) else labels.reshape(-1).tolist()
    if len(raw) != n:
        raise ValueError(f"{what}: {len(raw)} labels for {n} scores; they must be the same length.")
    out = np.empty(n, dtype=np.int64)
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out[i] = -1
            continue
        try:
            iv = int(v)
        except (TypeError, ValueError):
            iv = None
        if iv is None or iv != v or iv not in (-1, 0, 1):
            raise ValueError(
                f"{what}: label {v!r} at position {i} is not understood; "
                "use 1 (used in training), 0 (not used), or -1/None (unknown)."
            )
        out[i] = iv
    return out


def _short(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


# ----------------------------------------------------------------------------------------------- plots


def roc_plot(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike[str],
    log_fpr: bool = False,
    title: str = "",
) -> Path:
    """Draw one ROC curve per detector, with AUC in the legend and the chance diagonal.

    Args:
        curves: detector name -> (labels, scores). Labels are 1 = used, 0 = not used; unknown labels
            (-1/None/NaN) are left out of that detector's curve and counted in its legend entry.
        path: where to write the PNG.
        log_fpr: log-scale the FPR axis from 1e-3 to 1, which is where membership inference matters
            (few false accusations); 1% and 5% FPR get dotted guides and the legend adds TPR@1% FPR.
        title: figure title.

    Returns:
        The path written.
    """
    if not curves:
        raise ValueError("roc_plot: `curves` is empty; pass {detector name: (labels, scores)}.")
    fig = new_figure(5.6, 5.0)
    ax = fig.add_subplot()
    low = 1e-3
    for name, pair in curves.items():
        try:
            labels, scores = pair
        except (TypeError, ValueError):
            raise ValueError(f"roc_plot: curves[{name!r}] must be a (labels, scores) pair.") from None
        s = _scores_array(scores, f"roc_plot: curves[{name!r}] scores")
        y = _labels_array(labels, s.size, f"roc_plot: curves[{name!r}]")
        known = y >= 0
        y_k, s_k = y[known], s[known]
        if not (np.any(y_k == 1) and np.any(y_k == 0)):
            raise ValueError(
                f"roc_plot: curves[{name!r}] needs at least one 'used' (1) and one 'not used' (0) label "
                "to draw a ROC curve."
            )
        # Same functions as the reports use, so the legend never disagrees with a metrics table.
        fpr, tpr, _ = metrics.roc_curve(y_k, s_k)
        label = f"{name}  (AUC {metrics.roc_auc(y_k, s_k):.3f}"
        if log_fpr:
            label += f", TPR@1% {metrics.tpr_at_fpr(y_k, s_k, 0.01):.2f}"
        n_unknown = int((~known).sum())
        if n_unknown:
            label += f", {n_unknown} unlabelled skipped"
        label += ")"
        if log_fpr:
            # A log axis cannot show fpr = 0; pin those points to the left edge so the curve still starts
            # where a detector with no false positives actually starts.
            fpr = np.maximum(fpr, low)
        ax.plot(fpr, tpr, drawstyle="steps-post" if log_fpr else "default", lw=2, label=label)
    if log_fpr:
        xs = np.logspace(np.log10(low), 0, 200)
        ax.plot(xs, xs, ls="--", color="0.6", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlim(low, 1.0)
        for x, txt in ((0.01, "1% FPR"), (0.05, "5% FPR")):
            ax.axvline(x, ls=":", color="0.3", lw=1)
            ax.text(x, 0.98, f" {txt}", rotation=90, va="top", ha="right", fontsize=8, color="0.3")
    else:
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
        ax.set_xlim(0, 1)
        ax.set_aspect("equal")
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (not-used images flagged as used)")
    ax.set_ylabel("true positive rate (used images found)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.set_title(title or ("ROC (log FPR)" if log_fpr else "ROC"))
    return save_figure(fig, path)


def score_histogram(
    scores: Any,
    labels: Any,
    path: str | os.PathLike[str],
    threshold: float | None = None,
    title: str = "",
) -> Path:
    """Overlay the score distributions of used (1), not used (0) and unlabelled (-1/None) images.

    Each group is normalised to density so a small group stays visible next to a large one; the legend
    gives the counts. Unlabelled images are drawn as an outline so they never hide the labelled groups.
    ``threshold`` adds a vertical line where the detector's decision flips.
    """
    s = _scores_array(scores, "score_histogram: scores")
    y = _labels_array(labels, s.size, "score_histogram")
    lo, hi = float(s.min()), float(s.max())
    if threshold is not None:
        lo, hi = min(lo, float(threshold)), max(hi, float(threshold))
    if hi == lo:  # all scores equal: give the single bar some width
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, int(np.clip(np.sqrt(s.size) * 2, 10, 60)) + 1)

    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    groups = (
        (0, "not used", _NOT_USED, dict(histtype="stepfilled", alpha=0.45)),
        (1, "used", _USED, dict(histtype="stepfilled", alpha=0.45)),
        (-1, "unlabelled", _UNLABELLED, dict(histtype="step", lw=1.6, ls="-")),
    )
    for value, name, color, style in groups:
        part = s[y == value]
        if part.size == 0:
            continue
        ax.hist(part, bins=bins, density=True, color=color, label=f"{name} (n={part.size})", **style)
    if threshold is not None:
        ax.axvline(float(threshold), color="black", ls="--", lw=1.5, label=f"threshold = {threshold:.3g}")
    ax.set_xlabel("membership score (higher = more likely used in training)")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.9)
    ax.set_title(title or "Score distribution")
    return save_figure(fig, path)


def confusion_plot(labels: Any, decisions: Any, path: str | os.PathLike[str], title: str = "") -> Path:
    """2x2 confusion matrix: rows = truth (not used, used), columns = decision (not used, used).

    Each cell shows the count and the percentage of its truth row, so the diagonal reads directly as
    specificity and recall. Unlabelled images (-1/None) cannot be scored and are left out (and counted
    in the subtitle).
    """
    d_raw = np.asarray(decisions).reshape(-1)
    y = _labels_array(labels, d_raw.size, "confusion_plot")
    try:
        d = d_raw.astype(float)
    except (TypeError, ValueError):
        raise ValueError("confusion_plot: decisions must be booleans or 0/1.") from None
    if not np.all((d == 0) | (d == 1)):
        raise ValueError("confusion_plot: decisions must be booleans or 0/1 (1 = judged used in training).")
    d = d.astype(np.int64)
    known = y >= 0
    n_unknown = int((~known).sum())
    if not known.any():
        raise ValueError("confusion_plot: every label is unknown; a confusion matrix needs known labels.")
    y, d = y[known], d[known]
    counts = np.array([[np.sum((y == t) & (d == p)) for p in (0, 1)] for t in (0, 1)])
    row_tot = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_tot, out=np.zeros(counts.shape, dtype=float), where=row_tot > 0)

    fig = new_figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for t in range(2):
        for p in range(2):
            ax.text(
                p, t, f"{counts[t, p]}\n{100 * frac[t, p]:.1f}%",
                ha="center", va="center", fontsize=13,
                color="white" if frac[t, p] > 0.55 else "black",
            )
    names = ["not used", "used"]
    ax.set_xticks([0, 1], labels=names)
    ax.set_yticks([0, 1], labels=names)
    ax.set_xlabel("decision")
    ax.set_ylabel("truth")
    sub = f"n={int(counts.sum())}, % of each truth row"
    if n_unknown:
        sub += f"; {n_unknown} unlabelled left out"
    ax.set_title(f"{title or 'Confusion matrix'}\n{sub}", fontsize=10)
    return save_figure(fig, path)


def _as_display_image(img: Any, where: str) -> tuple[np.ndarray, float | None, float | None]:
    """Image ready for imshow plus (vmin, vmax) for grey images.

    uint8 is shown on 0..255, floats on [0, 1] or [-1, 1] when they fit (usual dataset / tanh-GAN ranges),
    otherwise stretched to their own range, so real and generated images look alike without guessing.
    """
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # CHW (torch layout) -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 3:
        if a.dtype == np.uint8:
            return a, None, None
        a = a.astype(float)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a), None, None
    if a.ndim != 2:
        raise ValueError(f"evidence_grid: {where} has shape {a.shape}; expected a 2-D grey image (H, W).")
    if a.dtype == np.uint8:
        return a, 0.0, 255.0
    a = a.astype(float)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if lo >= 0.0 and hi <= 1.0:
        return a, 0.0, 1.0
    if lo >= -1.0 and hi <= 1.0:
        return a, -1.0, 1.0
    return a, lo, hi if hi > lo else lo + 1.0


def evidence_grid(
    rows: Sequence[tuple[str, Any, Sequence[tuple[str, Any, float]]]],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Show each real image next to its nearest generated images, with similarities, as visual evidence.

    Args:
        rows: one entry per real image: (real id, real image, [(generated id, generated image, similarity),
            ...]), neighbours in the order to show (normally most similar first). Images are 2-D grey
            arrays (uint8 or float); (H, W, 1), (1, H, W) and RGB are accepted too. Only the first 12 rows
            are drawn so the picture stays readable; the title says when rows were dropped.
        path: where to write the PNG.
        title: figure title.
    """
    if not rows:
        raise ValueError("evidence_grid: `rows` is empty; pass at least one (real id, image, neighbours).")
    shown = list(rows)[:_MAX_EVIDENCE_ROWS]
    n_cols = 1 + max(len(r[2]) for r in shown)
    cell = 1.7
    fig = new_figure(cell * n_cols, cell * 1.18 * len(shown) + 0.5)
    grid = fig.add_gridspec(len(shown), n_cols)
    for i, row in enumerate(shown):
        try:
            real_id, real_img, neighbours = row
        except (TypeError, ValueError):
            raise ValueError(
                f"evidence_grid: rows[{i}] must be (real id, real image, [(gen id, gen image, similarity)])."
            ) from None
        cells: list[tuple[str, Any, str, str]] = [(str(real_id), real_img, "real", f"rows[{i}] real image")]
        for j, nb in enumerate(neighbours):
            try:
                gen_id, gen_img, sim = nb
            except (TypeError, ValueError):
                raise ValueError(
                    f"evidence_grid: rows[{i}] neighbour {j} must be (generated id, image, similarity)."
                ) from None
            cells.append((str(gen_id), gen_img, f"sim {float(sim):.3f}", f"rows[{i}] neighbour {j}"))
        for j, (cid, img, caption, where) in enumerate(cells):
            ax = fig.add_subplot(grid[i, j])
            data, vmin, vmax = _as_display_image(img, where)
            ax.imshow(data, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(_short(cid), fontsize=7)
            ax.set_xlabel(caption, fontsize=8, fontweight="bold" if j == 0 else "normal")
            if j == 0:
                # Frame the real image so each row's anchor stands out from its generated neighbours.
                for spine in ax.spines.values():
                    spine.set_edgecolor(_USED)
                    spine.set_linewidth(2)
    head = title or "Real images and their nearest generated images"
    if len(rows) > len(shown):
        head += f"  (first {len(shown)} of {len(rows)} shown)"
    fig.suptitle(head, fontsize=10)
    return save_figure(fig, path)


def training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    keys: Sequence[str] = ("loss", "active_fraction", "val_auc"),
) -> Path:
    """One small panel per metric in ``keys`` that appears in ``history`` (x = ``epoch``, else the index).

    Epochs where a metric is missing or None (e.g. validation run every few epochs) are skipped for that
    panel only. Keys that never appear are left out rather than drawn empty.
    """
    if not history:
        raise ValueError("training_curves: `history` is empty; pass one dict of metrics per epoch.")
    present = [k for k in keys if any(h.get(k) is not None for h in history)]
    if not present:
        seen = sorted({k for h in history for k in h})
        raise ValueError(
            f"training_curves: none of the keys {list(keys)} appear in history; available keys: {seen}. "
            "Pass keys=... naming the metrics to plot."
        )
    xs = np.array([float(h["epoch"]) if h.get("epoch") is not None else float(i) for i, h in enumerate(history)])
    fig = new_figure(3.2 * len(present), 2.8)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, key in zip(axes, present, strict=True):
        pts = [(x, float(h[key])) for x, h in zip(xs, history, strict=True) if h.get(key) is not None]
        px, py = np.array(pts).T
        ax.plot(px, py, marker="o" if len(pts) <= 30 else None, ms=3, lw=1.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def evidence_rows(
    ids: Sequence[str], images: Sequence[Any], gallery_ids: Sequence[str], gallery: Sequence[Any],
    scores: np.ndarray, nearest: np.ndarray, nearest_similarity: np.ndarray, rows: int = 8, per_row: int = 4,
) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray, float]]]]:
    """Rows for `evidence_grid`: the highest-scoring real images, each beside its nearest generated images."""
    return [
        (ids[i], np.asarray(images[i]),
         [(gallery_ids[j], np.asarray(gallery[j]), float(v))
          for j, v in zip(nearest[i][:per_row], nearest_similarity[i][:per_row], strict=True)])
        for i in np.argsort(-np.asarray(scores))[:rows]
    ]
