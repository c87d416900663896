"""Registry and promotion against a real sqlite MLflow store (no Ray): versions of any detector kind, aliases,
history, refusals that name the kinds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from fingerprint.config import ConfigError
from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import PRESETS, fit_detector, load_detector
from jobs import promote, registry
from jobs.tracking import setup_experiment


@pytest.fixture(scope="module")
def detectors(sample_bench, tmp_path_factory) -> dict[str, Path]:
    """Two kinds fitted on the same locked split."""
    out = tmp_path_factory.mktemp("regdet")
    data = load_fit_data(sample_bench, 0.25, 0)
    folders = {}
    for name in ("pixel_ncc", "gradient_nn"):
        kind, settings = PRESETS[name]
        det = fit_detector(kind, settings, data)
        det.meta.extra["name"] = name
        folders[name] = det.save(out / name)
    return folders


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # Artifacts beside the sqlite file, not in ./mlruns of the working folder.
    mlflow.set_experiment(experiment_id=setup_experiment(uri, "registry-test"))
    yield uri
    mlflow.set_tracking_uri(None)


def variant(src: Path, dst: Path, *, metrics: dict | None = None, val_ids: list[str] | None = None) -> Path:
    """A copy of the detector whose meta.json claims other metrics or another validation split."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    if metrics is not None:
        meta["metrics"] = metrics
    if val_ids is not None:
        meta["split"]["val"] = val_ids
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def register(folder: Path) -> str:
    with mlflow.start_run():
        return registry.log_detector(folder, "fp").version


def test_versions_of_two_kinds_download_as_detector_folders(store, detectors, tmp_path):
    with mlflow.start_run() as run:
        mv = registry.log_detector(detectors["pixel_ncc"], "fp")
    v2 = register(detectors["gradient_nn"])
    assert mv.version == "1" and v2 == "2" and mv.run_id == run.info.run_id
    meta = json.loads((detectors["pixel_ncc"] / "meta.json").read_text())
    assert mv.tags["kind"] == "pixel" and registry.get_version("fp", v2).tags["kind"] == "gradient"
    assert mv.tags[registry.SPLIT_TAG] == registry.get_version("fp", v2).tags[registry.SPLIT_TAG] != ""
    assert registry.version_metrics(mv)["val_auc"] == pytest.approx(meta["metrics"]["val_auc"])
    assert "kind pixel" in mv.description and '"metric": "ncc"' in mv.description
    fp = meta["false_positives"]
    assert f"flagged {fp['flagged']} of {fp['not_used']} labelled not-used images" in mv.description

    registry.set_alias("fp", "champion", v2, reason="first", metrics={"val_auc": 0.5})
    got, folder = registry.download_detector("fp", "champion", tmp_path / "dl")
    assert got.version == "2" and sorted(p.name for p in folder.iterdir()) == \
        ["arrays.safetensors", "ids.json", "meta.json", "thumbs.safetensors"]
    original, loaded = load_detector(detectors["gradient_nn"]), load_detector(folder)
    assert loaded.kind == "gradient" and loaded.threshold == original.threshold
    assert loaded.gallery_ids == original.gallery_ids


def test_clear_errors(store, detectors, tmp_path):
    with pytest.raises(registry.RegistryError, match="active MLflow run"):
        registry.log_detector(detectors["pixel_ncc"], "fp")
    with mlflow.start_run(), pytest.raises(registry.RegistryError, match="not a saved fingerprint detector"):
        (tmp_path / "empty").mkdir()
        registry.log_detector(tmp_path / "empty", "fp")
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.download_detector("nope")
    register(detectors["pixel_ncc"])
    with pytest.raises(registry.RegistryError, match=r"no alias 'champion'.*versions \['1'\].*fingerprint promote"):
        registry.download_detector("fp")


def test_promotion_rules_and_history(store, detectors, tmp_path, capsys):
    pixel, grad = detectors["pixel_ncc"], detectors["gradient_nn"]
    val_ids = json.loads((pixel / "meta.json").read_text())["split"]["val"]
    v1 = register(variant(pixel, tmp_path / "a", metrics={"val_auc": 0.70, "val_f1": 0.6}))
    v2 = register(variant(grad, tmp_path / "b", metrics={"val_auc": 0.72, "val_f1": 0.6}))
    v3 = register(variant(grad, tmp_path / "c", metrics={"val_auc": 0.90}))
    v4 = register(variant(pixel, tmp_path / "d", metrics={"val_auc": 0.95, "val_f1": 0.7},
                          val_ids=val_ids[1:]))
    cfg = dict(model="fp", metric="val_auc", tracking_uri=store)

    # no challenger yet: explained, nothing moves
    d = promote.main(promote.PromoteConfig(**cfg))
    assert not d.promote and "no alias 'challenger'" in d.reason

    # the first version becomes champion; a dry run only says so
    registry.set_alias("fp", "challenger", v1, reason="test", metrics={})
    d = promote.main(promote.PromoteConfig(**cfg, dry_run=True))
    assert d.promote and not d.applied and registry.get_alias("fp", "champion") is None
    d = promote.main(promote.PromoteConfig(**cfg))
    assert d.applied and registry.get_alias("fp", "champion").version == v1
    assert "nothing to do" in promote.main(promote.PromoteConfig(**cfg)).reason

    # better, but by less than the margin
    registry.set_alias("fp", "challenger", v2, reason="test", metrics={})
    d = promote.main(promote.PromoteConfig(**cfg, min_improvement=0.05))
    assert not d.promote and "+0.0200" in d.reason and "at least 0.05" in d.reason
    # the decision names the kinds it compared: a gradient candidate against a pixel champion
    assert f"v{v2} (gradient_nn, kind gradient)" in d.reason and f"v{v1} (pixel_ncc, kind pixel)" in d.reason
    assert registry.get_alias("fp", "champion").version == v1

    # a required metric is missing
    registry.set_alias("fp", "challenger", v3, reason="test", metrics={})
    d = promote.main(promote.PromoteConfig(**cfg, require="val_f1"))
    assert not d.promote and "val_f1" in d.reason

    # another validation split: not comparable, whatever the numbers
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v4))
    assert not d.promote and "same locked split" in d.reason and "kind pixel" in d.reason

    # better by the margin with every required metric: promoted, and worse is refused afterwards
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v3, min_improvement=0.1))
    assert d.applied and d.champion == v1 and registry.get_alias("fp", "champion").version == v3
    assert d.metrics["candidate_kind"] == "gradient" and d.metrics["champion_kind"] == "pixel"
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v2))
    assert not d.promote and "-0.1800" in d.reason

    champion_moves = [e for e in registry.alias_history("fp") if e["alias"] == "champion"]
    assert [(e["from_version"], e["to_version"]) for e in champion_moves] == [(None, v1), (v1, v3)]
    last = champion_moves[-1]
    assert last["metrics"]["candidate_val_auc"] == pytest.approx(0.9)
    assert last["metrics"]["champion_val_auc"] == pytest.approx(0.7)
    assert last["from_run_id"] and last["to_run_id"] and last["time"].endswith("Z")
    capsys.readouterr()
    promote.main(promote.PromoteConfig(**cfg, history=True))
    printed = capsys.readouterr().out
    assert printed.count("| champion ") == 2 and printed.count("| challenger ") == 3


def test_promotion_can_require_a_low_false_positive_bound(store, detectors, tmp_path):
    pixel = detectors["pixel_ncc"]
    bound = load_detector(pixel).meta.false_positives.bound
    v1 = register(pixel)
    assert registry.version_fpr_bound(registry.get_version("fp", v1)) == pytest.approx(bound)
    registry.set_alias("fp", "challenger", v1, reason="test", metrics={})
    cfg = dict(model="fp", metric="val_auc", tracking_uri=store)
    # Below the recorded bound: refused with the number, nothing moves; at it: promoted.
    d = promote.main(promote.PromoteConfig(**cfg, max_fpr_bound=bound * 0.99))
    assert not d.promote and f"up to {bound:.1%}" in d.reason and "--max-fpr-bound" in d.reason
    assert d.metrics["candidate_fpr_bound"] == pytest.approx(bound) and registry.get_alias("fp", "champion") is None
    assert promote.main(promote.PromoteConfig(**cfg, max_fpr_bound=bound)).applied
    # A version registered without a bound (saved before it was recorded) is refused when a limit is set.
    old = variant(pixel, tmp_path / "old", metrics={"val_auc": 0.99})
    meta = json.loads((old / "meta.json").read_text())
    del meta["false_positives"]
    (old / "meta.json").write_text(json.dumps(meta))
    v2 = register(old)
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v2, max_fpr_bound=0.5))
    assert not d.promote and "records no false-positive bound" in d.reason
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v2))  # no limit: the metric rules alone decide
    assert "val_auc 0.9900" in d.reason and "false-positive" not in d.reason


def test_moving_an_alias_to_a_missing_version_keeps_the_champion(store, detectors):
    v1 = register(detectors["pixel_ncc"])
    registry.set_alias("fp", "champion", v1, reason="first", metrics={})
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.set_alias("fp", "champion", "99", reason="typo", metrics={})
    assert registry.get_alias("fp", "champion").version == v1
    assert len(registry.alias_history("fp")) == 1


def test_promote_config_names_flags():
    with pytest.raises(ConfigError) as e:
        promote.main(promote.PromoteConfig(model="", min_improvement=-1, candidate="champion", max_fpr_bound=0))
    text = str(e.value)
    assert "--model" in text and "--min-improvement" in text and "--candidate" in text
    assert "--max-fpr-bound: must be in (0, 1] (got 0)" in text


def test_history_keys_never_collide_and_old_numbered_keys_come_first(store, detectors):
    from mlflow.tracking import MlflowClient

    v1 = register(detectors["pixel_ncc"])
    # a registry written by the old read-then-increment scheme
    for seq, to in ((2, "old-b"), (1, "old-a"), (10, "old-c")):
        MlflowClient().set_registered_model_tag("fp", f"{registry.HISTORY_TAG}{seq:06d}",
                                                json.dumps({"alias": "champion", "to_version": to}))
    registry.set_alias("fp", "champion", v1, reason="new", metrics={})
    registry.set_alias("fp", "challenger", v1, reason="new", metrics={})
    events = registry.alias_history("fp")
    assert [e["to_version"] for e in events] == ["old-a", "old-b", "old-c", v1, v1]
    assert [e["alias"] for e in events[3:]] == ["champion", "challenger"]
    keys = [e["key"] for e in events]
    assert len(set(keys)) == 5 and all(k.startswith(registry.HISTORY_TAG) for k in keys)
    assert registry.history_key() != registry.history_key()
    assert sorted(registry.history_key() for _ in range(3))[0] < registry.history_key()  # time-ordered text
