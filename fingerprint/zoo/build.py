"""Build membership-inference benchmarks with known answers: train a zoo generator on part of a real pool.

    build_benchmark("bench/dcgan-small", ["../shared/bench/ctbench-s0"], "dcgan", {"steps": 3000},
                    BuildSettings(members=100, seed=0))
    build_suite("benchmarks/zoo/suite.yaml", "bench/zoo")        # one sub-folder per entry, plus suite.json

Steps: read every real image of the pool (benchmark folders: dev and test real images, their labels ignored;
plain folders of PNG/JPEG files; manifests), resize to ``image_size``, drop exact duplicates, group near-duplicate
slices into pseudo-patients (average linkage on 32 x 32 thumbnails, as :func:`fingerprint.data.imagesets.real_groups`;
a manifest's groups when every image has one), split whole groups into members (about ``members`` images, the
generator's training set) and non-members, split each side into dev and test (different groups), train the
family on the members, sample dev and test generated images with different seeds, and write::

    out/dev/generated/gen_00001.png ...        out/dev/used/used_0001.png ...   out/dev/not_used/not_used_0001.png ...
    out/test/generated/gen_00001.png ...       out/test/real_unknown/real_unknown_0001.png ...  (shuffled)
    out/test_labels.csv   id,label             out/groups.csv  id,group
    out/split.json        where every pool file went, and the seed
    out/generator/        the saved generator (meta.json + weights.safetensors)
    out/zoo.json          family, settings, build settings, seed, training history, timing, checks
    out/README.md         how it was made

The same arguments give the same files (on the same machine, torch version and thread count): every random choice
comes from ``seed``. ``test_labels.csv``, ``split.json``, ``zoo.json`` and the README are answer keys.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from fingerprint.config import ConfigError, Range, check_fields, field_docs
from fingerprint.data.images import save_gray_png, write_generated
from fingerprint.io import atomic_dir, jsonable, write_text_atomic

log = logging.getLogger(__name__)

__all__ = ["NULL_LEVEL", "BuildSettings", "PoolImages", "build_benchmark", "build_suite", "load_pool", "load_suite",
           "split_groups"]

NULL_LEVEL = "none"
"""The memorisation level a null control's zoo.json declares: nothing labelled used was in the training set."""


@dataclass
class BuildSettings:
    members: Annotated[int, Range(2)] = 200
    """Real images in the generator's training set (about: whole pseudo-patient groups are taken until reached)."""
    image_size: Annotated[int, Range(16)] = 32
    """Side of every image written and of the generator, in pixels (a power of two: 16, 32, 64, 128)."""
    dev_fraction: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.4
    """Share of the members (whole groups) labelled in dev/used; the rest are the used images of the test set."""
    non_member_ratio: Annotated[float, Range(0, lo_open=True)] = 1.0
    """Non-members per member in dev/not_used and in test/real_unknown, as far as the pool allows (whole groups);
    the rest of the pool is left out (listed in split.json)."""
    dev_generated: Annotated[int, Range(1)] = 500
    """Generated images in dev/generated."""
    test_generated: Annotated[int, Range(1)] = 1000
    """Generated images in test/generated (drawn with another seed)."""
    temperature: Annotated[float, Range(0, lo_open=True)] = 1.0
    """Sampler temperature (family-specific: latent std for dcgan/vae, component std for ae_gmm, noise scale for
    diffusion); below 1 samples sit nearer the training data."""
    seed: int = 0
    """Seed of the split, the training, the sampling and the shuffling of the test images."""
    group_threshold: Annotated[float, Range(-1, 1)] = 0.95
    """Pseudo-patient grouping: thumbnail correlation at which near-duplicate slices join (average linkage)."""
    null_control: bool = False
    """A null control: the generator trains on about --members other pool images (whole groups, released nowhere)
    instead of the images labelled used, so nothing labelled was memorised and every detector should score at
    chance; zoo.json says memorisation 'none'."""

    def problems(self) -> list[str]:
        out = check_fields(self)
        if isinstance(self.image_size, int) and self.image_size & (self.image_size - 1):
            out.append(f"--image-size: must be a power of two (16, 32, 64, 128), got {self.image_size}")
        return out


# ---------------------------------------------------------------------------------------------------- pool


@dataclass
class PoolImages:
    """Real images of a pool, deduplicated, at one size."""

    sources: list[str]
    """Pool file of each image (as given, joined with the path inside its folder)."""
    pixels: np.ndarray
    """(N, S, S) uint8."""
    groups: np.ndarray
    """(N,) int64 pseudo-patient ids."""
    duplicates: list[tuple[str, str]]
    """(dropped file, identical kept file) pairs."""
    roots: list[str] = dataclasses.field(default_factory=list)
    """The pool as given (folders, manifests), normalised."""


def _pool_items(source: str) -> list[Any]:
    from fingerprint.data import images as fpdata
    from fingerprint.data.imagesets import benchmark_items

    path = Path(source)
    if not path.exists():
        raise ConfigError([f"--pool: '{source}' does not exist; give benchmark folders, folders of PNG/JPEG "
                           "images or manifest CSVs, comma-separated"])
    try:
        if path.is_dir() and (path / "dev").is_dir():
            return benchmark_items(path).real  # labels ignored: every real image, dev and test
        if path.is_file() or (path / fpdata.MANIFEST_NAME).is_file() or fpdata._role_dirs(path):
            return fpdata.open_folder(path).real
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in fpdata.IMAGE_SUFFIXES)
        return [fpdata.ImageItem(id=p.stem, path=p, role="real_unknown", label=None) for p in files]
    except fpdata.DataError as e:
        raise ConfigError([f"--pool: {e}"]) from e


def load_pool(pool: Sequence[str | Path], image_size: int, group_threshold: float = 0.95) -> PoolImages:
    """Every real image of ``pool`` at ``image_size``, exact duplicates dropped, with pseudo-patient groups."""
    from dataclasses import replace

    from fingerprint.data import images as fpdata
    from fingerprint.data.imagesets import real_groups
    from fingerprint.features.handcrafted import images_to_array

    if not pool:
        raise ConfigError(["--pool: required: benchmark folders, folders of PNG/JPEG images or manifests"])
    items: list[Any] = []
    for i, source in enumerate(pool):
        found = _pool_items(str(source))
        if not found:
            raise ConfigError([f"--pool: '{source}' holds no real images (.png/.jpg)"])
        # Manifest groups are local to their manifest.
        items += [replace(it, group=None if it.group is None else f"{i}:{it.group}") for it in found]
    try:
        pil, items, _ = fpdata.load_images(items)
    except fpdata.DataError as e:
        raise ConfigError([f"--pool: {e}"]) from e
    pixels = np.rint(images_to_array(pil, image_size) * 255.0).astype(np.uint8)
    # Exact duplicates (the same slice in two pools) would otherwise be counted twice.
    first: dict[bytes, int] = {}
    keep, duplicates = [], []
    for j, im in enumerate(pil):
        key = hashlib.sha1(im.tobytes() + repr(im.size).encode()).digest()
        if key in first:
            duplicates.append((str(items[j].path), str(items[first[key]].path)))
        else:
            first[key] = j
            keep.append(j)
    items = [items[j] for j in keep]
    pil = [pil[j] for j in keep]
    pixels = pixels[keep]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a lopsided grouping shows up as a split error naming the flag instead
        groups = real_groups(items, pil, group_threshold)
    return PoolImages([str(it.path) for it in items], pixels, np.asarray(groups, dtype=np.int64), duplicates,
                      [os.path.normpath(str(p)) for p in pool])


# --------------------------------------------------------------------------------------------------- split


def _fill(groups: list[int], sizes: dict[int, int], targets: Sequence[float]) -> tuple[list[list[int]], list[int]]:
    """Deal ``groups`` in order to the bin furthest below its target until every target is met; the rest is left."""
    bins: list[list[int]] = [[] for _ in targets]
    have = [0] * len(targets)
    rest = []
    for g in groups:
        short = [(have[b] / t if t > 0 else 1.0, b) for b, t in enumerate(targets) if have[b] < t or not bins[b]]
        if not short:
            rest.append(g)
            continue
        b = min(short)[1]
        bins[b].append(g)
        have[b] += sizes[g]
    return bins, rest


def split_groups(groups: np.ndarray, build: BuildSettings, seed: int) -> dict[str, np.ndarray]:
    """Indices of dev_used, test_used, dev_not_used, test_not_used, trained (the generator's training set: the
    used images, or with ``null_control`` as many other images) and left_out images (whole groups each).

    Raises ConfigError naming --members or --pool when the pool cannot give both sides of dev and test a group.
    """
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(groups, return_counts=True)
    sizes = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    order = [int(g) for g in rng.permutation(ids)]
    n = len(groups)
    if len(ids) < 4:
        raise ConfigError([f"--pool: {n} images in {len(ids)} pseudo-patient group(s); a benchmark needs at least 4 "
                           "groups (members and non-members, each in dev and test). Add images, or raise "
                           "--group-threshold to split groups more finely."])

    def take(candidates: list[int]) -> tuple[list[int], int]:
        chosen, total = [], 0
        for g in candidates:
            if total >= build.members and len(chosen) >= 2:
                break
            chosen.append(g)
            total += sizes[g]
        return chosen, total

    members, total = take(order)
    trained, taken = members, total
    if build.null_control:
        # The next groups of the same shuffled order: drawn exactly like the labelled used images, never released.
        trained, t_total = take([g for g in order if g not in set(members)])
        taken += t_total
    others = [g for g in order if g not in set(members) | set(trained)]
    if len(others) < 2:
        share = (2 if build.null_control else 1) + build.non_member_ratio  # pool images per member
        held = "members and the null control's training set take" if build.null_control else "members take"
        raise ConfigError([f"--members: {build.members} {held} {taken} of the {n} pool images, leaving "
                           f"{n - taken} image(s) in {len(others)} group(s) for non-members; at least 2 groups are "
                           f"needed (dev and test). Use fewer members (at most about {int(n / share)}) or a "
                           "bigger --pool."])
    (dev_m, test_m), _ = _fill(members, sizes, [build.dev_fraction * total, (1 - build.dev_fraction) * total])
    if not test_m:  # one huge group took every member slot of dev
        test_m.append(dev_m.pop())
    n_dev_m, n_test_m = (sum(sizes[g] for g in side) for side in (dev_m, test_m))
    (dev_n, test_n), rest = _fill(others, sizes, [build.non_member_ratio * n_dev_m, build.non_member_ratio * n_test_m])

    def idx(gs: list[int]) -> np.ndarray:
        return np.flatnonzero(np.isin(groups, gs)).astype(np.int64)

    return {"dev_used": idx(dev_m), "test_used": idx(test_m), "dev_not_used": idx(dev_n),
            "test_not_used": idx(test_n), "trained": idx(trained if build.null_control else dev_m + test_m),
            "left_out": idx(rest)}


# --------------------------------------------------------------------------------------------------- build


def stage_seeds(seed: int) -> dict[str, int]:
    """Independent seeds for a build's stages (split, train, dev, test, shuffle) from its one seed: a null split
    drawn elsewhere (`fingerprint null-calibration`) with the same seed is the zoo's."""
    names = ("split", "train", "dev", "test", "shuffle")
    kids = np.random.SeedSequence(int(seed) % 2**63).spawn(len(names))
    return {k: int(s.generate_state(1)[0]) for k, s in zip(names, kids, strict=True)}


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def nn_l2_auc(used: np.ndarray, not_used: np.ndarray, generated: np.ndarray) -> float:
    """ROC AUC of minus the L2 distance to the nearest generated image, used (1) versus not used (0)."""
    from sklearn.metrics import roc_auc_score

    g = generated.reshape(len(generated), -1).astype(np.float64) / 255.0
    r = np.concatenate([used, not_used]).reshape(len(used) + len(not_used), -1).astype(np.float64) / 255.0
    d = ((r**2).sum(1)[:, None] - 2.0 * r @ g.T + (g**2).sum(1)[None, :]).min(axis=1)
    y = np.r_[np.ones(len(used)), np.zeros(len(not_used))]
    return float(roc_auc_score(y, -d))


def build_benchmark(out: str | Path, pool: Sequence[str | Path] | PoolImages, family_name: str,
                    settings: dict[str, Any] | None = None, build: BuildSettings | None = None, *,
                    name: str | None = None, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Train ``family_name`` on part of ``pool`` and write a benchmark to ``out`` (see the module docstring).

    ``pool``: paths (benchmark folders, image folders, manifests) or an already loaded :class:`PoolImages` at
    ``build.image_size``. Returns what zoo.json holds. Raises ConfigError naming the flag for bad input.
    """
    from fingerprint.zoo.base import create_generator

    t0 = time.perf_counter()
    build = build or BuildSettings()
    out = Path(out)
    problems = build.problems()
    if out.exists() and not overwrite:
        problems.append(f"--out: '{out}' exists; pass --overwrite to replace it")
    if problems:
        raise ConfigError(problems)
    gen = create_generator(family_name, settings or {})  # ConfigError naming --family / --settings
    seeds = stage_seeds(build.seed)
    if not isinstance(pool, PoolImages):
        pool = load_pool([str(p) for p in pool], build.image_size, build.group_threshold)
    elif pool.pixels.shape[1] != build.image_size:
        raise ValueError(f"pool images are {pool.pixels.shape[1]} px but --image-size is {build.image_size}")
    parts = split_groups(pool.groups, build, seeds["split"])
    t_load = time.perf_counter() - t0

    train_idx = parts["trained"]
    log.info("%s: training %s on %d images (%d groups) of %d in the pool", name or out.name, family_name,
             len(train_idx), len(np.unique(pool.groups[train_idx])), len(pool.sources))
    t1 = time.perf_counter()
    history = gen.fit(pool.pixels[train_idx].astype(np.float32) / 255.0, seed=seeds["train"], progress=progress)
    t_fit = time.perf_counter() - t1
    t2 = time.perf_counter()
    dev_gen = _to_u8(gen.sample(build.dev_generated, seed=seeds["dev"], temperature=build.temperature))
    test_gen = _to_u8(gen.sample(build.test_generated, seed=seeds["test"], temperature=build.temperature))
    t_sample = time.perf_counter() - t2

    rng = np.random.default_rng(seeds["shuffle"])
    dev_used, dev_not = rng.permutation(parts["dev_used"]), rng.permutation(parts["dev_not_used"])
    test_real = np.concatenate([parts["test_used"], parts["test_not_used"]])
    test_lab = np.r_[np.ones(len(parts["test_used"]), np.int64), np.zeros(len(parts["test_not_used"]), np.int64)]
    perm = rng.permutation(len(test_real))
    test_real, test_lab = test_real[perm], test_lab[perm]

    px = pool.pixels
    checks = {"nn_l2_auc_dev": nn_l2_auc(px[dev_used], px[dev_not], dev_gen),
              "nn_l2_auc_test": nn_l2_auc(px[test_real[test_lab == 1]], px[test_real[test_lab == 0]], test_gen)}
    counts = {"pool": len(pool.sources), "pool_groups": int(len(np.unique(pool.groups))),
              "duplicates_dropped": len(pool.duplicates), "members": int(len(train_idx)),
              "member_groups": int(len(np.unique(pool.groups[train_idx]))),
              "labelled_used": int(len(dev_used) + len(parts["test_used"])),
              "dev_generated": build.dev_generated, "dev_used": int(len(dev_used)), "dev_not_used": int(len(dev_not)),
              "test_generated": build.test_generated, "test_real_unknown": int(len(test_real)),
              "test_used": int(test_lab.sum()), "test_not_used": int(len(test_lab) - test_lab.sum()),
              "left_out": int(len(parts["left_out"]))}

    t3 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        write_generated(tmp, dev_gen, test_gen)
        # Group numbers in order of first appearance in the written files, so they tell nothing about the pool.
        renum: dict[int, int] = {}
        group_rows: list[tuple[str, int]] = []
        files: dict[str, dict[str, Any]] = {}

        def put(j: int, rel: str, label: int) -> None:
            g = renum.setdefault(int(pool.groups[j]), len(renum))
            save_gray_png(px[j], tmp / rel)
            group_rows.append((Path(rel).stem, g))
            files[rel] = {"source": pool.sources[j], "label": label, "group": g}

        for role, idxs, label in (("used", dev_used, 1), ("not_used", dev_not, 0)):
            for i, j in enumerate(idxs, 1):
                put(int(j), f"dev/{role}/{role}_{i:04d}.png", label)
        label_rows = []
        for i, (j, lab) in enumerate(zip(test_real, test_lab, strict=True), 1):
            put(int(j), f"test/real_unknown/real_unknown_{i:04d}.png", int(lab))
            label_rows.append((f"real_unknown_{i:04d}", int(lab)))
        for fname, header, rows in (("test_labels.csv", ("id", "label"), label_rows),
                                    ("groups.csv", ("id", "group"), group_rows)):
            with open(tmp / fname, "w", newline="") as f:
                wr = csv.writer(f, lineterminator="\n")
                wr.writerow(header)
                wr.writerows(rows)
        split = {"seed": build.seed, "seeds": seeds, **({"null_control": True} if build.null_control else {}),
                 "members": [pool.sources[j] for j in train_idx],
                 "files": files, "left_out": [pool.sources[j] for j in parts["left_out"]],
                 "duplicates_dropped": [{"file": a, "same_as": b} for a, b in pool.duplicates]}
        (tmp / "split.json").write_text(json.dumps(split, indent=1) + "\n")
        gen.save(tmp / "generator")
        t_write = time.perf_counter() - t3
        import torch

        record = {
            "name": name or out.name, "family": family_name,
            # What the suite groups its report by (fingerprint.evaluation.suite.zoo_info): known, not measured.
            **({"memorisation": NULL_LEVEL} if build.null_control else {}),
            "settings": dataclasses.asdict(gen.settings),
            "build": dataclasses.asdict(build), "seed": build.seed, "counts": counts, "checks": checks,
            "generator_extra": gen.extra, "history": history,
            "timing": {"load_split_s": round(t_load, 2), "fit_s": round(t_fit, 2), "sample_s": round(t_sample, 2),
                       "write_s": round(t_write, 2), "total_s": round(time.perf_counter() - t0, 2),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "machine": platform.machine()},
        }
        (tmp / "zoo.json").write_text(json.dumps(record, indent=1, default=jsonable) + "\n")
        (tmp / "README.md").write_text(_readme(record, pool, gen))
    log.info("%s: wrote %s (fit %.0f s, sample %.0f s; pixel NN-L2 AUC dev %.3f, test %.3f)", record["name"], out,
             t_fit, t_sample, checks["nn_l2_auc_dev"], checks["nn_l2_auc_test"])
    return record


def _readme(r: dict[str, Any], pool: PoolImages, gen: Any) -> str:
    from fingerprint.zoo.base import family as family_of

    c, b, s = r["counts"], r["build"], r["settings"]
    docs = field_docs(type(gen.settings))
    settings_lines = "\n".join(f"  - `{k}` = {v!r}: {docs.get(k, '')}" for k, v in s.items())
    roots = pool.roots or sorted({str(Path(p).parent) for p in pool.sources})
    pool_text = ", ".join(f"`{x}`" for x in roots[:6]) + (" ..." if len(roots) > 6 else "")
    hist = r["history"]
    last = ", ".join(f"{k} {v:.4g}" for k, v in hist[-1].items() if k not in ("step", "seconds")) if hist else ""
    if b.get("null_control"):
        null_text = f"""
**A null control.** Nothing labelled used here was in the generator's training set: the generator trained on
{c['members']} other pool images ({c['member_groups']} groups, drawn like the labelled used images and released
nowhere), and the {c['labelled_used']} images labelled used (`dev/used/`, label 1 in `test_labels.csv`) are as new
to it as the not-used ones. Any detector should score at chance here, a memorisation test should find no evidence,
and every image a detector flags is a false accusation.
"""
        training_text = f"""Training set: {c['members']} pool images in {c['member_groups']} groups (asked for about
{b['members']}), none of them released (listed in `split.json` as `members`). Labelled used, but not trained on:
{c['labelled_used']} images, the {c['dev_used']} in `dev/used/` and the {c['test_used']} labelled 1 in
`test/real_unknown/`."""
        used_text = "real images labelled used (NOT in the training set: a null control)"
        label_text = "1 = labelled used"
        sides_text = ("the labelled-used side, the training side (released nowhere) or the held-out side, and "
                      "the two released sides to dev or test")
    else:
        null_text = ""
        training_text = f"""Training set: {c['members']} images in {c['member_groups']} groups (asked for about
{b['members']}); all of them are released: the {c['dev_used']} images in `dev/used/` and the {c['test_used']} used
images in `test/real_unknown/`."""
        used_text, label_text = "real images that WERE in the generator's training set", "1 = used for training"
        sides_text = "the training side (members) or the held-out side, and within each side to dev or test"
    return f"""# {r['name']}: membership-inference benchmark made by `fingerprint zoo`

## What this is
A benchmark in the layout of the shared ctbench benchmarks (and of the ImageCLEFmedical GANs task): a generator
(`{r['family']}`) was trained on a known subset of a pool of real images; given its generated images, which real
images were in its training set? All images are 8-bit grayscale PNG files, {b['image_size']} x {b['image_size']}
pixels. Made with seed {b['seed']}; the same command with the same seed rewrites the same images.
{null_text}
## Layout and counts
- `dev/generated/`: {c['dev_generated']} generated images (`gen_00001.png` ...).
- `dev/used/`: {c['dev_used']} {used_text} (`used_0001.png` ...).
- `dev/not_used/`: {c['dev_not_used']} real images that were NOT (`not_used_0001.png` ...).
- `test/generated/`: {c['test_generated']} generated images, sampled from the same generator with another seed.
- `test/real_unknown/`: {c['test_real_unknown']} real images, shuffled and renamed (`real_unknown_0001.png` ...):
  {c['test_used']} used and {c['test_not_used']} not used. The names reveal nothing.
- `test_labels.csv`: `id,label` for `test/real_unknown` ({label_text}). `groups.csv`: `id,group`, the
  pseudo-patient of every real image. `split.json`: the pool file behind every real image, the training set and
  the images left out. `generator/`: the trained generator (`fingerprint.zoo.load_generator`). `zoo.json`: family,
  settings, build settings, training history, timing and checks.

`test_labels.csv`, `split.json`, `zoo.json` and this README are answer keys: do not fit or tune a detector on them.

## Real images
{c['pool']} distinct real images from the pool ({pool_text}; every real image of each source, whatever its label
there; {c['duplicates_dropped']} exact duplicate(s) dropped), resized to
{b['image_size']} x {b['image_size']} (bicubic). Without patient identifiers they were clustered into {c['pool_groups']}
pseudo-patient groups (average-linkage clustering on normalised-correlation distance of 32 x 32 thumbnails, cut at
correlation {b['group_threshold']}; a manifest's groups where every image had one). Whole groups were assigned to
{sides_text}, so dev and test real images
come from different groups. The grouping is approximate: two groups may still come from one patient.

{training_text}
Non-members: {b['non_member_ratio']:g} per member on each side as far as whole groups allow; {c['left_out']} pool
images were left out.

## How the generator was trained
Family `{r['family']}`: {family_of(r['family']).description}
Settings:
{settings_lines}

Trained on CPU for {hist[-1]['step'] if hist else 0} iterations in {r['timing']['fit_s']:.0f} s (last logged losses:
{last}).
Generated images were sampled with temperature {b['temperature']:g}; dev and test use different seeds.

## What a simple baseline reaches (dev, used versus not used)
Pixel nearest neighbour, minus the L2 distance to the nearest dev generated image: ROC AUC
{r['checks']['nn_l2_auc_dev']:.3f} (0.5 = no memorisation visible to it).
"""


# --------------------------------------------------------------------------------------------------- suites


def load_suite(spec: str | Path) -> Any:
    """Read and validate a suite YAML (see benchmarks/zoo/suite.yaml); ConfigError names the entry and field."""
    import yaml
    from pydantic import ValidationError

    from fingerprint.zoo.suite import Suite, check_suite

    path = Path(spec)
    if not path.is_file():
        raise ConfigError([f"--spec: '{spec}' does not exist; give a suite YAML such as benchmarks/zoo/suite.yaml"])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"--spec: {path} is not valid YAML ({e})"]) from e
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = list(err["loc"])
            where = ".".join(str(p) for p in loc)
            if len(loc) >= 2 and loc[0] == "entries" and isinstance(loc[1], int):
                entries = raw.get("entries") if isinstance(raw, dict) else None
                entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
                label = entry.get("name") if isinstance(entry, dict) else None
                rest = ".".join(str(p) for p in loc[2:])
                where = f"entry {loc[1]}" + (f" ({label})" if label else "") + (f", field {rest}" if rest else "")
            problems.append(f"--spec: {path}: {where}: {err['msg']}")
        raise ConfigError(problems) from e
    check_suite(suite, path)
    return suite


def built_as(target: Path, family_name: str, settings: dict[str, Any], build: BuildSettings) -> dict[str, Any] | None:
    """The zoo.json of ``target`` when it was built with this family, these settings and build settings, else None
    (a spec edited after a build must not keep the old benchmark)."""
    path = Path(target) / "zoo.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(build)))
    # A build setting added since that build took its default there.
    default = json.loads(json.dumps(dataclasses.asdict(BuildSettings())))
    same = (record.get("family") == family_name
            and all(record.get("settings", {}).get(k) == v for k, v in json.loads(json.dumps(settings)).items())
            and all(record.get("build", {}).get(k, default[k]) == v for k, v in wanted.items()))
    return record if same else None


def build_suite(spec: str | Path, out: str | Path, *, pool: Sequence[str] | None = None, only: Sequence[str] = (),
                overwrite: bool = False, progress: bool = False, reseed: int = 0) -> list[dict[str, Any]]:
    """Build every entry of the suite ``spec`` (or those named in ``only``) into ``out/<name>/``.

    ``reseed`` is added to every entry's seed: a fresh draw of the same suite (other splits of the pool, other
    generator weights and samples) to report on after choices were made on the first.

    Entries whose folder already holds a zoo.json are kept (resumable) unless ``overwrite``. Pools are loaded
    once per distinct (pool, image size, grouping threshold). Writes ``out/suite.json`` with one line per entry.
    """
    suite = load_suite(spec)
    out = Path(out)
    entries = suite.entries
    if only:
        unknown = sorted(set(only) - {e.name for e in entries})
        if unknown:
            raise ConfigError([f"--only: no entry named {', '.join(unknown)} in {spec}; entries: "
                               + ", ".join(e.name for e in entries)])
        entries = [e for e in entries if e.name in set(only)]
    base = Path(spec).resolve().parent
    pools: dict[tuple, PoolImages] = {}
    records = []
    for entry in entries:
        target = out / entry.name
        build = suite.build_settings(entry, reseed)
        kept = built_as(target, entry.family, entry.settings, build)
        if kept is not None and not overwrite:
            log.info("%s: %s is built with these settings, kept (pass --overwrite to rebuild)", entry.name, target)
            records.append(kept)
            continue
        sources = list(pool) if pool else suite.pool_paths(entry, base)
        key = (tuple(sources), build.image_size, build.group_threshold)
        if key not in pools:
            pools[key] = load_pool(sources, build.image_size, build.group_threshold)
        try:
            records.append(build_benchmark(target, pools[key], entry.family, entry.settings, build, name=entry.name,
                                           overwrite=True, progress=progress))
        except ConfigError as e:
            raise ConfigError([f"entry {entry.name}: {p}" for p in e.problems]) from e
    summary = [{"name": r["name"], "family": r["family"], "members": r["counts"]["members"],
                **({"memorisation": r["memorisation"]} if "memorisation" in r else {}),
                "fit_s": r["timing"]["fit_s"], "total_s": r["timing"]["total_s"], **r["checks"]} for r in records]
    write_text_atomic(out / "suite.json", json.dumps({"spec": str(spec), "reseed": reseed, "entries": summary},
                                                     indent=1) + "\n")
    return records


def generator_recipe(path: str | Path) -> dict[str, Any] | None:
    """How the generator of the zoo benchmark at ``path`` was trained, as settings of the ``shadow`` detector kind
    (family, its settings, sampler temperature, image side), from its ``zoo.json``, or from ``path`` itself when it
    is a file shaped like one; None without a usable one.

    Only the recipe is read, never the split or the checks: a shadow detector may assume the target's family and
    training settings are known, not its training set."""
    file = Path(path) if Path(path).is_file() else Path(path) / "zoo.json"
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
        build = record.get("build") or {}
        recipe = {"family": str(record["family"]),
                  "generator_settings": json.dumps(dict(record["settings"]), sort_keys=True),
                  "temperature": float(build.get("temperature", 1.0)),
                  "generator_size": int(build.get("image_size", 0))}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("%s: no usable generator recipe (%s: %s); shadow detectors use their stand-in", file,
                    type(e).__name__, e)
        return None
    return recipe
