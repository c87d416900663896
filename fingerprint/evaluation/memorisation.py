"""Is there any evidence of memorisation at all? A group-level permutation test of the AUC (numpy only).

Per-image membership decisions only make sense when the scores separate the generator's training images from
other real images better than chance. :func:`memorisation_test` tests

    H0: the scores do not separate used (members) from not-used images

by permuting the labels among whole groups (pseudo-patients): neighbouring CT slices of one patient are near
duplicates, so permuting single images would treat them as independent evidence and give too small p-values.

    from fingerprint.evaluation.memorisation import memorisation_test
    res = memorisation_test(labels, scores, groups)          # 2000 permutations, seed 0
    res.p_value, res.verdict                                   # "no evidence of memorisation (p = 0.41): ..."

The test is one-sided (higher score = more likely a member, as everywhere in fingerprint):
``p = (1 + #{permutations with AUC >= observed}) / (1 + n_permutations)``, so p is never 0 and its smallest
value is ``1 / (1 + n_permutations)``.

No evidence is not an all-clear, and how far from one it is depends on the scores, the labels and the groups:
``detectable_auc`` is the AUC the test would find 4 times out of 5 (80% power at the 0.05 level) for them. It is
the permutation distribution's 95th percentile plus 0.84 of its standard deviation (the normal approximation of
the AUC's spread under the alternative, the permutation spread standing in for it); simulated binormal scores with
patient effects (60 groups of 1-5 slices, within-patient correlation 0 to 0.8) gave 75% to 89% power at it.
Few labelled patients, or strongly correlated slices, push it up. "No evidence" says little about separations
weaker than it, and even at it the test misses 1 time in 5. Where the groups allow too few label assignments for
p to reach 0.05 it is 1.0 (nothing can be detected); with tied scores or too few permutations it is nan.

A small p says the scores rank members above non-members as a population. For a detector whose signal is
``distribution`` (how generated-like an image looks overall) that can come from any difference between the
training patients and the other real images, not only from memorisation of single images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.evaluation.metrics import _as_groups, _as_labels, _as_scores, _require_both_classes, roc_auc

__all__ = ["ALPHA", "N_PERMUTATIONS", "POWER", "MemorisationTest", "memorisation_test", "power_text"]

N_PERMUTATIONS = 2000
"""Default number of permutations: p-values down to 1/2001, resolution well below the 0.05 level."""
ALPHA = 0.05
"""Level of the verdict: p above it is no evidence of memorisation."""
POWER = 0.8
"""Power at which ``detectable_auc`` is quoted."""

# Chunk the (permutations x samples) label matrix so memory stays bounded for large evaluations.
_MAX_CELLS = 2_000_000


@dataclass(frozen=True)
class MemorisationTest:
    """Result of :func:`memorisation_test`."""

    auc: float
    """Observed AUC of the scores against the labels."""
    p_value: float
    """One-sided permutation p-value of H0 "the scores do not separate members from non-members"."""
    n_permutations: int
    n_groups: int
    """Exchangeable units: groups, or images when no groups were given."""
    unit: str
    """'group' or 'image': what the permutations moved labels between."""
    verdict: str
    """One sentence for reports (see :func:`verdict_text`)."""
    detectable_auc: float = math.nan
    """The AUC this test detects with 80% power at the 0.05 level on these labels and groups (1.0: not even a
    perfect separation would be detected reliably); a weaker separation can pass unnoticed."""

    @property
    def evidence(self) -> bool:
        """True when p <= 0.05: the scores separate members from non-members beyond chance."""
        return self.p_value <= ALPHA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "evidence": self.evidence}


def format_p(p: float) -> str:
    """A p-value for text: three significant digits (0.412, 0.0005)."""
    return f"{p:.3g}"


def power_text(detectable_auc: float) -> str:
    """What the test could have found, e.g. 'the test finds a separation reliably (80% power) only from AUC
    0.71'."""
    if not math.isfinite(detectable_auc):
        return "the test's power cannot be estimated here (tied scores or too few permutations)"
    if detectable_auc >= 1.0:
        return "the test would not reliably find even a perfect separation here"
    return f"the test finds a separation reliably ({POWER:.0%} power) only from AUC {detectable_auc:.2f}"


def verdict_text(auc: float, p: float, detectable_auc: float = math.nan) -> str:
    """The verdict for reports: no evidence of memorisation when p > 0.05 (with what the test could have found),
    else that the scores separate."""
    if p > ALPHA:
        return (f"no evidence of memorisation (p = {format_p(p)}): per-image decisions cannot be told from chance "
                f"on these labels; not an all-clear: {power_text(detectable_auc)}")
    return f"the scores separate training members from non-members (AUC {auc:.3f}, p = {format_p(p)})"


def _midranks(s: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``s`` with ties given their average rank (the Mann-Whitney convention)."""
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inv]


def _permuted_labels(y: np.ndarray, g: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, len(y))`` label vectors, each a permutation of the labels among whole groups.

    Groups whose images share one label ("pure") exchange that label among all pure groups, whatever their
    sizes; a group with both labels ("mixed") moves its whole label vector to another mixed group of the same
    size (a group alone in its size keeps its vector). Group sizes and which images form a group never change.
    """
    n_groups = int(g.max()) + 1
    size = np.bincount(g, minlength=n_groups)
    pos = np.bincount(g, weights=y, minlength=n_groups)
    out = np.empty((n, y.size), dtype=np.float64)
    pure = np.flatnonzero((pos == 0) | (pos == size))
    if pure.size:
        group_label = (pos[pure] > 0).astype(np.float64)
        perm = rng.permuted(np.broadcast_to(group_label, (n, pure.size)), axis=1)
        slot = np.full(n_groups, -1)
        slot[pure] = np.arange(pure.size)
        rows = np.flatnonzero(np.isin(g, pure))
        out[:, rows] = perm[:, slot[g[rows]]]
    mixed = np.flatnonzero((pos > 0) & (pos < size))
    for k in np.unique(size[mixed]):
        same = mixed[size[mixed] == k]
        # (len(same), k) image indices of each group, in image order; the label vectors move between rows.
        members = np.stack([np.flatnonzero(g == j) for j in same])
        vectors = y[members].astype(np.float64)
        order = np.argsort(rng.random((n, same.size)), axis=1)
        out[:, members.reshape(-1)] = vectors[order].reshape(n, -1)
    return out


def _distinct_assignments(y: np.ndarray, g: np.ndarray, cap: int = 10**6) -> int:
    """How many distinct label assignments the permutations can reach (an upper bound, at most ``cap``)."""
    n_groups = int(g.max()) + 1
    size = np.bincount(g, minlength=n_groups)
    pos = np.bincount(g, weights=y, minlength=n_groups)
    pure = (pos == 0) | (pos == size)
    total = math.comb(int(pure.sum()), int((pure & (pos > 0)).sum()))
    mixed = ~pure
    for k in np.unique(size[mixed]):
        total *= math.factorial(min(int((mixed & (size == k)).sum()), 12))
        total = min(total, cap)
    return min(total, cap)


def memorisation_test(
    labels: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike | None = None,
    n_permutations: int = N_PERMUTATIONS,
    seed: int = 0,
) -> MemorisationTest:
    """Group-level permutation test of the AUC: do ``scores`` separate members (label 1) from non-members?

    Args:
        labels: 1 = used to train the generator (member), 0 = not used.
        scores: higher = more likely a member.
        groups: one id per image (e.g. its patient); labels are permuted among whole groups (see
            :func:`_permuted_labels` for groups holding both labels). None treats every image as its own group,
            which overstates the evidence when neighbouring slices of one patient are among the images.
        n_permutations: random permutations (2000 by default; p cannot fall below ``1 / (1 + n_permutations)``).
        seed: seed of the permutations; the same inputs and seed give the same p-value.

    Returns:
        :class:`MemorisationTest` with the observed AUC, the one-sided p-value
        ``(1 + #{permuted AUC >= observed}) / (1 + n_permutations)``, the AUC detectable with 80% power, and a
        verdict sentence.

    Raises:
        ValueError: on malformed input (the message names the argument), a single class in ``labels``, or
            ``n_permutations`` not a positive integer.
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    g = np.arange(y.size) if groups is None else _as_groups(groups, y.size)
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int | np.integer) or n_permutations < 1:
        raise ValueError(f"n_permutations must be a positive integer (2000 or more for a p-value near 0.05), "
                         f"got {n_permutations!r}.")
    n_permutations = int(n_permutations)
    _require_both_classes(y, "The memorisation test")
    auc = roc_auc(y, s)

    # AUC = (sum of members' midranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg): the ranks are fixed, only the
    # labels move, so every permutation is one matrix-vector product.
    ranks = _midranks(s)
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CELLS // y.size)
    hits = 0
    done = 0
    null: list[np.ndarray] = []
    while done < n_permutations:
        b = min(chunk, n_permutations - done)
        yp = _permuted_labels(y, g, b, rng)
        n_pos = yp.sum(axis=1)
        n_neg = y.size - n_pos
        with np.errstate(divide="ignore", invalid="ignore"):
            perm_auc = (yp @ ranks - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
        # A tie with the observed AUC counts against H0's rejection; the slack absorbs round-off only.
        hits += int(np.sum(perm_auc >= auc - 1e-12))
        null.append(perm_auc[np.isfinite(perm_auc)])
        done += b
    p = (1 + hits) / (1 + n_permutations)
    n_groups = int(g.max()) + 1
    reachable = _distinct_assignments(y, g)
    detectable = _detectable_auc(np.concatenate(null), reachable)
    verdict = verdict_text(auc, p, detectable)
    if reachable * ALPHA < 1:
        verdict += (f" [only {reachable} distinct label assignments over {n_groups} groups: p cannot fall "
                    f"below about {1 / reachable:.2g}]")
    return MemorisationTest(auc=auc, p_value=p, n_permutations=n_permutations, n_groups=n_groups,
                            unit="image" if groups is None else "group", verdict=verdict,
                             detectable_auc=detectable)


def _detectable_auc(null_aucs: np.ndarray, reachable: int) -> float:
    """The AUC detected with ``POWER`` at level ``ALPHA``: the null's (1 - ALPHA) quantile plus z_POWER of its
    spread (see the module docstring); 1.0 when ``reachable`` label assignments cannot give p <= ALPHA; nan
    without a usable null (tied scores, fewer than 2 permutations)."""
    if reachable * ALPHA < 1:
        return 1.0
    if null_aucs.size < 2 or float(null_aucs.std()) == 0.0:
        return math.nan
    critical = float(np.quantile(null_aucs, 1 - ALPHA))
    return min(1.0, critical + NormalDist().inv_cdf(POWER) * float(null_aucs.std()))
