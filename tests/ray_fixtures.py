"""Ray fixtures for the jobs tests: import the ones a module needs (`from tests.ray_fixtures import ray_local`).

One embedded Ray (2 CPUs, no dashboard) serves every test that asks for `ray_local`; it is started on first use
(5-9 s) and kept. `ray_cluster` needs a multi-node `ray.cluster_utils.Cluster` instead, so it shuts the embedded
instance down and the next `ray_local` user starts a fresh one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def ray_local() -> Iterator[None]:
    """An embedded local Ray with 2 CPUs (started if none is running)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture
def ray_cluster() -> Iterator[object]:
    """A head without CPUs (it only hosts the driver and the Train controller) plus two 1-CPU worker nodes."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_with_dashboard() -> Iterator[str]:
    """An embedded local Ray (2 CPUs) with its dashboard on 127.0.0.1, for Serve's REST API (what `serve deploy`
    uses); yields the dashboard's http address. A running instance without a dashboard is shut down first, and
    this one is shut down at the end of the module (the next `ray_local` user starts a fresh one)."""
    import socket

    import ray

    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=port, log_to_driver=False)
    try:
        yield f"http://{ctx.dashboard_url}"
    finally:
        ray.shutdown()
