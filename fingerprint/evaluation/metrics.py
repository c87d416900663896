"""Evaluation metrics for membership inference (numpy only).

Conventions used throughout:

* ``labels`` are 1 for *member* (image was in the generator's training set, the positive class) and 0 for
  non-member. Booleans and floats equal to 0.0/1.0 are accepted.
* ``scores`` are real numbers where **higher means more likely a member**.
* ``decisions`` are hard 0/1 predictions (e.g. ``scores >= threshold``).

Results agree with scikit-learn (``roc_auc_score``, ``roc_curve``, ``accuracy_score``, ``precision_score``,
``recall_score``, ``f1_score``, ``cohen_kappa_score``) but scikit-learn is not needed at runtime: the library
must stay importable inside slim serving images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "FPR_TARGETS",
    "all_metrics",
    "binary_metrics",
    "bootstrap_ci",
    "confusion",
    "format_table",
    "group_strata",
    "resampling_unit",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]

# Low-FPR operating points are what matter for membership inference: an attack that is only good "on
# average" (AUC) can still be useless at identifying members confidently. Key -> FPR target.
FPR_TARGETS: dict[str, float] = {"tpr_at_01fpr": 0.001, "tpr_at_1fpr": 0.01, "tpr_at_5fpr": 0.05}

# fps / n_neg is compared with a target FPR such as 0.01; without slack, 3/300 vs 0.01 could flip on
# round-off. The slack is far below 1/n_neg for any realistic n_neg, so it never admits an extra negative.
_FPR_SLACK = 1e-9

_BINARY_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "kappa")


# --------------------------------------------------------------------------------------------- validation


def _as_labels(labels: ArrayLike, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}; flatten it first.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one sample.")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric or boolean 0/1 values, got dtype {arr.dtype}.")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        examples = np.unique(arr[bad])[:5].tolist()
        raise ValueError(
            f"{name} must contain only 0 and 1 (1 = member / positive), found other values such as "
            f"{examples}; binarise them first."
        )
    return arr.astype(np.int64)


def _as_scores(scores: ArrayLike, n: int) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, got shape {arr.shape}; flatten it first.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"scores must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if arr.shape[0] != n:
        raise ValueError(f"labels and scores have different lengths ({n} vs {arr.shape[0]}); pass one "
                         f"score per labelled sample.")
    if not np.isfinite(arr).all():
        raise ValueError(f"scores contain {int((~np.isfinite(arr)).sum())} NaN/inf values; drop or fix them "
                         f"before computing metrics.")
    return arr


def _as_decisions(decisions: ArrayLike, n: int) -> np.ndarray:
    arr = _as_labels(decisions, name="decisions")
    if arr.shape[0] != n:
        raise ValueError(f"labels and decisions have different lengths ({n} vs {arr.shape[0]}); pass one "
                         f"decision per labelled sample.")
    return arr


def _require_both_classes(labels: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        only = "non-members (0)" if n_pos == 0 else "members (1)"
        raise ValueError(f"{what} is undefined when labels contain a single class: all {labels.size} labels "
                         f"are {only}. Evaluate on a set with both members and non-members.")
    return n_pos, n_neg


def _validate_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 <= fpr <= 1.0 or math.isnan(fpr):
        raise ValueError(f"fpr must be a false-positive rate in [0, 1], got {fpr}.")
    return fpr


# ---------------------------------------------------------------------------------------------- ROC / AUC


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Receiver operating characteristic of ``scores`` against binary ``labels``.

    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)`` after checking the input: one point per
    distinct score (tied scores form a single point, so a tie can move TPR and FPR together), in order of
    decreasing threshold, preceded by the point (0, 0) at threshold ``+inf``. Collinear points are kept
    (no ``drop_intermediate``) because callers such as :func:`tpr_at_fpr` need every operating point.

    Returns:
        ``(fpr, tpr, thresholds)``; a sample is predicted positive at threshold ``t`` iff ``score >= t``.

    Raises:
        ValueError: on malformed input or when ``labels`` contain only one class.
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _require_both_classes(y, "ROC curve")
    return sk_roc_curve(y, s, drop_intermediate=False)


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``) after checking the input.

    Equals the probability that a random member scores higher than a random non-member, with ties counted
    as one half.

    Raises:
        ValueError: on malformed input or when ``labels`` contain only one class.
    """
    from sklearn.metrics import roc_auc_score

    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _require_both_classes(y, "ROC AUC")
    return float(roc_auc_score(y, s))


def tpr_at_fpr(labels: ArrayLike, scores: ArrayLike, fpr: float) -> float:
    """Largest true-positive rate reachable with false-positive rate ``<= fpr``.

    Convention: the ROC curve is treated as a *step* function of actually achievable thresholds (a
    threshold admits all samples with ``score >= t``, whole ties included). No interpolation between
    points and no randomised tie-breaking, so the value is a TPR some real threshold attains. The point
    (0, 0) is always achievable, so the result is 0.0 when even the top-scoring tie contains a negative
    beyond the budget, e.g. ``fpr=0.001`` with fewer than 1000 negatives requires zero false positives.

    Raises:
        ValueError: on malformed input, ``fpr`` outside [0, 1], or a single class in ``labels``.
    """
    target = _validate_fpr(fpr)
    fprs, tprs, _ = roc_curve(labels, scores)
    ok = fprs <= target + _FPR_SLACK
    # fpr and tpr are both non-decreasing along the curve, so the last admissible point has the max TPR;
    # max() states the intent without relying on that.
    return float(tprs[ok].max())


# ------------------------------------------------------------------------------------ threshold metrics


def confusion(labels: ArrayLike, decisions: ArrayLike) -> dict[str, int]:
    """Confusion counts ``{"tp", "fp", "tn", "fn"}`` for hard 0/1 ``decisions`` (1 = predicted member)."""
    y = _as_labels(labels)
    d = _as_decisions(decisions, y.size)
    tp = int(np.sum((y == 1) & (d == 1)))
    fp = int(np.sum((y == 0) & (d == 1)))
    tn = int(np.sum((y == 0) & (d == 0)))
    fn = int(np.sum((y == 1) & (d == 0)))
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _binary_from_counts(tp: ArrayLike, fp: ArrayLike, tn: ArrayLike, fn: ArrayLike) -> dict[str, np.ndarray]:
    """Binary metrics from (arrays of) confusion counts; vectorised so bootstrap can reuse it."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    n = tp + fp + tn + fn
    accuracy = _safe_div(tp + tn, n)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    specificity = _safe_div(tn, tn + fp)
    # 2TP / (2TP + FP + FN) equals the harmonic mean of precision and recall, and is 0 (sklearn's
    # zero_division=0) exactly when that harmonic mean is undefined.
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    p_observed = accuracy
    p_expected = _safe_div((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp), n * n)
    kappa = _safe_div(p_observed - p_expected, 1.0 - p_expected)
    return {
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": f1,
        "kappa": kappa,
    }


def binary_metrics(labels: ArrayLike, decisions: ArrayLike) -> dict[str, float]:
    """Accuracy, precision, recall, specificity, F1 and Cohen's kappa of hard ``decisions``.

    Any ratio whose denominator is zero is reported as 0.0, matching scikit-learn's ``zero_division=0``
    (and ``cohen_kappa_score(..., replace_undefined_by=0.0)`` when both labels and decisions are constant
    and equal, where kappa is 0/0).
    """
    c = confusion(labels, decisions)
    out = _binary_from_counts(c["tp"], c["fp"], c["tn"], c["fn"])
    return {k: float(v) for k, v in out.items()}


def _resolve_decisions(
    scores: np.ndarray, decisions: ArrayLike | None, threshold: float | None
) -> np.ndarray | None:
    if decisions is not None and threshold is not None:
        raise ValueError("pass either decisions or threshold, not both: decisions are scores >= threshold.")
    if threshold is not None:
        t = float(threshold)
        if math.isnan(t):
            raise ValueError("threshold is NaN; pass a real number (decisions = scores >= threshold).")
        return (scores >= t).astype(np.int64)
    if decisions is not None:
        return _as_decisions(decisions, scores.size)
    return None


def all_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    decisions: ArrayLike | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """Ranking metrics of ``scores`` plus, optionally, binary metrics of hard decisions.

    Keys: ``auc``, ``tpr_at_01fpr`` (FPR <= 0.1%), ``tpr_at_1fpr`` (1%), ``tpr_at_5fpr`` (5%), and when
    ``decisions`` or ``threshold`` is given (not both; ``threshold`` means ``decisions = scores >=
    threshold``) also ``accuracy``, ``precision``, ``recall``, ``specificity``, ``f1``, ``kappa``.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    d = _resolve_decisions(s, decisions, threshold)
    _require_both_classes(y, "ROC AUC")
    out: dict[str, float] = {"auc": roc_auc(y, s)}
    fprs, tprs, _ = roc_curve(y, s)
    for key, target in FPR_TARGETS.items():
        out[key] = float(tprs[fprs <= target + _FPR_SLACK].max())
    if d is not None:
        out.update(binary_metrics(y, d))
    return out


# ------------------------------------------------------------------------------------------- bootstrap


# By hand because scikit-learn scores one resample per call; this does all resamples in a few array operations.
def _score_metrics_batch(
    codes: np.ndarray, y: np.ndarray, idx: np.ndarray, n_codes: int
) -> dict[str, np.ndarray]:
    """AUC and TPR@FPR for many resamples at once, each given as the ``(n_boot, n)`` indices it draws.

    ``codes`` maps each sample to the rank of its distinct score (0 = lowest). For each resample we count
    positives and negatives per distinct score; every ROC point and the tie-aware AUC follow from cumulative
    sums of those histograms, so no per-resample sort is needed. Resamples lacking a class give NaN.
    """
    n_boot = idx.shape[0]
    offsets = (np.arange(n_boot) * n_codes)[:, None]
    flat = (codes[idx] + offsets).ravel()
    y_rs = y[idx]
    pos_hist = np.bincount(flat, weights=y_rs.ravel(), minlength=n_boot * n_codes).reshape(n_boot, n_codes)
    all_hist = np.bincount(flat, minlength=n_boot * n_codes).reshape(n_boot, n_codes)
    return _metrics_from_histograms(pos_hist, all_hist - pos_hist)


def _score_metrics_weighted(
    codes: np.ndarray, y: np.ndarray, weights: np.ndarray, n_codes: int
) -> dict[str, np.ndarray]:
    """As :func:`_score_metrics_batch`, each resample given as ``(n_boot, n)`` multiplicities of the samples.

    A group bootstrap draws whole groups, so one resample is how many times each sample was drawn (its
    group's count); the histograms are weighted counts of the same codes, at the cost of an image bootstrap.
    """
    n_boot = weights.shape[0]
    offsets = (np.arange(n_boot) * n_codes)[:, None]
    flat = (codes[None, :] + offsets).ravel()
    w = weights.astype(np.float64)
    pos_hist = np.bincount(flat, weights=(w * y[None, :]).ravel(), minlength=n_boot * n_codes)
    all_hist = np.bincount(flat, weights=w.ravel(), minlength=n_boot * n_codes)
    pos_hist = pos_hist.reshape(n_boot, n_codes)
    return _metrics_from_histograms(pos_hist, all_hist.reshape(n_boot, n_codes) - pos_hist)


def _metrics_from_histograms(pos_hist: np.ndarray, neg_hist: np.ndarray) -> dict[str, np.ndarray]:
    """AUC and TPR@FPR per row of ``(n_boot, n_codes)`` positive and negative counts per distinct score."""
    n_pos = pos_hist.sum(axis=1)
    n_neg = neg_hist.sum(axis=1)
    valid = (n_pos > 0) & (n_neg > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Negatives strictly below each distinct score, plus half the tied ones.
        neg_below = np.cumsum(neg_hist, axis=1) - neg_hist
        auc = (pos_hist * (neg_below + 0.5 * neg_hist)).sum(axis=1) / (n_pos * n_neg)
        # Threshold at distinct score k admits everything with code >= k: reverse cumulative sums. Distinct
        # scores absent from a resample just repeat a neighbouring point, which changes no step-ROC maximum.
        tpr = np.cumsum(pos_hist[:, ::-1], axis=1) / n_pos[:, None]
        fps = np.cumsum(neg_hist[:, ::-1], axis=1)
        out: dict[str, np.ndarray] = {"auc": np.where(valid, auc, np.nan)}
        for key, target in FPR_TARGETS.items():
            ok = fps <= target * n_neg[:, None] + _FPR_SLACK * n_neg[:, None]
            # Point (0, 0) is always achievable, hence the initial 0.
            best = np.where(ok, tpr, 0.0).max(axis=1)
            out[key] = np.where(valid, best, np.nan)
    return out


def _as_groups(groups: ArrayLike, n: int, name: str = "groups") -> np.ndarray:
    """``(n,)`` group index 0..G-1 of each sample from any hashable-like ids (equal ids = one group)."""
    arr = np.asarray(groups)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of one group id per sample, got shape {arr.shape}.")
    if arr.shape[0] != n:
        raise ValueError(f"labels and {name} have different lengths ({n} vs {arr.shape[0]}); pass one group id "
                         f"(e.g. patient) per labelled sample.")
    if arr.dtype == object:
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in arr.tolist()):
            raise ValueError(f"{name} contains missing values (None/NaN); give every sample a group id.")
        arr = arr.astype(str)
    elif np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError(f"{name} contains {int(np.isnan(arr).sum())} NaN values; give every sample a group id.")
    return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)


def group_strata(y: np.ndarray, g: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Groups split by class for a stratified group resample, and the ``(G,)`` number of members per group.

    Returns ``[member-only groups, non-member-only groups, mixed groups]`` (empty strata dropped), each the
    sorted group indices of that stratum. A group whose images all share one label belongs to that label's
    stratum; a group holding both (a patient with used and not-used slices) is *mixed*: mixed groups are
    resampled among themselves, so every resample holds as many mixed groups as the data.
    """
    n_groups = int(g.max()) + 1
    size = np.bincount(g, minlength=n_groups)
    pos = np.bincount(g, weights=y, minlength=n_groups)
    strata = [np.flatnonzero(pos == size), np.flatnonzero(pos == 0), np.flatnonzero((pos > 0) & (pos < size))]
    return [s for s in strata if s.size], pos


def bootstrap_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    decisions: ArrayLike | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
    groups: ArrayLike | None = None,
) -> dict[str, tuple[float, float, float]]:
    """Percentile bootstrap confidence intervals for every metric of :func:`all_metrics`.

    Returns ``{metric: (point, low, high)}`` where ``point`` is the metric on the full data and
    ``(low, high)`` are the ``alpha/2`` and ``1 - alpha/2`` quantiles over ``n_boot`` resamples.

    The resampling unit is the sample, or with ``groups`` (one id per sample, e.g. the patient) the group: each
    resample draws whole groups with replacement, so near-duplicate neighbouring slices of one patient count as
    one observation, not as many independent ones (an image bootstrap gives too narrow intervals for them).

    With ``stratified=True`` (default) members and non-members are resampled separately, keeping class
    counts fixed so AUC and TPR@FPR are defined in every resample. With groups, the strata are the groups
    whose images are all members, those that are all non-members, and the *mixed* groups (holding both); each
    stratum is resampled within itself, so a resample has as many groups of each kind as the data (the number
    of images still varies with the sizes of the groups drawn). With ``stratified=False`` whole samples (or
    groups) are resampled; resamples that happen to contain one class are ignored for the ranking metrics (NaN,
    skipped by the quantiles).

    Percentile intervals need not contain the point estimate for statistics at the edge of their range
    (e.g. TPR at 0.1% FPR with few negatives), although they almost always do for AUC and accuracy.
    A fixed ``seed`` makes the intervals reproducible; with one sample per group the group bootstrap draws
    exactly the resamples of the image bootstrap with the same seed.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    d = _resolve_decisions(s, decisions, threshold)
    g = None if groups is None else _as_groups(groups, y.size)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}.")
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (0.05 gives a 95% interval), got {alpha}.")
    point = all_metrics(y, s, decisions=d)  # also rejects single-class labels

    rng = np.random.default_rng(seed)
    n = y.size
    pos_idx = np.flatnonzero(y == 1)
    neg_idx = np.flatnonzero(y == 0)
    _, codes = np.unique(s, return_inverse=True)
    codes = codes.reshape(-1)
    n_codes = int(codes.max()) + 1
    if g is not None:
        n_groups = int(g.max()) + 1
        strata = group_strata(y, g)[0] if stratified else [np.arange(n_groups)]

    # Process resamples in chunks so memory stays bounded (histograms are n_boot x n_distinct_scores).
    chunk = max(1, min(n_boot, 1_000_000 // max(n_codes, n)))
    samples: dict[str, list[np.ndarray]] = {k: [] for k in point}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        if g is not None:
            # How often each group is drawn, stratum by stratum; a sample counts as often as its group.
            offsets = (np.arange(b) * n_groups)[:, None]
            counts = np.zeros(b * n_groups, dtype=np.int64)
            for st in strata:
                drawn = st[rng.integers(0, st.size, size=(b, st.size))]
                counts += np.bincount((drawn + offsets).ravel(), minlength=b * n_groups)
            w = counts.reshape(b, n_groups)[:, g]
            batch = _score_metrics_weighted(codes, y, w, n_codes)
        else:
            if stratified:
                idx = np.concatenate(
                    [
                        pos_idx[rng.integers(0, pos_idx.size, size=(b, pos_idx.size))],
                        neg_idx[rng.integers(0, neg_idx.size, size=(b, neg_idx.size))],
                    ],
                    axis=1,
                )
            else:
                idx = rng.integers(0, n, size=(b, n))
            batch = _score_metrics_batch(codes, y, idx, n_codes)
        for key, val in batch.items():
            samples[key].append(val)
        if d is not None:
            if g is not None:
                tp = (w * (y & d)).sum(axis=1)
                fp = (w * ((1 - y) & d)).sum(axis=1)
                n_pos = (w * y).sum(axis=1)
                n_rs = w.sum(axis=1)
            else:
                y_rs = y[idx]
                d_rs = d[idx]
                tp = (y_rs & d_rs).sum(axis=1)
                fp = ((1 - y_rs) & d_rs).sum(axis=1)
                n_pos = y_rs.sum(axis=1)
                n_rs = n
            fn = n_pos - tp
            tn = (n_rs - n_pos) - fp
            for key, val in _binary_from_counts(tp, fp, tn, fn).items():
                samples[key].append(val)
        done += b

    out: dict[str, tuple[float, float, float]] = {}
    for key, pt in point.items():
        vals = np.concatenate(samples[key])
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            low = high = float("nan")
        else:
            low, high = (float(q) for q in np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0]))
        out[key] = (pt, low, high)
    return out


def resampling_unit(groups: ArrayLike | None) -> str:
    """One line for reports: what :func:`bootstrap_ci` resampled, given the ``groups`` it was passed."""
    if groups is None:
        return ("images (no groups given: if neighbouring slices of one patient are among them, the intervals "
                "are too narrow)")
    n_groups = len(np.unique(np.asarray(groups).astype(str)))
    return f"whole groups ({n_groups} groups, drawn with replacement within their class)"


# ---------------------------------------------------------------------------------------------- tables


def _format_cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return format(float(value), floatfmt)
    if isinstance(value, tuple) and len(value) == 3 and all(
        isinstance(v, int | float | np.integer | np.floating) for v in value
    ):
        # (point, low, high) from bootstrap_ci.
        p, lo, hi = (format(float(v), floatfmt) for v in value)
        return f"{p} [{lo}, {hi}]"
    # A bare "|" would split the cell; newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    floatfmt: str = ".3f",
) -> str:
    """Render ``rows`` as a GitHub-flavoured Markdown table.

    Args:
        rows: one mapping per table row; a key missing from a row renders as an empty cell.
        columns: row keys to show, in order; an entry may be ``(key, header)`` to relabel a column.
        floatfmt: ``format()`` spec for floats, also applied to ``(point, low, high)`` tuples from
            :func:`bootstrap_ci`, which render as ``point [low, high]``.

    Returns:
        The table text ending with a newline. Numeric columns are right-aligned.
    """
    if not columns:
        raise ValueError("format_table needs at least one entry in columns.")
    keys: list[str] = []
    headers: list[str] = []
    for col in columns:
        if isinstance(col, str):
            keys.append(col)
            headers.append(col)
        elif isinstance(col, tuple) and len(col) == 2 and all(isinstance(c, str) for c in col):
            keys.append(col[0])
            headers.append(col[1])
        else:
            raise ValueError(f"format_table columns must be str or (key, header) pairs, got {col!r}.")
    cells = [[_format_cell(row.get(k), floatfmt) for k in keys] for row in rows]
    numeric = [
        any(isinstance(row.get(k), int | float | np.number | tuple) for row in rows)
        and all(row.get(k) is None or isinstance(row.get(k), int | float | np.number | tuple) for row in rows)
        for k in keys
    ]
    widths = [max([len(h), 3, *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    rules = [("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    sep = "| " + " | ".join(rules) + " |"
    header = line([h.replace("|", "\\|") for h in headers])
    return "\n".join([header, sep, *(line(r) for r in cells)]) + "\n"
