"""Embedding networks: any timm backbone, a projection head, L2-normalised output, and its preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from fingerprint.config import ModelConfig


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says which flag to change."""


class EmbeddingNet(nn.Module):
    """timm backbone (pooled features) -> linear projection -> L2-normalised embedding."""

    def __init__(self, backbone: nn.Module, embed_dim: int, in_chans: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.in_chans = in_chans
        self.head = nn.Linear(backbone.num_features, embed_dim)
        # A near-orthogonal start keeps the pretrained feature geometry, so epoch 0 is a useful baseline.
        nn.init.orthogonal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_chans == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)).float(), dim=-1)


def weights_file(weights_dir: str | Path, backbone: str) -> Path | None:
    """``<weights_dir>/<backbone>.safetensors`` (or .pth/.bin) if it exists: how offline weights are found."""
    for ext in (".safetensors", ".pth", ".bin"):
        p = Path(weights_dir) / f"{backbone}{ext}"
        if p.is_file():
            return p
    return None


def create_embedder(config: ModelConfig) -> EmbeddingNet:
    """Build the embedding network for `config`, loading pretrained weights as `config.weights` says."""
    # Gray CT slices: timm sums the RGB kernels of the first conv for in_chans=1, which is exactly what a gray
    # image copied into three channels would see, at a third of the first layer's cost.
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": config.in_chans}
    try:
        if config.weights == "none":
            backbone = timm.create_model(config.backbone, pretrained=False, **kwargs)
        elif config.weights == "hub":
            backbone = timm.create_model(config.backbone, pretrained=True, **kwargs)
        else:
            path = Path(config.weights)
            if not path.is_file():
                raise WeightsError(f"--weights: file '{path}' does not exist")
            backbone = timm.create_model(
                config.backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
    except WeightsError:
        raise
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise WeightsError(
                f"--backbone: '{config.backbone}' is not a timm model; see timm.list_models() for names"
            ) from e
        raise WeightsError(_weights_hint(config, e)) from e
    except Exception as e:  # network errors, hub errors, mismatched state dicts
        raise WeightsError(_weights_hint(config, e)) from e
    return EmbeddingNet(backbone, config.embed_dim, config.in_chans)


def _weights_hint(config: ModelConfig, error: Exception) -> str:
    where = "the model hub" if config.weights == "hub" else f"'{config.weights}'"
    return (
        f"could not load pretrained weights for --backbone {config.backbone} from {where}: "
        f"{type(error).__name__}: {str(error)[:300]}. Give a local file that matches the backbone with "
        "--weights PATH (e.g. ../shared/weights/tf_efficientnet_lite0.safetensors for tf_efficientnet_lite0), "
        "or --weights none to start from random weights."
    )


def data_config(model: EmbeddingNet, config: ModelConfig) -> dict[str, Any]:
    """timm's preprocessing for this model (mean, std, interpolation, crop), adapted to its input channels."""
    cfg = dict(resolve_model_data_config(model.backbone))
    if config.image_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], config.image_size, config.image_size)
    # The model sees one gray channel: the per-channel statistics collapse to their mean, which is exactly what
    # summing the RGB kernels assumes for a gray image replicated three times.
    c = config.in_chans
    cfg["input_size"] = (c, *cfg["input_size"][1:])
    for key in ("mean", "std"):
        values = tuple(float(v) for v in cfg[key])
        cfg[key] = (sum(values) / len(values),) * c if c == 1 else values
    return cfg
