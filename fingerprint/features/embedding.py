"""Batched, gradient-free embedding of image lists."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from fingerprint.features.transforms import Preprocess


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bfloat16 autocast on CUDA (no loss scaling needed); a no-op context on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def embed_images(
    model: nn.Module,
    images: Sequence[Image.Image],
    transform: Preprocess,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    amp: bool = True,
    progress: str | None = None,
) -> np.ndarray:
    """Embeddings (N, D) float32 of `images`, in order. `progress` names a progress bar (None hides it)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in tqdm(
            range(0, len(images), batch_size), desc=progress, disable=progress is None, unit="batch", leave=False
        ):
            batch = transform.batch(images[start : start + batch_size]).to(device)
            with autocast(device, amp):
                out.append(model(batch).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()
