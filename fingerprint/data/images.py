"""Reading image sets in the ImageCLEFmedical GANs layout, and group-aware splits of the labelled real images.

An image set is the generated images of one generator plus a pool of real images, each real image tagged
with its role: ``used`` (was in the generator's training set, label 1), ``not_used`` (label 0) or
``real_unknown`` (label withheld). :func:`open_folder` recognises three layouts:

1. role subfolders directly under the folder (any subset)::

       dev/generated/*.png  dev/used/*.png  dev/not_used/*.png      test/generated/  test/real_unknown/

2. the original ImageCLEF 2023 challenge names::

       img_gen/generated/   img_real/used/   img_real/not_used/       generated_1/     real_unknown_1/

3. a CSV manifest (given as the path, or ``manifest.csv`` inside the folder) with the header
   ``path,role[,label][,group]``; relative paths resolve against the CSV's folder.

Every image is checked when the set is opened (decoded in full, so truncated files are caught), so a bad
file is reported up front, naming the file, instead of halfway through training. ``skip_bad=True`` (the CLI's
``--skip-bad``) lists such files in :attr:`ImageSet.skipped` and goes on.

Pixels are always 8-bit gray (``"L"``); see :func:`load_image` for how RGB, palette and 16-bit images map.

Example::

    dev, test = open_benchmark("bench/ctbench-s1")
    x = load_array(dev.real, size=64)               # (160, 64, 64) float32 in [0, 1]
    y = np.array([it.label for it in dev.real])
    groups = infer_groups(x)                        # near-duplicate slices share a group
    for train_idx, val_idx in group_kfold(y, groups, n_splits=5, seed=0):
        ...
"""

from __future__ import annotations

import csv
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from fingerprint.features.handcrafted import area_matrix, images_to_array

__all__ = [
    "ROLES",
    "DataError",
    "ImageItem",
    "ImageSet",
    "open_folder",
    "open_benchmark",
    "load_image",
    "load_images",
    "load_array",
    "infer_groups",
    "group_kfold",
    "repeated_group_kfold",
    "group_split",
]

ROLES = ("generated", "used", "not_used", "real_unknown")
REAL_ROLES = ("used", "not_used", "real_unknown")
ROLE_LABELS: dict[str, int | None] = {"generated": None, "used": 1, "not_used": 0, "real_unknown": None}

# Files with these suffixes are expected to be images: if one does not decode it is reported, whereas other
# files (README.md, labels.csv, .DS_Store, ...) are ignored silently.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
# What the content must be, whatever the suffix says (MPO is the multi-picture JPEG some cameras write).
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "MPO"})

MANIFEST_NAME = "manifest.csv"

# Folder names per role, relative to the set's root, in the order they are looked for.
ROLE_DIRS: dict[str, tuple[str, ...]] = {
    "generated": ("generated", "img_gen/generated", "generated_1", "img_gen/generated_1"),
    "used": ("used", "img_real/used"),
    "not_used": ("not_used", "img_real/not_used"),
    "real_unknown": ("real_unknown", "real_unknown_1", "img_real/real_unknown", "img_real/real_unknown_1"),
}

LAYOUT_HELP = (
    "Expected one of these layouts:\n"
    "  1. role folders: generated/, used/, not_used/ (dev) or generated/, real_unknown/ (test);\n"
    "  2. ImageCLEF 2023 names: img_gen/generated/, img_real/used/, img_real/not_used/ (dev) or "
    "generated_1/, real_unknown_1/ (test);\n"
    f"  3. a CSV manifest ({MANIFEST_NAME} in the folder, or its path) with header path,role[,label][,group] "
    f"and role one of {', '.join(ROLES)}."
)

SKIP_HINT = "Remove or replace the file, or pass --skip-bad (skip_bad=True) to skip unreadable images."


class DataError(ValueError):
    """Bad or missing input data; the message names the file or folder and says what to do."""


@dataclass(frozen=True)
class ImageItem:
    """One image of a set.

    ``id`` is the file stem (``real_unknown_0001``), unique within the set: when two roles share a stem both
    get their role as prefix (``used_0001``), and stems still equal after that fall back to the path relative
    to the set's root. ``label`` is 1 for ``used``, 0 for ``not_used`` and None otherwise. ``group`` is a
    patient / group id when a manifest gives one.
    """

    id: str
    path: Path
    role: str
    label: int | None
    group: str | None = None


@dataclass
class ImageSet:
    """The images of one set (e.g. dev or test), sorted by role then path; ``skipped`` lists bad files."""

    root: Path
    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def role(self, role: str) -> list[ImageItem]:
        """Items with this role, sorted by path."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return [it for it in self.items if it.role == role]

    @property
    def real(self) -> list[ImageItem]:
        """Real images: used, then not_used, then real_unknown, each sorted by path."""
        return [it for r in REAL_ROLES for it in self.role(r)]

    @property
    def generated(self) -> list[ImageItem]:
        """Generated images, sorted by path."""
        return self.role("generated")

    def counts(self) -> dict[str, int]:
        """Number of items per role (every role present as a key)."""
        c = Counter(it.role for it in self.items)
        return {r: c.get(r, 0) for r in ROLES}

    def summary(self) -> str:
        """One line: root, count per role, number of skipped files."""
        counts = ", ".join(f"{r} {n}" for r, n in self.counts().items())
        text = f"{self.root}: {counts}"
        if self.skipped:
            text += f" ({len(self.skipped)} bad file(s) skipped)"
        return text

    def __len__(self) -> int:
        return len(self.items)


# ----------------------------------------------------------------------------------------------------------
# Decoding


def _read(path: Path) -> tuple[Image.Image | None, str | None]:
    """Decode ``path`` in full: ``(image, None)``, or ``(None, why it is not a usable image)``."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return None, f"cannot read file ({e.strerror or e})"
    if size == 0:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(path) as im:
            # load() decodes all pixel data, which is what catches truncated files; verify() would not.
            im.load()
            if im.format not in IMAGE_FORMATS:
                return None, f"is a {im.format} image; only PNG and JPEG are supported (convert it)"
            return to_gray8(im), None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return None, f"not a readable PNG/JPEG image ({type(e).__name__}: {e})"


def to_gray8(im: Image.Image) -> Image.Image:
    """Convert any decoded image to 8-bit gray; see :func:`load_image` for the rules."""
    if im.mode == "L":
        return im.copy()
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if a.ndim != 2:
            raise ValueError(f"unexpected {im.mode} image with shape {a.shape}")
        lo, hi = float(a.min()), float(a.max())
        if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo < 0:
            # Signed data (e.g. Hounsfield units): there is no fixed range to keep, so stretch this image.
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        else:
            # Scale by the smallest common bit depth that holds the image's maximum, so an 8-bit image stored
            # as 16-bit stays as it is, 12-bit CT data keeps its contrast, and images of one bit depth are
            # all scaled alike (a per-image min-max stretch would not be).
            bits = next((b for b in (8, 10, 12, 14, 16) if hi < 2**b), None)
            top = float(2**bits - 1) if bits is not None else hi
            a = a * (255.0 / top)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    try:
        # Pillow's luma conversion; for RGBA / LA the alpha is dropped, not composited, because medical
        # images carry no meaningful transparency.
        return im.convert("L")
    except ValueError:
        # Modes without a direct path to L (e.g. PA, LAB, HSV) go through RGB.
        return im.convert("RGB").convert("L")


def _decode(path: Path) -> Image.Image:
    """Decode ``path`` to an 8-bit gray image, raising DataError (naming the file) if it is bad."""
    image, reason = _read(path)
    if image is None:
        raise DataError(f"{path}: {reason}. {SKIP_HINT}")
    return image


def load_image(path: str | Path) -> Image.Image:
    """Load one PNG/JPEG image as 8-bit gray (mode ``"L"``), fully decoded, with its file closed.

    Conversions: RGB / RGBA / palette / 1-bit use Pillow's luma conversion (alpha is dropped). 16-bit and
    32-bit integer images (modes ``I;16``, ``I``) are divided by the range of the smallest bit depth among
    8, 10, 12, 14, 16 that holds the image's maximum (``value * 255 / (2**bits - 1)``): an 8-bit image saved
    as 16-bit is unchanged, 12-bit CT stays 12-bit in contrast, and images of one depth scale alike. Images
    with negative values (signed, e.g. Hounsfield units) are min-max stretched to 0..255. Float images in
    [0, 1] are multiplied by 255.

    Raises DataError naming the file if it is missing, empty, truncated, not an image, or not PNG/JPEG.
    """
    return _decode(Path(path))


def load_images(
    items: Sequence[ImageItem], skip_bad: bool = False
) -> tuple[list[Image.Image], list[ImageItem], list[tuple[Path, str]]]:
    """Load the images of ``items`` as 8-bit gray.

    Returns ``(images, kept_items, skipped)``: with ``skip_bad=True`` an unreadable file is left out of
    ``images`` and ``kept_items`` (which stay aligned) and listed in ``skipped`` as ``(path, reason)``;
    otherwise it raises DataError naming the file.
    """
    images: list[Image.Image] = []
    kept: list[ImageItem] = []
    skipped: list[tuple[Path, str]] = []
    for it in items:
        try:
            images.append(_decode(Path(it.path)))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append((Path(it.path), str(e)))
            continue
        kept.append(it)
    return images, kept, skipped


def load_array(items: Sequence[ImageItem | str | Path], size: int | None = None) -> np.ndarray:
    """Load images as one ``(N, H, W)`` float32 array with values in [0, 1].

    With ``size`` every image is resized (bicubic, aspect ratio not kept) to ``size x size``. Without it,
    images keep their size if all agree; otherwise all are resized to the most common size (the largest
    of the most common ones on a tie). Bicubic overshoot is clipped back to [0, 1]. ``items`` may be
    ImageItems or paths; a bad file raises DataError (filter with :func:`load_images` first to skip them).
    """
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    paths = [it.path if isinstance(it, ImageItem) else Path(it) for it in items]
    images = [_decode(Path(p)) for p in paths]
    if not images:
        side = size or 0
        return np.zeros((0, side, side), dtype=np.float32)
    if size is None:
        counts = Counter(im.size for im in images)
        top = max(counts.values())
        return images_to_array(images, max(s for s, n in counts.items() if n == top))
    return images_to_array(images, size)


# ----------------------------------------------------------------------------------------------------------
# Writing benchmarks

BENCHMARK_DIRS = ("dev/generated", "dev/used", "dev/not_used", "test/generated", "test/real_unknown")
"""The folders of a benchmark in the shared (ImageCLEF) layout."""


def save_gray_png(pixels: np.ndarray, path: Path) -> None:
    """An (H, W) uint8 array as an 8-bit gray PNG."""
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(path, format="PNG")


def write_generated(root: Path, dev: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> None:
    """Make the benchmark folders under ``root`` and write the generated images (``gen_00001.png`` ...)."""
    for sub in BENCHMARK_DIRS:
        (root / sub).mkdir(parents=True)
    for split, images in (("dev", dev), ("test", test)):
        for i, im in enumerate(images, 1):
            save_gray_png(im, root / split / "generated" / f"gen_{i:05d}.png")


# ----------------------------------------------------------------------------------------------------------
# Opening sets


def _list_dir_images(folder: Path) -> tuple[list[Path], Counter[str], int]:
    """Image files directly in ``folder`` (sorted), a count of ignored suffixes, and the number of subfolders."""
    images: list[Path] = []
    ignored: Counter[str] = Counter()
    subdirs = 0
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            subdirs += 1
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            images.append(p)
        else:
            ignored[p.suffix.lower() or "(no suffix)"] += 1
    return images, ignored, subdirs


def _assign_ids(entries: list[tuple[Path, str, str | None]], root: Path) -> list[ImageItem]:
    """Build items with unique ids from ``(path, role, group)`` entries (see ImageItem for the id rule)."""
    stems_roles: dict[str, set[str]] = defaultdict(set)
    for path, role, _ in entries:
        stems_roles[path.stem].add(role)
    ids = [f"{role}_{p.stem}" if len(stems_roles[p.stem]) > 1 else p.stem for p, role, _ in entries]
    dup = {k for k, n in Counter(ids).items() if n > 1}
    if dup:
        for i, (p, role, _) in enumerate(entries):
            if ids[i] in dup:
                try:
                    rel = p.relative_to(root)
                except ValueError:
                    rel = p
                prefix = f"{role}_" if len(stems_roles[p.stem]) > 1 else ""
                ids[i] = prefix + rel.with_suffix("").as_posix()
        still = {k for k, n in Counter(ids).items() if n > 1}
        if still:
            for i, (p, _, _) in enumerate(entries):
                if ids[i] in still:
                    ids[i] = f"{ids[i]}{p.suffix}"
    if len(set(ids)) != len(ids):
        clash = sorted(str(p) for (p, _, _), i in zip(entries, ids, strict=True) if Counter(ids)[i] > 1)
        raise DataError(f"cannot give these files distinct ids; rename them: {', '.join(clash[:6])}")
    return [
        ImageItem(id=i, path=p, role=role, label=ROLE_LABELS[role], group=g)
        for i, (p, role, g) in zip(ids, entries, strict=True)
    ]


def _validate(
    entries: list[tuple[Path, str, str | None]], skip_bad: bool
) -> tuple[list[tuple[Path, str, str | None]], list[tuple[Path, str]]]:
    good: list[tuple[Path, str, str | None]] = []
    skipped: list[tuple[Path, str]] = []
    for entry in entries:
        _, reason = _read(entry[0])
        if reason is None:
            good.append(entry)
        elif skip_bad:
            skipped.append((entry[0], reason))
        else:
            raise DataError(f"{entry[0]}: {reason}. {SKIP_HINT}")
    return good, skipped


def _read_manifest(csv_path: Path) -> list[tuple[Path, str, str | None]]:
    """Parse a manifest into ``(path, role, group)`` entries; every problem names the CSV line."""
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the manifest ({e}). It must be a UTF-8 CSV file.") from e
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{csv_path}: the manifest is empty; it needs a header path,role[,label][,group].")
    header = [c.strip().lower() for c in rows[0]]
    unknown = [c for c in header if c not in ("path", "role", "label", "group")]
    if "path" not in header or "role" not in header or unknown or len(set(header)) != len(header):
        raise DataError(
            f"{csv_path}: bad manifest header {','.join(rows[0])!r}; expected path,role[,label][,group] "
            "(columns in any order, no others)."
        )
    col = {name: header.index(name) for name in header}
    base = csv_path.parent
    entries: list[tuple[Path, str, str | None]] = []
    seen: dict[Path, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        where = f"{csv_path}, line {lineno}"
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} columns ({','.join(header)}), got {len(row)}.")
        raw_path = row[col["path"]].strip()
        role = row[col["role"]].strip().lower()
        if not raw_path:
            raise DataError(f"{where}: empty path.")
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}.")
        if "label" in col:
            label = row[col["label"]].strip()
            if label:
                expected = ROLE_LABELS[role]
                if label not in ("0", "1") or expected is None or int(label) != expected:
                    want = f"{expected} or empty" if expected is not None else "empty"
                    raise DataError(f"{where}: label {label!r} does not fit role {role!r}; it must be {want}.")
        group = (row[col["group"]].strip() or None) if "group" in col else None
        path = Path(raw_path)
        if not path.is_absolute():
            path = base / path
        if path in seen:
            raise DataError(f"{where}: {raw_path} is listed twice (first on line {seen[path]}).")
        seen[path] = lineno
        entries.append((path, role, group))
    return entries


def _role_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for role, names in ROLE_DIRS.items():
        hits = [root / n for n in names if (root / n).is_dir()]
        if len(hits) > 1:
            raise DataError(
                f"{root}: more than one folder for role {role!r}: {', '.join(str(h) for h in hits)}. "
                "Keep one (or write a manifest.csv listing the images)."
            )
        if hits:
            found[role] = hits[0]
    return found


def open_folder(path: str | Path, skip_bad: bool = False, require: Sequence[str] = ()) -> ImageSet:
    """Open one image set (dev or test) in any of the layouts in the module docstring.

    ``path`` is a folder or a manifest CSV; a ``manifest.csv`` inside the folder wins over role folders.
    Every image is decoded once to check it. Bad files raise DataError naming the file, or with
    ``skip_bad=True`` are listed in ``skipped``. ``require`` names roles that must have at least one image
    (e.g. ``("generated", "used")``); otherwise DataError says what was found and what layout is expected.
    Role folders are read without recursing; hidden files and files that are not .png/.jpg/.jpeg are
    ignored. Items are sorted by role (in ROLES order), then path.
    """
    bad_req = [r for r in require if r not in ROLES]
    if bad_req:
        raise ValueError(f"require has unknown role(s) {bad_req}; expected some of {', '.join(ROLES)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder. Check the path (expected a data folder or a CSV).")
    notes: dict[str, str] = {}
    if path.is_file() or (path / MANIFEST_NAME).is_file():
        csv_path = path if path.is_file() else path / MANIFEST_NAME
        if csv_path.suffix.lower() != ".csv":
            raise DataError(f"{csv_path}: expected a folder or a .csv manifest.\n{LAYOUT_HELP}")
        root = csv_path.parent
        entries = _read_manifest(csv_path)
        layout = f"manifest {csv_path}"
    else:
        root = path
        dirs = _role_dirs(root)
        if not dirs:
            subs = sorted(p.name + "/" for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            n_img = sum(1 for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found = f"subfolders {', '.join(subs)}" if subs else "no subfolders"
            raise DataError(
                f"{root}: no role folders or {MANIFEST_NAME} found ({found}; {n_img} image file(s) at the top)."
                f"\n{LAYOUT_HELP}"
            )
        entries = []
        for role, d in dirs.items():
            files, ignored, subdirs = _list_dir_images(d)
            entries.extend((p, role, None) for p in files)
            if not files:
                extra = [f"{n} {s} file(s)" for s, n in sorted(ignored.items())]
                if subdirs:
                    extra.append(f"{subdirs} subfolder(s) (not searched)")
                notes[role] = f"{d} has no .png/.jpg images" + (f" ({', '.join(extra)})" if extra else "")
        layout = "folders " + ", ".join(f"{r}={d.relative_to(root).as_posix()}/" for r, d in dirs.items())

    # Missing files in a manifest count as bad files, so --skip-bad covers them too.
    entries, skipped = _validate(entries, skip_bad)
    order = {r: i for i, r in enumerate(ROLES)}
    entries.sort(key=lambda e: (order[e[1]], str(e[0])))
    items = _assign_ids(entries, root)
    image_set = ImageSet(root=root, items=items, skipped=skipped)

    missing = [r for r in require if not any(it.role == r for it in items)]
    if missing:
        counts = ", ".join(f"{r} {n}" for r, n in image_set.counts().items())
        lines = [f"{path}: no images for required role(s) {', '.join(missing)}.", f"Read {layout}; found {counts}."]
        lines += [f"  {notes[r]}" for r in missing if r in notes]
        if skipped:
            lines.append(f"  {len(skipped)} bad file(s) were skipped.")
        lines.append(LAYOUT_HELP)
        raise DataError("\n".join(lines))
    return image_set


def open_benchmark(root: str | Path, skip_bad: bool = False) -> tuple[ImageSet, ImageSet | None]:
    """Open a benchmark: ``(dev, test)`` if ``root`` has ``dev/`` and ``test/``, else ``(open_folder(root), None)``.

    With dev/test subfolders, dev must have generated, used and not_used images and test must have
    generated and real_unknown images. A ``dev/`` without ``test/`` gives ``(dev, None)``.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such benchmark folder. Check the path.")
    dev_dir, test_dir = root / "dev", root / "test"
    if dev_dir.is_dir():
        dev = open_folder(dev_dir, skip_bad=skip_bad, require=("generated", "used", "not_used"))
        test = (
            open_folder(test_dir, skip_bad=skip_bad, require=("generated", "real_unknown"))
            if test_dir.is_dir()
            else None
        )
        return dev, test
    return open_folder(root, skip_bad=skip_bad), None


# ----------------------------------------------------------------------------------------------------------
# Grouping and splits


def infer_groups(
    images: np.ndarray, threshold: float = 0.98, thumb: int = 16, linkage: Literal["single", "average"] = "single"
) -> np.ndarray:
    """Group near-duplicate images (e.g. neighbouring CT slices of one patient) when no patient ids exist.

    Each image is area-downscaled to ``thumb x thumb``; pairs whose normalised (Pearson) correlation is at
    least ``threshold`` are joined, and groups are the connected components (so chains join too). Constant
    thumbnails have no correlation; they are joined only with constant thumbnails of the same value.

    Why the default is 0.98, not 0.9: lung CT slices all share the body outline, so at 16 x 16 even
    unrelated slices correlate highly (median pair 0.90 on ctbench-s1 dev); at 0.9 the chains join 159 of
    160 images into one group, at 0.98 it gives 102 groups of at most 11 with a single used / not_used pair
    joined. The right value depends on the images: a warning is raised when one group takes over half of
    the images, which usually means the threshold is too low.

    ``linkage="average"`` clusters instead by average linkage on ``1 - correlation`` cut at
    ``1 - threshold``: a group joins another only if their images are alike *on average*, so one chance
    pair cannot chain two patients together. On the ctbench sets, ``threshold=0.95, thumb=32,
    linkage="average"`` gives about 150 groups over 360 images with no dev group mixing used and not-used
    images, whereas single linkage needs a very high threshold to avoid chaining. It needs the full
    ``N x N`` distance matrix (8 N^2 bytes), so it suits pools of up to ~10,000 images.

    ``images``: ``(N, H, W)`` (or ``(N, 1, H, W)``) array. Returns ``(N,)`` int64 group ids 0..G-1, numbered
    in order of first appearance. Memory for single linkage is bounded by comparing in row blocks.
    """
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {x.shape}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a correlation and must lie in [-1, 1], got {threshold}")
    if thumb < 2:
        raise ValueError(f"thumb must be at least 2, got {thumb}")
    if linkage not in ("single", "average"):
        raise ValueError(f"linkage must be 'single' or 'average', got {linkage!r}")
    n, h, w = x.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x = x.astype(np.float64, copy=False)
    th, tw = min(thumb, h), min(thumb, w)
    t = np.einsum("ph,nhw,qw->npq", area_matrix(h, th), x, area_matrix(w, tw), optimize=True).reshape(n, -1)
    mean = t.mean(axis=1, keepdims=True)
    z = t - mean
    norm = np.linalg.norm(z, axis=1)
    scale = float(np.ptp(x)) or 1.0
    flat = norm <= 1e-9 * scale * np.sqrt(z.shape[1])
    z[~flat] /= norm[~flat, None]
    z[flat] = 0.0

    if linkage == "average":
        ids = _average_linkage_groups(z, flat, mean[:, 0], scale, threshold)
    else:
        ids = _single_linkage_groups(z, flat, mean[:, 0], scale, threshold)
    biggest = int(np.bincount(ids).max())
    if n >= 10 and biggest > n // 2:
        warnings.warn(
            f"infer_groups: one group holds {biggest} of {n} images at threshold {threshold}; whole-group "
            "splits will be lopsided or impossible. The threshold is probably too low for these images "
            "(similar-looking scans correlate highly); try a higher one such as 0.98.",
            stacklevel=2,
        )
    return ids.astype(np.int64)


def _flat_levels(flat: np.ndarray, mean: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices of constant thumbnails and, for each, the index of the first constant one at its level."""
    flat_idx = np.flatnonzero(flat)
    if len(flat_idx) == 0:
        return flat_idx, flat_idx
    levels = np.round(mean[flat_idx] / (1e-3 * scale))
    _, first, inv = np.unique(levels, return_index=True, return_inverse=True)
    return flat_idx, flat_idx[first[inv]]


def _average_linkage_groups(z: np.ndarray, flat: np.ndarray, mean: np.ndarray, scale: float,
                            threshold: float) -> np.ndarray:
    from scipy.cluster.hierarchy import fcluster
    from scipy.cluster.hierarchy import linkage as hlinkage
    from scipy.spatial.distance import squareform

    n = len(z)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    corr = z @ z.T
    flat_idx, head = _flat_levels(flat, mean, scale)
    if len(flat_idx) > 1:
        same = head[:, None] == head[None, :]
        corr[np.ix_(flat_idx, flat_idx)] = np.where(same, 1.0, 0.0)
    dist = np.clip(1.0 - corr, 0.0, 2.0)
    dist = (dist + dist.T) / 2  # exact symmetry for squareform
    np.fill_diagonal(dist, 0.0)
    tree = hlinkage(squareform(dist, checks=False), method="average")
    # A tiny slack so that a pair exactly at the threshold is joined, as with single linkage's ">=".
    labels = fcluster(tree, t=(1.0 - threshold) + 1e-12, criterion="distance")
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))  # cluster -> rank of its first member
    return order[np.unique(labels, return_inverse=True)[1]]


def _single_linkage_groups(z: np.ndarray, flat: np.ndarray, mean: np.ndarray, scale: float,
                           threshold: float) -> np.ndarray:
    n = len(z)
    src: list[np.ndarray] = []
    dst: list[np.ndarray] = []
    block = max(1, 2**22 // n)  # ~32 MB of float64 correlations per block
    for start in range(0, n, block):
        corr = z[start : start + block] @ z.T
        a, b = np.nonzero(corr >= threshold)
        a += start
        keep = a < b
        src.append(a[keep])
        dst.append(b[keep])
    flat_idx, head = _flat_levels(flat, mean, scale)
    if len(flat_idx) > 1:
        # Constant images (e.g. blank slices) are duplicates of each other when their level matches.
        src.append(head[head != flat_idx])
        dst.append(flat_idx[head != flat_idx])
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.concatenate(src), np.concatenate(dst)
    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    _, first = np.unique(labels, return_index=True)
    return np.argsort(np.argsort(first))[labels]  # ids numbered in order of first appearance


def _group_table(labels: Sequence, groups: Sequence | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample -> group index, sample -> class index, and the (G, C) count of each class in each group."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if len(y) == 0:
        raise DataError("no labelled samples to split.")
    if any(v is None for v in y.tolist()):
        raise DataError("labels contain None (unlabelled images, e.g. real_unknown); split labelled images only.")
    if groups is None:
        g_idx = np.arange(len(y))
    else:
        g = np.asarray(groups)
        if g.shape != y.shape:
            raise ValueError(f"labels and groups differ in length: {len(y)} vs {len(g)}")
        # Strings like "None" or mixed int/str groups are fine: only equality matters.
        _, g_idx = np.unique(np.array([str(v) for v in g.tolist()]), return_inverse=True)
    _, c_idx = np.unique(y, return_inverse=True)
    table = np.zeros((g_idx.max() + 1, c_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (g_idx, c_idx), 1)
    return g_idx, c_idx, table


# By hand because scikit-learn's group splitters give k equal folds, not one split at an arbitrary fraction.
def _assign_groups(table: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Greedy stratified assignment of groups to bins with target fractions; returns the bin per group.

    Groups go largest first (ties in random order); each goes to the bin whose classes, weighted by the
    group's class counts, are least filled relative to their target after adding it. This keeps every
    class's share per bin near the target, and puts one group of a class in each bin before a second.
    """
    n_groups, n_classes = table.shape
    totals = table.sum(axis=0).astype(np.float64)
    want = targets[:, None] * totals[None, :]  # (B, C) target count per bin and class
    sizes = table.sum(axis=1)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    bin_order = rng.permutation(len(targets))  # which bin wins a tie is random too
    fill = np.zeros((len(targets), n_classes))
    out = np.empty(n_groups, dtype=np.int64)
    for gi in order:
        cnt = table[gi]
        weight = cnt / cnt.sum()
        score = (((fill + cnt[None, :]) / want) * weight[None, :]).sum(axis=1)
        b = bin_order[np.argmin(score[bin_order])]
        out[gi] = b
        fill[b] += cnt
    return out


def _check_class_groups(table: np.ndarray, labels: Sequence, n_bins: int, what: str) -> None:
    classes = np.unique(np.asarray(labels))
    n_groups = (table > 0).sum(axis=0)
    for c, k in zip(classes.tolist(), n_groups.tolist(), strict=True):
        if k < n_bins:
            raise DataError(
                f"class {c!r} has only {k} group(s), fewer than the {n_bins} {what}; whole groups must stay "
                f"on one side, so use at most {k} (or check the grouping: a low infer_groups threshold "
                "merges many images into one group)."
            )


def group_kfold(
    labels: Sequence, groups: Sequence | None, n_splits: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, group-aware k-fold: ``[(train_idx, test_idx), ...]`` with sorted int64 indices.

    Every group (e.g. from :func:`infer_groups` or a manifest) lies wholly in one test fold; each fold holds
    about 1/n_splits of every class; the same seed gives the same folds. ``groups=None`` treats every sample
    as its own group. Raises DataError if a class has fewer groups than ``n_splits``.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if not isinstance(n_splits, int) or n_splits < 2:
        raise ValueError(f"n_splits must be an int >= 2, got {n_splits!r}")
    g_idx, c_idx, table = _group_table(labels, groups)
    _check_class_groups(table, labels, n_splits, "folds (n_splits)")
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64))
            for tr, te in folds.split(np.zeros(len(c_idx)), c_idx, g_idx)]


def repeated_group_kfold(
    labels: Sequence, groups: Sequence | None, n_splits: int = 5, n_repeats: int = 3, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`group_kfold` repeated with ``n_repeats`` seeds derived from ``seed``: ``n_splits * n_repeats`` splits.

    Splits are ordered repeat by repeat, so ``splits[r * n_splits:(r + 1) * n_splits]`` is one full k-fold.
    """
    if not isinstance(n_repeats, int) or n_repeats < 1:
        raise ValueError(f"n_repeats must be an int >= 1, got {n_repeats!r}")
    seeds = np.random.SeedSequence(seed).generate_state(n_repeats)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for s in seeds:
        out.extend(group_kfold(labels, groups, n_splits=n_splits, seed=int(s)))
    return out


def group_split(
    labels: Sequence, groups: Sequence | None, val_fraction: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One seeded stratified, group-aware split: ``(train_idx, val_idx)``, sorted int64 indices.

    About ``val_fraction`` of every class goes to validation, whole groups only (so the fraction is met as
    closely as group sizes allow). Raises DataError if a class has fewer than 2 groups.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    g_idx, _, table = _group_table(labels, groups)
    _check_class_groups(table, labels, 2, "sides of a train/validation split")
    bins = _assign_groups(table, np.array([1.0 - val_fraction, val_fraction]), np.random.default_rng(seed))
    side = bins[g_idx]
    # The greedy fill can leave a small class wholly on one side; move its smallest group across.
    c_idx = np.unique(np.asarray(labels), return_inverse=True)[1]
    for c in range(table.shape[1]):
        for here, there in ((1, 0), (0, 1)):
            if not np.any(c_idx[side == here] == c):
                cand = np.unique(g_idx[(side == there) & (c_idx == c)])
                gi = min(cand.tolist(), key=lambda k: (table[k].sum(), k))
                side[g_idx == gi] = here
    for c in range(table.shape[1]):
        if not (np.any(c_idx[side == 0] == c) and np.any(c_idx[side == 1] == c)):
            raise DataError(
                "cannot split with every class on both sides while keeping groups whole; the groups mix "
                "classes too much (check the grouping, or use a different val_fraction)."
            )
    all_idx = np.arange(len(g_idx))
    return all_idx[side == 0], all_idx[side == 1]
