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

from fingerprint import data as fpdata
from fingerprint.backbones import EmbeddingNet, create_embedder, data_config
from fingerprint.checkpoint import save_checkpoint, unwrap
from fingerprint.config import ModelConfig, ScoreConfig, TrainConfig, subset, to_dict
from fingerprint.detectors.base import FitData
from fingerprint.embedding import autocast, embed_images, resolve_device
from fingerprint.losses import TripletLoss
from fingerprint.metrics import all_metrics
from fingerprint.miners import create_miner
from fingerprint.scoring import Scores, membership_scores
from fingerprint.thresholds import threshold_at_fpr, threshold_max_f1, threshold_real_to_real
from fingerprint.transforms import Preprocess
from fingerprint.triplets import TripletDataset, balanced_weights

log = logging.getLogger(__name__)


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
    split: dict[str, list[str]] = field(default_factory=dict)
    """Ids of the train and validation real images: logged so runs are compared on the same split."""


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read the benchmark, and hold out whole groups of labelled dev images for validation."""
    dev, test = fpdata.open_benchmark(config.data, skip_bad=config.skip_bad)
    for s in (dev, test):
        if s is not None and s.skipped:
            log.warning("skipped %d unreadable file(s) in %s: %s", len(s.skipped), s.root,
                        "; ".join(f"{p} ({why})" for p, why in s.skipped[:10]))
    for role in ("generated", "used", "not_used"):
        if not dev.role(role):
            raise fpdata.DataError(
                f"{dev.root}: no '{role}' images; triplet training needs dev generated/, used/ and not_used/ "
                "(or a manifest CSV with those roles)"
            )
    labelled = dev.role("used") + dev.role("not_used")
    images, labelled, _ = fpdata.load_images(labelled, skip_bad=config.skip_bad)
    labels = np.array([it.label for it in labelled])
    groups = _groups(labelled, images)
    if config.val_fraction > 0:
        train_idx, val_idx = fpdata.group_split(labels, groups, config.val_fraction, config.seed)
    else:
        train_idx, val_idx = np.arange(len(labelled)), np.arange(0)
    gen_items = dev.role("generated") + (test.role("generated") if test is not None else [])
    gallery, gen_items, _ = fpdata.load_images(gen_items, skip_bad=config.skip_bad)
    sources = np.array([0 if it.path.is_relative_to(dev.root) else 1 for it in gen_items])
    unknown = test.role("real_unknown") if test is not None else []
    unknown_images, _, _ = fpdata.load_images(unknown, skip_bad=True)
    return TrainingData(
        anchors=gallery,
        anchor_sources=sources,
        positives=[images[i] for i in train_idx if labels[i] == 1],
        negatives=[images[i] for i in train_idx if labels[i] == 0],
        val_images=[images[i] for i in val_idx],
        val_labels=labels[val_idx],
        val_ids=[labelled[i].id for i in val_idx],
        gallery=gallery,
        gallery_ids=[("dev/" if src == 0 and test is not None else "") + it.id
                     for it, src in zip(gen_items, sources, strict=True)],
        reference=images + unknown_images,
        split={"train": [labelled[i].id for i in train_idx], "val": [labelled[i].id for i in val_idx]},
    )


def training_data(data: FitData) -> TrainingData:
    """The triplet loop's view of a detector's FitData: positives and negatives from its training images only."""
    y = data.labels[data.train]
    return TrainingData(
        anchors=data.generated, anchor_sources=data.generated_source,
        positives=[data.real[i] for i in data.train[y == 1]], negatives=[data.real[i] for i in data.train[y == 0]],
        val_images=[], val_labels=np.zeros(0, dtype=np.int64), val_ids=[],
        gallery=data.generated, gallery_ids=data.generated_ids, reference=data.real, split=data.split,
    )


def _groups(items: list[fpdata.ImageItem], images: list[Image.Image]) -> np.ndarray:
    if all(it.group is not None for it in items):
        return np.unique([it.group for it in items], return_inverse=True)[1]
    # No patient ids: neighbouring slices of one scan are near-duplicates, so group them before splitting.
    return fpdata.infer_groups(np.stack([np.asarray(im.resize((32, 32)), dtype=np.float32) / 255 for im in images]))


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


def choose_threshold(config: ScoreConfig, labels: np.ndarray | None, scores: Scores) -> float:
    """The decision threshold that `config.threshold_method` asks for."""
    if config.threshold_method == "real_to_real" or labels is None or len(np.unique(labels)) < 2:
        # Calibrated scores already measure generated-versus-real similarity, so their real-to-real reference
        # is zero by construction; raw scores use the real images' own neighbour similarities.
        ref = np.zeros(1) if scores.real_similarity is not None else scores.generated_similarity
        return threshold_real_to_real(ref, config.real_quantile)
    if config.threshold_method == "fpr":
        return threshold_at_fpr(labels, scores.score, config.target_fpr)
    return threshold_max_f1(labels, scores.score)


def score_images(
    model: nn.Module,
    images: list[Image.Image],
    gallery: np.ndarray,
    reference: np.ndarray | None,
    config: ScoreConfig,
    transform: Preprocess,
    device: torch.device,
    amp: bool = True,
) -> Scores:
    real = embed_images(model, images, transform, device=device, amp=amp)
    return membership_scores(real, gallery, config, reference)


def validate(
    model: nn.Module, data: TrainingData, config: TrainConfig, transform: Preprocess, device: torch.device
) -> Validation | None:
    """Score the held-out dev images against all generated images; None when nothing is held out."""
    if len(data.val_images) == 0 or len(np.unique(data.val_labels)) < 2:
        return None
    model = unwrap(model)
    gallery = embed_images(model, data.gallery, transform, device=device, amp=config.amp, progress="embed gallery")
    reference = embed_images(model, data.reference, transform, device=device, amp=config.amp)
    scores = score_images(model, data.val_images, gallery, reference, config, transform, device, config.amp)
    threshold = choose_threshold(config, data.val_labels, scores)
    m = all_metrics(data.val_labels, scores.score, threshold=threshold)
    return Validation({f"val_{k}": float(v) for k, v in m.items()}, threshold, scores, data.val_labels)


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
            validation = validate(model, data, config, eval_tf, device)
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
