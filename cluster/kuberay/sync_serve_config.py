"""Write serve/config.yaml into ray-service.yaml's `serveConfigV2`, so the RayService serves the same Serve config.

    python cluster/kuberay/sync_serve_config.py           # rewrite serveConfigV2 after editing serve/config.yaml
    python cluster/kuberay/sync_serve_config.py --check   # exit 1 if ray-service.yaml is out of date

serve/config.yaml is written for one machine; a pod differs in exactly the settings listed in CLUSTER_OVERRIDES,
and nowhere else (tests/test_cluster_configs.py checks that serveConfigV2 equals serve/config.yaml with these
overrides applied, and that each overridden setting exists in serve/config.yaml). Everything else (application,
import_path, deployments, batching, autoscaling, actor options) is copied as it is.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
RAY_SERVICE = Path(__file__).with_name("ray-service.yaml")
KEY = "  serveConfigV2: |"
"""The line that opens the block scalar in ray-service.yaml (a key of `spec`, indented by two spaces)."""

SettingPath = tuple[Any, ...]
CLUSTER_OVERRIDES: list[tuple[SettingPath, Any, str]] = [
    (("http_options", "host"), "0.0.0.0",
     "the Kubernetes Service that KubeRay puts in front of the Serve proxies reaches them on the pod IP, not on "
     "loopback; requests then need the bearer token from the fingerprint-serve-token Secret"),
    (("applications", {"name": "fingerprint"}, "deployments", {"name": "FingerprintService"}, "user_config",
      "tracking_uri"), "",
     "empty = MLFLOW_TRACKING_URI, set by config.yaml on every pod (the MLflow server); a sqlite file would be "
     "a fresh, empty registry in each pod"),
]
"""(path into the Serve config, cluster value, why). A dict in a path selects the list item with those keys."""


def _step(node: Any, key: Any, path: SettingPath) -> Any:
    if isinstance(key, dict):
        if not isinstance(node, list):
            raise KeyError(f"{'.'.join(map(str, path))}: expected a list to select {key} from")
        found = [item for item in node if isinstance(item, dict) and all(item.get(k) == v for k, v in key.items())]
        if len(found) != 1:
            raise KeyError(f"{'.'.join(map(str, path))}: {len(found)} items match {key}, expected exactly 1")
        return found[0]
    if not isinstance(node, dict) or key not in node:
        raise KeyError(f"{'.'.join(map(str, path))}: no setting '{key}'")
    return node[key]


def get_setting(config: dict[str, Any], path: SettingPath) -> Any:
    """The value at `path` in a Serve config; KeyError naming the path when it is absent."""
    node: Any = config
    for i, key in enumerate(path):
        node = _step(node, key, path[: i + 1])
    return node


def cluster_config(local: dict[str, Any]) -> dict[str, Any]:
    """serve/config.yaml's content with CLUSTER_OVERRIDES applied (each overridden setting must already exist)."""
    out = copy.deepcopy(local)
    for path, value, _why in CLUSTER_OVERRIDES:
        get_setting(out, path)  # refuse to invent a setting serve/config.yaml does not have
        parent = get_setting(out, path[:-1]) if len(path) > 1 else out
        parent[path[-1]] = value
    return out


def describe(path: SettingPath) -> str:
    """A readable form of a setting path, e.g. applications[fingerprint].deployments[Service].user_config.k."""
    out = ""
    for key in path:
        if isinstance(key, dict):
            out += "[" + ",".join(str(v) if k == "name" else f"{k}={v}" for k, v in key.items()) + "]"
        else:
            out += ("." if out else "") + str(key)
    return out


def render_block(config: dict[str, Any]) -> str:
    """The serveConfigV2 block scalar (its key line included) for `config`."""
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)
    header = ["# Generated from serve/config.yaml by cluster/kuberay/sync_serve_config.py: edit that file and run",
              "# the script. Set differently on the cluster (CLUSTER_OVERRIDES in the script says why):"]
    header += [f"#   {describe(path)}: {value!r}" for path, value, _why in CLUSTER_OVERRIDES]
    lines = [KEY] + ["    " + line if line else "" for line in [*header, *body.splitlines()]]
    return "\n".join(lines) + "\n"


def replace_block(manifest: str, block: str) -> str:
    """`manifest` with the serveConfigV2 block replaced by `block` (everything up to the next key of `spec`)."""
    lines = manifest.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == KEY)
    except StopIteration:
        raise ValueError(f"{RAY_SERVICE}: no line '{KEY}' to replace") from None
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > 2):
        end += 1
    # Blank lines before the next key belong to the layout, not to the block.
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def expected_manifest(serve_config: Path = SERVE_CONFIG, ray_service: Path = RAY_SERVICE) -> str:
    local = yaml.safe_load(serve_config.read_text())
    return replace_block(ray_service.read_text(), render_block(cluster_config(local)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether ray-service.yaml is up to date")
    args = parser.parse_args(argv)
    new = expected_manifest()
    if new == RAY_SERVICE.read_text():
        print(f"{RAY_SERVICE.relative_to(ROOT)} is up to date with {SERVE_CONFIG.relative_to(ROOT)}")
        return 0
    if args.check:
        print(f"{RAY_SERVICE.relative_to(ROOT)} is out of date: run python {Path(__file__).relative_to(ROOT)}",
              file=sys.stderr)
        return 1
    fd, tmp = tempfile.mkstemp(dir=RAY_SERVICE.parent, prefix=".ray-service.", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, RAY_SERVICE)  # atomic: never a half-written manifest
    print(f"updated serveConfigV2 in {RAY_SERVICE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
