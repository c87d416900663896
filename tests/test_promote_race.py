"""Concurrent `fingerprint promote` on real MLflow registries (no mocks): a sqlite store and a real `mlflow server`
process. Threads with their own clients and separate processes race to promote versions of different val_auc on
the same locked split. Every race must end with the best version as champion, one recorded promotion per
improvement, no lost or shared history entry (`jobs.promote_races` checks them; `python -m jobs.promote_races`
runs 50 races for the figures). The lock itself: an expired one is taken over, a held one makes a promoter wait
and then decide on fresh state.

Only bounded waits (join/subprocess timeouts) guard against hangs; nothing asserts how long anything took."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fingerprint.data.imagesets import load_fit_data
from fingerprint.detectors import PRESETS, fit_detector
from jobs import promote, registry
from jobs import promote_races as races
from jobs.tracking import setup_experiment

ROOT = Path(__file__).resolve().parents[1]
JOIN_S = 120.0
"""Bound on any wait for a promoter (only to turn a hang into a failure)."""


@pytest.fixture(scope="module")
def base(sample_bench, tmp_path_factory):
    """A sqlite store with one real logged detector version; races register versions that share its model."""
    out = tmp_path_factory.mktemp("race")
    kind, settings = PRESETS["pixel_ncc"]
    det = fit_detector(kind, settings, load_fit_data(sample_bench, 0.25, 0))
    det.meta.extra["name"] = "pixel_ncc"
    folder = det.save(out / "pixel_ncc")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # Artifacts beside the sqlite file, not in ./mlruns of the working folder.
    mlflow.set_experiment(experiment_id=setup_experiment(uri, "race-test"))
    with mlflow.start_run():
        mv = registry.log_detector(folder, "fp-base")
    yield uri, mv
    mlflow.set_tracking_uri(None)



def check_race(uri: str, name: str, versions: list[str], applied: list[tuple[str | None, str]], n_setup: int):
    problems = races.race_problems(uri, name, versions, applied, n_setup)
    assert not problems, problems


def test_threads_race_to_promote(base):
    """Nine races of four promoter threads (each with its own MLflow client) on the sqlite store."""
    uri, mv = base
    result = races.run_races(uri, mv, "thread", races=9, promoters=4)
    assert result["alias_moves"] >= 9  # every race moves the alias at least once
    assert not result["promoter_errors"] and not result["problems"], result


def test_races_against_a_real_mlflow_server(base, tmp_path):
    """The same invariants through a real `mlflow server` process on 127.0.0.1 (HTTP, its own sqlite store)."""
    with races.mlflow_server(tmp_path / "server") as server:
        mv = races.base_version(server, tmp_path)
        result = races.run_races(server, mv, "server", races=2, promoters=3)
    mlflow.set_tracking_uri(base[0])
    assert result["alias_moves"] >= 2
    assert not result["promoter_errors"] and not result["problems"], result


def test_processes_race_to_promote(base):
    uri, mv = base
    for race in range(1):  # a process costs an MLflow import: one race of three keeps the suite short
        name = f"fp-process-{race}"
        candidates, n_setup = races.setup_race(uri, mv, name, 100 + race, 3)
        procs = [subprocess.Popen(
            [sys.executable, "-m", "jobs.promote", "--model", name, "--candidate", v, "--tracking-uri", uri,
             "--lock-timeout", str(JOIN_S)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for v in candidates]
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=JOIN_S)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail(f"race {race}: a promoter process hung")
            assert p.returncode == 0, err
            assert "WARNING" not in out
            outs.append(out)
        applied = []
        for out in outs:
            for line in out.splitlines():
                if "'champion' -> version" in line:
                    to = line.split("-> version ")[1].split()[0]
                    was = line.split("(was ")[1].rstrip(")") if "(was " in line else None
                    applied.append((was, to))
        check_race(uri, name, candidates, applied, n_setup)


def test_expired_lock_is_taken_over(base):
    uri, mv = base
    versions = races.make_model(uri, mv, "fp-stale", [0.6, 0.8])
    registry.set_alias("fp-stale", "champion", versions[0], reason="setup", metrics={})
    dead = {"token": "dead", "owner": "crashed@host:1", "expires": time.time() - 1}
    MlflowClient().set_registered_model_tag("fp-stale", registry.LOCK_TAG, json.dumps(dead))
    lock = registry.acquire_promotion_lock("fp-stale", timeout=10)
    assert lock.took_over["token"] == "dead" and lock.held()
    lock.release()
    assert registry.LOCK_TAG not in MlflowClient().get_registered_model("fp-stale").tags

    MlflowClient().set_registered_model_tag("fp-stale", registry.LOCK_TAG, json.dumps(dead))
    d = promote.main(promote.PromoteConfig(model="fp-stale", candidate=versions[1], tracking_uri=uri,
                                           lock_timeout=10))
    assert d.applied and registry.get_alias("fp-stale", "champion").version == versions[1]
    assert registry.LOCK_TAG not in MlflowClient().get_registered_model("fp-stale").tags


def test_held_lock_waits_then_decides_on_fresh_state(base):
    uri, mv = base
    low, mid, high = races.make_model(uri, mv, "fp-held", [0.6, 0.7, 0.9])
    registry.set_alias("fp-held", "champion", low, reason="setup", metrics={})
    cfg = dict(model="fp-held", tracking_uri=uri)
    # mid beats the champion as things stand: without the lock it would be promoted at once
    assert promote.decide(promote.PromoteConfig(**cfg, candidate=mid)).promote
    done = threading.Event()
    result: list = []

    def second() -> None:
        try:
            result.append(promote.main(promote.PromoteConfig(**cfg, candidate=mid, lock_timeout=JOIN_S)))
        except BaseException as e:
            result.append(e)
        done.set()

    with registry.promotion_lock("fp-held", timeout=10) as lock:
        waiter = threading.Thread(target=second)
        waiter.start()
        done.wait(1.0)  # give it the chance to run; it must be blocked on the lock, however long this takes
        assert not done.is_set() and result == []
        # meanwhile the lock holder promotes the best version
        lock.check()
        registry.set_alias("fp-held", "champion", high, reason="holder", metrics={})
    waiter.join(JOIN_S)
    assert done.is_set(), "the waiting promoter hung"
    (d,) = result
    assert isinstance(d, promote.Decision), d
    assert not d.applied and d.reason.startswith("refused") and d.champion == high
    assert registry.get_alias("fp-held", "champion").version == high
    assert [e["to_version"] for e in registry.alias_history("fp-held")] == [low, high]


def test_lock_timeout_refuses_and_names_the_flag(base):
    uri, mv = base
    low, high = races.make_model(uri, mv, "fp-busy", [0.6, 0.9])
    registry.set_alias("fp-busy", "champion", low, reason="setup", metrics={})
    with registry.promotion_lock("fp-busy", timeout=10):
        with pytest.raises(registry.LockTimeout, match="--lock-timeout"):
            promote.main(promote.PromoteConfig(model="fp-busy", candidate=high, tracking_uri=uri, lock_timeout=0.5))
    assert registry.get_alias("fp-busy", "champion").version == low
    cli = subprocess.run([sys.executable, "-m", "jobs.promote", "--model", "fp-busy", "--candidate", high,
                          "--tracking-uri", uri, "--lock-timeout", "-1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=JOIN_S)
    assert cli.returncode == 2 and "--lock-timeout" in cli.stderr
