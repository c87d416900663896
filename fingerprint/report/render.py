"""The audit report as one self-contained HTML file: a pure function of :class:`ReportInputs`.

Everything the page needs is inside it (pictures as base64 PNG data URIs, style and a little vanilla JavaScript),
so it opens offline, can be mailed or archived as one file, and requests nothing from any network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
from PIL import Image

from fingerprint.evaluation import plots
from fingerprint.evaluation.memorisation import MemorisationTest
from fingerprint.io import write_text_atomic
from fingerprint.report import verdict as vd

THUMB = 64
"""Side of the thumbnails in pixels: enough to compare anatomy, small enough for hundreds of them in one file."""


@dataclass
class ReportInputs:
    """Everything a report shows, computed beforehand; :func:`build_report` only arranges it."""

    ids: list[str]
    """The scored real images."""
    scores: np.ndarray
    """(N,) higher = more likely a member of the generator's training set."""
    decisions: np.ndarray
    """(N,) 1 = flagged as used for training."""
    threshold: float | None
    """The decision threshold; None when decisions come from several (per-fold) thresholds."""
    detector: dict[str, Any]
    """kind, name, signal, settings, threshold_method, metrics (validation), created_at: a detector's meta."""
    labels: np.ndarray | None = None
    """(N,) 1 = used, 0 = not used, -1 = unknown; None without any labels."""
    groups: list[str] | None = None
    """(N,) patient of each image; the bootstrap and the permutation test move whole patients."""
    nearest_ids: list[list[str]] | None = None
    """Per image, the ids of its nearest generated images, most similar first."""
    nearest_similarities: list[list[float]] | None = None
    real_images: Mapping[str, Any] = field(default_factory=dict)
    """Scored images by id (PIL images or 2-D arrays; a missing id or None shows no thumbnail)."""
    generated_images: Mapping[str, Any] = field(default_factory=dict)
    """Generated images by id, for the neighbour thumbnails."""
    dataset: dict[str, Any] = field(default_factory=dict)
    """Counts (generated, real, used, not_used, unknown, scored), groups, image_sizes, generator, root."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """command, config, registry, data hashes, versions."""
    title: str = "Membership audit"
    """Page title."""
    threshold_note: str = ""
    """How the threshold was chosen (e.g. 'max F1 on the training labels')."""
    evidence: vd.Evidence | None = None
    """Precomputed intervals and test; None computes them from labels when both classes are present."""
    memorisation: MemorisationTest | None = None
    """A memorisation test already run on these scores, reused instead of run again."""
    n_boot: int = 1000
    """Bootstrap resamples for the intervals."""
    seed: int = 0
    """Seed of the bootstrap and the permutations."""
    thumbnails: int = 100
    """Rows (highest scores first) shown with thumbnails; the others list neighbour ids and similarities only."""
    neighbours: int = 4
    """Nearest generated images shown per row."""
    max_rows: int = 5000
    """Rows in the per-image table (highest scores first); more are left out and the page says so."""


def labelled(inputs: ReportInputs) -> np.ndarray | None:
    """Indices of the images with a known label, when both classes are among them; else None."""
    if inputs.labels is None:
        return None
    y = np.asarray(inputs.labels)
    known = np.flatnonzero(y >= 0)
    if not (np.any(y[known] == 1) and np.any(y[known] == 0)):
        return None
    return known


def compute_evidence(inputs: ReportInputs) -> vd.Evidence | None:
    """Intervals and the memorisation test on the labelled images, or None without both classes."""
    if inputs.evidence is not None:
        return inputs.evidence
    known = labelled(inputs)
    if known is None:
        return None
    groups = None if inputs.groups is None else [inputs.groups[i] for i in known]
    mem = inputs.memorisation
    if mem is not None and (known.size != len(inputs.ids) or (mem.unit == "group") != (groups is not None)):
        mem = None  # computed on other images or another unit: run it again on what the report shows
    return vd.assess(np.asarray(inputs.labels)[known], np.asarray(inputs.scores, dtype=float)[known],
                     np.asarray(inputs.decisions)[known], groups, n_boot=inputs.n_boot, seed=inputs.seed,
                     memorisation=mem)


# ------------------------------------------------------------------------------------------------- pictures


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail_uri(image: Any, side: int = THUMB) -> str | None:
    """A gray PNG thumbnail (longest side ``side``) of a PIL image or array as a data URI; None for None."""
    if image is None:
        return None
    im = image if isinstance(image, Image.Image) else Image.fromarray(_to_uint8(np.asarray(image)))
    im = im.convert("L") if im.mode not in ("L", "RGB") else im.copy()
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return png_uri(buf.getvalue())


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    a = a.astype(float)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return np.rint(a * 255).astype(np.uint8)
    return np.rint((a - lo) / (hi - lo) * 255).astype(np.uint8) if hi > lo else np.zeros(a.shape, np.uint8)


def figures(inputs: ReportInputs) -> list[tuple[str, str]]:
    """(caption, data URI) of the report's plots: ROC (linear, log FPR) and histogram by label, or the score
    histogram alone without labels. Drawn by fingerprint.evaluation.plots, the same pictures as everywhere."""
    s = np.asarray(inputs.scores, dtype=float)
    known = labelled(inputs)
    y = None if inputs.labels is None else np.asarray(inputs.labels)
    out: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="fingerprint-report-") as tmp:
        if known is not None:
            curve = {inputs.detector.get("name", "scores"): (y[known], s[known])}
            for name, log_fpr, caption in (("roc", False, "ROC curve"),
                                           ("roc_log", True, "ROC curve, log false-positive rate: where few "
                                                             "false accusations are made")):
                path = plots.roc_plot(curve, Path(tmp) / f"{name}.png", log_fpr=log_fpr,
                                      title="ROC (log FPR)" if log_fpr else "ROC")
                out.append((caption, png_uri(path.read_bytes())))
        hist_labels = [None if y is None or v < 0 else int(v) for v in (y if y is not None else [None] * s.size)]
        path = plots.score_histogram(s, hist_labels, Path(tmp) / "hist.png", threshold=inputs.threshold,
                                     title="Scores by label" if known is not None else "Scores (no labels)")
        out.append(("Score distribution" + (" by label" if known is not None else "")
                    + ("; the line is the threshold" if inputs.threshold is not None else ""),
                    png_uri(path.read_bytes())))
    return out


# --------------------------------------------------------------------------------------------------- HTML


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: float, fmt: str = ".4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


LABEL_NAMES = {1: "used", 0: "not used", -1: "unknown"}


def _rows_html(inputs: ReportInputs, order: np.ndarray) -> str:
    k = inputs.neighbours
    out = []
    cache: dict[str, str | None] = {}

    def gen_uri(gid: str) -> str | None:
        if gid not in cache:
            cache[gid] = thumbnail_uri(inputs.generated_images.get(gid))
        return cache[gid]

    for rank, i in enumerate(order):
        rid = inputs.ids[i]
        score = float(inputs.scores[i])
        dec = int(inputs.decisions[i])
        lab = -1 if inputs.labels is None else int(inputs.labels[i])
        nids = (inputs.nearest_ids[i] if inputs.nearest_ids is not None else [])[:k]
        nsims = (inputs.nearest_similarities[i] if inputs.nearest_similarities is not None else [])[:k]
        top = float(nsims[0]) if nsims else float("nan")
        thumbs = rank < inputs.thumbnails
        real = thumbnail_uri(inputs.real_images.get(rid)) if thumbs else None
        cells = [f'<td class="id">{esc(rid)}</td>',
                 f'<td class="num">{score:.4f}</td>',
                 f'<td><span class="dec dec{dec}">{"flagged" if dec else "not flagged"}</span></td>']
        if inputs.labels is not None:
            cells.append(f'<td class="lab lab{lab}">{LABEL_NAMES.get(lab, "unknown")}</td>')
        if inputs.groups is not None:
            cells.append(f"<td>{esc(inputs.groups[i])}</td>")
        cells.append(f'<td class="num">{_num(top)}</td>')
        parts = []
        if real:
            parts.append(f'<figure class="real"><img src="{real}" alt="{esc(rid)}" width="{THUMB}" '
                         f'height="{THUMB}"><figcaption>real</figcaption></figure>')
        for gid, sim in zip(nids, nsims, strict=False):
            uri = gen_uri(gid) if thumbs else None
            img = (f'<img src="{uri}" alt="{esc(gid)}" width="{THUMB}" height="{THUMB}">' if uri
                   else '<span class="noimg"></span>')
            parts.append(f'<figure title="{esc(gid)}">{img}<figcaption>{esc(_short(gid))}<br>'
                         f'sim {float(sim):.3f}</figcaption></figure>')
        cells.append(f'<td class="strip">{"".join(parts) or "<span class=note>no neighbours recorded</span>"}</td>')
        label_attr = f' data-label="{lab}"' if inputs.labels is not None else ""
        out.append(f'<tr data-id="{esc(rid)}" data-score="{score:.17g}" data-decision="{dec}"{label_attr} '
                   f'data-sim="{top if not math.isnan(top) else -1e300:.17g}">{"".join(cells)}</tr>')
    return "\n".join(out)


def _short(text: str, limit: int = 14) -> str:
    return text if len(text) <= limit else "\u2026" + text[-(limit - 1):]


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    return "<table class=kv>" + "".join(
        f"<tr><th>{esc(k)}</th><td>{v if isinstance(v, _Raw) else esc(v)}</td></tr>" for k, v in rows
        if v not in (None, "", {}, [])) + "</table>"


class _Raw(str):
    """Already-escaped HTML for _kv_table."""


def _json_block(value: Any) -> _Raw:
    return _Raw(f"<pre>{esc(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>")


def _dataset_html(inputs: ReportInputs, n_flagged: int) -> str:
    d = inputs.dataset
    sizes = d.get("image_sizes") or {}
    rows: list[tuple[str, Any]] = [
        ("data", d.get("root")),
        ("generated images", d.get("generated")),
        ("real images", d.get("real")),
        ("real: used / not used / unknown",
         " / ".join(str(d.get(k, "?")) for k in ("used", "not_used", "unknown")) if "used" in d else None),
        ("scored images", f"{len(inputs.ids)} ({n_flagged} flagged)"),
        ("labels of the scored images", d.get("labels_from")),
        ("patient groups", d.get("groups")),
        ("image sizes", ", ".join(f"{k} ({v})" for k, v in sizes.items()) if sizes else None),
        ("generator", d.get("generator")),
    ]
    return _kv_table(rows)


def _metrics_html(ev: vd.Evidence) -> str:
    names = {"auc": "AUC", "tpr_at_01fpr": "TPR at 0.1% FPR", "tpr_at_1fpr": "TPR at 1% FPR",
             "tpr_at_5fpr": "TPR at 5% FPR", "accuracy": "accuracy", "precision": "precision",
             "recall": "recall (TPR at the threshold)", "specificity": "specificity (1 - FPR at the threshold)",
             "f1": "F1", "kappa": "Cohen's kappa"}
    rows = "".join(f"<tr><th>{esc(names.get(k, k))}</th><td class=num>{_num(p, '.3f')}</td>"
                   f"<td class=num>[{_num(lo, '.3f')}, {_num(hi, '.3f')}]</td></tr>"
                   for k, (p, lo, hi) in ev.metrics.items())
    return f"<table class=metrics><tr><th>metric</th><th>value</th><th>95% interval</th></tr>{rows}</table>"


def build_report(inputs: ReportInputs) -> str:
    """The whole report as one HTML string (no external references)."""
    n = len(inputs.ids)
    scores = np.asarray(inputs.scores, dtype=float)
    if scores.shape != (n,) or np.asarray(inputs.decisions).shape != (n,):
        raise ValueError(f"report: {n} ids but {scores.shape} scores and {np.asarray(inputs.decisions).shape} "
                         "decisions; pass one of each per image")
    if n == 0:
        raise ValueError("report: no scored images; score some real images first")
    signal = str(inputs.detector.get("signal") or "per_image")
    ev = compute_evidence(inputs)
    verdict = vd.judge(ev, signal, n)
    n_flagged = int(np.asarray(inputs.decisions).sum())
    order = np.argsort(-scores, kind="stable")[: inputs.max_rows]
    det = inputs.detector
    name = det.get("name") or det.get("kind", "?")
    signal_badge = (f'<span class="badge dist" title="The score measures how generated-like an image looks overall, '
                    f'not closeness to particular generated images">signal: {esc(signal)}</span>'
                    if signal != "per_image" else '<span class="badge">signal: per image</span>')
    figs = "".join(f'<figure class="plot"><img src="{uri}" alt="{esc(cap)}"><figcaption>{esc(cap)}</figcaption>'
                   f"</figure>" for cap, uri in figures(inputs))
    how = inputs.threshold_note or det.get("threshold_method", "")
    # The detector's record covers its own threshold only, not one given with --threshold.
    own = inputs.threshold is not None and inputs.threshold == det.get("threshold")
    threshold = vd.threshold_sentence(inputs.threshold, ev, how, det.get("false_positives") if own else None)
    label_col = "<th data-sort=label data-type=num>label</th>" if inputs.labels is not None else ""
    group_col = "<th data-sort=group data-type=text>patient</th>" if inputs.groups is not None else ""
    label_filter = ("<label>label <select id=f-label><option value=all>all</option><option value=1>used</option>"
                    "<option value=0>not used</option><option value=-1>unknown</option></select></label>"
                    if inputs.labels is not None else "")
    thumbs_note = (f"Thumbnails for the {min(inputs.thumbnails, len(order))} highest-scoring images; "
                   if inputs.thumbnails < len(order) else "")
    rows_note = (f"The table holds the {len(order)} highest-scoring of {n} images. " if len(order) < n else "")
    per_image_title = "Flagged images and their nearest generated images" if verdict.findings else \
        "Per-image decisions (not findings)"
    warning = f'<p class="warn" id="table-warning">{esc(verdict.warning)}</p>' if verdict.warning else ""
    if verdict.findings and ev is not None and ev.false_positive_rate[0] > vd.FALSE_ACCUSATION_RATE:
        warning += (f'<p class="warn soft" id="threshold-warning">At this threshold {vd.pct_ci(ev.false_positive_rate)}'
                    " of the non-members are flagged too: a flag alone is no accusation; the score and the "
                    "neighbours beside it are the evidence.</p>")
    prov = inputs.provenance
    registry = prov.get("registry") or {}
    page = _PAGE.substitute(
        title=esc(inputs.title),
        created=esc(prov.get("created") or datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        detector=esc(f"{name} ({det.get('kind', '?')})"),
        signal_badge=signal_badge,
        level=esc(verdict.level),
        headline=esc(verdict.headline),
        details="".join(f"<li>{esc(t)}</li>" for t in verdict.details),
        dataset=_dataset_html(inputs, n_flagged),
        threshold=esc(threshold),
        figures=figs,
        metrics=_metrics_html(ev) if ev is not None else "<p class=note>No labels: no metrics.</p>",
        per_image_title=esc(per_image_title),
        findings_class="findings" if verdict.findings else "not-findings",
        warning=warning,
        label_filter=label_filter,
        label_col=label_col,
        group_col=group_col,
        rows=_rows_html(inputs, order),
        total=len(order),
        table_note=esc(rows_note + thumbs_note + "click a column heading to sort; similarities are the detector's "
                       "(higher = closer)."),
        provenance=_kv_table([
            ("command", prov.get("command")),
            ("detector", _json_block({k: det.get(k) for k in ("name", "kind", "signal", "threshold",
                                                              "threshold_method", "false_positives",
                                                              "settings", "metrics", "created_at")
                                       if det.get(k) not in (None, "")})),
            ("registry", _json_block(registry) if registry else None),
            ("data hashes", _json_block(prov.get("data")) if prov.get("data") else None),
            ("configuration", _json_block(prov.get("config")) if prov.get("config") else None),
            ("package versions", ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items())),
            ("verdict as JSON", _json_block(vd.to_dict(verdict, ev))),
        ]),
        script=_SCRIPT,
        style=_STYLE,
    )
    return page


def write_report(path: str | Path, inputs: ReportInputs) -> Path:
    """Build the report and write it atomically to ``path``; return the path."""
    return write_text_atomic(path, build_report(inputs))


_STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 24px 48px}
h1{font-size:22px;margin:6px 0 2px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 14px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;background:#e4e8ee;font-size:12px;margin-left:6px}
.badge.dist{background:#ffe2a8;color:#5a3b00;font-weight:600}
.verdict{border-left:6px solid #888;background:#fff;padding:12px 16px;border-radius:4px;box-shadow:0 1px 2px #0002}
.verdict p.head{font-size:19px;font-weight:600;margin:0 0 6px}
.verdict ul{margin:4px 0 0 18px;padding:0;color:#333;font-size:14px}
.verdict.memorises{border-color:#c62828}.verdict.separates{border-color:#ef6c00}
.verdict.population{border-color:#f9a825}.verdict.no_evidence{border-color:#2e7d32}.verdict.no_labels{border-color:#757575}
table{border-collapse:collapse;background:#fff}
table.kv th{text-align:left;padding:3px 14px 3px 0;vertical-align:top;color:#444;font-weight:500;white-space:nowrap}
table.kv td{padding:3px 0}
table.metrics td,table.metrics th{padding:3px 12px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:10px}
figure.plot{margin:0;background:#fff;padding:6px;box-shadow:0 1px 2px #0002}
figure.plot img{max-width:360px;height:auto;display:block}
figure.plot figcaption{font-size:12px;color:#555;max-width:360px}
.controls{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0;font-size:14px}
.controls input,.controls select{font:inherit;padding:2px 4px}
#images th{position:sticky;top:0;background:#eef1f5;padding:5px 8px;text-align:left;cursor:pointer;user-select:none}
#images th[data-dir=asc]::after{content:" \\25B2"} #images th[data-dir=desc]::after{content:" \\25BC"}
#images td{padding:4px 8px;border-bottom:1px solid #eee;vertical-align:middle}
td.strip{display:flex;gap:6px} td.strip figure{margin:0;text-align:center;font-size:11px;color:#444}
td.strip img{display:block;image-rendering:pixelated;border:1px solid #ccc}
td.strip figure.real img{border:2px solid #c62828}
.noimg{display:inline-block;width:64px;height:64px;background:#eee}
.dec1{color:#b71c1c;font-weight:600} .dec0{color:#666}
.lab1{color:#b71c1c} .lab0{color:#1565c0}
.warn{background:#fff4e5;border:1px solid #f0b060;padding:8px 12px;border-radius:4px;font-weight:600}
.warn.soft{background:#fffbe8;border-color:#e6d28a;font-weight:400}
section.not-findings #images{opacity:.55}
section.not-findings .dec1{color:#666;font-weight:400}
.note{color:#666;font-size:13px} pre{margin:0;font-size:12px;white-space:pre-wrap;max-height:320px;overflow:auto}
details summary{cursor:pointer;font-weight:600}
"""

_SCRIPT = """
(function () {
  var table = document.getElementById('images');
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var byId = function (id) { return document.getElementById(id); };
  var text = byId('f-id'), dec = byId('f-decision'), minScore = byId('f-min'), lab = byId('f-label');
  function apply() {
    var q = text.value.trim().toLowerCase(), d = dec.value, l = lab ? lab.value : 'all';
    var lo = minScore.value === '' ? -Infinity : parseFloat(minScore.value);
    var shown = 0;
    rows.forEach(function (r) {
      var ok = (!q || r.dataset.id.toLowerCase().indexOf(q) >= 0) && (d === 'all' || r.dataset.decision === d)
        && (l === 'all' || r.dataset.label === l) && !(parseFloat(r.dataset.score) < lo);
      r.hidden = !ok;
      if (ok) shown += 1;
    });
    byId('shown').textContent = shown;
  }
  [text, dec, minScore, lab].forEach(function (el) {
    if (el) { el.addEventListener('input', apply); el.addEventListener('change', apply); }
  });
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    var key = th.dataset.sort;
    if (!key) return;
    th.addEventListener('click', function () {
      var dir = th.dataset.dir === 'desc' ? 'asc' : 'desc';
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (o) { delete o.dataset.dir; });
      th.dataset.dir = dir;
      var num = th.dataset.type === 'num', sign = dir === 'asc' ? 1 : -1;
      var col = th.cellIndex;
      rows.sort(function (a, b) {
        var x = num ? parseFloat(a.dataset[key]) : (a.dataset[key] || a.cells[col].textContent);
        var y = num ? parseFloat(b.dataset[key]) : (b.dataset[key] || b.cells[col].textContent);
        return (x < y ? -1 : x > y ? 1 : 0) * sign;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  apply();
})();
"""

_PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<link rel="icon" href="data:,">
<style>$style</style>
</head>
<body>
<main>
<h1>$title</h1>
<p class="sub">Detector $detector $signal_badge &middot; made $created by fingerprint</p>
<div class="verdict $level" id="verdict">
<p class="head">$headline</p>
<ul>$details</ul>
</div>

<h2>Data</h2>
$dataset

<h2>Threshold</h2>
<p id="threshold">$threshold</p>

<h2>Curves</h2>
<div class="plots">$figures</div>

<h2>Metrics</h2>
$metrics

<section class="$findings_class" id="per-image">
<h2>$per_image_title</h2>
$warning
<div class="controls">
<label>id <input id="f-id" type="search" placeholder="contains"></label>
<label>decision <select id="f-decision"><option value="all">all</option><option value="1">flagged</option>
<option value="0">not flagged</option></select></label>
<label>score &ge; <input id="f-min" type="number" step="any" placeholder="any"></label>
$label_filter
<span>showing <b id="shown">$total</b> of $total</span>
</div>
<p class="note">$table_note</p>
<table id="images">
<thead><tr><th data-sort=id data-type=text>id</th><th data-sort=score data-type=num data-dir=desc>score</th>
<th data-sort=decision data-type=num>decision</th>$label_col$group_col
<th data-sort=sim data-type=num>top similarity</th><th>the image and its nearest generated images</th></tr></thead>
<tbody>
$rows
</tbody>
</table>
</section>

<h2>Provenance</h2>
$provenance
</main>
<script>$script</script>
</body>
</html>
""")
