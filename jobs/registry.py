"""The MLflow model registry as this project uses it: versions carry a fingerprint checkpoint, aliases pick them.

MLflow 3, aliases only (`champion`, `challenger`); registry stages are deprecated and never used.

    with mlflow.start_run():
        mv = log_checkpoint_model(Path("runs/s1/checkpoint"), "fingerprint-ctbench")   # new version
    set_alias("fingerprint-ctbench", "champion", mv.version, reason="first version", metrics={...})
    mv, folder = download_checkpoint("fingerprint-ctbench", "champion")  # folder -> load_checkpoint(folder)

Each version is an `mlflow.pytorch` model (pickled `EmbeddingNet`, with signature and input example) whose
`extra_files/` hold the checkpoint folder itself (model.pt + meta.json: threshold, k, data config, split), so a
consumer (serving, `fingerprint predict`) needs nothing but `fingerprint.checkpoint.load_checkpoint`.

MLflow keeps no history of alias moves, so `set_alias` records each one as a registered-model tag
`fingerprint.alias_history.<seq>` holding JSON (alias, from/to version, reason, metrics, run ids, time, user);
`alias_history` lists them in order. One tag per change keeps each value small and never rewrites old entries.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HISTORY_TAG = "fingerprint.alias_history."
"""Prefix of the registered-model tags that record alias changes; the suffix is a zero-padded sequence number."""
METRIC_TAG = "metric."
"""Prefix of the model-version tags that copy the checkpoint's metrics (so promotion needs no run lookups)."""
SPLIT_TAG = "split_sha256"
"""Model-version tag: hash of the validation ids, so promotion compares versions on the same locked split."""
CHECKPOINT_FILES = ("model.pt", "meta.json")
"""What a version must carry to be loadable by `fingerprint.checkpoint.load_checkpoint`."""


class RegistryError(RuntimeError):
    """A registry request that cannot be served; the message says what exists and what to run."""


def split_digest(split: dict[str, list[str]] | None) -> str:
    """Stable hash of the validation ids of a checkpoint's split ('' when nothing was held out)."""
    val = sorted((split or {}).get("val", []))
    if not val:
        return ""
    return hashlib.sha256("\n".join(val).encode()).hexdigest()


def _read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    missing = [n for n in CHECKPOINT_FILES if not (checkpoint_dir / n).is_file()]
    if missing:
        found = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.is_dir() else "no such folder"
        raise RegistryError(
            f"{checkpoint_dir}: not a fingerprint checkpoint (missing {', '.join(missing)}; found {found}); "
            "give the checkpoint folder written by `fingerprint train` or a Ray Train checkpoint"
        )
    return json.loads((checkpoint_dir / "meta.json").read_text())


def _pip_requirements() -> list[str]:
    # Given explicitly: MLflow's own inference imports the model in a subprocess and takes ~10 s per log.
    import PIL
    import timm
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"timm=={timm.__version__}", f"numpy=={np.__version__}", f"pillow=={PIL.__version__}",
            f"mlflow=={mlflow.__version__}"]


def log_checkpoint_model(
    checkpoint_dir: Path,
    registered_model: str,
    *,
    input_example: np.ndarray | None = None,
    tags: dict[str, str] | None = None,
    await_registration_for: int = 300,
) -> ModelVersion:
    """Log the checkpoint as an MLflow PyTorch model in the active run and register it as a new version.

    The version gets tags `metric.<name>` (the checkpoint's metrics), `split_sha256` (its validation split),
    `epoch`, `backbone`, and `tags`. `input_example` defaults to a batch of two blank images of the model's
    input size; a batch of one would also be valid here but fixes the batch dimension of `pt2` exports.
    """
    from fingerprint.checkpoint import load_checkpoint  # torch/timm: heavy, only when a model is logged

    checkpoint_dir = Path(checkpoint_dir)
    if mlflow.active_run() is None:
        raise RegistryError("log_checkpoint_model needs an active MLflow run (inside `with mlflow.start_run():`)")
    meta = _read_meta(checkpoint_dir)
    ckpt = load_checkpoint(checkpoint_dir)
    if input_example is None:
        c, h, w = meta["data_config"]["input_size"]
        input_example = np.zeros((2, c, h, w), dtype=np.float32)
    import torch

    with torch.no_grad():
        output = ckpt.model(torch.from_numpy(np.asarray(input_example, dtype=np.float32))).numpy()
    signature = mlflow.models.infer_signature(input_example, output)
    import fingerprint

    info = mlflow.pytorch.log_model(
        ckpt.model,
        name="model",
        # pickle: loads back as the nn.Module in one call and needs no torch.export of every timm backbone;
        # the library code travels along (code_paths) so loading needs only the pip requirements.
        serialization_format="pickle",
        signature=signature,
        input_example=input_example,
        pip_requirements=_pip_requirements(),
        code_paths=[str(Path(fingerprint.__file__).parent)],
        extra_files=[str(checkpoint_dir / n) for n in CHECKPOINT_FILES],
        registered_model_name=registered_model,
        await_registration_for=await_registration_for,
    )
    client = MlflowClient()
    version = str(info.registered_model_version)
    version_tags = {
        SPLIT_TAG: split_digest(meta.get("split")),
        "epoch": str(meta.get("epoch", "")),
        "backbone": str(meta.get("config", {}).get("backbone", "")),
        "threshold": repr(float(meta["score"]["threshold"])),
        **{f"{METRIC_TAG}{k}": repr(float(v)) for k, v in (meta.get("metrics") or {}).items()
           if isinstance(v, int | float)},
        **(tags or {}),
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    mv = get_version(registered_model, version)
    log.info("registered %s version %s (run %s)", registered_model, version, mv.run_id)
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
    """The checkpoint metrics copied onto a version's tags by `log_checkpoint_model`."""
    out = {}
    for key, value in (mv.tags or {}).items():
        if key.startswith(METRIC_TAG):
            try:
                out[key[len(METRIC_TAG):]] = float(value)
            except ValueError:
                continue
    return out


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


def download_checkpoint(
    registered_model: str, alias: str = "champion", dst: Path | None = None
) -> tuple[ModelVersion, Path]:
    """Resolve `alias` to a concrete version and download its checkpoint folder (model.pt + meta.json).

    The version is resolved once, then downloaded by number, so a promotion in between cannot mix versions.
    Returns the version and a folder for `fingerprint.checkpoint.load_checkpoint`. `dst` defaults to a new
    temporary folder (the caller owns it).
    """
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
        src = local / "extra_files"
        missing = [n for n in CHECKPOINT_FILES if not (src / n).is_file()]
        if missing:
            raise RegistryError(
                f"{registered_model} version {mv.version} carries no fingerprint checkpoint (missing "
                f"extra_files/{', '.join(missing)}); it was not logged by jobs.registry.log_checkpoint_model"
            )
        out = dst / "checkpoint"
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(src), out)
    return mv, out


def _history_tags(registered_model: str) -> list[tuple[str, str]]:
    rm = MlflowClient().get_registered_model(registered_model)
    return sorted((k, v) for k, v in (rm.tags or {}).items() if k.startswith(HISTORY_TAG))


def alias_history(registered_model: str) -> list[dict[str, Any]]:
    """Every recorded alias change of `registered_model`, oldest first."""
    out = []
    for key, value in _history_tags(registered_model):
        try:
            out.append(json.loads(value))
        except json.JSONDecodeError:
            out.append({"unreadable": key, "raw": value})
    return out


def set_alias(
    registered_model: str, alias: str, version: str | int, *, reason: str, metrics: dict[str, Any]
) -> None:
    """Point `alias` at `version` and record the change (from, to, reason, metrics, run ids, time, user).

    The alias moves first, in one registry call: whatever fails afterwards, the model keeps a valid alias
    (the old version until the call succeeds, the new one after). A failure to record the history is raised
    so that it is noticed, but the move stands.
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
        existing = _history_tags(registered_model)
        seq = int(existing[-1][0][len(HISTORY_TAG):]) + 1 if existing else 1
        client.set_registered_model_tag(registered_model, f"{HISTORY_TAG}{seq:06d}",
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
