"""cluster/local_multinode.sh for real: two Ray nodes on this machine, a sweep through RAY_ADDRESS, both stopped."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_multinode.sh"
TIMEOUT_S = 900  # about 2 minutes on 2 idle cores; the rest is room for a machine shared with other runs


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's process group: not ours any more
        return False
    return True


@pytest.mark.ray
@pytest.mark.slow
def test_local_multinode_sweep(tmp_path: Path) -> None:
    work = tmp_path / "mn"
    env = {**os.environ, "WORKDIR": str(work), "KEEP": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    # Its own session, so that on a timeout the script (whose trap stops the nodes) is signalled, nothing else.
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"local_multinode.sh took more than {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]

    # Two nodes, one CPU each, were up before the sweep ran.
    assert "2 nodes, CPUs: [1.0, 1.0]" in out, out[-4000:]
    assert "head and worker nodes are up" in out and "sweep finished" in out
    # The sweep's results: its Tune experiment and Ray Train checkpoints in the shared storage folder, the MLflow
    # store, and a registered version.
    results = work / "ray-results"
    assert any(re.fullmatch(r"sweep-[0-9a-f]{8}", p.name) for p in results.iterdir()), "no Tune experiment"
    assert any(p.parent.joinpath("model.pt").is_file() for p in results.rglob("meta.json")), (
        "no Ray Train checkpoint (model.pt + meta.json) was written to the storage folder")
    assert (work / "mlflow.db").is_file()
    assert re.search(r"alias challenger .* -> 1", out), "the sweep registered no version"
    # Training really spanned both nodes: each node's logs hold a Ray Train worker.
    for node in ("head", "worker"):
        assert list((work / "ray-logs" / node).rglob("ray-train-sys-worker-*.log")), f"no Train worker on {node}"
    # Both nodes were stopped: their process groups are gone.
    pgids = [int(g) for g in re.findall(r"stopping the \w+ node \(process group (\d+)\)", out)]
    assert len(pgids) == 2, out[-2000:]
    assert not any(group_alive(g) for g in pgids), "a Ray node outlived the script"
