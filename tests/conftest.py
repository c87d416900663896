"""Shared fixtures: small synthetic benchmarks made once per session (no files from outside the repo)."""

import os
from pathlib import Path

import pytest

# Two cores are shared by torch, Ray and the test runner: one intra-op thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from jobs.ray_session import secure_local_auth  # noqa: E402  (after the thread setting, before any Ray starts)

# Every Ray a test starts (embedded, multi-node Cluster, Serve) is closed by a per-session token, as in production.
secure_local_auth()


@pytest.fixture(scope="session")
def sample_bench(tmp_path_factory) -> Path:
    """A tiny benchmark in the ImageCLEF layout with a strongly memorising generator."""
    from fingerprint.data.phantoms import make_sample_dataset

    out = tmp_path_factory.mktemp("bench") / "sample"
    make_sample_dataset(out, n_patients=12, slices_per_patient=3, size=32, n_generated_dev=48,
                        n_generated_test=48, memorisation=0.95, n_reference_patients=12, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_train_kwargs() -> dict:
    """The smallest honest training settings: random init, 32 px, two short epochs."""
    return dict(backbone="resnet18", weights="none", image_size=32, embed_dim=16, epochs=2,
                triplets_per_epoch=32, batch_size=8, k=3, device="cpu", seed=0)
