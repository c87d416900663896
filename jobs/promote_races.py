"""Concurrent promoters against one real registry: the races the promotion lock must survive, and their figures.

`python -m jobs.promote_races` runs N races (each: several `fingerprint promote` at once, on versions of
different val_auc) against a sqlite store and against a real `mlflow server` process on 127.0.0.1, checks every
race from the registry's own record (best version champion, one history entry per alias move, no entry lost or
shared, moves a chain of strict improvements, lock released) and writes
`benchmarks/results/promotion_races.{json,md}`. The tests use the same functions on fewer races.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fingerprint.commands.cli import Command

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
AUCS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
JOIN_S = 180.0
"""Bound on any wait for a promoter (only to turn a hang into a failure)."""


def make_model(uri: str, base_version: Any, name: str, aucs: list[float]) -> list[str]:
    """A registered model whose versions carry `aucs` as val_auc, all sharing `base_version`'s model and split."""
    from mlflow.tracking import MlflowClient

    from jobs import registry

    client = MlflowClient(uri)
    client.create_registered_model(name)
    # A `models:/m-...` source must name its logged model (a tracking server checks; sqlite does not), and a
    # server's get_model_version leaves model_id empty: take it from the source.
    model_id = base_version.model_id or (base_version.source.removeprefix("models:/")
                                         if base_version.source.startswith("models:/m-") else None)
    versions = []
    for auc in aucs:
        tags = {k: v for k, v in base_version.tags.items() if not k.startswith(registry.METRIC_TAG)}
        tags[f"{registry.METRIC_TAG}val_auc"] = repr(auc)
        versions.append(str(client.create_model_version(name, base_version.source, run_id=base_version.run_id,
                                                        tags=tags, model_id=model_id).version))
    return versions


def setup_race(uri: str, base_version: Any, name: str, seed: int, n: int) -> tuple[list[str], int]:
    """`n` candidate versions in random order; odd seeds start from an existing (worst) champion."""
    from jobs import registry

    rng = random.Random(seed)
    aucs = rng.sample(AUCS, n + 1)
    versions = make_model(uri, base_version, name, aucs)
    worst = versions[aucs.index(min(aucs))]
    n_setup = seed % 2
    if n_setup:
        registry.set_alias(name, "champion", worst, reason="setup", metrics={})
    candidates = [v for v in versions if not (n_setup and v == worst)]
    rng.shuffle(candidates)
    return candidates, n_setup


def race_threads(uri: str, name: str, candidates: list[str], lock_timeout: float = JOIN_S) -> list[Any]:
    """One promoter thread per candidate, released together; each result is a Decision or the exception."""
    from jobs import promote

    barrier = threading.Barrier(len(candidates))
    results: dict[str, Any] = {}

    def one(version: str) -> None:
        try:
            barrier.wait(timeout=JOIN_S)
            results[version] = promote.main(promote.PromoteConfig(
                model=name, candidate=version, tracking_uri=uri, lock_timeout=lock_timeout))
        except BaseException as e:  # reported by the caller
            results[version] = e

    threads = [threading.Thread(target=one, args=(v,), daemon=True) for v in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    return [TimeoutError(f"promoter of version {v} hung") if t.is_alive() or v not in results else results[v]
            for v, t in zip(candidates, threads, strict=True)]


def race_problems(uri: str, name: str, versions: list[str], applied: list[tuple[str | None, str]],
                  n_setup: int) -> list[str]:
    """What went wrong in a race, from the registry's own record (empty: the race kept every invariant)."""
    from mlflow.tracking import MlflowClient

    from jobs import registry

    client = MlflowClient(uri)
    auc = {v: registry.version_metrics(registry.get_version(name, v))["val_auc"] for v in versions}
    best = max(versions, key=auc.__getitem__)
    problems = []
    champion = registry.get_alias(name, "champion").version
    if champion != best:
        problems.append(f"champion is v{champion} (val_auc {auc.get(champion)}), not the best v{best}")
    tags = client.get_registered_model(name).tags
    raw = [k for k in tags if k.startswith(registry.HISTORY_TAG)]
    events = registry.alias_history(name)
    keys = [e["key"] for e in events]
    if not len(keys) == len(set(keys)) == len(raw):
        problems.append(f"history keys lost or shared: {len(keys)} events, {len(set(keys))} keys, {len(raw)} tags")
    moves = [e for e in events if e["alias"] == "champion"][n_setup:]
    if sorted(((e["from_version"], e["to_version"]) for e in moves), key=str) != sorted(applied, key=str):
        problems.append(f"history {[(e['from_version'], e['to_version']) for e in moves]} != moves the promoters "
                        f"reported {applied}")
    previous = moves[0]["from_version"] if moves else None
    for e in moves:
        if e["from_version"] != previous:
            problems.append(f"move {e['from_version']}->{e['to_version']} does not start at v{previous}")
        if previous is not None and e["to_version"] in auc and auc[e["to_version"]] <= auc.get(previous, -1):
            problems.append(f"v{e['to_version']} replaced the better or equal v{previous}")
        previous = e["to_version"]
    if len({e["to_version"] for e in moves}) != len(moves):
        problems.append("a version was promoted twice")
    if registry.LOCK_TAG in tags:
        problems.append("the promotion lock was left behind")
    return problems


def applied_moves(results: list[Any]) -> list[tuple[str | None, str]]:
    return [(r.champion, r.candidate) for r in results if not isinstance(r, BaseException) and r.applied]


def base_version(uri: str, work: Path, model: str = "fp-race-base") -> Any:
    """One real logged detector version (pixel NCC on a tiny phantom benchmark) for races to share."""
    import mlflow

    from fingerprint.data.imagesets import load_fit_data
    from fingerprint.data.phantoms import make_sample_dataset
    from fingerprint.detectors import PRESETS, fit_detector
    from jobs import registry
    from jobs.tracking import setup_experiment

    bench = work / "bench"
    if not bench.exists():
        make_sample_dataset(bench, n_patients=8, slices_per_patient=2, size=32, n_generated_dev=16,
                            n_generated_test=16, memorisation=0.95, n_reference_patients=8, seed=0)
    kind, settings = PRESETS["pixel_ncc"]
    det = fit_detector(kind, settings, load_fit_data(bench, 0.25, 0))
    det.meta.extra["name"] = "pixel_ncc"
    folder = det.save(work / "pixel_ncc")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=setup_experiment(uri, "promotion-races"))
    with mlflow.start_run():
        return registry.log_detector(folder, model)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(work: Path, start_timeout_s: float = 180.0) -> Iterator[str]:
    """A real `mlflow server` process on 127.0.0.1 (sqlite backend, artifacts served from `work`); yields its URI
    and stops it (and its workers) on exit."""
    port = _free_port()
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{work / 'server.db'}", "--artifacts-destination",
           str(work / "artifacts"), "--workers", "2"]
    logf = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                tail = (work / "server.log").read_text()[-2000:]
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {tail}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:  # noqa: S310 (loopback URL we built)
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health within {start_timeout_s:g} s")
            time.sleep(0.5)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        logf.close()


@dataclass
class RacesConfig:
    """Concurrent promotion races against a sqlite store and a real MLflow server."""

    races: int = 50
    """Races per store."""
    promoters: int = 4
    """Concurrent promoters per race (threads, each with its own MLflow client)."""
    server_races: int = 10
    """Races against a real `mlflow server` process on 127.0.0.1 (0: skip the server)."""
    out: str = "benchmarks/results"
    """Folder for promotion_races.json and promotion_races.md."""


def run_races(uri: str, base: Any, label: str, races: int, promoters: int, seed0: int = 0) -> dict[str, Any]:
    """`races` races on `uri`; counts of double/lost promotions and every problem found."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    problems, errors, moves, wall = [], [], 0, []
    for race in range(races):
        name = f"fp-{label}-{seed0 + race}"
        candidates, n_setup = setup_race(uri, base, name, seed0 + race, promoters)
        t0 = time.monotonic()
        with contextlib.redirect_stdout(io.StringIO()):  # each promoter prints its decision
            results = race_threads(uri, name, candidates)
        wall.append(time.monotonic() - t0)
        errors += [f"{name}: {r!r}" for r in results if isinstance(r, BaseException)]
        applied = applied_moves(results)
        moves += len(applied)
        problems += [f"{name}: {p}" for p in race_problems(uri, name, candidates, applied, n_setup)]
        if sys.stderr.isatty():
            print(f"\r{label}: race {race + 1}/{races}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return {"store": label, "races": races, "promoters_per_race": promoters, "alias_moves": moves,
            "races_with_problems": len({p.split(':')[0] for p in problems}), "problems": problems,
            "promoter_errors": errors, "median_race_s": sorted(wall)[len(wall) // 2] if wall else None}


def main(config: RacesConfig) -> dict[str, Any]:
    from fingerprint.io import jsonable, write_text_atomic

    out = Path(config.out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fp-races-") as tmp:
        work = Path(tmp)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        rows.append(run_races(uri, base_version(uri, work), "sqlite", config.races, config.promoters))
        if config.server_races:
            with mlflow_server(work / "server") as server:
                rows.append(run_races(server, base_version(server, work), "server", config.server_races,
                                      config.promoters, seed0=1000))
    result = {"command": "python -m jobs.promote_races " + " ".join(sys.argv[1:]), "results": rows,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_text_atomic(out / "promotion_races.json", json.dumps(result, indent=2, default=jsonable) + "\n")
    lines = ["# Concurrent promotion races", "", f"`{result['command']}` ({result['created_at']})", "",
             "| store | races | promoters per race | alias moves | races with a problem | promoter errors | "
             "median race (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['races']} | {r['promoters_per_race']} | {r['alias_moves']} | "
                     f"{r['races_with_problems']} | {len(r['promoter_errors'])} | {r['median_race_s']:.2f} |")
    lines += ["", "A problem is any of: the best version not champion, a history entry lost or shared, a move the "
              "registry records that no promoter reported (or the reverse), a worse version replacing a better one, "
              "a version promoted twice, the lock left behind."]
    for r in rows:
        lines += [f"- {r['store']}: {p}" for p in r["problems"] + r["promoter_errors"]]
    write_text_atomic(out / "promotion_races.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def command() -> Command:
    return Command(RacesConfig, main, (__doc__ or "").strip().splitlines()[0])


if __name__ == "__main__":
    from jobs._cli import run_command

    raise SystemExit(run_command("promote-races", command))
