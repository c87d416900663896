"""Atomic file writes: a crash or a bad input never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """``json.dumps(default=...)`` hook: arrays and numpy numbers as lists and numbers, paths and the rest as text,
    dataclasses as dicts."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: str | Path, rows: Iterable[Sequence[object]], header: Sequence[str] | None = None) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header is not None:
        writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        # mkdtemp creates 0700 folders; give the result the permissions a plain mkdir() would have.
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no read-only call)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def remove_stale_temps(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Clean up after atomic writes that were killed half-way in `folder` (not below it): remove every
    ``.<name>.*`` entry that :func:`atomic_dir` or :func:`write_bytes_atomic` makes for the given names (e.g.
    ``.checkpoint.k2j4x_9a``, ``.config.json.3bq0.tmp``); return what was removed.

    A folder ``<name>`` that is missing while ``.<name>.old`` exists was caught between atomic_dir's two renames:
    ``.<name>.old`` is the complete previous version, so it is put back instead of removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = list(names)
    for name in names:
        old = folder / f".{name}.old"
        if old.is_dir() and not old.is_symlink() and not os.path.lexists(folder / name):
            os.replace(old, folder / name)
    removed = []
    for entry in sorted(folder.iterdir()):
        if not any(entry.name.startswith(f".{name}.") for name in names):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def read_csv(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header; a missing file or column is an error naming both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; expected a header with {', '.join(required)}"
            )
        return list(reader)


DEV_PREFIX = "dev/"
"""What a benchmark's dev image ids start with when it also has a test set (fingerprint.data.imagesets)."""


def read_labels(path: str | Path) -> dict[str, int]:
    """An ``id,label`` CSV (1 = used for training, 0 = not used); a bad label is an error naming its line."""
    out = {}
    for n, r in enumerate(read_csv(path, ("id", "label")), start=2):
        if (r["label"] or "").strip() not in ("0", "1"):
            raise ValueError(f"{path}: line {n}: label must be 0 or 1, got {r['label']!r}")
        out[r["id"].strip()] = int(r["label"])
    return out


def read_groups(path: str | Path) -> dict[str, str]:
    """An ``id,group`` CSV (patient ids, as the sample data and the generator zoo write ``groups.csv``)."""
    out = {}
    for n, r in enumerate(read_csv(path, ("id", "group")), start=2):
        group = (r["group"] or "").strip()
        if not group:
            raise ValueError(f"{path}: line {n}: empty group for id {r['id']!r}")
        out[r["id"].strip()] = group
    return out


def lookup_ids(table: dict[str, str], ids: Sequence[str], prefix: str = DEV_PREFIX) -> list[str | None]:
    """``table[id]`` for each id, also matching an id without ``prefix`` (a benchmark's dev ids, ``dev/used_0001``,
    are written as ``used_0001`` in its CSVs); None where neither is there."""
    return [table.get(i, table.get(i.removeprefix(prefix))) for i in ids]
