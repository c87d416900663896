"""Image preprocessing from timm's data config, plus the mild augmentation the seed applied to positives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import functional as TF


class Preprocess:
    """PIL image -> normalised tensor, exactly as timm's eval pipeline for the model's data config.

    timm's pipeline is split at its ToTensor step into a pixel stage (PIL resize and crop, per image, giving
    uint8) and a tensor stage (scale to [0, 1] and normalise) that runs once on a whole batch. Per image the
    tensor stage costs about as much as the resize; on a batch it is nearly free, which matters to a CPU
    service. Both stages are element-wise, so `batch(images)` equals stacking `self(image)` bit for bit.

    A class (not a lambda) so that Ray can pickle it into workers and replicas.
    """

    def __init__(self, data_config: dict[str, Any], augment: bool = False) -> None:
        self.data_config = data_config
        self.mode = "RGB" if data_config["input_size"][0] == 3 else "L"
        cfg = {k: data_config[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
               if k in data_config}
        self.base = create_transform(**cfg, is_training=False)
        steps = list(getattr(self.base, "transforms", []))
        cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
        # Without a ToTensor step to cut at (a pipeline this class does not know), every image runs it whole.
        self._pil_steps = T.Compose(steps[:cut]) if cut is not None else None
        self._tensor_steps = steps[cut + 1:] if cut is not None else []
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

    def _image(self, image: Image.Image) -> Image.Image:
        image = image.convert(self.mode)
        return self.augment(image) if self.augment is not None else image

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The pixel stage: a (C, H, W) uint8 tensor (float, fully processed, if the pipeline cannot be split)."""
        if self._pil_steps is None:
            return self.base(self._image(image))
        t = torch.from_numpy(np.array(self._pil_steps(self._image(image)), dtype=np.uint8))  # a writable copy
        return t[None] if t.ndim == 2 else t.permute(2, 0, 1)

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """The tensor stage on a (N, C, H, W) batch from `pixels`: to float in [0, 1], then normalised."""
        if self._pil_steps is None:
            return pixels
        # ToTensor's own arithmetic (default float dtype, then / 255), so results match it exactly.
        x = pixels.to(dtype=torch.get_default_dtype()).div_(255)
        for step in self._tensor_steps:
            # In place on the one float buffer: the same arithmetic as Normalize's copy, without the copy.
            x = TF.normalize(x, step.mean, step.std, inplace=True) if isinstance(step, T.Normalize) else step(x)
        return x

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A (N, C, H, W) batch of preprocessed `images`."""
        return self.finish(torch.stack([self.pixels(im) for im in images]))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.batch([image])[0]
