"""Which images a job fits on and scores, with one id rule shared by fit, predict, the harness and the service.

Ids: in a benchmark with ``dev/`` and ``test/``, test images keep their plain id (``real_unknown_0001``, the
ImageCLEF submission's) and dev images get ``dev/`` in front (``dev/used_0001``, ``dev/gen_00001``), since the two
sets reuse file names. A single folder or manifest keeps its plain ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fingerprint.data import images as fpdata
from fingerprint.detectors.base import FitData
from fingerprint.features.handcrafted import images_to_array
from fingerprint.io import DEV_PREFIX, lookup_ids, read_groups

log = logging.getLogger(__name__)



@dataclass
class BenchmarkItems:
    """The images of a benchmark folder by role, ids already made unique across dev and test."""

    root: Path
    generated: list[fpdata.ImageItem]
    generated_source: np.ndarray
    """(G,) 0 = dev generated, 1 = test generated."""
    labelled: list[fpdata.ImageItem]
    """Dev used, then dev not_used images."""
    unknown: list[fpdata.ImageItem]
    """Real images without a label: the test set's real_unknown (or a folder's)."""
    skipped: list[tuple[Path, str]]

    @property
    def real(self) -> list[fpdata.ImageItem]:
        return self.labelled + self.unknown

    def to_score(self) -> list[fpdata.ImageItem]:
        """What `predict` scores: the unlabelled real images, or every real image when none is unlabelled."""
        return self.unknown or self.real


def benchmark_items(root: str | Path, skip_bad: bool = False) -> BenchmarkItems:
    """Open a benchmark folder (dev/ and test/), a single labelled or unlabelled folder, or a manifest."""
    dev, test = fpdata.open_benchmark(root, skip_bad=skip_bad)
    skipped = [s for part in (dev, test) if part is not None for s in part.skipped]
    if skipped:
        log.warning("skipped %d unreadable file(s): %s", len(skipped),
                    "; ".join(f"{p} ({why})" for p, why in skipped[:10]))

    def dev_ids(items: list[fpdata.ImageItem]) -> list[fpdata.ImageItem]:
        return [replace(it, id=DEV_PREFIX + it.id) for it in items] if test is not None else items

    gen = dev_ids(dev.generated) + (test.generated if test is not None else [])
    source = np.r_[np.zeros(len(dev.generated)), np.ones(len(gen) - len(dev.generated))].astype(np.int64)
    labelled = dev_ids(dev.role("used") + dev.role("not_used"))
    unknown = test.role("real_unknown") if test is not None else dev.role("real_unknown")
    return BenchmarkItems(Path(root), gen, source, labelled, unknown, skipped)


def load_fit_data(root: str | Path, val_fraction: float = 0.25, seed: int = 0, skip_bad: bool = False,
                  group_threshold: float = 0.95) -> FitData:
    """Every image of a benchmark as FitData: all real images as the reference pool, the labelled dev images
    split by whole pseudo-patient groups into train and (``val_fraction``) validation.

    Groups come from ``groups.csv`` beside dev/ and test/ (``id,group``, as the sample data and the generator zoo
    write it) or a manifest's group column, else from near-duplicate clustering of all real images
    (average linkage on 32x32 thumbnails at ``group_threshold`` correlation): neighbouring slices of one patient
    never sit on both sides of the split. The split depends only on the images, ``val_fraction`` and ``seed``,
    so every kind fitted with the same three is validated on the same images.
    """
    items = benchmark_items(root, skip_bad)
    if not any(it.label == 1 for it in items.labelled) or not any(it.label == 0 for it in items.labelled):
        raise fpdata.DataError(f"{root}: fitting needs labelled dev images, used and not_used "
                               f"(found {len(items.labelled)} labelled)")
    if not items.generated:
        raise fpdata.DataError(f"{root}: no generated images found")
    real_items = items.real
    real, real_items, _ = fpdata.load_images(real_items, skip_bad=skip_bad)
    generated, gen_items, _ = fpdata.load_images(items.generated, skip_bad=skip_bad)
    kept_gen = {it.id for it in gen_items}
    source = np.array([s for it, s in zip(items.generated, items.generated_source, strict=True)
                       if it.id in kept_gen], dtype=np.int64)
    labels = np.array([-1 if it.label is None else it.label for it in real_items], dtype=np.int64)
    groups = pool_groups(root, real_items, real, group_threshold)
    labelled = np.flatnonzero(labels >= 0)
    if val_fraction > 0:
        tr, va = fpdata.group_split(labels[labelled], groups[labelled], val_fraction, seed)
        train, val = labelled[tr], labelled[va]
    else:
        train, val = labelled, np.zeros(0, dtype=np.int64)
    return FitData(generated=generated, generated_ids=[it.id for it in gen_items], real=real,
                   real_ids=[it.id for it in real_items], labels=labels, groups=groups, train=train, val=val,
                   generated_source=source)


GROUPS_FILE = "groups.csv"


def pool_groups(root: str | Path, items: list[fpdata.ImageItem], images: list, threshold: float = 0.95
                ) -> np.ndarray:
    """Pseudo-patient ids of a benchmark's real images: its groups.csv, a manifest's groups, or clustering."""
    known = groups_file(root, [it.id for it in items])
    return known if known is not None else real_groups(items, images, threshold)


def groups_file(root: str | Path, ids: list[str]) -> np.ndarray | None:
    """Patient groups of ``ids`` from ``<root>/groups.csv`` (``id,group``; dev ids may be written without their
    ``dev/`` prefix), or None when there is no such file or it misses one of the ids."""
    path = Path(root) / GROUPS_FILE
    if not path.is_file():
        return None
    found = lookup_ids(read_groups(path), ids)
    if any(g is None for g in found):
        missing = [i for i, g in zip(ids, found, strict=True) if g is None]
        log.warning("%s does not name %d of the real images (e.g. %s); grouping by image similarity instead",
                    path, len(missing), missing[0])
        return None
    return np.unique(found, return_inverse=True)[1].astype(np.int64)


def real_groups(items: list[fpdata.ImageItem], images: list, threshold: float = 0.95) -> np.ndarray:
    """Pseudo-patient ids: the manifest's groups when every image has one, else near-duplicate clusters."""
    if items and all(it.group is not None for it in items):
        return np.unique([str(it.group) for it in items], return_inverse=True)[1].astype(np.int64)
    return fpdata.infer_groups(images_to_array(images, 64), threshold=threshold, thumb=32, linkage="average")
