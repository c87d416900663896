"""Registry and promotion against a real sqlite MLflow store (no Ray): versions, aliases, history, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from fingerprint.checkpoint import load_checkpoint
from fingerprint.config import ConfigError, TrainConfig
from jobs import promote, registry


@pytest.fixture(scope="module")
def checkpoint(sample_bench, tiny_train_kwargs, tmp_path_factory) -> Path:
    from fingerprint import train

    out = tmp_path_factory.mktemp("regtrain")
    return train.main(TrainConfig(data=str(sample_bench), out=str(out), **{**tiny_train_kwargs, "epochs": 1}))


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    yield uri
    mlflow.set_tracking_uri(None)


def variant(src: Path, dst: Path, *, metrics: dict | None = None, val_ids: list[str] | None = None) -> Path:
    """A copy of the checkpoint whose meta.json claims other metrics or another validation split."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    if metrics is not None:
        meta["metrics"] = metrics
    if val_ids is not None:
        meta["split"]["val"] = val_ids
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def register(ckpt: Path) -> str:
    with mlflow.start_run():
        return registry.log_checkpoint_model(ckpt, "fp").version


def test_version_carries_a_loadable_checkpoint_and_a_pyfunc_model(store, checkpoint, tmp_path):
    with mlflow.start_run() as run:
        mv = registry.log_checkpoint_model(checkpoint, "fp")
    assert mv.version == "1" and mv.run_id == run.info.run_id
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert mv.tags[registry.SPLIT_TAG] == registry.split_digest(meta["split"]) != ""
    assert float(mv.tags["metric.val_auc"]) == pytest.approx(meta["metrics"]["val_auc"])
    assert registry.version_metrics(mv)["val_auc"] == pytest.approx(meta["metrics"]["val_auc"])

    registry.set_alias("fp", "champion", mv.version, reason="first", metrics={"val_auc": 0.5})
    got, folder = registry.download_checkpoint("fp", "champion", tmp_path / "dl")
    assert got.version == "1" and sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.pt"]
    original, loaded = load_checkpoint(checkpoint), load_checkpoint(folder)
    assert loaded.threshold == original.threshold and loaded.meta["data_config"] == original.meta["data_config"]
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), original.model(x), atol=1e-6)
        # the MLflow flavour itself (batch of 3: the logged example had 2, the batch dimension stays free)
        flavoured = mlflow.pytorch.load_model("models:/fp@champion")
        assert torch.allclose(flavoured(x), original.model(x), atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model("models:/fp/1")
    assert np.asarray(pyfunc.predict(x.numpy())).shape == (3, 16)


def test_clear_errors(store, checkpoint, tmp_path):
    with pytest.raises(registry.RegistryError, match="active MLflow run"):
        registry.log_checkpoint_model(checkpoint, "fp")
    with mlflow.start_run(), pytest.raises(registry.RegistryError, match="missing model.pt"):
        (tmp_path / "empty").mkdir()
        registry.log_checkpoint_model(tmp_path / "empty", "fp")
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.download_checkpoint("nope")
    register(checkpoint)
    with pytest.raises(registry.RegistryError, match=r"no alias 'champion'.*versions \['1'\].*fingerprint promote"):
        registry.download_checkpoint("fp")


def test_promotion_rules_and_history(store, checkpoint, tmp_path, capsys):
    base = json.loads((checkpoint / "meta.json").read_text())
    val_ids = base["split"]["val"]
    v1 = register(variant(checkpoint, tmp_path / "a", metrics={"val_auc": 0.70, "val_f1": 0.6}))
    v2 = register(variant(checkpoint, tmp_path / "b", metrics={"val_auc": 0.72, "val_f1": 0.6}))
    v3 = register(variant(checkpoint, tmp_path / "c", metrics={"val_auc": 0.90}))
    v4 = register(variant(checkpoint, tmp_path / "d", metrics={"val_auc": 0.95, "val_f1": 0.7},
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
    assert registry.get_alias("fp", "champion").version == v1

    # a required metric is missing
    registry.set_alias("fp", "challenger", v3, reason="test", metrics={})
    d = promote.main(promote.PromoteConfig(**cfg, require="val_f1"))
    assert not d.promote and "val_f1" in d.reason

    # another validation split: not comparable, whatever the numbers
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v4))
    assert not d.promote and "same locked split" in d.reason

    # better by the margin with every required metric: promoted, and worse is refused afterwards
    d = promote.main(promote.PromoteConfig(**cfg, candidate=v3, min_improvement=0.1))
    assert d.applied and d.champion == v1 and registry.get_alias("fp", "champion").version == v3
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


def test_moving_an_alias_to_a_missing_version_keeps_the_champion(store, checkpoint):
    v1 = register(checkpoint)
    registry.set_alias("fp", "champion", v1, reason="first", metrics={})
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.set_alias("fp", "champion", "99", reason="typo", metrics={})
    assert registry.get_alias("fp", "champion").version == v1
    assert len(registry.alias_history("fp")) == 1


def test_promote_config_names_flags():
    with pytest.raises(ConfigError) as e:
        promote.main(promote.PromoteConfig(model="", min_improvement=-1, candidate="champion"))
    text = str(e.value)
    assert "--model" in text and "--min-improvement" in text and "--candidate" in text
