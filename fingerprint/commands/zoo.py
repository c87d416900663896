"""`fingerprint zoo`: train a generator on part of a real pool and write a benchmark whose answers are known.

    fingerprint zoo --pool ../shared/bench/ctbench-s0,../shared/bench/ctbench-s1 --family dcgan \\
        --settings '{"steps": 3000, "width": 16}' --members 100 --out bench/dcgan-100
    fingerprint zoo --spec benchmarks/zoo/suite.yaml --out bench/zoo           # every entry of a suite
    fingerprint zoo --spec benchmarks/zoo/suite.yaml --out bench/zoo --only vae-small-long

Families: dcgan, vae, diffusion, ae_gmm (fingerprint/zoo/). The benchmark has the shared layout (dev/generated,
dev/used, dev/not_used, test/generated, test/real_unknown) plus test_labels.csv, groups.csv, split.json, zoo.json,
the saved generator and a README. The same command with the same --seed writes the same images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fingerprint.config import Range, check_fields, flag, subset, validate
from fingerprint.zoo.build import BuildSettings, build_benchmark, build_suite

log = logging.getLogger(__name__)


@dataclass
class ZooConfig(BuildSettings):
    pool: str = ""
    """Real images, comma-separated: benchmark folders (all their real images, dev and test; labels ignored),
    folders of PNG/JPEG images, or manifest CSVs. With --spec it replaces the spec's pool."""
    out: str = "runs/zoo"
    """Folder to write the benchmark to (with --spec: one sub-folder per entry, plus suite.json)."""
    family: str = "dcgan"
    """Generator family: dcgan, vae, diffusion or ae_gmm (ignored with --spec)."""
    settings: str = ""
    """JSON object of the family's settings, e.g. '{"steps": 3000, "width": 16}' (ignored with --spec)."""
    spec: str = ""
    """A suite YAML (e.g. benchmarks/zoo/suite.yaml) listing several benchmarks to build; build settings and family
    flags are then taken from it."""
    only: str = ""
    """With --spec: comma-separated entry names to build (default: all)."""
    reseed: Annotated[int, Range(0)] = 0
    """With --spec: add this to every entry's seed, for a fresh draw of the same suite (other splits, other
    generators) to report on after choosing on the first; 0 = the spec's seeds."""
    overwrite: bool = False
    """Replace an existing --out (with --spec: rebuild entries already built; otherwise they are kept)."""
    progress: bool = True
    """Log training progress."""

    def problems(self) -> list[str]:
        from fingerprint.zoo.base import families, settings_problems

        if self.spec:
            out = check_fields(self)
            if not Path(self.spec).is_file():
                out.append(f"{flag('spec')}: '{self.spec}' does not exist; give a suite YAML such as "
                           "benchmarks/zoo/suite.yaml")
        else:
            out = BuildSettings.problems(self)  # check_fields of every field, with the image-size rule
            if not self.pool.strip():
                out.append(f"{flag('pool')}: required: benchmark folders, image folders or manifests, comma-separated")
            if self.family not in families():
                out.append(f"{flag('family')}: unknown family {self.family!r}; known: {', '.join(sorted(families()))}")
            else:
                try:
                    out += settings_problems(self.family, self.overrides())
                except ValueError as e:
                    out.append(f"{flag('settings')}: {e}")
            if Path(self.out).exists() and not self.overwrite:
                out.append(f"{flag('out')}: '{self.out}' exists; pass --overwrite to replace it")
        for p in self.pools():
            if not Path(p).exists():
                out.append(f"{flag('pool')}: '{p}' does not exist; give benchmark folders, image folders or manifests")
        return list(dict.fromkeys(out))

    def pools(self) -> list[str]:
        return [p.strip() for p in self.pool.split(",") if p.strip()]

    def overrides(self) -> dict[str, Any]:
        if not self.settings.strip():
            return {}
        try:
            value = json.loads(self.settings)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e}): {self.settings!r}") from e
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object such as '{{\"steps\": 3000}}', got {self.settings!r}")
        return value


def main(config: ZooConfig) -> Path:
    validate(config)
    if config.spec:
        records = build_suite(config.spec, config.out, pool=config.pools() or None,
                              only=[s.strip() for s in config.only.split(",") if s.strip()],
                              overwrite=config.overwrite, progress=config.progress, reseed=config.reseed)
        for r in records:
            log.info("%s (%s): %d members, fit %.0f s, NN-L2 AUC dev %.3f test %.3f", r["name"], r["family"],
                     r["counts"]["members"], r["timing"]["fit_s"], r["checks"]["nn_l2_auc_dev"],
                     r["checks"]["nn_l2_auc_test"])
        return Path(config.out)
    build = subset(BuildSettings, config)
    build_benchmark(config.out, config.pools(), config.family, config.overrides(), build, overwrite=config.overwrite,
                    progress=config.progress)
    return Path(config.out)


__all__ = ["ZooConfig", "main"]
