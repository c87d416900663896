"""`fingerprint sample-data`: write the bundled sample benchmark (CT-like phantoms and a memorising generator).

    fingerprint sample-data --out data/sample

Nothing is downloaded: the images are made here, so they can be shared freely, unlike the real CT benchmarks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fingerprint.config import Range, check_fields, flag, validate
from fingerprint.data.phantoms import make_sample_dataset

log = logging.getLogger(__name__)


@dataclass
class SampleDataConfig:
    out: str = "data/sample"
    """Folder to write (dev/, test/, test_labels.csv, groups.csv, README.md)."""
    patients: Annotated[int, Range(5)] = 30
    """Patients whose slices trained the generator; as many again are held out as not-used images."""
    slices_per_patient: Annotated[int, Range(1)] = 4
    """Neighbouring slices per patient (near-duplicates, as in real CT series)."""
    size: Annotated[int, Range(16)] = 64
    """Image size in pixels."""
    generated: Annotated[int, Range(1)] = 200
    """Generated images in dev and, again, in test."""
    memorisation: Annotated[float, Range(0, 1)] = 0.9
    """How closely generated images copy training images (0 = not at all, 1 = near copies)."""
    seed: int = 0
    """Seed for phantoms, the generator and the split."""
    overwrite: bool = False
    """Replace an existing folder."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        if Path(self.out).exists() and not self.overwrite:
            out.append(f"{flag('out')}: '{self.out}' exists; pass --overwrite to replace it")
        return out


def main(config: SampleDataConfig) -> Path:
    validate(config)
    counts = make_sample_dataset(
        config.out, n_patients=config.patients, slices_per_patient=config.slices_per_patient, size=config.size,
        n_generated_dev=config.generated, n_generated_test=config.generated, memorisation=config.memorisation,
        n_reference_patients=config.patients, seed=config.seed, overwrite=config.overwrite,
    )
    log.info("wrote %s: %s", config.out, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return Path(config.out)
