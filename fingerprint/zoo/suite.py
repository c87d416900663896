"""The YAML suite spec of `fingerprint zoo --spec`: several benchmarks built in one go, validated with pydantic.

    pool: [../../../shared/bench/ctbench-s0]      # relative paths resolve against the YAML's folder
    defaults: {image_size: 32, dev_generated: 300}  # build settings shared by every entry
    entries:
      - name: dcgan-small-long                     # sub-folder of --out
        family: dcgan
        settings: {steps: 3000, width: 16}         # the family's settings (fingerprint.zoo.<family>)
        members: 60                                # any build setting overrides the defaults
        seed: 0
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fingerprint.config import ConfigError, from_dict
from fingerprint.zoo.base import families, settings_problems
from fingerprint.zoo.build import BuildSettings

_BUILD_FIELDS = {f.name for f in dataclasses.fields(BuildSettings)}


class SuiteEntry(BaseModel):
    """One benchmark of a suite: a family, its settings and build settings that override the suite's defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    family: str
    settings: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    pool: list[str] | None = None
    members: int | None = None
    image_size: int | None = None
    dev_fraction: float | None = None
    non_member_ratio: float | None = None
    dev_generated: int | None = None
    test_generated: int | None = None
    temperature: float | None = None
    seed: int | None = None
    group_threshold: float | None = None
    null_control: bool | None = None


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: list[str] = Field(default_factory=list)
    defaults: dict[str, Any] = Field(default_factory=dict)
    entries: list[SuiteEntry] = Field(min_length=1)

    def build_settings(self, entry: SuiteEntry, reseed: int = 0) -> BuildSettings:
        """The entry's build settings over the defaults; ``reseed`` is added to its seed (a fresh draw)."""
        own = {k: getattr(entry, k) for k in _BUILD_FIELDS if getattr(entry, k) is not None}
        build = from_dict(BuildSettings, {**self.defaults, **own})
        return dataclasses.replace(build, seed=build.seed + reseed)

    def pool_paths(self, entry: SuiteEntry, base: Path) -> list[str]:
        return [str(p if Path(p).is_absolute() else base / p) for p in (entry.pool or self.pool)]


def check_suite(suite: Suite, path: Path) -> None:
    """What pydantic cannot know: unknown families, bad family or build settings, duplicate names."""
    problems = []
    unknown = sorted(set(suite.defaults) - _BUILD_FIELDS)
    if unknown:
        problems.append(f"defaults: unknown build setting(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(_BUILD_FIELDS))}")
    seen: set[str] = set()
    for i, e in enumerate(suite.entries):
        where = f"entry {i} ({e.name})"
        if e.name in seen:
            problems.append(f"{where}, field name: {e.name!r} is used twice")
        seen.add(e.name)
        if e.family not in families():
            problems.append(f"{where}, field family: unknown family {e.family!r}; "
                            f"known: {', '.join(sorted(families()))}")
        else:
            problems += [f"{where}, field settings: {p.removeprefix('--settings: ')}"
                         for p in settings_problems(e.family, e.settings)]
        if not unknown:
            problems += [f"{where}, field {p.split(':')[0].removeprefix('--').replace('-', '_')}:"
                         f"{p.split(':', 1)[1]}" for p in suite.build_settings(e).problems()]
        if not (e.pool or suite.pool):
            problems.append(f"{where}, field pool: no pool (give one at the top of the spec, per entry, or --pool)")
    if problems:
        raise ConfigError([f"--spec: {path}: {p}" for p in problems])
