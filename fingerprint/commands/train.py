"""`fingerprint train`: triplet fine-tuning on one machine, writing a triplet detector that `predict` and serving use.

    fingerprint train --data ../shared/bench/ctbench-s1 \
        --backbone tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.safetensors \
        --image-size 64 --epochs 3 --out runs/s1

Writes ``<out>/detector`` (the triplet kind of the detector protocol: network, gallery, threshold, validation
metrics), ``<out>/checkpoint`` (weights and optimizer state of the last finished epoch, rewritten atomically after
every epoch) and reports. The Ray Train job (`fingerprint train-ray`, in jobs/) runs the same `fit` on several workers.

A run folder holds one run. Training into a folder that already holds one is refused unless ``--resume`` (continue
it from ``<out>/checkpoint``; its settings must match) or ``--overwrite`` (remove its files, start again) is given.
Ctrl-C stops after saying where the last finished epoch is; ``--resume`` carries on from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fingerprint.config import ConfigError, TrainConfig, flag, from_dict, save_json, subset, to_dict, validate
from fingerprint.detectors.base import check_decision
from fingerprint.detectors.triplet.checkpoint import load_training_state
from fingerprint.detectors.triplet.training import (
    EpochEnd,
    FitResult,
    TrainingData,
    final_detector,
    fit,
    load_training_data,
)
from fingerprint.detectors.triplet.training import validate as validate_epoch
from fingerprint.evaluation import plots
from fingerprint.io import remove_stale_temps, write_csv_atomic, write_text_atomic

log = logging.getLogger(__name__)


def write_reports(out: Path, result: FitResult, data: TrainingData) -> list[Path]:
    """Pictures and tables about a finished run: training curves, validation ROC, histogram, evidence."""
    out.mkdir(parents=True, exist_ok=True)
    written = [write_text_atomic(out / "history.json", json.dumps(result.history, indent=2))]
    written.append(plots.training_curves(result.history, out / "training_curves.png"))
    v = result.validation
    if v is None:
        return written
    s = v.scores
    written.append(plots.roc_plot({"validation": (v.labels, s.score)}, out / "val_roc.png", title="held-out dev"))
    written.append(plots.score_histogram(s.score, v.labels, out / "val_scores.png", threshold=v.threshold))
    written.append(plots.confusion_plot(v.labels, s.score >= v.threshold, out / "val_confusion.png"))
    rows = plots.evidence_rows(data.val_ids, data.val_images, data.gallery_ids, data.gallery, s.score, s.nearest,
                               s.nearest_similarity)
    written.append(plots.evidence_grid(rows, out / "val_evidence.png", title="highest-scoring held-out images"))
    written.append(write_csv_atomic(
        out / "val_scores.csv",
        [(data.val_ids[i], int(v.labels[i]), f"{s.score[i]:.6f}") for i in range(len(v.labels))],
        header=("id", "label", "score"),
    ))
    return written


@dataclass
class TrainRunConfig(TrainConfig):
    """`fingerprint train`'s flags: the training settings plus what to do with a run already in --out.

    The two flags stay out of the shared TrainConfig (and so out of saved configs and the Ray run-name hash).
    """

    resume: bool = False
    """Continue the interrupted run in --out from <out>/checkpoint, after its last finished epoch; its saved
    training settings must match these."""
    overwrite: bool = False
    """Replace the run already in --out: its files are removed first, then training starts from scratch."""


RUN_DIRS = ("checkpoint", "detector")
"""Folders a run writes into <out> (each atomically, through a `.<name>.*` temporary sibling)."""
RUN_FILES = ("config.json", "split.json", "history.json", "training_curves.png", "val_roc.png", "val_scores.png",
             "val_confusion.png", "val_evidence.png", "val_scores.csv")
"""Files a run writes into <out>."""
RUN_MARKERS = ("config.json", "checkpoint", "detector")
"""Any of these in <out> means it already holds a run."""
NOT_TRAINING = frozenset({"out", "device", "loader_workers"})
"""Settings that say where or how fast, not what is trained: a resumed run may change them."""


def main(config: TrainConfig | TrainRunConfig, *, on_epoch: Callable[[EpochEnd], None] | None = None) -> Path:
    """Train, save the checkpoint to `<out>/checkpoint` after every epoch, then the detector to `<out>/detector`
    and reports; return the detector folder.

    `config` may be the plain training settings (a new run into a folder without one) or this command's
    TrainRunConfig with `resume` / `overwrite`. `on_epoch` is called after each epoch's checkpoint is saved.
    A KeyboardInterrupt leaves the last finished epoch's checkpoint intact and is re-raised saying where it is.
    """
    validate(config)
    resume, overwrite = bool(getattr(config, "resume", False)), bool(getattr(config, "overwrite", False))
    settings = subset(TrainConfig, config)  # what is trained and saved, without the run-folder flags
    out = Path(settings.out)
    ckpt_dir = out / "checkpoint"
    saved = prepare_run_folder(out, settings, resume=resume, overwrite=overwrite)  # refuses before any work
    state = load_training_state(ckpt_dir) if saved is not None and ckpt_dir.is_dir() else None
    if saved is not None and ckpt_dir.is_dir() and state is None:
        raise FileNotFoundError(f"{ckpt_dir}: no training_state.pt to resume from; start again with --overwrite")
    if saved is not None and state is None:
        log.info("--resume: no epoch of the run in %s had finished; starting from the first", out)
    done: list[int] = [int(state["epoch"])] if state is not None else []
    try:
        return _train(settings, out, state, done, on_epoch)
    except KeyboardInterrupt:
        if done:
            where = (f"the last finished epoch ({done[-1] + 1} of {settings.epochs}) is saved in {ckpt_dir}, "
                     "resume with --resume")
        else:
            where = f"no epoch finished yet; start again with --resume (same settings) or --overwrite in {out}"
        raise KeyboardInterrupt(where) from None


def _train(config: TrainConfig, out: Path, state: dict[str, Any] | None, done: list[int],
           on_epoch: Callable[[EpochEnd], None] | None) -> Path:
    data = load_training_data(config)
    if data.source is not None:
        check_decision(data.source, config.threshold_method, config.target_fpr)
    if state is not None:
        saved_split = json.loads((out / "checkpoint" / "meta.json").read_text()).get("split")
        if saved_split is not None and saved_split != data.split:
            raise ValueError(f"--resume: the images in --data {config.data} differ from those {out / 'checkpoint'} "
                             "was trained on (its train/val split changed); use a new --out or --overwrite")
        log.info("resuming %s after epoch %d of %d", out, int(state["epoch"]) + 1, config.epochs)
    log.info("training on %d generated anchors, %d used / %d not-used real images; %d held out",
             len(data.anchors), len(data.positives), len(data.negatives), len(data.val_images))
    save_json(config, out / "config.json")
    write_text_atomic(out / "split.json", json.dumps(data.split, indent=2))

    def checkpoint(end: EpochEnd) -> None:
        # Ctrl-C during the write waits for it, so the folder always holds a whole epoch; the epoch is counted
        # inside too, or a Ctrl-C deferred to the end of the write would report the saved epoch as unfinished.
        with sigint_deferred():
            end.save(out / "checkpoint")
            done.append(end.epoch)
        if on_epoch is not None:
            on_epoch(end)

    result = fit(config, data, on_epoch=checkpoint, resume=state)
    if result.validation is None and state is not None and int(state["epoch"]) + 1 >= config.epochs:
        # Resumed after the last epoch (interrupted while writing the detector): validate what was saved.
        validation = validate_epoch(result.model, data, config, result.data_config)
        if validation is not None:
            result = dataclasses.replace(result, validation=validation, threshold=validation.threshold)
    detector = final_detector(result, data, config).save(out / "detector")
    write_reports(out, result, data)
    log.info("detector: %s (checkpoint %s)", detector, out / "checkpoint")
    return detector


def prepare_run_folder(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Make `out` hold this run only, before any work; return the saved settings when resuming.

    A folder already holding a run is refused without --resume or --overwrite; --resume checks the saved training
    settings match; --overwrite removes the old run's files. Leftovers of killed atomic writes are cleaned up.
    """
    if resume and overwrite:
        raise ConfigError([f"{flag('resume')} and {flag('overwrite')}: give one (continue the run in {out}, or "
                           "replace it)"])
    found = [n + ("/" if n in RUN_DIRS else "") for n in RUN_MARKERS if os.path.lexists(out / n)]
    if found and not (resume or overwrite):
        raise ConfigError([f"{flag('out')}: {out} already holds a run ({', '.join(found)}); give {flag('resume')} "
                           f"to continue it, {flag('overwrite')} to replace it, or a new {flag('out')}"])
    if resume and not ((out / "checkpoint" / "meta.json").is_file() or (out / "config.json").is_file()):
        raise ConfigError([f"{flag('resume')}: {out} holds no run to resume (no checkpoint/ or config.json); "
                           f"drop {flag('resume')} to start one"])
    stale = remove_stale_temps(out, RUN_DIRS + RUN_FILES)
    if stale:
        log.info("removed %d leftover(s) of interrupted writes in %s: %s", len(stale), out,
                 ", ".join(p.name for p in stale))
    if overwrite and found:
        with sigint_deferred():  # all or nothing: a half-removed run would mix with the new one
            removed = remove_run(out)
        log.info("--overwrite: removed the previous run in %s (%s)", out, ", ".join(removed))
        return None
    if not resume:
        return None
    source = out / "checkpoint" / "meta.json"
    if source.is_file():
        saved = json.loads(source.read_text())["config"]
    else:  # interrupted before its first epoch finished: nothing trained yet, but the settings are set
        source = out / "config.json"
        saved = json.loads(source.read_text())
    differ = settings_differ(saved, config)
    if differ:
        raise ConfigError([f"{flag('resume')}: {source} was saved with different training settings: "
                           + "; ".join(differ) + f". Use a new {flag('out')}, or {flag('overwrite')} to start again"])
    return saved


def settings_differ(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The training-relevant settings where `saved` (a saved config dict) and `config` differ, as
    ``--flag saved (now current)``; fields missing from an older save count as their defaults."""
    before, now = to_dict(from_dict(TrainConfig, saved)), to_dict(config)
    out = []
    for name, value in now.items():
        if name in NOT_TRAINING or _same(name, before[name], value):
            continue
        out.append(f"{flag(name)} {before[name]!r} (now {value!r})")
    return out


def _same(name: str, a: Any, b: Any) -> bool:
    if a == b:
        return True
    if name in ("data", "weights") and isinstance(a, str) and isinstance(b, str) and "none" not in (a, b) \
            and "hub" not in (a, b):
        return Path(a).resolve() == Path(b).resolve()  # the same file, named relative or absolute
    return False


def remove_run(out: Path) -> list[str]:
    """Remove every file and folder a run writes into `out` (and their temporaries); keep anything else."""
    removed = []
    for name in RUN_DIRS + RUN_FILES + tuple(n.removesuffix(".png") + ".tmp.png" for n in RUN_FILES
                                             if n.endswith(".png")):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
        else:
            continue
        removed.append(name)
    removed += [p.name for p in remove_stale_temps(out, RUN_DIRS + RUN_FILES)]
    return removed


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt: for short writes that must
    not stop half-way. A no-op outside the main thread or when someone else handles SIGINT."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
