"""Deploy serve/config.yaml and hot-swap a running app from Python, through Serve's public REST API.

    ray start --head && serve deploy serve/config.yaml      # the CLI route: the same REST call

    from serve.deploy import load_config, deploy_config, reload_app
    deploy_config(load_config(user_config={"detector": "/abs/runs/fit/detector"}))
    reload_app("fingerprint")          # after `fingerprint promote`: re-resolve the alias, swap in place
    reload_app("fingerprint", {"detector": "/abs/runs/best/detector"})     # or serve another folder (any kind)

Both talk to the Ray dashboard's documented Serve REST API (PUT / GET /api/serve/applications/), exactly as the
`serve deploy` and `serve status` CLIs do, at `address` or $RAY_DASHBOARD_ADDRESS (default
http://localhost:8265): the Ray instance must run its dashboard (`ray start --head` does; `ray.init` needs
`include_dashboard=True`). Ray Serve has no public Python call that applies a config file: `serve.run` takes an
application object, not a config, and gives every call a new random code version.

Why the config route: a config deploy gives the deployment a code version derived from the config, so a change
that touches only `user_config` (or replicas, autoscaling, max_ongoing_requests) reconfigures the running
replicas in place: `FingerprintService.reconfigure` loads the new detector beside the old one (any kind, even
another kind than before) and swaps a single reference, and no replica restarts. The Python route, `serve.run`
of `serve.app.build_app(...)` again, replaces the replicas instead; `build_app` sets `max_surge_percent: 100`,
so each new replica starts (and loads its detector) before its old one stops and no request is refused, at the
cost of a replica start per swap.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).with_name("config.yaml")
APP_NAME = "fingerprint"
DEPLOYMENT = "FingerprintService"
DASHBOARD_ENV = "RAY_DASHBOARD_ADDRESS"
DEFAULT_DASHBOARD = "http://localhost:8265"
API_PATH = "/api/serve/applications/"


def load_config(path: str | Path = CONFIG_PATH, *, user_config: dict[str, Any] | None = None,
                deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Serve config (multi-application schema) from `path`, with the deployment's settings overridden.

    `user_config` keys replace those in the file; `deployment` replaces deployment options (e.g.
    num_replicas, autoscaling_config, max_ongoing_requests).
    """
    config = yaml.safe_load(Path(path).read_text())
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application, found {len(apps)}")
    dep = _deployment(apps[0], path)
    if user_config:
        dep["user_config"] = {**(dep.get("user_config") or {}), **user_config}
    if deployment:
        if "num_replicas" in deployment:
            dep.pop("autoscaling_config", None)
        if "autoscaling_config" in deployment:
            dep.pop("num_replicas", None)
        dep.update(deployment)
    return config


def _deployment(app: dict[str, Any], where: Any) -> dict[str, Any]:
    for dep in app.get("deployments") or []:
        if dep.get("name") == DEPLOYMENT:
            return dep
    raise ValueError(f"{where}: application {app.get('name')!r} has no deployment {DEPLOYMENT}")


def dashboard_address(address: str | None = None) -> str:
    """Where the Serve REST API answers: `address`, else $RAY_DASHBOARD_ADDRESS, else localhost:8265."""
    address = address or os.environ.get(DASHBOARD_ENV) or DEFAULT_DASHBOARD
    return (address if "://" in address else f"http://{address}").rstrip("/")


class RestError(RuntimeError):
    """The Serve REST API answered with an HTTP error (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _rest(method: str, address: str | None, body: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Any:
    url = dashboard_address(address) + API_PATH
    data = None if body is None else json.dumps(body).encode()
    from jobs.ray_session import auth_headers

    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **auth_headers()})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (an http URL we build)
            text = resp.read().decode()
    except urllib.error.HTTPError as e:
        raise RestError(f"{method} {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}", e.code) from e
    except urllib.error.URLError as e:
        raise RuntimeError(f"{method} {url}: no Ray dashboard answers there ({e.reason}); start Ray with its "
                           f"dashboard (`ray start --head`) or set {DASHBOARD_ENV}") from e
    return json.loads(text) if text.strip() else None


def check_config(config: dict[str, Any]) -> None:
    """Refuse, before deploying, a config whose batches could never fill (max_ongoing_requests < max_batch_size)."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    for app in schema.applications:
        for dep in app.deployments:
            uc = dep.user_config if isinstance(dep.user_config, dict) else {}
            limit = dep.max_ongoing_requests if isinstance(dep.max_ongoing_requests, int) else None
            if limit is not None and int(uc.get("max_batch_size", 16)) > limit:
                raise ValueError(f"application {app.name}, deployment {dep.name}: max_ongoing_requests ({limit}) "
                                 f"must be >= user_config.max_batch_size ({uc['max_batch_size']}), or batches "
                                 "can never fill")


def deploy_config(config: dict[str, Any], address: str | None = None, timeout_s: float = 180.0) -> None:
    """Apply a Serve config (what `serve deploy` does) on the Ray instance at `address`; wait until RUNNING."""
    check_config(config)
    # The first PUT starts Serve's controller and proxy before it answers. On a busy machine that outlasted both
    # the 30 s a status read gets and the dashboard's own wait (HTTP 500), while the controller went on starting:
    # the deploy's limit applies, and applying the same config again is harmless, so a server error is retried.
    start = time.monotonic()
    while True:
        try:
            _rest("PUT", address, config, timeout_s=timeout_s)
            break
        except RestError as e:
            if e.status < 500 or time.monotonic() - start > timeout_s:
                raise
            log.warning("Serve deploy answered HTTP %d; retrying until %.0f s have passed", e.status, timeout_s)
            time.sleep(2.0)
    wait_running([app["name"] for app in config["applications"]], address, timeout_s)


def serve_details(address: str | None = None) -> dict[str, Any]:
    """What `serve status` reads: applications, their deployments, statuses and deployed configs."""
    return _rest("GET", address) or {}


def wait_running(app_names: list[str], address: str | None = None, timeout_s: float = 180.0,
                 settle_s: float = 3.0) -> None:
    """Block until every named application is RUNNING and healthy; raise with Serve's message if one fails.

    The controller applies a config on its next loop, so right after a deploy the status can still read
    RUNNING from before: unless an update (a status other than RUNNING/HEALTHY) is seen, keep polling for
    `settle_s` seconds before trusting it.
    """
    start = time.monotonic()
    saw_update = False
    while True:
        apps = serve_details(address).get("applications") or {}
        states = {n: apps[n].get("status", "?") if n in apps else "MISSING" for n in app_names}
        failed = {n: "; ".join([apps[n].get("message") or ""] + [
            f"{d}: {info.get('message')}" for d, info in (apps[n].get("deployments") or {}).items()
            if info.get("message")]) for n in app_names if states[n] == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve application(s) failed to deploy: {failed}")
        healthy = all(s == "RUNNING" for s in states.values()) and all(
            d.get("status") == "HEALTHY" for n in app_names for d in (apps[n].get("deployments") or {}).values())
        saw_update = saw_update or not healthy
        if healthy and (saw_update or time.monotonic() - start > settle_s):
            return
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"Serve application(s) not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.2)


def deployed_config(app_name: str = APP_NAME, address: str | None = None) -> dict[str, Any]:
    """The config the named application was last deployed with (as the controller holds it)."""
    details = serve_details(address)
    apps = details.get("applications") or {}
    if app_name not in apps or not apps[app_name].get("deployed_app_config"):
        raise ValueError(f"no application {app_name!r} deployed from a config (found {sorted(apps)}); deploy "
                         "serve/config.yaml with `serve deploy` or serve.deploy.deploy_config first")
    config: dict[str, Any] = {"applications": [copy.deepcopy(apps[app_name]["deployed_app_config"])]}
    if details.get("http_options"):
        config["http_options"] = {k: v for k, v in details["http_options"].items() if v is not None}
    return config


def reload_app(app_name: str = APP_NAME, user_config: dict[str, Any] | None = None, address: str | None = None,
               timeout_s: float = 180.0) -> int:
    """Hot swap: bump `user_config.reload` of the running app (plus any `user_config` changes) and apply it.

    Every replica re-resolves its model source (a registry alias, or a detector folder, possibly of another
    kind) and swaps in place; requests in flight finish on the detector they started with. Returns the new
    `reload` number.
    """
    config = deployed_config(app_name, address)
    dep = _deployment(config["applications"][0], f"application {app_name}")
    uc = dict(dep.get("user_config") or {})
    uc.update(user_config or {})
    uc["reload"] = int(uc.get("reload", 0)) + 1
    dep["user_config"] = uc
    log.info("reloading %s with reload=%d", app_name, uc["reload"])
    deploy_config(config, address, timeout_s)
    return uc["reload"]
