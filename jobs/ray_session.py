"""The one way fingerprint starts or joins Ray: never with the control plane open.

A local Ray listens on every interface whatever address it is given (its gRPC servers bind 0.0.0.0; the node IP
only decides what it advertises), so binding to loopback cannot close it. Ray's token auth can: with
``RAY_AUTH_MODE=token`` every GCS, raylet and dashboard call must carry the cluster's token. An embedded instance
gets a fresh random token held only in this process's environment (workers inherit it); nothing else on the
network can join it, submit jobs or run code. A cluster named by ``RAY_ADDRESS`` keeps its own policy: give its
token with ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Any

log = logging.getLogger(__name__)

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def secure_local_auth() -> str:
    """Switch this process (and the Ray it starts) to token auth; return the token in force.

    An explicit ``RAY_AUTH_MODE=disabled`` is overridden for an embedded instance: with it, anyone who reaches
    the machine's ports could run code here.
    """
    if os.environ.get(AUTH_MODE_ENV, "token") != "token":
        log.warning("%s=%s ignored for the embedded Ray: it listens on every interface, so it runs with token auth",
                    AUTH_MODE_ENV, os.environ[AUTH_MODE_ENV])
    os.environ[AUTH_MODE_ENV] = "token"
    if not os.environ.get(TOKEN_ENV):
        path = os.environ.get(TOKEN_PATH_ENV)
        if path:
            return open(path).read().strip()
        os.environ[TOKEN_ENV] = secrets.token_hex(32)
    return os.environ[TOKEN_ENV]


def auth_headers() -> dict[str, str]:
    """The Authorization header Ray's dashboard (and Serve's REST API) wants, when token auth is on."""
    if os.environ.get(AUTH_MODE_ENV) != "token":
        return {}
    token = os.environ.get(TOKEN_ENV)
    if not token and os.environ.get(TOKEN_PATH_ENV):
        token = open(os.environ[TOKEN_PATH_ENV]).read().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def init_ray(num_cpus: int | None = None, dashboard: bool = False, **kwargs: Any) -> Any:
    """Join the cluster named by ``RAY_ADDRESS``, or start an embedded local Ray with token auth.

    ``dashboard``: start the dashboard (on 127.0.0.1) for Serve's REST API; ``kwargs`` go to ``ray.init``.
    Returns Ray's context (None when Ray was already initialised).
    """
    import ray

    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        log.info("connecting to the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        return ray.init(**kwargs)
    secure_local_auth()
    if dashboard:
        kwargs.setdefault("dashboard_host", "127.0.0.1")
    # "local", not None: None would join any cluster that `ray start` left running on this machine.
    return ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, **kwargs)
