"""The embedded Ray is closed: its ports listen on every interface, so a process without its token is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.ray_session import auth_headers, secure_local_auth

pytestmark = pytest.mark.ray

INTRUDER = """
import ray, sys
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
except Exception as e:
    print("REFUSED", type(e).__name__)
    sys.exit(3)
print("JOINED", ray.cluster_resources())
"""


def _try_join(gcs: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # A hang guard, not a speed check: a refused join returns within Ray's connect retries.
    return subprocess.run([sys.executable, "-c", INTRUDER, gcs], env=env, capture_output=True, text=True,
                          timeout=240)


def test_embedded_ray_refuses_processes_without_its_token(tmp_path):
    import ray

    from jobs.ray_session import init_ray

    if ray.is_initialized():
        ray.shutdown()
    ctx = init_ray(num_cpus=1, log_to_driver=False)
    try:
        gcs = ctx.address_info["gcs_address"]
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
        no_auth = _try_join(gcs, {**base, "RAY_AUTH_MODE": "disabled"})
        wrong = _try_join(gcs, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})
        right = _try_join(gcs, {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]})
    finally:
        ray.shutdown()
    assert no_auth.returncode == 3 and "REFUSED" in no_auth.stdout, no_auth.stdout + no_auth.stderr[-2000:]
    assert wrong.returncode == 3 and "REFUSED" in wrong.stdout, wrong.stdout + wrong.stderr[-2000:]
    assert right.returncode == 0 and "JOINED" in right.stdout, right.stdout + right.stderr[-2000:]


def test_auth_off_is_overridden_and_headers_carry_the_token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = secure_local_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(token) == 64
    assert auth_headers() == {"Authorization": f"Bearer {token}"}
    assert secure_local_auth() == token  # stable within a process: workers and the driver agree


def test_token_file_is_used_when_given(monkeypatch, tmp_path):
    (tmp_path / "tok").write_text("abc123\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert secure_local_auth() == "abc123"
    assert auth_headers() == {"Authorization": "Bearer abc123"}


def test_a_fresh_process_importing_the_jobs_starts_a_closed_ray(tmp_path):
    """Ray reads its auth mode at import: importing `jobs` (as every Ray command does first) must set token auth
    before a jobs module imports ray, or the embedded Ray would refuse its own driver."""
    code = ("import jobs.fit_ray, os, ray\n"
            "from jobs.ray_session import init_ray\n"
            "init_ray(num_cpus=1, log_to_driver=False)\n"
            "print(os.environ['RAY_AUTH_MODE'], ray.get(ray.remote(lambda: 6 * 7).remote()))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and r.stdout.split() == ["token", "42"], r.stdout + r.stderr[-2000:]
