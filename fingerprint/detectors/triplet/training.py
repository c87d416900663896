"""Triplet fine-tuning: data preparation, one epoch, validation, and `fit`, the loop every runner shares.

`fingerprint train` calls `fit` in one process; the Ray Train workers in `jobs/` call the same `fit` with
`wrap_model` / `wrap_loader` set to Ray's DDP helpers and an `on_epoch` hook that reports checkpoints.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fingerprint.config import ModelConfig, ScoreConfig, TrainConfig, subset, to_dict
from fingerprint.detectors.base import FitData, Scores, create_detector, finish_fit
from fingerprint.detectors.networks import TripletNN
from fingerprint.detectors.triplet.checkpoint import save_checkpoint, unwrap
from fingerprint.detectors.triplet.losses import TripletLoss
from fingerprint.detectors.triplet.miners import create_miner
from fingerprint.detectors.triplet.sampling import TripletDataset, balanced_weights
from fingerprint.features.backbones import EmbeddingNet, create_embedder, data_config
from fingerprint.features.embedding import autocast, resolve_device
from fingerprint.features.transforms import Preprocess

log = logging.getLogger(__name__)

VAL_GALLERY_SIZE = 2048
"""Default of ``TrainConfig.val_gallery_size``, for configs without the field: generated images the per-epoch
validation indexes (a seeded sample); the final detector (``final_detector``, Ray Train's ``build_detector``)
indexes every generated image."""


@dataclass
class TrainingData:
    """Everything one training run reads, loaded once into memory (ImageCLEF sets are small)."""

    anchors: list[Image.Image]
    anchor_sources: np.ndarray
    """0 = dev generated, 1 = test generated: anchors are balanced between the two, as in the seed."""
    positives: list[Image.Image]
    negatives: list[Image.Image]
    val_images: list[Image.Image]
    val_labels: np.ndarray
    val_ids: list[str]
    gallery: list[Image.Image]
    """All generated images (dev and test): what a real image is compared with."""
    gallery_ids: list[str]
    reference: list[Image.Image]
    """Every real image available (labelled or not), the pool for calibrating scores."""
    reference_ids: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    """Ids of the train and validation real images: logged so runs are compared on the same split."""
    source: FitData | None = None
    """The detector-protocol view of the same images (groups included), when built from one."""


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read the benchmark and hold out whole groups of labelled dev images for validation.

    The split is :func:`fingerprint.data.imagesets.load_fit_data`'s, so a triplet model is validated on the same images
    as every other detector kind fitted with the same ``--val-fraction`` and ``--seed``.
    """
    from fingerprint.data.imagesets import load_fit_data

    return training_data(load_fit_data(config.data, config.val_fraction, config.seed, config.skip_bad))


def training_data(data: FitData) -> TrainingData:
    """The triplet loop's view of a detector's FitData: positives and negatives from its training images only."""
    y = data.labels[data.train]
    return TrainingData(
        anchors=data.generated, anchor_sources=data.generated_source,
        positives=[data.real[i] for i in data.train[y == 1]], negatives=[data.real[i] for i in data.train[y == 0]],
        val_images=[data.real[i] for i in data.val], val_labels=data.labels[data.val],
        val_ids=[data.real_ids[i] for i in data.val],
        gallery=data.generated, gallery_ids=data.generated_ids, reference=data.real, reference_ids=data.real_ids,
        split=data.split, source=data,
    )


def build_model(config: ModelConfig) -> tuple[EmbeddingNet, dict[str, Any]]:
    model = create_embedder(config)
    return model, data_config(model, config)


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    inner = unwrap(model)
    head = list(inner.head.parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in inner.parameters() if id(p) not in head_ids]
    # The head starts from scratch while the backbone is pretrained: it may move faster.
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": config.lr}, {"params": head, "lr": config.lr * 10}],
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    return optimizer, scheduler


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: TripletLoss,
    device: torch.device,
    amp: bool = True,
    desc: str | None = None,
) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, mean active-triplet fraction and the triplet count."""
    model.train()
    total, active, steps, triplets = 0.0, 0.0, 0, 0
    bar = tqdm(loader, desc=desc, disable=desc is None, unit="step", leave=False)
    for a, p, n in bar:
        batch = torch.cat([a, p, n]).to(device, non_blocking=True)
        with autocast(device, amp):
            emb = model(batch)
        ea, ep, en = emb.float().chunk(3)
        out = loss_fn(ea, ep, en)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        total += out.loss.item()
        active += out.active_fraction
        steps += 1
        triplets += a.shape[0]
        bar.set_postfix(loss=f"{total / steps:.4f}", active=f"{active / steps:.2f}")
    if steps == 0:
        raise RuntimeError("the training loader produced no batch; raise --triplets-per-epoch")
    return {"loss": total / steps, "active_fraction": active / steps, "triplets": float(triplets)}


@dataclass
class Validation:
    metrics: dict[str, float]
    threshold: float
    scores: Scores
    labels: np.ndarray
    detector: TripletNN
    """The triplet detector as of this epoch (network, gallery, threshold): what a checkpoint of it would score."""
    gallery_sampled: bool = False
    """True when it indexed a sample of the gallery (``VAL_GALLERY_SIZE``): a final detector indexes all of it."""


def as_detector(model: nn.Module, data_cfg: dict[str, Any], config: TrainConfig) -> TripletNN:
    """The triplet detector kind around a network trained with ``config`` (not yet indexed)."""
    det = create_detector("triplet", TripletNN.settings_from(config))
    det.use_network(unwrap(model), data_cfg)
    return det


def validate(model: nn.Module, data: TrainingData, config: TrainConfig, data_cfg: dict[str, Any]) -> Validation | None:
    """Validate as every detector kind is: threshold from the training labels, metrics on the held-out images.

    None when nothing is held out.
    """
    if len(data.val_images) == 0 or len(np.unique(data.val_labels)) < 2 or data.source is None:
        return None
    det = as_detector(model, data_cfg, config)
    src = data.source
    rows = validation_gallery(len(src.generated), int(getattr(config, "val_gallery_size", VAL_GALLERY_SIZE)),
                              config.seed)
    det.index([src.generated[i] for i in rows], [src.generated_ids[i] for i in rows], src.real, src.real_ids,
              src.groups)
    finish_fit(det, src, threshold_method=config.threshold_method, target_fpr=config.target_fpr)
    scores = det.score(data.val_images, data.val_ids)
    return Validation(dict(det.meta.metrics), det.threshold, scores, data.val_labels, det,
                      gallery_sampled=len(rows) < len(src.generated))


def validation_gallery(n: int, size: int, seed: int) -> np.ndarray:
    """Rows of the gallery the per-epoch validation indexes: all of them, or a seeded sample of ``size``."""
    if size <= 0 or n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def final_detector(result: FitResult, data: TrainingData, config: TrainConfig) -> TripletNN:
    """The trained network as a saved-ready triplet detector: the last validation's when it indexed the whole
    gallery, else indexed afresh on every generated image."""
    if result.validation is not None and not result.validation.gallery_sampled:
        return result.validation.detector
    if data.source is None:
        raise ValueError("final_detector needs TrainingData built from FitData (training_data)")
    det = as_detector(result.model, result.data_config, config)
    src = data.source
    det.index(src.generated, src.generated_ids, src.real, src.real_ids, src.groups)
    return finish_fit(det, src, threshold_method=config.threshold_method, target_fpr=config.target_fpr)


@dataclass
class EpochEnd:
    """What an `on_epoch` hook receives after each epoch."""

    epoch: int
    metrics: dict[str, float]
    model: nn.Module
    validation: Validation | None
    save: Callable[[str | Path], Path]
    """Writes a complete checkpoint (model, optimizer, scheduler, config, metrics) to the given folder."""


@dataclass
class FitResult:
    model: EmbeddingNet
    data_config: dict[str, Any]
    history: list[dict[str, float]]
    validation: Validation | None
    threshold: float


def checkpoint_meta(
    config: TrainConfig, data_cfg: dict[str, Any], threshold: float, metrics: dict[str, float], epoch: int,
    split: dict[str, list[str]],
) -> dict[str, Any]:
    """meta.json: all that scoring needs besides the weights, readable by people."""
    return {
        "config": to_dict(config),
        "data_config": data_cfg,
        "score": {**to_dict(subset(ScoreConfig, config)), "threshold": threshold},
        "metrics": metrics,
        "epoch": epoch,
        "split": split,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _save(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    history: list[dict[str, float]], meta: dict[str, Any],
) -> Path:
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": meta["epoch"], "history": history}
    return save_checkpoint(path, model, meta, training_state=state)


def fit(
    config: TrainConfig,
    data: TrainingData,
    *,
    on_epoch: Callable[[EpochEnd], None] | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    wrap_loader: Callable[[DataLoader], DataLoader] | None = None,
    resume: dict[str, Any] | None = None,
    is_main: bool = True,
    device: torch.device | None = None,
) -> FitResult:
    """Triplet fine-tuning as configured; the same loop for one process and for every Ray Train worker.

    `resume` is a training state from a checkpoint ({'model', 'optimizer', 'scheduler', 'epoch', 'history'}):
    training continues after its epoch. Only `is_main` validates (the others report their training metrics).
    """
    torch.manual_seed(config.seed)
    device = device or resolve_device(config.device)
    model, data_cfg = build_model(subset(ModelConfig, config))
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(device)
    optimizer, scheduler = build_optimizer(model, config)
    start, history = 0, []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start, history = int(resume["epoch"]) + 1, list(resume.get("history", []))
    train_model = wrap_model(model) if wrap_model else model

    eval_tf = Preprocess(data_cfg)
    dataset = TripletDataset(
        data.anchors, data.positives, data.negatives, config.triplets_per_epoch, eval_tf,
        Preprocess(data_cfg, augment=True) if config.augment else eval_tf,
        anchor_weights=balanced_weights(data.anchor_sources), seed=config.seed,
    )
    # Triplets are random per index already, so no shuffling: a distributed sampler then hands each worker its
    # own disjoint shard of the epoch's triplets.
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.loader_workers,
                        drop_last=len(dataset) > config.batch_size)
    if wrap_loader:
        loader = wrap_loader(loader)
    loss_fn = TripletLoss(config.margin, create_miner(config.mining))

    validation, threshold = None, 0.0
    for epoch in range(start, config.epochs):
        dataset.set_epoch(epoch)
        t0 = time.perf_counter()
        desc = f"epoch {epoch + 1}/{config.epochs}" if is_main else None
        lr = float(optimizer.param_groups[0]["lr"])
        metrics = train_one_epoch(train_model, loader, optimizer, loss_fn, device, config.amp, desc)
        scheduler.step()
        metrics.update(epoch=float(epoch), epoch_seconds=time.perf_counter() - t0, lr=lr)
        if is_main:
            validation = validate(model, data, config, data_cfg)
            if validation is not None:
                metrics.update(validation.metrics)
                threshold = validation.threshold
                metrics["threshold"] = threshold
            log.info("epoch %d/%d %s", epoch + 1, config.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch"))
        history.append(metrics)

        save = functools.partial(
            _save, model=model, optimizer=optimizer, scheduler=scheduler, history=list(history),
            meta=checkpoint_meta(config, data_cfg, threshold, dict(metrics), epoch, data.split),
        )
        if on_epoch is not None:
            on_epoch(EpochEnd(epoch, metrics, model, validation, save))
    if not math.isfinite(threshold):
        threshold = 0.0
    return FitResult(unwrap(model), data_cfg, history, validation, threshold)
