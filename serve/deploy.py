"""Deploy serve/config.yaml and hot-swap a running app, from Python, the way `serve run serve/config.yaml` does.

    ray start --head && serve deploy serve/config.yaml      # the CLI route (needs the Ray dashboard)

    import ray; ray.init(address="auto")                    # or from Python, on the same cluster:
    from serve.deploy import load_config, deploy_config, reload_app
    deploy_config(load_config(user_config={"checkpoint": "...", "gallery": "...", "reference": "..."}))
    reload_app("fingerprint")          # after `fingerprint promote`: re-resolve the alias, swap in place

A config deploy gives the deployment a code version derived from the config, so a change that touches only
`user_config` (or replicas, autoscaling, max_ongoing_requests) reconfigures the running replicas in place:
`FingerprintService.reconfigure` loads the new champion beside the old one and swaps a single reference, and
no replica restarts. (`serve.run` from Python gives every call a new random version, which replaces replicas.)
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).with_name("config.yaml")
APP_NAME = "fingerprint"
DEPLOYMENT = "FingerprintService"


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


def _client() -> Any:
    # The controller client `serve run <config>` uses; Serve has no public Python call for config deploys.
    from ray.serve.context import _get_global_client

    return _get_global_client()


def deploy_config(config: dict[str, Any], timeout_s: float = 180.0) -> None:
    """Apply a Serve config (as `serve deploy` does) on the connected Ray instance; wait until RUNNING."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    serve.start(http_options=config.get("http_options"))
    _client().deploy_apps(schema)
    wait_running([app.name for app in schema.applications], timeout_s)


def wait_running(app_names: list[str], timeout_s: float = 180.0, settle_s: float = 3.0) -> None:
    """Block until every named application is RUNNING and healthy; raise with Serve's message if one fails.

    The controller applies a config on its next loop, so right after a deploy the status can still read
    RUNNING from before: unless an update (a status other than RUNNING/HEALTHY) is seen, keep polling for
    `settle_s` seconds before trusting it.
    """
    from ray import serve

    start = time.monotonic()
    saw_update = False
    while True:
        apps = serve.status().applications
        states = {n: str(getattr(apps[n].status, "value", apps[n].status)) if n in apps else "MISSING"
                  for n in app_names}
        failed = {n: "; ".join([apps[n].message] + [f"{d}: {info.message}" for d, info in apps[n].deployments.items()
                                                     if info.message])
                  for n in app_names if states[n] == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve application(s) failed to deploy: {failed}")
        healthy = all(s == "RUNNING" for s in states.values()) and all(
            d.status == "HEALTHY" for n in app_names for d in apps[n].deployments.values())
        saw_update = saw_update or not healthy
        if healthy and (saw_update or time.monotonic() - start > settle_s):
            return
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"Serve application(s) not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.1)


def deployed_config(app_name: str = APP_NAME) -> dict[str, Any]:
    """The config the named application was last deployed with (as the controller holds it)."""
    details = _client().get_serve_details()
    apps = details.get("applications") or {}
    if app_name not in apps or not apps[app_name].get("deployed_app_config"):
        raise ValueError(f"no application {app_name!r} deployed from a config (found {sorted(apps)}); deploy "
                         "serve/config.yaml with `serve deploy` or serve.deploy.deploy_config first")
    return {"applications": [copy.deepcopy(apps[app_name]["deployed_app_config"])],
            "http_options": details.get("http_options")}


def reload_app(app_name: str = APP_NAME, user_config: dict[str, Any] | None = None,
               timeout_s: float = 180.0) -> int:
    """Hot swap: bump `user_config.reload` of the running app (plus any `user_config` changes) and apply it.

    Every replica re-resolves the registry alias and swaps models in place; requests in flight finish on the
    version they started with. Returns the new `reload` number.
    """
    config = deployed_config(app_name)
    dep = _deployment(config["applications"][0], f"application {app_name}")
    uc = dict(dep.get("user_config") or {})
    uc.update(user_config or {})
    uc["reload"] = int(uc.get("reload", 0)) + 1
    dep["user_config"] = uc
    log.info("reloading %s with reload=%d", app_name, uc["reload"])
    deploy_config({k: v for k, v in config.items() if v is not None}, timeout_s)
    return uc["reload"]
