"""serve.bench on a real (tiny) run: an untrained triplet detector on two replicas on 127.0.0.1 (deployed through
Serve's REST API on the dashboard), both modes, the ceiling's layouts, CPU shares."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")


def test_cpu_by_role_sorts_processes_into_roles():
    from serve.bench import cpu_by_role

    before = {1: ("ray::ServeReplica:app:FingerprintService", 1.0), 2: ("ray::ProxyActor", 0.5), 3: ("me", 2.0),
              4: ("/x/ray/core/src/ray/raylet/raylet --args", 0.1), 5: ("ray::ServeController", 0.0)}
    after = {1: ("ray::ServeReplica:app:FingerprintService", 3.0), 2: ("ray::ProxyActor", 1.0), 3: ("me", 2.25),
             4: ("/x/ray/core/src/ray/raylet/raylet --args", 0.2), 5: ("ray::ServeController", 0.05),
             6: ("ray::ServeReplica:app:FingerprintService", 0.75),  # started in between: counts from zero
             7: ("make -j2", 4.0)}
    roles = cpu_by_role(before, after, client_pid=3)
    assert roles == {"replicas": 2.75, "proxy": 0.5, "controller": 0.05, "load generator": 0.25,
                     "ray other": 0.1, "other": 4.0}


def test_bench_two_replicas_both_modes(sample_bench, tmp_path):
    from serve import bench

    if ray.is_initialized():  # the bench starts its own local Ray
        ray.shutdown()
    before = os.environ.get(bench.THROUGHPUT_ENV)
    config = bench.BenchConfig(backbone="tf_efficientnet_lite0", image_size=32, embed_dim=16, data=str(sample_bench),
                               requests=12, warmup=2, seconds=30, concurrency="2", images_per_request="4",
                               replicas=2, max_batch_size=8, offline_batch_sizes="4", offline_seconds=0.3,
                               out=str(tmp_path), name="tiny")
    md = bench.main(config)
    assert os.environ.get(bench.THROUGHPUT_ENV) == before, "the bench must restore the environment"

    result = json.loads((tmp_path / "serve_tiny.json").read_text())
    assert md.read_text().startswith("# Serving benchmark: tiny") and "Ceiling used below" in md.read_text()
    cells = {c["mode"]: c for c in result["cells"]}
    assert set(cells) == {"batched", "max_batch_size=1"}
    for c in cells.values():
        assert c["ok"] == 12 and not c["errors"] and c["replicas"] == 2 and c["replicas_seen"] == 2
        assert c["images_per_s"] > 0 and c["latency_ms"]["p50"] <= c["latency_ms"]["p99"]
        assert c["cpu_s"]["replicas"] > 0 and c["cpu_s"]["proxy"] > 0
    # Four images arrive together in each request, so batching must put more than one in a forward pass.
    assert cells["batched"]["mean_batch_size"] > 1 and cells["batched"]["max_observed_batch_size"] <= 8
    assert cells["max_batch_size=1"]["max_observed_batch_size"] == 1

    for off in result["offline"].values():
        assert set(off["layouts"]) == {f"1x{os.cpu_count()}", "2x1"}
        every = [r for nets in off["layouts"].values() for by_bs in nets.values() for r in by_bs.values()]
        assert off["ceiling_images_per_s"] == max(every) > 0
