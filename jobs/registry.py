"""The MLflow model registry as this project uses it: versions carry a fingerprint detector, aliases pick them.

MLflow 3, aliases only (`champion`, `challenger`); registry stages are deprecated and never used.

    with mlflow.start_run():
        mv = log_detector(Path("runs/grad"), "fingerprint-ctbench")          # new version, any detector kind
    set_alias("fingerprint-ctbench", "champion", mv.version, reason="first version", metrics={...})
    mv, folder = download_detector("fingerprint-ctbench", "champion")      # folder -> load_detector(folder)

Each version is an MLflow **pyfunc** model (`jobs.pyfunc.DetectorModel`, logged from code: no pickle) whose
artifact `detector` is the saved detector folder itself (meta.json + arrays.safetensors + ids.json), with the
`fingerprint` package as code, a signature and an input example. So `mlflow.pyfunc.load_model(...)` and
`mlflow models serve` score base64 PNG/JPEG images end to end, and a consumer that only wants the detector
(serving, `fingerprint predict`) downloads the folder and calls `fingerprint.detectors.load_detector`.

The version carries tags `kind`, `detector` (its name), `threshold`, `split_sha256` (hash of the validation ids,
so promotion compares versions of any kinds on the same locked split) and `metric.<name>` (the validation metrics,
so promotion needs no run lookups), plus a readable description; the metrics are also attached to the
LoggedModel (`mlflow.log_metrics(..., model_id=...)`).

MLflow keeps no history of alias moves, so `set_alias` records each one as a registered-model tag
`fingerprint.alias_history.<UTC yyyymmddThhmmss.ffffff>Z-<8 hex of a uuid4>` holding JSON (alias, from/to version,
reason, metrics, run ids, time, user); `alias_history` lists them in order. One tag per change keeps each value
small and never rewrites old entries. The key is made up by the writer alone (time-ordered, plus a random part),
so two writers at once can never pick the same key and overwrite each other's entry: the earlier scheme numbered
entries by reading the last number and adding one, and two concurrent promotions both wrote `000001`. Registries
written by that scheme keep their `<seq>` keys (all digits); they are read back first, by number, before every
time-stamped key, since they were written before the switch.

Concurrency. MLflow has no transactions across calls and no compare-and-set: "read the champion, decide, move the
alias" is several independent requests, and two promoters interleaving them both move the alias (the later one
possibly to the worse version). `promotion_lock` is a lock kept in the registry itself, so it works with any
store (a sqlite file shared by processes, or a tracking server shared by machines): the registered-model tag
`fingerprint.promotion_lock` holds JSON {token, owner, expires}. Acquiring it is Fischer's mutual exclusion by
write-then-verify: when the tag is absent or expired, write our unique token, wait `settle` seconds, read it
back, and own the lock only if our token is still there (of several writers the last write wins, and every one
of them reads the same winner back). This is safe as long as a contender's read-then-write takes less than
`settle`; the holder also re-checks its token right before moving the alias (`PromotionLock.check`) and
`fingerprint promote` re-reads the alias afterwards, so a violated assumption is reported, not silent. The lock
expires after `ttl` seconds, so a promoter that died holding it blocks the others only until then (an expired lock
is taken over the same way); it is released (the tag deleted, only while it still holds our token) in `finally`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fingerprint.evaluation.thresholds import as_false_positives

log = logging.getLogger(__name__)

HISTORY_TAG = "fingerprint.alias_history."
"""Prefix of the registered-model tags that record alias changes; the suffix is `<UTC time>Z-<random hex>` (or, in
registries written before, a zero-padded sequence number)."""
LOCK_TAG = "fingerprint.promotion_lock"
"""Registered-model tag holding the promotion lock: JSON {token, owner, expires (unix time)}."""
LOCK_TTL_S = 60.0
"""Seconds after which a promotion lock is stale and may be taken over (a promotion holds it for about a second)."""
LOCK_SETTLE_S = 0.25
"""Pause between writing the lock and reading it back; must exceed a contender's read-then-write time."""
METRIC_TAG = "metric."
"""Prefix of the model-version tags that copy the detector's validation metrics (so promotion needs no run lookups)."""
SPLIT_TAG = "split_sha256"
"""Model-version tag: hash of the validation ids, so promotion compares versions on the same locked split."""
FPR_BOUND_TAG = "fpr_bound"
"""Version tag: the 95% upper bound on the false-positive rate its threshold showed at fitting (meta.json's
false_positives.bound); absent for detectors saved before it was recorded."""
DETECTOR_ARTIFACT = "detector"
"""Name of the pyfunc artifact that holds the detector folder."""


class RegistryError(RuntimeError):
    """A registry request that cannot be served; the message says what exists and what to run."""


class LockTimeout(RegistryError):
    """The promotion lock stayed held by someone else for longer than we were willing to wait."""


def split_digest(split: dict[str, list[str]] | None) -> str:
    """Stable hash of the validation ids of a detector's split ('' when nothing was held out)."""
    val = sorted((split or {}).get("val", []))
    if not val:
        return ""
    return hashlib.sha256("\n".join(val).encode()).hexdigest()


def _read_meta(detector_dir: Path) -> dict[str, Any]:
    from fingerprint.detectors import is_detector_dir

    if not is_detector_dir(detector_dir):
        found = sorted(p.name for p in detector_dir.iterdir()) if detector_dir.is_dir() else "no such folder"
        raise RegistryError(
            f"{detector_dir}: not a saved fingerprint detector (needs meta.json and arrays.safetensors; found "
            f"{found}); give the folder written by `fingerprint fit`, `fingerprint fit-ray` or `train-ray`"
        )
    return json.loads((detector_dir / "meta.json").read_text())


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's own inference imports the model in a subprocess and takes ~10 s per log.
    from importlib.metadata import version

    pinned = ["torch", "torchvision", "timm", "numpy", "pillow", "safetensors", "scipy", "scikit-learn", "pandas",
              "mlflow"]
    out = []
    for name in pinned:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except Exception:  # not installed: leave it to the resolver
            out.append(name)
    return out


def _png_base64(size: int) -> str:
    import io

    from PIL import Image

    from jobs.pyfunc import encode_image

    buf = io.BytesIO()
    Image.fromarray((np.arange(size * size, dtype=np.uint32).reshape(size, size) % 251).astype(np.uint8),
                    "L").save(buf, format="PNG")
    return encode_image(buf.getvalue())


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "id"), ColSpec("string", "image")])
    outputs = Schema([ColSpec("string", "id"), ColSpec("double", "score"), ColSpec("long", "decision"),
                      ColSpec("double", "threshold"), ColSpec("string", "nearest_ids"),
                      ColSpec("string", "nearest_similarities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def describe_detector(meta: dict[str, Any]) -> str:
    """The registered version's description: kind, settings, validation metrics and split sizes."""
    split = meta.get("split") or {}
    metrics = meta.get("metrics") or {}
    name = (meta.get("extra") or {}).get("name") or meta["kind"]
    lines = [
        f"fingerprint detector '{name}' (kind {meta['kind']}, signal {meta.get('signal', 'per_image')})",
        f"settings: {json.dumps(meta.get('settings', {}), sort_keys=True)}",
        f"threshold: {float(meta.get('threshold', 0.0)):.6g} ({meta.get('threshold_method', '')})",
        *([f"at fitting, {as_false_positives(meta['false_positives']).sentence()}"]
          if meta.get("false_positives") else []),
        "validation: " + (", ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items())
                                    if isinstance(v, int | float)) or "none (nothing held out)"),
        f"split: {len(split.get('train', []))} training / {len(split.get('val', []))} validation images "
        f"(val sha256 {split_digest(split)[:12] or '-'})",
    ]
    return "\n".join(lines)


def log_detector(
    detector_dir: Path,
    registered_model: str,
    *,
    tags: dict[str, str] | None = None,
    step: int = 0,
    await_registration_for: int = 300,
) -> ModelVersion:
    """Log a saved detector (any kind) as an MLflow pyfunc model in the active run and register a new version.

    The version gets tags `kind`, `detector`, `threshold`, `fpr_bound`, `split_sha256`, `metric.<name>` (its
    validation metrics) and `tags`, and a description; the metrics are attached to the logged model as well.
    """
    import fingerprint
    import jobs.pyfunc

    detector_dir = Path(detector_dir)
    if mlflow.active_run() is None:
        raise RegistryError("log_detector needs an active MLflow run (inside `with mlflow.start_run():`)")
    meta = _read_meta(detector_dir)
    size = int(((meta.get("extra") or {}).get("data_config") or {}).get("input_size", [1, 32, 32])[-1])
    example = pd.DataFrame({"id": ["example"], "image": [_png_base64(max(16, min(size, 64)))]})
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(jobs.pyfunc.__file__)),  # a model from code: MLflow stores the file, no pickle
        artifacts={DETECTOR_ARTIFACT: str(detector_dir)},
        code_paths=[str(Path(fingerprint.__file__).parent)],
        pip_requirements=_pip_requirements(),
        signature=_signature(),
        input_example=example,
        registered_model_name=registered_model,
        await_registration_for=await_registration_for,
        tags={"kind": meta["kind"]},
    )
    metrics = {k: float(v) for k, v in (meta.get("metrics") or {}).items()
               if isinstance(v, int | float) and np.isfinite(v)}
    if metrics:
        mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
    client = MlflowClient()
    version = str(info.registered_model_version)
    version_tags = {
        "kind": meta["kind"],
        "detector": str((meta.get("extra") or {}).get("name") or meta["kind"]),
        SPLIT_TAG: split_digest(meta.get("split")),
        "threshold": repr(float(meta.get("threshold", 0.0))),
        "signal": str(meta.get("signal", "")),
        **({FPR_BOUND_TAG: repr(float(meta["false_positives"]["bound"]))} if meta.get("false_positives") else {}),
        **{f"{METRIC_TAG}{k}": repr(v) for k, v in metrics.items()},
        **(tags or {}),
    }
    backbone = (meta.get("settings") or {}).get("backbone")
    if backbone:
        version_tags["backbone"] = str(backbone)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    client.update_model_version(registered_model, version, description=describe_detector(meta))
    mv = get_version(registered_model, version)
    log.info("registered %s version %s (%s, run %s)", registered_model, version, meta["kind"], mv.run_id)
    return mv


def _normalized(mv: ModelVersion) -> ModelVersion:
    # The sqlite store hands back versions as int, a tracking server as str (the declared type): callers compare
    # and print them, so make them always str.
    mv._version = str(mv.version)
    return mv


def get_version(registered_model: str, version: str | int) -> ModelVersion:
    """One version by number (MLflow's error when it does not exist)."""
    return _normalized(MlflowClient().get_model_version(registered_model, str(version)))


def version_metrics(mv: ModelVersion) -> dict[str, float]:
    """The validation metrics copied onto a version's tags by `log_detector`."""
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG):]] = float(value)
            except ValueError:
                continue
    return out


def version_fpr_bound(mv: ModelVersion) -> float | None:
    """The false-positive bound recorded on a version's tags (None when it has none)."""
    try:
        return float((mv.tags or {})[FPR_BOUND_TAG])
    except (KeyError, ValueError):
        return None


def get_alias(registered_model: str, alias: str) -> ModelVersion | None:
    """The version behind `alias`, or None when the alias (or the model) does not exist."""
    client = MlflowClient()
    try:
        return _normalized(client.get_model_version_by_alias(registered_model, alias))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def describe_model(registered_model: str) -> str:
    client = MlflowClient()
    try:
        rm = client.get_registered_model(registered_model)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=20)]
        return f"no registered model '{registered_model}' (registered: {names or 'none'})"
    versions = [str(v.version) for v in client.search_model_versions(f"name='{registered_model}'", max_results=50)]
    return f"aliases {dict(rm.aliases or {})}, versions {sorted(versions, key=int)}"


def download_detector(
    registered_model: str, alias: str = "champion", dst: Path | None = None
) -> tuple[ModelVersion, Path]:
    """Resolve `alias` to a concrete version and download its detector folder (meta.json + arrays + ids).

    The version is resolved once, then downloaded by number, so a promotion in between cannot mix versions.
    Returns the version and `<dst>/detector`, a folder for `fingerprint.detectors.load_detector`. `dst`
    defaults to a new temporary folder (the caller owns it).
    """
    from fingerprint.detectors import is_detector_dir

    mv = get_alias(registered_model, alias)
    if mv is None:
        raise RegistryError(
            f"registered model '{registered_model}' has no alias '{alias}' ({describe_model(registered_model)}); "
            f"run `fingerprint promote --model {registered_model}` after a training run, or choose another alias"
        )
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix=f"{registered_model}-v{mv.version}-"))
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{registered_model}/{mv.version}", dst_path=tmp))
        src = local / "artifacts" / DETECTOR_ARTIFACT
        if not is_detector_dir(src):
            found = [p for p in (local / "artifacts").rglob("meta.json")] if (local / "artifacts").is_dir() else []
            if len(found) != 1 or not is_detector_dir(found[0].parent):
                raise RegistryError(
                    f"{registered_model} version {mv.version} carries no fingerprint detector (no "
                    f"artifacts/{DETECTOR_ARTIFACT}/meta.json); it was not logged by jobs.registry.log_detector"
                )
            src = found[0].parent
        out = dst / "detector"
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(src), out)
    return mv, out


def history_key(now: datetime | None = None) -> str:
    """A new, never-colliding alias-history tag key: UTC time to the microsecond, then 8 random hex digits."""
    now = now or datetime.now(UTC)
    return f"{HISTORY_TAG}{now.strftime('%Y%m%dT%H%M%S.%f')}Z-{uuid.uuid4().hex[:8]}"


def _history_order(key: str) -> tuple[int, int, str]:
    # Legacy `<seq>` keys (all digits) first, by number; then time-stamped keys, whose text sorts by time.
    suffix = key[len(HISTORY_TAG):]
    return (0, int(suffix), suffix) if suffix.isdigit() else (1, 0, suffix)


def _history_tags(registered_model: str, client: MlflowClient | None = None) -> list[tuple[str, str]]:
    rm = (client or MlflowClient()).get_registered_model(registered_model)
    tags = [(k, v) for k, v in (rm.tags or {}).items() if k.startswith(HISTORY_TAG)]
    return sorted(tags, key=lambda kv: _history_order(kv[0]))


def alias_history(registered_model: str) -> list[dict[str, Any]]:
    """Every recorded alias change of `registered_model`, oldest first; each carries its tag under `key`."""
    out = []
    for key, value in _history_tags(registered_model):
        try:
            event = json.loads(value)
        except json.JSONDecodeError:
            event = {"unreadable": key, "raw": value}
        if isinstance(event, dict):
            event.setdefault("key", key)
        out.append(event)
    return out


def set_alias(
    registered_model: str, alias: str, version: str | int, *, reason: str, metrics: dict[str, Any]
) -> None:
    """Point `alias` at `version` and record the change (from, to, reason, metrics, run ids, time, user).

    The alias moves first, in one registry call: whatever fails afterwards, the model keeps a valid alias
    (the old version until the call succeeds, the new one after). A failure to record the history is raised
    so that it is noticed, but the move stands. The history key never collides with a concurrent writer's; the
    move itself is not guarded: callers that decide before moving hold `promotion_lock`.
    """
    client = MlflowClient()
    version = str(version)
    target = get_version(registered_model, version)  # fails early, with MLflow's message
    previous = get_alias(registered_model, alias)
    client.set_registered_model_alias(registered_model, alias, version)
    event = {
        "alias": alias,
        "from_version": previous.version if previous is not None else None,
        "to_version": version,
        "from_run_id": previous.run_id if previous is not None else None,
        "to_run_id": target.run_id,
        "reason": reason,
        "metrics": {k: (float(v) if isinstance(v, int | float) else v) for k, v in metrics.items()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "user": _user(),
    }
    try:
        client.set_registered_model_tag(registered_model, history_key(),
                                        json.dumps(event, sort_keys=True, default=str))
    except Exception as e:
        raise RegistryError(
            f"{registered_model}: alias '{alias}' now points at version {version}, but recording the change "
            f"failed ({type(e).__name__}: {e}); the event was {json.dumps(event, default=str)}"
        ) from e
    log.info("%s: alias %s %s -> %s (%s)", registered_model, alias, event["from_version"], version, reason)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def _read_lock(client: MlflowClient, registered_model: str) -> dict[str, Any] | None:
    raw = (client.get_registered_model(registered_model).tags or {}).get(LOCK_TAG)
    if raw is None:
        return None
    try:
        held = json.loads(raw)
        return held if isinstance(held, dict) else {"token": raw, "expires": 0.0}
    except json.JSONDecodeError:  # garbage in the tag: treat as an expired lock, so it can be taken over
        return {"token": raw, "owner": "unreadable", "expires": 0.0}


def _describe_lock(held: dict[str, Any] | None, now: float) -> str:
    if held is None:
        return "free"
    left = float(held.get("expires", 0.0)) - now
    return f"held by {held.get('owner', '?')} ({'expired' if left <= 0 else f'expires in {left:.0f} s'})"


class PromotionLock:
    """A held promotion lock (from `promotion_lock`); `check` raises if it has been lost since."""

    def __init__(self, client: MlflowClient, registered_model: str, token: str, owner: str, expires: float,
                 waited_s: float, took_over: dict[str, Any] | None):
        self.client, self.registered_model, self.token, self.owner = client, registered_model, token, owner
        self.expires, self.waited_s, self.took_over = expires, waited_s, took_over

    def held(self) -> bool:
        """Whether the registry still holds our token, unexpired."""
        held = _read_lock(self.client, self.registered_model)
        return held is not None and held.get("token") == self.token and time.time() < float(held["expires"])

    def check(self) -> None:
        """Raise RegistryError unless we still hold the lock (call right before the guarded write)."""
        if not self.held():
            held = _read_lock(self.client, self.registered_model)
            raise RegistryError(
                f"{self.registered_model}: lost the promotion lock ({LOCK_TAG} is now "
                f"{_describe_lock(held, time.time())}); nothing was changed, run the promotion again")

    def release(self) -> None:
        """Delete the lock tag, only while it still holds our token (a taken-over lock is someone else's)."""
        held = _read_lock(self.client, self.registered_model)
        if held is not None and held.get("token") == self.token:
            self.client.delete_registered_model_tag(self.registered_model, LOCK_TAG)


def acquire_promotion_lock(
    registered_model: str,
    *,
    timeout: float = 30.0,
    ttl: float = LOCK_TTL_S,
    settle: float = LOCK_SETTLE_S,
    poll: float = 0.1,
    client: MlflowClient | None = None,
) -> PromotionLock:
    """Take the registry-held promotion lock of `registered_model` (see the module docstring), waiting at most
    `timeout` seconds; LockTimeout names the holder when it cannot be had."""
    client = client or MlflowClient()
    token = uuid.uuid4().hex
    owner = f"{_user()}@{socket.gethostname()}:{os.getpid()}"
    start = time.monotonic()
    deadline = start + max(0.0, timeout)
    took_over: dict[str, Any] | None = None
    held: dict[str, Any] | None = None
    while True:
        try:
            t_read = time.monotonic()
            held = _read_lock(client, registered_model)
            now = time.time()
            if held is None or float(held.get("expires", 0.0)) <= now:
                # A read older than `settle` may no longer be true by the time our write lands: read again.
                if time.monotonic() - t_read < settle / 2:
                    value = {"token": token, "owner": owner, "expires": now + ttl}
                    client.set_registered_model_tag(registered_model, LOCK_TAG, json.dumps(value, sort_keys=True))
                    time.sleep(settle)
                    mine = _read_lock(client, registered_model)
                    if mine is not None and mine.get("token") == token:
                        if held is not None:
                            took_over = held
                            log.warning("%s: took over an expired promotion lock (%s)", registered_model,
                                        _describe_lock(held, now))
                        return PromotionLock(client, registered_model, token, owner, float(value["expires"]),
                                             time.monotonic() - start, took_over)
                    held = mine
        except MlflowException as e:  # e.g. sqlite "database is locked" under contention: try again
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise
            log.debug("%s: promotion lock attempt failed (%s); retrying", registered_model, e)
        if time.monotonic() >= deadline:
            raise LockTimeout(
                f"{registered_model}: could not take the promotion lock within {timeout:g} s (registered-model tag "
                f"{LOCK_TAG} {_describe_lock(held, time.time())}); another `fingerprint promote` is running. Retry, "
                f"or wait longer with --lock-timeout SECONDS (a stale lock expires {ttl:g} s after it was taken)")
        time.sleep(poll * (0.5 + random.random()))


@contextmanager
def promotion_lock(registered_model: str, **kwargs: Any) -> Iterator[PromotionLock]:
    """`with promotion_lock(model, timeout=30) as lock:` ... `lock.check()` right before the guarded write.

    Released in `finally`, whatever happens inside; keyword arguments as in `acquire_promotion_lock`.
    """
    lock = acquire_promotion_lock(registered_model, **kwargs)
    try:
        yield lock
    finally:
        try:
            lock.release()
        except Exception as e:  # it expires anyway; never hide the body's own error behind this one
            log.warning("%s: could not release the promotion lock (%s); it expires at %s", registered_model, e,
                        time.strftime("%H:%M:%S", time.localtime(lock.expires)))
