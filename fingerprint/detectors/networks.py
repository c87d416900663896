"""Detectors that compare images in a neural network's feature space: frozen timm features, or the seed's
triplet fine-tuning (anchor = generated, positive = used, negative = not-used image, Eq. 1).

Both keep the network's weights in the saved arrays (``net.<parameter>``) and its preprocessing (timm's data
config) in the metadata, so a saved detector scores anywhere without the original weights file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image

from fingerprint.config import ModelConfig, Range, TrainConfig
from fingerprint.detectors.base import FitData, Scores, register
from fingerprint.detectors.neighbours import FeatureNN
from fingerprint.features.backbones import EmbeddingNet, create_embedder, data_config
from fingerprint.features.embedding import embed_images, resolve_device
from fingerprint.features.transforms import Preprocess
from fingerprint.knn import Gallery, topk_mean

__all__ = ["NetworkNN", "FrozenNN", "TripletNN", "NetworkSettings", "TripletSettings"]


class _Pooled(torch.nn.Module):
    """The backbone's pooled features of an EmbeddingNet, without its projection head."""

    def __init__(self, net: EmbeddingNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


@dataclass
class NetworkSettings:
    backbone: str = "tf_efficientnet_lite0"
    """timm model name."""
    weights: str = "none"
    """Pretrained weights when fitting: a local timm state-dict file, 'hub', or 'none' (random). A saved
    detector carries its weights and does not need this file again."""
    image_size: Annotated[int | None, Range(16)] = 128
    """Input side in pixels; None keeps the model's own."""
    in_chans: Literal[1, 3] = 1
    """1 feeds gray images to a first conv whose RGB kernels are summed (timm), 3 replicates gray."""
    k: Annotated[int, Range(1)] = 1
    """Nearest generated images averaged into the score."""
    batch_size: Annotated[int, Range(1)] = 64
    """Images per forward pass."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the network runs."""
    seed: int = 0
    """Seed of the random initialisation (weights 'none', the projection head) and of training."""


class NetworkNN(FeatureNN):
    """Base of the network kinds: cosine k-NN in the feature space of ``self.net``."""

    embed_dim: int = 128

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.net: EmbeddingNet | None = None
        self._forward: torch.nn.Module | None = None
        self.device = resolve_device(settings.device)

    def model_config(self, weights: str) -> ModelConfig:
        s = self.settings
        return ModelConfig(backbone=s.backbone, weights=weights, embed_dim=getattr(s, "embed_dim", self.embed_dim),
                           image_size=s.image_size, in_chans=s.in_chans)

    def build(self, weights: str) -> None:
        """Create the network (with pretrained ``weights``) and record its preprocessing."""
        cfg = self.model_config(weights)
        torch.manual_seed(self.settings.seed)
        self.net = create_embedder(cfg).eval()
        self.meta.extra["data_config"] = data_config(self.net, cfg)

    def use_network(self, net: EmbeddingNet, data_cfg: dict[str, Any]) -> None:
        """Score with an already trained network (a Ray Train checkpoint) instead of fitting one."""
        self.net = net.eval()
        self.meta.extra["data_config"] = dict(data_cfg)

    @property
    def transform(self) -> Preprocess:
        return Preprocess(self.meta.extra["data_config"])

    def forward_module(self) -> torch.nn.Module:
        return self._forward or self.net

    def use_forward(self, module: torch.nn.Module | None) -> None:
        """Run ``module`` (e.g. a checked TorchScript trace of :meth:`forward_module`) instead; None undoes it."""
        self._forward = module

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        if self.net is None:
            raise RuntimeError(f"{self.kind}: fit or load the detector before scoring")
        model = self.forward_module().to(self.device)
        return embed_images(model, list(images), self.transform, self.settings.batch_size, self.device)

    def arrays(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        return {**super().arrays(), **state}

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        saved = self.meta.extra.get("data_config")
        self.build("none")  # every weight is replaced below
        if saved is not None:
            self.meta.extra["data_config"] = saved
        state = {k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("net.")}
        self.net.load_state_dict(state)
        self.net.eval()
        super().load_arrays(arrays)


@register("frozen")
class FrozenNN(NetworkNN):
    """Frozen pretrained features: cosine similarity of a timm backbone's pooled features to the nearest
    generated images."""

    Settings = NetworkSettings
    family = "c"

    def fit(self, data: FitData, progress: bool = False) -> None:
        self.build(self.settings.weights)
        super().fit(data, progress)

    def forward_module(self) -> torch.nn.Module:
        return self._forward or _Pooled(self.net)


@dataclass
class TripletSettings(NetworkSettings):
    image_size: Annotated[int | None, Range(16)] = 64
    """Input side in pixels (small keeps CPU training fast); None keeps the model's own."""
    k: Annotated[int, Range(1)] = 5
    """Nearest generated images averaged into the score."""
    embed_dim: Annotated[int, Range(2)] = 128
    """Dimension of the L2-normalised embedding."""
    epochs: Annotated[int, Range(1)] = 3
    """Training epochs."""
    triplets_per_epoch: Annotated[int, Range(1)] = 512
    """Triplets drawn (seeded) per epoch; anchors balanced between dev and test generated images."""
    train_batch_size: Annotated[int, Range(1)] = 32
    """Triplets per optimisation step."""
    lr: Annotated[float, Range(0, lo_open=True)] = 1e-4
    """AdamW learning rate of the backbone (the head uses 10x)."""
    margin: Annotated[float, Range(0, lo_open=True)] = 0.5
    """Triplet margin of Eq. (1) on L2-normalised embeddings."""
    mining: Literal["none", "batch_hard", "semi_hard"] = "none"
    """Triplet selection: the sampled triplets as they are (the seed's), or mined within each batch."""
    calibrate: bool = True
    """Subtract each image's mean similarity to its k nearest other real images (a k-NN density ratio)."""
    augment: bool = True
    """Augment positives (flips, small rotations, crops, brightness), as the seed did."""


@register("triplet")
class TripletNN(NetworkNN):
    """Triplet fine-tuning (the seed's method): a timm backbone trained so generated images sit closer to the
    used than to the not-used images, then k-NN in its embedding, calibrated on the real pool."""

    Settings = TripletSettings
    family = "d"
    learns = True
    costly = True

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(settings)
        self.reference: Gallery | None = None
        self._reference_features: np.ndarray | None = None

    @staticmethod
    def settings_from(config: TrainConfig) -> TripletSettings:
        """The detector settings of a training run's config (the inverse of :meth:`train_config`)."""
        return TripletSettings(
            backbone=config.backbone, weights=config.weights, image_size=config.image_size, k=config.k,
            in_chans=config.in_chans,
            device=config.device, embed_dim=config.embed_dim, epochs=config.epochs,
            triplets_per_epoch=config.triplets_per_epoch, train_batch_size=config.batch_size, lr=config.lr,
            margin=config.margin, mining=config.mining, calibrate=config.calibrate, augment=config.augment,
            seed=config.seed)

    def train_config(self) -> TrainConfig:
        s = self.settings
        return TrainConfig(backbone=s.backbone, weights=s.weights, embed_dim=s.embed_dim, image_size=s.image_size,
                           in_chans=s.in_chans, k=s.k, calibrate=s.calibrate, epochs=s.epochs,
                           triplets_per_epoch=s.triplets_per_epoch, batch_size=s.train_batch_size, lr=s.lr,
                           margin=s.margin, mining=s.mining, augment=s.augment, val_fraction=0.0, seed=s.seed,
                           device=s.device)

    def fit(self, data: FitData, progress: bool = False) -> None:
        from fingerprint.detectors.triplet.training import fit, training_data

        result = fit(self.train_config(), training_data(data))
        self.use_network(result.model, result.data_config)
        self.meta.extra["history"] = result.history
        self.index(data.generated, data.generated_ids, data.real, data.real_ids, data.groups, progress=progress)

    def index(self, generated, generated_ids, reference, reference_ids, reference_groups=None,  # noqa: ANN001
              progress: bool = False) -> None:
        super().index(generated, generated_ids, reference, reference_ids, reference_groups, progress)
        if self.settings.calibrate:
            self._set_reference_features(self.features(reference))

    def _set_reference_features(self, vectors: np.ndarray) -> None:
        self._reference_features = np.asarray(vectors, dtype=np.float32)
        self.reference = Gallery(self._reference_features, "cosine")

    def score(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> Scores:
        emb = self.features(images)
        sims, idx = self.gallery.search(emb, self.settings.k)
        gen = topk_mean(sims)
        if not self.settings.calibrate:
            return Scores(gen, idx, sims, generated_similarity=gen)
        ref = topk_mean(reference_similarity(self.reference, emb, self.settings.k, self.self_rows(ids, len(emb))))
        return Scores(gen - ref, idx, sims, generated_similarity=gen, real_similarity=ref)

    def arrays(self) -> dict[str, np.ndarray]:
        out = super().arrays()
        if self._reference_features is not None:
            out["reference"] = self._reference_features
        return out

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().load_arrays(arrays)
        if "reference" in arrays:
            self._set_reference_features(arrays["reference"])


def reference_similarity(reference: Gallery, queries: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    """(N, k) similarities of each query to its k nearest reference images, never itself.

    A query known to be in the reference (``rows`` >= 0) skips its own row. One that is not known there but
    matches a reference image exactly (the same image uploaded without its id) has that match dropped.
    """
    sims, _ = reference.search(queries, k + 1, exclude=rows)
    if sims.shape[1] <= k:
        return sims
    self_match = (rows < 0)[:, None] & (sims[:, :1] > 1.0 - 1e-6)
    return np.where(self_match, sims[:, 1:], sims[:, :-1])
