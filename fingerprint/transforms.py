"""Image preprocessing from timm's data config, plus the mild augmentation the seed applied to positives."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T


class Preprocess:
    """PIL image -> normalised tensor, exactly as timm's eval pipeline for the model's data config.

    A class (not a lambda) so that Ray can pickle it into workers and replicas.
    """

    def __init__(self, data_config: dict[str, Any], augment: bool = False) -> None:
        self.data_config = data_config
        self.mode = "RGB" if data_config["input_size"][0] == 3 else "L"
        cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
               if k in data_config}
        self.base = create_transform(**cfg, is_training=False)
        # timm's training pipeline (RandomResizedCrop down to 8% of the area) would destroy the fine detail that
        # carries membership; the seed used small geometric and intensity changes instead.
        self.augment = (
            T.Compose([
                T.RandomAffine(degrees=5, translate=(0.04, 0.04), scale=(0.95, 1.05)),
                T.ColorJitter(brightness=0.1, contrast=0.1),
            ])
            if augment
            else None
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert(self.mode)
        if self.augment is not None:
            image = self.augment(image)
        return self.base(image)
