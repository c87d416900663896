"""The audit report: its verdict (memorising vs not, distribution signal, no labels), the `fingerprint report`
command and the commands that write it, and the page itself in a real headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from browser import chromium, page  # noqa: F401

from fingerprint.commands import cli
from fingerprint.data.imagesets import load_fit_data
from fingerprint.data.phantoms import make_sample_dataset
from fingerprint.detectors import PRESETS, fit_detector, load_detector
from fingerprint.io import read_labels
from fingerprint.report import ReportInputs, assess, build_report, judge, write_report
from fingerprint.report.verdict import pct_ci


def scored_pool(bench: Path, preset: str = "pixel_ncc") -> dict:
    """Every real image of ``bench`` (dev and test) scored by a label-free detector, with its label and patient:
    12 patients give the permutation test enough groups to reach a small p when the scores separate."""
    data = load_fit_data(bench, val_fraction=0.0)
    det = fit_detector(*PRESETS[preset], data)
    s = det.score(data.real, data.real_ids)
    test = read_labels(bench / "test_labels.csv")
    y = np.array([lab if lab >= 0 else test[i] for lab, i in zip(data.labels, data.real_ids, strict=True)])
    return {"data": data, "det": det, "scores": s, "labels": y, "decisions": det.decide(s),
            "groups": [str(g) for g in data.groups]}


@pytest.fixture(scope="module")
def memorising(sample_bench) -> dict:
    return scored_pool(sample_bench)


@pytest.fixture(scope="module")
def not_memorising(tmp_path_factory) -> dict:
    """The sample fixture's benchmark with a generator that copies nothing (memorisation 0)."""
    out = tmp_path_factory.mktemp("nomem") / "sample"
    make_sample_dataset(out, n_patients=12, slices_per_patient=3, size=32, n_generated_dev=48, n_generated_test=48,
                        memorisation=0.0, n_reference_patients=12, seed=0)
    return scored_pool(out)


def evidence_of(pool: dict, n_boot: int = 200):
    return assess(pool["labels"], pool["scores"].score, pool["decisions"], pool["groups"], n_boot=n_boot)


def inputs_of(pool: dict, signal: str = "per_image", **kw) -> ReportInputs:
    data, det, s = pool["data"], pool["det"], pool["scores"]
    return ReportInputs(
        ids=list(data.real_ids), scores=s.score, decisions=pool["decisions"], threshold=det.threshold,
        detector={"name": det.name, "kind": det.kind, "signal": signal, "settings": det.meta.settings},
        labels=pool["labels"], groups=pool["groups"],
        nearest_ids=[[det.gallery_ids[j] for j in row] for row in s.nearest],
        nearest_similarities=s.nearest_similarity.tolist(),
        real_images=dict(zip(data.real_ids, data.real, strict=True)),
        generated_images=dict(zip(data.generated_ids, data.generated, strict=True)),
        dataset={"root": "sample", "generated": len(data.generated), "real": len(data.real)}, n_boot=100, **kw)


# ------------------------------------------------------------------------------------------------- verdict


def test_verdict_of_a_memorising_generator_quotes_tpr_at_1pct_fpr_with_its_interval(memorising):
    ev = evidence_of(memorising)
    v = judge(ev, "per_image")
    assert ev.memorisation.p_value <= 0.05 and ev.grouped and ev.memorisation.unit == "group"
    assert v.level == "memorises" and v.findings and not v.warning
    assert v.headline.startswith("The generator memorises its training images: at a 1% false-accusation rate an "
                                 f"attacker identifies {pct_ci(ev.metrics['tpr_at_1fpr'])} of the training images")
    assert re.search(r"\d+% \[\d+%, \d+%\]", v.headline) and "p = " in v.headline
    # the interval is the group bootstrap's, around the point estimate
    point, low, high = ev.metrics["tpr_at_1fpr"]
    assert 0 < point and low <= point <= high


def test_verdict_without_memorisation_says_no_evidence_and_withdraws_the_decisions(not_memorising):
    ev = evidence_of(not_memorising)
    v = judge(ev, "per_image")
    assert ev.memorisation.p_value > 0.05
    assert v.level == "no_evidence" and not v.findings
    assert re.fullmatch(r"No evidence of memorisation \(p = [0-9.]+\): per-image decisions cannot be told from "
                        r"chance on these labels; not an all-clear: the test finds a separation reliably \(80% "
                        r"power\) only from AUC 0\.[5-9][0-9]\.", v.headline)
    assert f"{ev.memorisation.detectable_auc:.2f}" in v.headline
    assert "must not be read as accusations" in v.warning


def test_a_distribution_signal_is_never_reported_as_memorisation(memorising):
    v = judge(evidence_of(memorising), "distribution")
    assert v.level == "population" and not v.findings
    assert "distribution signal" in v.headline and "memorises" not in v.headline
    mixed = judge(evidence_of(memorising), "mixed (domain_clf)")
    assert any("Signal mixed (domain_clf)" in d for d in mixed.details)


def test_without_labels_the_verdict_says_what_it_cannot_say():
    v = judge(None, "per_image", n_scored=40)
    assert v.level == "no_labels" and not v.findings
    assert v.headline.startswith("No labels: a verdict needs labelled members and non-members")
    assert "40 real images" in v.details[0]


def test_report_html_is_self_contained_and_labels_distribution_detectors(memorising, not_memorising):
    html = build_report(inputs_of(memorising, signal="distribution"))
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs and all(s.startswith("data:") for s in srcs)
    assert "http://" not in html and "https://" not in html
    assert "signal: distribution" in html and 'class="not-findings"' in html
    quiet = build_report(inputs_of(not_memorising))
    assert "No evidence of memorisation (p = " in quiet and "Per-image decisions (not findings)" in quiet
    assert 'class="not-findings"' in quiet
    loud = build_report(inputs_of(memorising))
    assert 'class="findings"' in loud and "Flagged images and their nearest generated images" in loud
    with pytest.raises(ValueError, match="ids but"):
        build_report(ReportInputs(ids=["a", "b"], scores=np.zeros(3), decisions=np.zeros(3), threshold=0.5,
                                  detector={}))


# ------------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def predicted(sample_bench, tmp_path_factory) -> dict[str, Path]:
    """`fingerprint fit` + `fingerprint predict` on the sample fixture (its test_labels.csv: predict writes the
    report too)."""
    root = tmp_path_factory.mktemp("report")
    det, pred = root / "det", root / "pred"
    assert cli.main(["fit", "--data", str(sample_bench), "--preset", "gradient_nn", "--out", str(det)]) == 0
    assert cli.main(["predict", "--model", str(det), "--data", str(sample_bench), "--out", str(pred)]) == 0
    return {"root": root, "det": det, "pred": pred, "data": sample_bench}


def test_predict_with_labels_writes_the_report(predicted):
    html = (predicted["pred"] / "report.html").read_text()
    rows = [json.loads(line) for line in (predicted["pred"] / "scores.jsonl").read_text().splitlines()]
    assert all({"id", "score", "decision", "threshold", "nearest_ids", "nearest_similarities", "signal"} <= set(r)
               for r in rows)
    assert html.count("<tr data-id=") == len(rows)
    # the test part of the fixture holds 4 patients: the test cannot reach p <= 0.05, and the report says why
    assert "No evidence of memorisation" in html and "distinct label assignments" in html
    assert "fingerprint predict" in html and "files_sha256" in html and "torch" in html


def test_predict_without_labels_writes_no_report(predicted, tmp_path):
    import shutil

    data = tmp_path / "nolabels"
    shutil.copytree(predicted["data"], data)
    (data / "test_labels.csv").unlink()
    assert cli.main(["predict", "--model", str(predicted["det"]), "--data", str(data), "--out",
                     str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "scores.jsonl").is_file() and not (tmp_path / "p" / "report.html").exists()
    # the report command still writes one, and says that without labels there is no verdict
    assert cli.main(["report", "--scores", str(tmp_path / "p"), "--data", str(data), "--n-boot", "50"]) == 0
    html = (tmp_path / "p" / "report.html").read_text()
    assert "No labels: a verdict needs labelled members and non-members" in html
    assert "<h2>Per-image decisions (not findings)</h2>" in html
    # Given the detector, the report says what its threshold did to the labelled not-used images it was fitted on.
    assert cli.main(["report", "--scores", str(tmp_path / "p"), "--data", str(data), "--model", str(predicted["det"]),
                     "--out", str(tmp_path / "m.html"), "--n-boot", "50"]) == 0
    html = (tmp_path / "m.html").read_text()
    fp = load_detector(predicted["det"]).meta.false_positives
    assert (f"these images have no labels; when the detector was fitted, threshold {fp.threshold:.4g} flagged "
            f"{fp.flagged} of {fp.not_used} labelled not-used images") in html
    assert f"at most {fp.bound:.1%}" in html
    # Another threshold than the detector's: its record does not cover it, so the report does not claim it.
    assert cli.main(["report", "--scores", str(tmp_path / "p"), "--data", str(data), "--model", str(predicted["det"]),
                     "--threshold", "0.5", "--out", str(tmp_path / "t.html"), "--n-boot", "50"]) == 0
    html = (tmp_path / "t.html").read_text()
    assert "when the detector was fitted" not in html and "unknown without labels" in html


def test_report_command_and_evaluate(predicted, capsys):
    out = predicted["root"] / "audit.html"
    assert cli.main(["report", "--scores", str(predicted["pred"]), "--data", str(predicted["data"]), "--model",
                     str(predicted["det"]), "--out", str(out), "--n-boot", "50", "--generator", "PCA test gen"]) == 0
    html = out.read_text()
    assert "PCA test gen" in html and "gradient_nn (gradient)" in html and "&quot;k&quot;: 10" in html
    assert cli.main(["evaluate", "--scores", str(predicted["pred"] / "scores.csv"), "--labels",
                     str(predicted["data"] / "test_labels.csv"), "--groups", str(predicted["data"] / "groups.csv"),
                     "--data", str(predicted["data"]), "--out", str(predicted["root"] / "eval"), "--n-boot", "50"]) == 0
    ev = (predicted["root"] / "eval" / "report.html").read_text()
    assert "fingerprint evaluate" in ev and "signal: per image" in ev and "<img src=\"data:image/png" in ev
    capsys.readouterr()
    assert cli.main(["report", "--scores", str(predicted["root"] / "missing")]) == 2
    assert "--scores" in capsys.readouterr().err
    assert cli.main(["report", "--scores", str(predicted["pred"]), "--labels",
                     str(predicted["data"] / "groups.csv")]) == 2
    assert "missing column(s) label" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- browser


def visible_rows(pg) -> int:
    return pg.eval_on_selector_all("#images tbody tr", "rows => rows.filter(r => !r.hidden).length")


def test_report_renders_in_chromium_with_every_image_and_a_working_filter(page, memorising, tmp_path):  # noqa: F811
    pg, log = page
    path = write_report(tmp_path / "report.html", inputs_of(memorising))
    pg.goto(path.as_uri())
    assert pg.inner_text("#verdict").startswith("The generator memorises its training images")
    n_img = pg.eval_on_selector_all("img", "imgs => imgs.length")
    broken = pg.eval_on_selector_all("img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0))"
                                            ".map(i => i.alt)")
    k = min(4, memorising["scores"].nearest.shape[1])
    assert n_img == 3 + len(memorising["data"].real_ids) * (1 + k) and broken == []  # 3 plots, thumbnails
    total = len(memorising["data"].real_ids)
    flagged = int(np.sum(memorising["decisions"]))
    assert visible_rows(pg) == total and pg.inner_text("#shown") == str(total)

    pg.select_option("#f-decision", "1")
    assert visible_rows(pg) == flagged and pg.inner_text("#shown") == str(flagged)
    pg.select_option("#f-decision", "0")
    assert visible_rows(pg) == total - flagged
    pg.select_option("#f-decision", "all")
    pg.select_option("#f-label", "1")
    assert visible_rows(pg) == int(np.sum(memorising["labels"] == 1))
    pg.select_option("#f-label", "all")

    cut = float(np.median(memorising["scores"].score))
    pg.fill("#f-min", str(cut))
    assert visible_rows(pg) == int(np.sum(memorising["scores"].score >= cut))
    pg.fill("#f-min", "")
    pg.fill("#f-id", "dev/used")
    assert visible_rows(pg) == sum(i.startswith("dev/used") for i in memorising["data"].real_ids)
    pg.fill("#f-id", "")

    # sorting: one click on "score" sorts ascending (it starts descending), a second descending again
    first = lambda: float(pg.eval_on_selector("#images tbody tr", "r => r.dataset.score"))  # noqa: E731
    assert first() == pytest.approx(float(np.max(memorising["scores"].score)))
    pg.click("#images th[data-sort=score]")
    assert first() == pytest.approx(float(np.min(memorising["scores"].score)))
    pg.click("#images th[data-sort=id]")
    ids = pg.eval_on_selector_all("#images tbody tr", "rows => rows.map(r => r.dataset.id)")
    assert ids == sorted(ids, reverse=True) and len(ids) == total
    assert log.problems() == []


def test_a_report_without_evidence_shows_its_decisions_as_withdrawn(page, not_memorising, tmp_path):  # noqa: F811
    pg, log = page
    path = write_report(tmp_path / "quiet.html", inputs_of(not_memorising))
    pg.goto(path.as_uri())
    assert pg.inner_text("#verdict").startswith("No evidence of memorisation (p = ")
    assert pg.is_visible("#table-warning") and "from chance" in pg.inner_text("#table-warning")
    opacity = pg.eval_on_selector("#images", "t => getComputedStyle(t).opacity")
    assert float(opacity) < 1
    assert pg.eval_on_selector_all("img", "imgs => imgs.every(i => i.naturalWidth > 0)")
    assert log.problems() == []


def test_benchmark_writes_the_report_of_the_submitted_detector(sample_bench, tmp_path):
    out = tmp_path / "bench"
    assert cli.main(["benchmark", "--data", str(sample_bench), "--out", str(out), "--detectors", "pixel_ncc,domain_clf",
                     "--folds", "2", "--repeats", "1", "--n-boot", "50", "--submit", "domain_clf"]) == 0
    html = (out / "report.html").read_text()
    res = json.loads((out / "results.json").read_text())
    mem = next(d for d in res["detectors"] if d["name"] == "domain_clf")["memorisation"]
    assert "signal: distribution" in html and "dev out of fold" in html
    assert html.count("<tr data-id=\"dev/") == res["data"]["labelled"]
    # the harness's own permutation test is the one the verdict quotes
    assert f"p = {mem['p_value']:.3g}" in html
    assert "The generator memorises" not in html and 'class="not-findings"' in html
