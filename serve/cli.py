"""`fingerprint serve`: run the scoring service on this machine (Ray starts in-process; Ctrl-C stops it).

    fingerprint serve --detector runs/fit/detector            # any kind, with the gallery it saved
    fingerprint serve --detector runs/fit --gallery data/other  # re-indexed on another benchmark folder
    fingerprint serve --registered-model fingerprint-ctbench --tracking-uri sqlite:///mlflow.db --port 8000

`--checkpoint` still works: it is the old name of `--detector`. For a long-lived cluster use
`serve deploy serve/config.yaml` instead (see serve/app.py and serve/deploy.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, fields

from fingerprint.commands.cli import Command
from fingerprint.config import flag, validate
from serve.config import ServeConfig

log = logging.getLogger(__name__)


@dataclass
class ServeCommandConfig(ServeConfig):
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0 exposes the service to the network: set an auth token then)."""
    port: int = 8000
    """HTTP port."""
    num_replicas: int = 1
    """Replicas of the deployment (each holds the detector and its gallery)."""
    max_replicas: int = 0
    """Above --num-replicas: autoscale between the two on ongoing requests; 0 = fixed --num-replicas."""
    max_ongoing_requests: int = 64
    """Requests a replica takes at once; must be >= --max-batch-size so batches can fill."""
    num_cpus: float = 1.0
    """CPUs reserved per replica (Ray also sets the replica's torch threads from it)."""

    def problems(self) -> list[str]:
        out = ServeConfig.problems(self)
        if not 0 < self.port < 65536:
            out.append(f"{flag('port')}: must be in 1..65535 (got {self.port})")
        if self.num_replicas < 1:
            out.append(f"{flag('num_replicas')}: must be >= 1")
        if self.max_replicas and self.max_replicas < self.num_replicas:
            out.append(f"{flag('max_replicas')}: must be 0 or >= --num-replicas")
        if self.max_ongoing_requests < self.max_batch_size:
            out.append(f"{flag('max_ongoing_requests')}: must be >= --max-batch-size ({self.max_batch_size})")
        if self.num_cpus <= 0:
            out.append(f"{flag('num_cpus')}: must be > 0")
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.token():
            log.warning("listening on %s without an auth token (--auth-token-env %s is unset)",
                        self.host, self.auth_token_env)
        return out


def app_args(config: ServeCommandConfig) -> dict:
    """The `build_app` arguments for this command's settings."""
    names = {f.name for f in fields(ServeConfig)}
    args = {k: v for k, v in vars(config).items() if k in names}
    args.update(max_ongoing_requests=config.max_ongoing_requests, num_cpus=config.num_cpus)
    if config.max_replicas > config.num_replicas:
        args.update(min_replicas=config.num_replicas, max_replicas=config.max_replicas)
    else:
        args.update(num_replicas=config.num_replicas)
    return args


def main(config: ServeCommandConfig) -> None:
    """Start Ray and Serve, deploy the app, and block until interrupted."""
    validate(config)
    from jobs.ray_session import secure_local_auth

    # A new local instance (never a cluster someone else started on this machine), closed by Ray's token auth:
    # its ports listen on every interface. Before Ray is imported: it reads its auth mode then.
    secure_local_auth()
    import ray
    from ray import serve

    from serve import guard
    from serve.app import build_app

    application = build_app(app_args(config))
    # Ray's HTTP proxy process reads these when it starts: the gate (auth before queueing, body limits, JSON
    # errors) and the token it checks.
    os.environ.setdefault(guard.CALLBACK_ENV, guard.CALLBACK)
    if config.token():
        os.environ[guard.TOKEN_ENV] = config.token()
    # Advertise loopback only. (Checked with `ss -ltnp`: GCS, raylet and workers still listen on every interface
    # whatever the node IP, so the token auth above is what closes them.)
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": config.host, "port": config.port})
    log.info("deploying; the service answers on http://%s:%d (OpenAPI at /docs) once the model is loaded",
             config.host, config.port)
    try:
        serve.run(application, name="fingerprint", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        # Ray can deliver the interrupt again while Serve stops; finish stopping either way.
        with contextlib.suppress(KeyboardInterrupt):
            serve.shutdown()
        ray.shutdown()


def command() -> Command:
    """Entry point for the `fingerprint.commands` group: `serve = "serve.cli:command"`."""
    return Command(ServeCommandConfig, main, (__doc__ or "").strip().splitlines()[0])
