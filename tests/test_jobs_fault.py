"""Fault tolerance on a real multi-node Ray: a worker node disappears mid-run and training finishes from the last
checkpoint, losing at most one epoch.

`ray.cluster_utils.Cluster` gives a head without CPUs and two 1-CPU worker nodes, so each Train worker sits on its
own node. The run is elastic (`--min-workers 1`): after the node is removed, Ray Train restarts the worker group at
the size the cluster still holds (1) and both the model and the optimizer continue from the latest checkpoint.
`add_node`/`remove_node` must run on the main thread, so training runs in a thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_fixtures import ray_cluster  # noqa: F401  (fixture)

from jobs.train_ray import RayTrainConfig, load_state, resolved, run_training

HANG_S = 900
"""Seconds after which a wait is taken for a hang (never a speed check)."""

EPOCHS = 5


@pytest.mark.ray
@pytest.mark.slow
def test_losing_a_worker_node_resumes_from_the_last_checkpoint(ray_cluster, sample_bench, tiny_train_kwargs,  # noqa: F811
                                                               tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = resolved(RayTrainConfig(
        data=str(sample_bench), out=str(tmp_path / "out"), storage_path=str(tmp_path / "ray"), tracking_uri=uri,
        registered_model="none", num_workers=2, min_workers=1, max_failures=3,
        **{**tiny_train_kwargs, "epochs": EPOCHS, "triplets_per_epoch": 128}))
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(cfg)
        except BaseException as e:  # reported by the main thread
            outcome["error"] = e

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    first = Path(cfg.storage_path) / cfg.run_name / "epoch_0000"
    # A hang guard, not a speed goal: generous enough for a machine busy with other work.
    deadline = time.monotonic() + HANG_S
    while not (first / "training_state.pt").exists():
        assert thread.is_alive(), f"training ended before the first checkpoint: {outcome}"
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint after {HANG_S} s: the run hangs")
        time.sleep(0.2)
    time.sleep(1.0)  # let the checkpoint registration finish
    worker_nodes = [n for n in ray_cluster.list_all_nodes() if n is not ray_cluster.head_node]
    ray_cluster.remove_node(worker_nodes[-1])

    thread.join(timeout=HANG_S)
    assert not thread.is_alive(), "training did not finish within 6 minutes of losing a node"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]

    # the final state holds every epoch exactly once
    state = load_state(_latest_checkpoint(Path(result.ray_path)))
    assert [int(h["epoch"]) for h in state["history"]] == list(range(EPOCHS))

    # rank 0 logged each epoch it trained: a restart shows as a repeated step, at world size 1 afterwards
    client = MlflowClient(uri)
    losses = client.get_metric_history(result.mlflow_run_id, "loss")
    sizes = [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, "world_size"),
                                     key=lambda m: m.timestamp)]
    steps = sorted(m.step for m in losses)
    assert set(steps) == set(range(EPOCHS))
    redone = len(steps) - EPOCHS
    assert redone <= 1, f"lost {redone} epochs: {steps}"
    assert sizes[0] == 2 and sizes[-1] == 1, f"world sizes over time: {sizes}"


def _latest_checkpoint(run_dir: Path) -> Path:
    return max(run_dir.glob("epoch_*"), key=lambda p: p.name)
