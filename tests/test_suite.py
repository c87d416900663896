"""`fingerprint suite`: leave-one-benchmark-out selection on three tiny phantom benchmarks (memorisation 0, 0.5,
0.95). Checks that a held-out benchmark's choice never reads its labels, that test labels never reach fitting,
that the per-(benchmark, candidate) cache is reused, the --extra submission, bad input, and the group bootstrap."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fingerprint.commands import cli
from fingerprint.config import ConfigError
from fingerprint.data.phantoms import make_sample_dataset
from fingerprint.detectors import load_detector
from fingerprint.evaluation import suite
from fingerprint.evaluation.suite import SuiteConfig, choose, zoo_info
from fingerprint.zoo.build import NULL_LEVEL

CANDIDATES = "pixel_l2,pixel_ncc,gradient_nn"
TINY = dict(candidates=CANDIDATES, folds=2, repeats=1, image_size=32, n_boot=50)
TINY_ARGS = ["--candidates", CANDIDATES, "--folds", "2", "--repeats", "1", "--image-size", "32", "--n-boot", "50"]
LEVELS = {"m000": 0.0, "m050": 0.5, "m095": 0.95}


def _tiny_bench(path: Path, memorisation: float, seed: int) -> Path:
    make_sample_dataset(path, n_patients=12, slices_per_patient=3, size=32, n_generated_dev=48,
                        n_generated_test=48, memorisation=memorisation, n_reference_patients=12, seed=seed)
    return path


@pytest.fixture(scope="module")
def benches(tmp_path_factory) -> tuple[Path, Path]:
    """(suite folder with three benchmarks, an extra benchmark). Two carry a zoo.json, one does not; the one
    whose generator copies nothing declares itself a null control, as `fingerprint zoo --null-control` does."""
    root = tmp_path_factory.mktemp("suite")
    for i, (name, m) in enumerate(LEVELS.items()):
        _tiny_bench(root / "suite" / name, m, seed=i)
        if name != "m050":
            (root / "suite" / name / "zoo.json").write_text(json.dumps(
                {"family": "pca", **({"memorisation": NULL_LEVEL} if m == 0 else {}),
                 "settings": {"memorisation": m, "blend": 0.1}}))
    return root / "suite", _tiny_bench(root / "extra", 0.9, seed=7)


@pytest.fixture(scope="module")
def first(benches, tmp_path_factory) -> tuple[Path, dict]:
    """One run through the CLI, with --extra; returns (out, suite.json)."""
    suite_dir, extra = benches
    out = tmp_path_factory.mktemp("out") / "run"
    assert cli.main(["suite", "--suite", str(suite_dir), "--extra", str(extra), "--out", str(out), *TINY_ARGS]) == 0
    return out, json.loads((out / "suite.json").read_text())


def _run(suite_dir: Path, out: Path, **kw) -> dict:
    return suite.run(SuiteConfig(suite=str(suite_dir), out=str(out), **{**TINY, **kw}))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rows(res: dict) -> dict[str, dict]:
    return {r["benchmark"]: r for r in res["leave_one_out"]}


def test_outputs_and_leave_one_out(first) -> None:
    out, res = first
    for name in ("suite.md", "suite.json", "suite_auc.png"):
        assert (out / name).is_file(), name
    for b in LEVELS:
        for c in CANDIDATES.split(","):
            assert (out / "cache" / b / f"{c}.json").is_file()
    rows = _rows(res)
    assert sorted(rows) == sorted(LEVELS)
    # Each held-out choice is the rule applied to the other benchmarks' dev-CV AUCs, null controls left out.
    for b, r in rows.items():
        rest = [o for o in LEVELS if o not in (b, "m000")]
        assert r["chosen"] == choose(res["dev_auc"], rest, "mean")[0]
        assert r["other_rule_chosen"] == choose(res["dev_auc"], rest, "worst")[0]
        assert r["dev_auc"] == pytest.approx(res["dev_auc"][b][r["chosen"]])
        point, low, high = r["test_auc_ci"]
        assert 0 <= low <= point <= high <= 1
        assert r["best_baseline"] in ("pixel_l2", "pixel_ncc")
        assert r["margin"] == pytest.approx(r["test_auc"] - r["best_baseline_test_auc"])
        assert r["groups_from"] == "groups.csv"
    # zoo.json gives family and memorisation; without one the benchmark is 'unknown'.
    assert (rows["m095"]["family"], rows["m095"]["memorisation"]) == ("pca", "0.95")
    assert (rows["m050"]["family"], rows["m050"]["memorisation"]) == ("unknown", "?")
    assert rows["m000"]["memorisation"] == NULL_LEVEL
    # A null control is its own row, never averaged into its family's "all".
    assert {(f["family"], f["memorisation"]) for f in res["families"]} == {
        ("pca", NULL_LEVEL), ("pca", "0.95"), ("unknown", "?")}
    md = (out / "suite.md").read_text()
    for text in ("Leave one benchmark out", "By generator family", "What a user may conclude", "test AUC on B"):
        assert text in md
    # The strongly memorising benchmark is easy: some candidate separates its test images well.
    assert rows["m095"]["hindsight_best_test_auc"] > 0.8
    # Goals: one record per benchmark and goal that applies, each the comparison it names.
    goals = res["goals"]
    for r in rows.values():
        assert 0 <= r["test_tpr_at_1fpr"] <= 1 and 0 < r["dev_memorisation_p"] <= 1
        assert 0.5 < r["dev_memorisation_detectable_auc"] <= 1
        # The decision shares, recomputed from the cached test decisions and the answer key.
        cached = json.loads((out / "cache" / r["benchmark"] / f"{r['chosen']}.json").read_text())["test"]
        key = dict(csv.reader((Path(res["config"]["suite"]) / r["benchmark"] / "test_labels.csv").open()))
        y = np.array([int(key[i]) for i in cached["ids"]])
        dec = np.array(cached["decisions"])
        assert r["test_flagged"] == pytest.approx(dec.mean())
        assert r["test_false_accusations"] == pytest.approx(dec[y == 0].mean())
        # The product's rule: the threshold flags at most 5% of the dev not-used images it was set on.
        product = np.array(cached["product_decisions"])
        assert r["test_flagged_product"] == pytest.approx(product.mean())
        assert r["test_false_accusations_product"] == pytest.approx(product[y == 0].mean())
        assert np.array_equal(product, np.asarray(cached["scores"]) >= cached["product_threshold"])
        assert 0 <= cached["product_dev_not_used_flagged"] <= 0.05
        bound = cached["product_false_positives"]
        assert bound["rate"] == cached["product_dev_not_used_flagged"] <= bound["bound"] == r["dev_fpr_bound_product"]
        assert f"{r['test_false_accusations_product']:.0%} (bound {bound['bound']:.0%})" in md
        if r["dev_memorisation_p"] > 0.05:
            assert f"(detectable AUC {r['dev_memorisation_detectable_auc']:.2f})" in md
        mine = {g["goal"]: g for g in goals if g["benchmark"] == r["benchmark"]}
        strong = r["best_baseline_test_auc"] >= suite.STRONG_BASELINE
        if r["memorisation"] == NULL_LEVEL:
            # A null control has nothing to find: no baseline to beat, and the no-evidence goal always applies.
            assert not r["signal_on_test"]
            assert set(mine) == {f"test AUC >= {suite.FLOOR}", f"no signal on test: dev memorisation test p > "
                                 f"{suite.ALPHA}"}
            assert f"Null control `{r['benchmark']}`" in md and f"{r['test_flagged_product']:.0%} at the fpr" in md
            assert "n/a (null)" in md
        else:
            margin = next(g for name, g in mine.items() if name.startswith("test AUC >= best baseline"))
            assert margin["target"] == pytest.approx(r["best_baseline_test_auc"] + (0 if strong else suite.AHEAD))
            assert margin["met"] == (r["test_auc"] >= margin["target"])
            assert (f"test TPR at 1% FPR >= {suite.STRONG_TPR}" in mine) == strong
        assert mine[f"test AUC >= {suite.FLOOR}"]["met"] == (r["test_auc"] >= suite.FLOOR)
        no_signal = [g for name, g in mine.items() if name.startswith("no signal on test")]
        assert bool(no_signal) == (not r["signal_on_test"])
        for g in no_signal:
            assert g["value"] == r["dev_memorisation_p"] and g["met"] == (g["value"] > 0.05)
    assert "Goals, per held-out benchmark" in md and "memorisation p (dev)" in md
    assert "test non-members flagged" in md and "test non-members flagged, fpr rule" in md
    # The margin over baselines is averaged over the benchmarks with something to find only.
    assert "over 2 held-out benchmarks with something to find" in md and "positive on" in md


def test_benchmarks_sharing_a_split_are_held_out_together(benches, tmp_path) -> None:
    """Two benchmarks drawn on the same split of real images (same split.json members) never choose for each
    other: each is left out of the other's rest."""
    suite_dir = _copy(benches[0], tmp_path / "suite")
    for name in ("m000", "m050"):
        (suite_dir / name / "split.json").write_text(json.dumps({"seed": 0, "members": ["a.png", "b.png"]}))
    res = _run(suite_dir, tmp_path / "out")
    rows = _rows(res)
    assert rows["m000"]["held_out_with"] == ["m050"] and rows["m050"]["held_out_with"] == ["m000"]
    assert rows["m095"]["held_out_with"] == []
    assert rows["m000"]["chosen"] == choose(res["dev_auc"], ["m095"], "mean")[0]
    assert rows["m095"]["chosen"] == choose(res["dev_auc"], ["m050"], "mean")[0]  # m000 is a null control
    # A zoo split.json keys on the images labelled used (its files), which a null control shares with the
    # ordinary build of its seed, not on its training set.
    for name, trained in (("m000", "x.png"), ("m050", "y.png")):
        (suite_dir / name / "split.json").write_text(json.dumps({"seed": 0, "members": [trained], "files": {
            "dev/used/used_0001.png": {"source": "a.png", "label": 1},
            "dev/not_used/not_used_0001.png": {"source": "c.png", "label": 0}}}))
    assert suite.make_bench(suite_dir / "m000").split_key == suite.make_bench(suite_dir / "m050").split_key
    assert "shares its split" in (tmp_path / "out" / "suite.md").read_text()


def test_extra_submission(first, benches) -> None:
    out, res = first
    _, extra = benches
    chosen = res["suite_choice"]["mean"]["candidate"]
    unknown = sorted(p.stem for p in (extra / "test" / "real_unknown").glob("*.png"))
    sub = list(csv.reader((out / "extra" / "submission.csv").open()))
    assert sorted(r[0] for r in sub) == unknown and all(r[1] in ("0", "1") and len(r) == 2 for r in sub)
    scores = list(csv.DictReader((out / "extra" / "scores.csv").open()))
    assert sorted(r["id"] for r in scores) == unknown
    det = load_detector(out / "extra" / "detector")
    assert det.name == chosen
    assert res["extras"][0]["candidate"] == chosen and res["extras"][0]["test"] == len(unknown)


def test_rerun_reuses_the_cache(first, benches) -> None:
    out, res = first
    suite_dir, extra = benches
    cache = sorted((out / "cache").rglob("*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    sub_stamp = (out / "extra" / "submission.csv").stat().st_mtime_ns
    again = _run(suite_dir, out, extra=str(extra))
    assert again["work"]["evaluated"] == 0 and again["work"]["reused"] == 3 * len(LEVELS)
    assert again["work"]["loaded"] == 0 and again["work"]["submitted"] == 0
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps
    assert (out / "extra" / "submission.csv").stat().st_mtime_ns == sub_stamp
    assert again["leave_one_out"] == res["leave_one_out"]
    # Another candidate set evaluates only what is new.
    more = _run(suite_dir, out, candidates=CANDIDATES + ",pixel_mass")
    assert more["work"]["evaluated"] == len(LEVELS) and more["work"]["reused"] == 3 * len(LEVELS)


def _flip(bench: Path) -> None:
    """Swap the dev labels (used <-> not_used folders) and the test labels of ``bench``."""
    (bench / "dev" / "used").rename(bench / "dev" / "tmp")
    (bench / "dev" / "not_used").rename(bench / "dev" / "used")
    (bench / "dev" / "tmp").rename(bench / "dev" / "not_used")
    rows = list(csv.DictReader((bench / "test_labels.csv").open()))
    with (bench / "test_labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(("id", "label"))
        w.writerows((r["id"], 1 - int(r["label"])) for r in rows)


@pytest.mark.parametrize("held_out", sorted(LEVELS))
def test_choice_for_held_out_never_reads_its_labels(first, benches, tmp_path, held_out) -> None:
    _, res = first
    flipped = _copy(benches[0], tmp_path / "suite")
    _flip(flipped / held_out)
    new = _run(flipped, tmp_path / "out")
    before, after = _rows(res)[held_out], _rows(new)[held_out]
    assert after["chosen"] == before["chosen"]
    assert after["other_rule_chosen"] == before["other_rule_chosen"]
    # Its own numbers did see the flip: label-free scores, labels reversed.
    for c in CANDIDATES.split(","):
        assert new["dev_auc"][held_out][c] == pytest.approx(1 - res["dev_auc"][held_out][c])
        assert new["test_auc"][held_out][c][0] == pytest.approx(1 - res["test_auc"][held_out][c][0])


def test_choose_reads_only_the_benchmarks_it_is_given() -> None:
    dev = {"A": {"pixel_l2": 0.75, "best": 0.9}, "B": {"pixel_l2": 0.7, "best": 0.7005}}
    assert choose({"B": dev["B"]}, ["B"], "mean") == ("pixel_l2", 0.7)  # a tie within TIE: the simpler one
    assert choose(dev, ["A", "B"], "mean")[0] == "best"
    assert choose(dev, ["A", "B"], "worst")[0] == "pixel_l2"  # 0.7 vs 0.7005: a tie
    with pytest.raises(KeyError):
        choose({"A": dev["A"]}, ["A", "B"], "mean")


def test_extras_without_a_generator_recipe_get_the_best_candidate_without_shadows(tmp_path) -> None:
    """Shadow detectors measure what they should only with the target's recipe: an --extra benchmark without a
    zoo.json gets the rule's choice among the other candidates, and the report says why."""
    from fingerprint.detectors import needs_recipe

    assert needs_recipe("shadow_gradient") and needs_recipe("shadow_ensemble") and not needs_recipe("cal_ensemble")
    dev = {"A": {"gradient_cal": 0.80, "cal_ensemble": 0.82, "shadow_ensemble": 0.90},
           "B": {"gradient_cal": 0.70, "cal_ensemble": 0.66, "shadow_ensemble": 0.75}}
    rep = {"suite_choice": {"mean": {"candidate": "shadow_ensemble"}}, "dev_auc": dev,
           "candidates": [{"name": c} for c in dev["A"]]}
    config = SuiteConfig(suite=str(tmp_path), rule="mean")
    plain, zoo = tmp_path / "plain", tmp_path / "zoo"
    plain.mkdir()
    zoo.mkdir()
    (zoo / "zoo.json").write_text(json.dumps({"family": "vae", "settings": {"steps": 3}, "build": {"image_size": 16}}))
    assert suite.extra_choice(config, rep, zoo) == ("shadow_ensemble", "")
    pick, why = suite.extra_choice(config, rep, plain)
    assert pick == "gradient_cal" and "shadow_ensemble" in why and "zoo.json" in why  # mean 0.75 vs 0.74
    rep["suite_choice"]["mean"]["candidate"] = "cal_ensemble"
    assert suite.extra_choice(config, rep, plain) == ("cal_ensemble", "")
    # A recipe given with --extra-recipes counts as the benchmark's own; a bad or extra one names the flag.
    rep["suite_choice"]["mean"]["candidate"] = "shadow_ensemble"
    assert suite.extra_choice(config, rep, plain, str(zoo / "zoo.json")) == ("shadow_ensemble", "")
    (tmp_path / "bad.json").write_text("[]")
    for recipes, what in ((f"{zoo / 'zoo.json'},{zoo / 'zoo.json'}", "2 entries for 1"), (str(tmp_path / "bad.json"),
                                                                                        "not a generator recipe")):
        problems = [p for p in SuiteConfig(suite=str(tmp_path), extra=str(plain), extra_recipes=recipes).problems()
                    if p.startswith("--extra-recipes")]
        assert len(problems) == 1 and what in problems[0], problems
    only_shadows = {**rep, "candidates": [{"name": "shadow_ensemble"}]}
    only_shadows["suite_choice"] = {"mean": {"candidate": "shadow_ensemble"}}
    pick, why = suite.extra_choice(config, only_shadows, plain)
    assert pick == "shadow_ensemble" and "stand-in" in why


def test_test_labels_never_reach_fitting(first, benches, tmp_path) -> None:
    out, res = first
    shuffled = _copy(benches[0], tmp_path / "suite")
    rng = np.random.default_rng(1)
    for b in LEVELS:
        path = shuffled / b / "test_labels.csv"
        rows = list(csv.DictReader(path.open()))
        labels = rng.permutation([r["label"] for r in rows])
        path.write_text("id,label\n" + "".join(f"{r['id']},{v}\n" for r, v in zip(rows, labels, strict=True)))
    new_out = tmp_path / "out"
    new = _run(shuffled, new_out)
    assert new["work"]["evaluated"] == 3 * len(LEVELS)  # a fresh folder: everything refitted
    for b in LEVELS:
        for c in CANDIDATES.split(","):
            a = json.loads((out / "cache" / b / f"{c}.json").read_text())
            z = json.loads((new_out / "cache" / b / f"{c}.json").read_text())
            assert z["test"] == a["test"] and z["dev"] == a["dev"]
    assert new["dev_auc"] == res["dev_auc"]
    assert [r["chosen"] for r in new["leave_one_out"]] == [r["chosen"] for r in res["leave_one_out"]]


def test_bad_input_names_the_flag_and_folder(benches, tmp_path) -> None:
    suite_dir, extra = benches
    empty = tmp_path / "empty"
    (empty / "notes").mkdir(parents=True)
    with pytest.raises(ConfigError, match=rf"--suite: '{empty}' holds no benchmark"):
        _run(empty, tmp_path / "o1")
    with pytest.raises(ConfigError, match="it is itself one benchmark"):
        _run(suite_dir / "m050", tmp_path / "o2")
    nolabels = _copy(suite_dir, tmp_path / "nolabels")
    (nolabels / "m050" / "test_labels.csv").unlink()
    with pytest.raises(ConfigError, match=rf"--suite: benchmark '{nolabels / 'm050'}' has no test_labels.csv"):
        _run(nolabels, tmp_path / "o3")
    with pytest.raises(ConfigError, match="--candidates: unknown nope"):
        _run(suite_dir, tmp_path / "o4", candidates="pixel_l2,nope")
    with pytest.raises(ConfigError, match=rf"--extra: '{tmp_path / 'missing'}' is not a benchmark"):
        _run(suite_dir, tmp_path / "o5", extra=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--suite: required"):
        suite.run(SuiteConfig())
    # Through the CLI: exit code 2 and the message, no traceback.
    assert cli.main(["suite", "--suite", str(empty), "--out", str(tmp_path / "o6")]) == 2


def test_zoo_info(tmp_path) -> None:
    assert zoo_info(tmp_path)[:2] == ("unknown", "?")
    (tmp_path / "zoo.json").write_text(json.dumps({"family": "stylegan", "memorization": 0.25}))
    assert zoo_info(tmp_path)[:2] == ("stylegan", "0.25")
    (tmp_path / "zoo.json").write_text(json.dumps({"family": "dcgan", "level": "high", "settings": {"steps": 9}}))
    assert zoo_info(tmp_path)[:2] == ("dcgan", "high")
    (tmp_path / "zoo.json").write_text("{not json")
    assert zoo_info(tmp_path)[:2] == ("unknown", "?")


def test_zoo_level_from_its_check(tmp_path) -> None:
    (tmp_path / "zoo.json").write_text(json.dumps({"family": "vae", "checks": {"nn_l2_auc_test": 0.95}}))
    assert zoo_info(tmp_path)[:2] == ("vae", "strong")
    (tmp_path / "zoo.json").write_text(json.dumps({"family": "vae", "checks": {"nn_l2_auc_test": 0.55}}))
    assert zoo_info(tmp_path)[:2] == ("vae", "weak")
