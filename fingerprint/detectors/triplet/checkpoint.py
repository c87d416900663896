"""Checkpoints: `model.pt` (state dict) beside a readable `meta.json` (config, data config, threshold, metrics).

The folder is written under a temporary name and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fingerprint.config import ModelConfig, from_dict
from fingerprint.features.backbones import EmbeddingNet, create_embedder
from fingerprint.io import atomic_dir, jsonable

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: EmbeddingNet
    meta: dict[str, Any]
    """Everything else: 'config' (the training config), 'data_config', 'score' (k, reduction, calibrate,
    threshold), 'metrics', 'epoch', ..."""
    path: Path

    @property
    def threshold(self) -> float:
        return float(self.meta["score"]["threshold"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers, whose state dict has no prefixes."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(
    path: str | Path, model: torch.nn.Module, meta: dict[str, Any], training_state: dict[str, Any] | None = None
) -> Path:
    """Write model.pt, meta.json and (optionally) training_state.pt (optimizer, scheduler) to `path`."""
    path = Path(path)
    meta = {"format_version": FORMAT_VERSION, **meta}
    with atomic_dir(path) as tmp:
        torch.save(unwrap(model).state_dict(), tmp / "model.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=jsonable))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the embedding network from its config and load its weights (no download needed)."""
    path = Path(path)
    missing = [name for name in ("model.pt", "meta.json") if not (path / name).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "nothing (no such folder)"
        raise FileNotFoundError(
            f"{path}: not a fingerprint checkpoint, missing {', '.join(missing)}; found {found}. "
            "Give the --out folder of `fingerprint train`."
        )
    meta = json.loads((path / "meta.json").read_text())
    model_config = from_dict(ModelConfig, meta["config"])
    model_config.weights = "none"  # the state dict below replaces every weight
    model = create_embedder(model_config)
    model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
    model.eval()
    return Checkpoint(model, meta, path)


def load_training_state(path: str | Path) -> dict[str, Any] | None:
    f = Path(path) / "training_state.pt"
    return torch.load(f, map_location="cpu", weights_only=True) if f.is_file() else None
