"""Tests for the synthetic sample data: phantoms, the PCA stand-in generator and the benchmark writer."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fingerprint.data.phantoms import PCAGenerator, make_patients, make_phantom, make_sample_dataset

# Small but complete: every split gets at least one patient, and it builds in a fraction of a second.
TINY = dict(n_patients=6, slices_per_patient=2, n_generated_dev=10, n_generated_test=12, n_reference_patients=4)


def _load_dir(d: Path) -> tuple[list[str], np.ndarray]:
    files = sorted(d.glob("*.png"))
    return [f.stem for f in files], np.stack([np.array(Image.open(f)) for f in files])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _nn_corr(real: np.ndarray, gen: np.ndarray) -> np.ndarray:
    """Max normalised (Pearson) correlation of each real image with any generated image."""

    def norm(a: np.ndarray) -> np.ndarray:
        a = a.reshape(len(a), -1).astype(np.float64)
        a = a - a.mean(axis=1, keepdims=True)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return (norm(real) @ norm(gen).T).max(axis=1)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney probability P(score_pos > score_neg), ties counted half."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _dev_nn_auc(root: Path) -> float:
    _, gen = _load_dir(root / "dev/generated")
    _, used = _load_dir(root / "dev/used")
    _, not_used = _load_dir(root / "dev/not_used")
    return _auc(_nn_corr(used, gen), _nn_corr(not_used, gen))


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("strong") / "bench"
    return root, make_sample_dataset(root, memorisation=0.95, seed=0)


def test_phantom_looks_like_a_ct_slice() -> None:
    img = make_phantom(np.random.default_rng(0))
    assert img.shape == (64, 64) and img.dtype == np.uint8
    # Black outside the circular field of view, as in the real slices.
    assert img[0, 0] == img[0, -1] == img[-1, 0] == img[-1, -1] == 0
    # Lungs (left and right of centre) are darker than the soft tissue of the mediastinum between them.
    assert img[28:36, 14:20].mean() < img[28:36, 29:35].mean() - 30
    assert make_phantom(np.random.default_rng(0), size=32).shape == (32, 32)
    with pytest.raises(ValueError, match="size"):
        make_phantom(np.random.default_rng(0), size=4)


def test_patients_are_grouped_and_neighbouring_slices_alike() -> None:
    imgs, groups = make_patients(np.random.default_rng(1), n_patients=3, slices_per_patient=3, size=64)
    assert imgs.shape == (9, 64, 64) and imgs.dtype == np.uint8
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x = imgs.reshape(9, -1).astype(float)
    corr = np.corrcoef(x)
    same = [corr[i, i + 1] for i in (0, 1, 3, 4, 6, 7)]
    other = [corr[i, j] for i in range(9) for j in range(9) if groups[i] != groups[j]]
    assert min(same) > max(other)
    with pytest.raises(ValueError, match="slices_per_patient"):
        make_patients(np.random.default_rng(0), 2, 100)


def test_pca_generator_memorisation_extremes() -> None:
    imgs, _ = make_patients(np.random.default_rng(2), n_patients=4, slices_per_patient=2)
    # memorisation=1 with all components: samples are the training images (up to rounding).
    gen = PCAGenerator(n_components=100, memorisation=1.0).fit(imgs)
    samples = gen.sample(20, np.random.default_rng(0))
    assert samples.shape == (20, 64, 64) and samples.dtype == np.uint8
    dists = np.abs(samples[:, None].astype(int) - imgs[None].astype(int)).max(axis=(2, 3)).min(axis=1)
    assert dists.max() <= 1
    # memorisation=0: no sample is a copy.
    gen0 = PCAGenerator(n_components=100, memorisation=0.0).fit(imgs)
    d0 = np.abs(gen0.sample(20, np.random.default_rng(0))[:, None].astype(int) - imgs[None]).mean(axis=(2, 3))
    assert d0.min() > 2
    with pytest.raises(RuntimeError, match="before fit"):
        PCAGenerator().sample(1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="memorisation"):
        PCAGenerator(memorisation=1.5)
    with pytest.raises(ValueError, match="basis_images"):
        PCAGenerator().fit(imgs, basis_images=imgs[:, :32, :32])


def test_layout_counts_and_readme(strong: tuple[Path, dict[str, int]]) -> None:
    root, counts = strong
    assert counts == {
        "patients": 30, "used_patients": 15, "train_images": 60, "dev_generated": 200, "dev_used": 40,
        "dev_not_used": 40, "test_generated": 200, "test_real_unknown": 40, "test_used": 20, "test_not_used": 20,
    }
    expected = {
        "dev/generated": [f"gen_{i:05d}" for i in range(1, 201)],
        "dev/used": [f"used_{i:04d}" for i in range(1, 41)],
        "dev/not_used": [f"not_used_{i:04d}" for i in range(1, 41)],
        "test/generated": [f"gen_{i:05d}" for i in range(1, 201)],
        "test/real_unknown": [f"real_unknown_{i:04d}" for i in range(1, 41)],
    }
    for sub, stems in expected.items():
        got, imgs = _load_dir(root / sub)
        assert got == stems, sub
        assert imgs.shape[1:] == (64, 64) and imgs.dtype == np.uint8
    assert {p.name for p in root.iterdir()} == {"dev", "test", "test_labels.csv", "groups.csv", "README.md"}
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "temp folder left behind"
    readme = (root / "README.md").read_text()
    assert "seed=0" in readme and "NOT a GAN" in readme and "60 slices of the used patients" in readme


def test_test_labels_match_real_unknown(strong: tuple[Path, dict[str, int]]) -> None:
    root, counts = strong
    rows = _read_csv(root / "test_labels.csv")
    stems, _ = _load_dir(root / "test/real_unknown")
    assert [r["id"] for r in rows] == stems
    labels = [int(r["label"]) for r in rows]
    assert set(labels) == {0, 1}
    assert sum(labels) == counts["test_used"] and len(labels) - sum(labels) == counts["test_not_used"]
    # Shuffled: the labels are not in blocks.
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)


def test_groups_never_straddle_splits(strong: tuple[Path, dict[str, int]]) -> None:
    root, _ = strong
    group = {r["id"]: int(r["group"]) for r in _read_csv(root / "groups.csv")}
    labels = {r["id"]: int(r["label"]) for r in _read_csv(root / "test_labels.csv")}
    real_ids = [p.stem for sub in ("dev/used", "dev/not_used", "test/real_unknown")
                for p in (root / sub).glob("*.png")]
    assert sorted(group) == sorted(real_ids)
    used = {g for i, g in group.items() if i.startswith("used_") or labels.get(i) == 1}
    not_used = {g for i, g in group.items() if i.startswith("not_used_") or labels.get(i) == 0}
    dev = {g for i, g in group.items() if not i.startswith("real_unknown_")}
    test = {g for i, g in group.items() if i.startswith("real_unknown_")}
    assert used and not_used and not used & not_used
    assert dev and test and not dev & test


def test_memorisation_knob_controls_nearest_neighbour_auc(strong: tuple[Path, dict[str, int]],
                                                           tmp_path: Path) -> None:
    root, _ = strong
    auc_strong = _dev_nn_auc(root)
    weak = tmp_path / "weak"
    make_sample_dataset(weak, memorisation=0.0, seed=0)
    auc_weak = _dev_nn_auc(weak)
    assert auc_strong > 0.8, auc_strong
    assert auc_weak < auc_strong - 0.2, (auc_weak, auc_strong)


def test_deterministic_given_seed(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = files((make_sample_dataset(tmp_path / "a", seed=3, **TINY), tmp_path / "a")[1])
    b = files((make_sample_dataset(tmp_path / "b", seed=3, **TINY), tmp_path / "b")[1])
    c = files((make_sample_dataset(tmp_path / "c", seed=4, **TINY), tmp_path / "c")[1])
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_refuses_existing_folder_and_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    make_sample_dataset(out, seed=1, **TINY)
    marker = out / "dev/used/used_0001.png"
    before = marker.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_sample_dataset(out, seed=2, **TINY)
    assert marker.read_bytes() == before
    make_sample_dataset(out, seed=2, overwrite=True, **TINY)
    assert marker.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    with pytest.raises(ValueError, match="n_patients") as err:
        make_sample_dataset(tmp_path / "x", n_patients=3, memorisation=2.0)
    assert "memorisation" in str(err.value)  # all problems reported at once
    assert not (tmp_path / "x").exists()
