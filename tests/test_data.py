"""Tests for fingerprint.data.images: layouts, decoding, bad files, grouping and group-aware splits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fingerprint.data.images import (
    ROLES,
    DataError,
    ImageItem,
    group_kfold,
    group_split,
    infer_groups,
    load_array,
    load_image,
    load_images,
    open_benchmark,
    open_folder,
    repeated_group_kfold,
)

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def _png(path: Path, value: int = 0, size: tuple[int, int] = (8, 8), seed: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        a = np.full((size[1], size[0]), value, dtype=np.uint8)
    else:
        a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(a, mode="L").save(path)
    return path


def _fill(folder: Path, n: int, prefix: str, start_seed: int = 0) -> None:
    for i in range(n):
        _png(folder / f"{prefix}_{i + 1:04d}.png", seed=start_seed + i)


# ------------------------------------------------------------------------------------------------ layouts


def test_role_folders_layout(tmp_path: Path) -> None:
    _fill(tmp_path / "generated", 3, "gen")
    _fill(tmp_path / "used", 2, "used", 10)
    _fill(tmp_path / "not_used", 2, "not_used", 20)
    (tmp_path / "used" / "README.md").write_text("ignored")
    (tmp_path / "used" / "labels.csv").write_text("id,label\n")
    (tmp_path / "used" / ".hidden.png").write_bytes(b"junk")  # hidden: ignored even with an image suffix
    s = open_folder(tmp_path, require=("generated", "used", "not_used"))
    assert s.counts() == {"generated": 3, "used": 2, "not_used": 2, "real_unknown": 0}
    assert [it.id for it in s.real] == ["used_0001", "used_0002", "not_used_0001", "not_used_0002"]
    assert [it.label for it in s.real] == [1, 1, 0, 0]
    assert all(it.label is None and it.role == "generated" for it in s.generated)
    assert s.role("real_unknown") == [] and s.skipped == []
    assert "generated 3" in s.summary() and "used 2" in s.summary()


def test_imageclef_dev_and_test_names(tmp_path: Path) -> None:
    dev, test = tmp_path / "dev", tmp_path / "test"
    _fill(dev / "img_gen" / "generated", 2, "gen")
    _fill(dev / "img_real" / "used", 2, "used", 10)
    _fill(dev / "img_real" / "not_used", 1, "not_used", 20)
    _fill(test / "generated_1", 3, "gen", 30)
    _fill(test / "real_unknown_1", 2, "real_unknown", 40)
    d, t = open_benchmark(tmp_path)
    assert d.counts() == {"generated": 2, "used": 2, "not_used": 1, "real_unknown": 0}
    assert t is not None
    assert t.counts() == {"generated": 3, "used": 0, "not_used": 0, "real_unknown": 2}
    assert [it.id for it in t.real] == ["real_unknown_0001", "real_unknown_0002"]
    assert all(it.label is None for it in t.real)
    # A folder without dev/test is one set.
    only, none = open_benchmark(test)
    assert none is None and len(only) == 5


def test_shared_stem_across_roles_gets_role_prefix(tmp_path: Path) -> None:
    _png(tmp_path / "generated" / "0001.png", seed=1)
    _png(tmp_path / "used" / "0001.png", seed=2)
    _png(tmp_path / "used" / "0002.png", seed=3)
    s = open_folder(tmp_path)
    assert sorted(it.id for it in s.items) == ["0002", "generated_0001", "used_0001"]


def test_ambiguous_role_folders(tmp_path: Path) -> None:
    _fill(tmp_path / "generated", 1, "gen")
    _fill(tmp_path / "img_gen" / "generated", 1, "gen")
    with pytest.raises(DataError, match="more than one folder for role 'generated'"):
        open_folder(tmp_path)


def test_manifest_relative_paths_labels_groups(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "g1.png", seed=1)
    _png(tmp_path / "imgs" / "a.png", seed=2)
    _png(tmp_path / "imgs" / "b.jpg", seed=3)
    _png(tmp_path / "other" / "c.png", seed=4)
    csv_path = tmp_path / "lists" / "dev.csv"
    csv_path.parent.mkdir()
    csv_path.write_text(
        "path,role,label,group\n"
        "../imgs/g1.png,generated,,\n"
        "../imgs/a.png,used,1,p7\n"
        "../imgs/b.jpg,not_used,,p8\n"
        f"{tmp_path / 'other' / 'c.png'},real_unknown,,\n"
    )
    s = open_folder(csv_path, require=("generated", "used"))
    by_id = {it.id: it for it in s.items}
    assert set(by_id) == {"g1", "a", "b", "c"}
    assert by_id["a"].label == 1 and by_id["a"].group == "p7"
    assert by_id["b"].label == 0 and by_id["b"].group == "p8"
    assert by_id["c"].label is None and by_id["c"].role == "real_unknown" and by_id["c"].group is None
    assert by_id["a"].path.resolve() == (tmp_path / "imgs" / "a.png").resolve()


def test_manifest_inside_folder_without_label_column(tmp_path: Path) -> None:
    _png(tmp_path / "x" / "s1.png", seed=1)
    _png(tmp_path / "y" / "s1.png", seed=2)  # same stem and role: id falls back to the relative path
    _png(tmp_path / "x" / "n.png", seed=3)
    (tmp_path / "manifest.csv").write_text("role,path\nused,x/s1.png\nused,y/s1.png\nnot_used,x/n.png\n")
    s = open_folder(tmp_path)
    assert sorted(it.id for it in s.real) == ["n", "x/s1", "y/s1"]
    assert [it.label for it in s.real] == [1, 1, 0]


@pytest.mark.parametrize(
    "body, match",
    [
        ("file,role\na.png,used\n", "bad manifest header"),
        ("path,role\na.png,train\n", "line 2: unknown role 'train'"),
        ("path,role,label\na.png,used,0\n", "line 2: label '0' does not fit role 'used'"),
        ("path,role\na.png,used\na.png,used\n", "listed twice"),
        ("", "manifest is empty"),
    ],
)
def test_manifest_errors(tmp_path: Path, body: str, match: str) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(DataError, match=match):
        open_folder(tmp_path / "m.csv")


def test_manifest_missing_file_is_bad_file(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", seed=1)
    (tmp_path / "m.csv").write_text("path,role\na.png,used\ngone.png,used\n")
    with pytest.raises(DataError, match=r"gone\.png.*--skip-bad"):
        open_folder(tmp_path / "m.csv")
    s = open_folder(tmp_path / "m.csv", skip_bad=True)
    assert [it.id for it in s.items] == ["a"]
    assert s.skipped[0][0].name == "gone.png"


# ------------------------------------------------------------------------------------------------ errors


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        open_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no such benchmark folder"):
        open_benchmark(tmp_path / "nope")


def test_unrecognised_layout_lists_what_was_found(tmp_path: Path) -> None:
    _fill(tmp_path / "train", 2, "x")
    with pytest.raises(DataError, match=r"subfolders train/[\s\S]*Expected one of these layouts"):
        open_folder(tmp_path)


def test_required_role_empty(tmp_path: Path) -> None:
    _fill(tmp_path / "generated", 2, "gen")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("x")
    with pytest.raises(DataError) as e:
        open_folder(tmp_path, require=("generated", "used"))
    msg = str(e.value)
    assert "required role(s) used" in msg and "generated 2" in msg and "1 .txt file(s)" in msg
    assert "img_real/used" in msg  # names the expected layout
    # Not required: fine.
    assert len(open_folder(tmp_path)) == 2


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
        ("text.png", lambda p: p.write_text("this is not an image\n" * 20), "not a readable"),
        ("corrupt.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), "not a readable"),
        ("truncated.png", _truncated_png, "not a readable"),
    ],
)
def test_bad_files(tmp_path: Path, name: str, make, reason: str) -> None:
    _fill(tmp_path / "used", 2, "used")
    bad = tmp_path / "used" / name
    make(bad)
    with pytest.raises(DataError) as e:
        open_folder(tmp_path)
    assert str(bad) in str(e.value) and "--skip-bad" in str(e.value) and reason in str(e.value)
    s = open_folder(tmp_path, skip_bad=True)
    assert len(s) == 2 and [p for p, _ in s.skipped] == [bad] and reason in s.skipped[0][1]
    assert "1 bad file(s) skipped" in s.summary()
    with pytest.raises(DataError, match="--skip-bad"):
        load_image(bad)
    item = ImageItem(id="b", path=bad, role="used", label=1, group=None)
    images, kept, skipped = load_images([*s.items, item], skip_bad=True)
    assert len(images) == len(kept) == 2 and skipped[0][0] == bad
    with pytest.raises(DataError, match=name):
        load_images([item])


def test_all_bad_then_required_role_mentions_skipped(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="1 bad file"):
        open_folder(tmp_path, skip_bad=True, require=("used",))


# ------------------------------------------------------------------------------------------------ decoding


def test_16bit_png_scaled_by_bit_depth(tmp_path: Path) -> None:
    a12 = np.array([[0, 1000], [2047, 4095]], dtype=np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(a12).save(tmp_path / "ct12.png")
    im = load_image(tmp_path / "ct12.png")
    assert im.mode == "L"
    np.testing.assert_array_equal(np.asarray(im), np.rint(a12.astype(np.float64) * 255 / 4095).astype(np.uint8))
    a8 = np.array([[0, 17], [200, 255]], dtype=np.uint16)  # 8-bit values stored as 16-bit stay as they are
    Image.fromarray(a8).save(tmp_path / "ct8.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "ct8.png")), a8.astype(np.uint8))
    a16 = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "full.png")
    assert np.asarray(load_image(tmp_path / "full.png")).tolist() == [[0, 255]]


def test_color_modes_to_gray(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.jpg", quality=95)
    im = load_image(tmp_path / "c.jpg")
    assert im.mode == "L" and abs(int(np.asarray(im).mean()) - round(200 * 0.587)) <= 3
    Image.fromarray(np.dstack([rgb, np.full((4, 4), 7, np.uint8)]), mode="RGBA").save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").mode == "L"
    Image.fromarray(rgb, mode="RGB").convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "L"
    # Content decides, not the suffix: a JPEG named .png loads.
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "really_jpeg.png", format="JPEG")
    assert load_image(tmp_path / "really_jpeg.png").mode == "L"


def test_other_format_with_image_suffix_is_bad(tmp_path: Path) -> None:
    Image.new("L", (4, 4)).save(tmp_path / "x.png", format="BMP")
    with pytest.raises(DataError, match="BMP"):
        load_image(tmp_path / "x.png")


def test_load_array_sizes(tmp_path: Path) -> None:
    p1 = _png(tmp_path / "a.png", value=255, size=(8, 8))
    p2 = _png(tmp_path / "b.png", value=0, size=(8, 8))
    p3 = _png(tmp_path / "c.png", seed=3, size=(16, 12))
    x = load_array([p1, p2])
    assert x.shape == (2, 8, 8) and x.dtype == np.float32 and x[0].min() == 1.0 and x[1].max() == 0.0
    mixed = load_array([p1, p2, p3])  # most common size wins
    assert mixed.shape == (3, 8, 8) and mixed.min() >= 0.0 and mixed.max() <= 1.0
    assert load_array([p3], size=5).shape == (1, 5, 5)
    assert load_array([], size=4).shape == (0, 4, 4)


# ------------------------------------------------------------------------------------------------ groups


def test_infer_groups_near_copies_together() -> None:
    rng = np.random.default_rng(0)
    base = rng.random((5, 32, 32))
    copies = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1)
    blank = np.zeros((2, 32, 32))
    images = np.concatenate([base, copies, blank]).astype(np.float32)
    g = infer_groups(images)
    assert g.tolist()[:5] == [0, 1, 2, 3, 4]  # ids in order of first appearance
    np.testing.assert_array_equal(g[:5], g[5:10])
    assert g[10] == g[11] == 5  # blank images are duplicates of each other
    assert infer_groups(images, threshold=1.0)[:10].tolist() == list(range(10))
    assert infer_groups(images[:, None]).tolist() == g.tolist()  # (N, 1, H, W) accepted


def test_infer_groups_chain_and_warning() -> None:
    # A chain a~b~c with a and c less alike still forms one group (union-find).
    rng = np.random.default_rng(1)
    a, c = rng.random((2, 16, 16))
    b = (a + c) / 2
    g = infer_groups(np.stack([a, b, c]), threshold=0.6)
    assert len(set(g.tolist())) == 1
    assert len(set(infer_groups(np.stack([a, c]), threshold=0.6).tolist())) == 2  # not alike on their own
    with pytest.warns(UserWarning, match="threshold is probably too low"):
        infer_groups(rng.random((12, 16, 16)) * 0.01 + np.linspace(0, 1, 256).reshape(16, 16))


def test_infer_groups_average_linkage_does_not_chain() -> None:
    rng = np.random.default_rng(1)
    a, c = rng.random((2, 16, 16))
    b = (a + c) / 2
    chain = np.stack([a, b, c])
    # Single linkage chains a~b~c; average linkage keeps a and c apart (b joins one of them).
    assert len(set(infer_groups(chain, threshold=0.6).tolist())) == 1
    g = infer_groups(chain, threshold=0.6, linkage="average")
    assert len(set(g.tolist())) == 2 and g[0] != g[2]
    # Near copies and blank images group exactly as with single linkage, ids in order of first appearance.
    base = rng.random((5, 32, 32))
    copies = np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1)
    images = np.concatenate([base, copies, np.zeros((2, 32, 32)), np.ones((1, 32, 32))])
    g = infer_groups(images, linkage="average")
    assert g.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 5, 6]
    assert infer_groups(images[:1], linkage="average").tolist() == [0]
    with pytest.raises(ValueError, match="linkage"):
        infer_groups(images, linkage="complete")  # type: ignore[arg-type]


def _labels_groups(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for gid in range(40):
        size = int(rng.integers(1, 5))
        labels += [gid % 2] * size
        groups += [f"p{gid}"] * size
    return np.array(labels), np.array(groups)


def test_group_kfold_keeps_groups_whole_stratified_and_seeded() -> None:
    y, g = _labels_groups()
    folds = group_kfold(y, g, n_splits=5, seed=3)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests.tolist()) == list(range(len(y)))  # each sample tested exactly once
    for tr, te in folds:
        assert not set(g[tr]) & set(g[te])
        assert set(y[te]) == {0, 1}
        assert abs(y[te].mean() - y.mean()) < 0.2
        assert abs(len(te) - len(y) / 5) <= 4
    again = group_kfold(y, g, n_splits=5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    other = group_kfold(y, g, n_splits=5, seed=4)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))


def test_group_kfold_without_groups_and_too_many_splits() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    assert len(group_kfold(y, None, n_splits=3)) == 3
    with pytest.raises(DataError, match=r"class 0 has only 2 group\(s\), fewer than the 3 folds"):
        group_kfold(y, ["a", "a", "b", "c", "c", "d"], n_splits=3)
    with pytest.raises(ValueError, match="n_splits"):
        group_kfold(y, None, n_splits=1)


def test_repeated_group_kfold_and_group_split() -> None:
    y, g = _labels_groups(1)
    splits = repeated_group_kfold(y, g, n_splits=4, n_repeats=3, seed=0)
    assert len(splits) == 12
    for r in range(3):
        covered = np.concatenate([te for _, te in splits[r * 4 : (r + 1) * 4]])
        assert sorted(covered.tolist()) == list(range(len(y)))
    assert not np.array_equal(splits[0][1], splits[4][1])
    tr, va = group_split(y, g, val_fraction=0.25, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert not set(g[tr]) & set(g[va])
    assert set(y[va]) == {0, 1} and 0.15 < len(va) / len(y) < 0.35
    tr2, va2 = group_split(y, g, val_fraction=0.25, seed=0)
    assert np.array_equal(va, va2)


# ------------------------------------------------------------------------------------------------ benchmark


@pytest.mark.skipif(not (BENCH / "ctbench-s1").is_dir(), reason="shared benchmark ctbench-s1 not present")
def test_ctbench_s1_counts() -> None:
    dev, test = open_benchmark(BENCH / "ctbench-s1")
    assert dev.counts() == {"generated": 500, "used": 80, "not_used": 80, "real_unknown": 0}
    assert test is not None
    assert test.counts() == {"generated": 2000, "used": 0, "not_used": 0, "real_unknown": 200}
    assert test.real[0].id == "real_unknown_0001" and set(ROLES) >= {it.role for it in dev.items}
