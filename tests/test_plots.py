"""Tests for fingerprint.evaluation.plots: every picture is a real, readable PNG written atomically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fingerprint.evaluation import plots


def _assert_png(path: Path, returned: Path, min_side: int = 200) -> None:
    assert returned == path
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()  # raises on a truncated / corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w >= min_side and h >= min_side
        # A blank canvas would mean nothing was drawn.
        assert len(set(im.convert("L").getdata())) > 10
    # Atomic write: the temp sibling must be gone.
    assert not list(path.parent.glob("*.tmp.png"))


def _scores(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.normal(size=n) + 1.2 * labels
    return labels, scores


def test_import_does_not_touch_pyplot_or_backend() -> None:
    code = (
        "import sys, matplotlib\n"
        "before = dict.__getitem__(matplotlib.rcParams, 'backend')\n"
        "import fingerprint.evaluation.plots\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert dict.__getitem__(matplotlib.rcParams, 'backend') == before, 'backend changed'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_plotting_does_not_import_pyplot(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np\n"
        "from fingerprint.evaluation import plots\n"
        f"plots.roc_plot({{'a': ([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6])}}, {str(tmp_path / 'r.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_roc_plot_linear(tmp_path: Path) -> None:
    y1, s1 = _scores(seed=1)
    y2, s2 = _scores(seed=2)
    p = tmp_path / "roc.png"
    _assert_png(p, plots.roc_plot({"pixel": (y1, s1), "embedding": (y2, s2 * 2)}, p, title="ROC"))


def test_roc_plot_log_fpr_tiny_values(tmp_path: Path) -> None:
    # 5000 negatives: the first false positive sits at FPR 2e-4, below the axis' 1e-3 left edge.
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(500, int), np.zeros(5000, int)]
    scores = np.r_[rng.normal(3, 1, 500), rng.normal(0, 1, 5000)]
    p = tmp_path / "sub" / "roc_log.png"  # parent created on demand
    _assert_png(p, plots.roc_plot({"strong": (labels, scores)}, p, log_fpr=True))


def test_roc_plot_perfect_detector_log(tmp_path: Path) -> None:
    p = tmp_path / "perfect.png"
    _assert_png(p, plots.roc_plot({"perfect": ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])}, p, log_fpr=True))


def test_roc_plot_skips_unlabelled(tmp_path: Path) -> None:
    p = tmp_path / "roc_u.png"
    labels = [1, 0, None, -1, 1, 0, float("nan")]
    scores = [0.9, 0.1, 0.5, 0.5, 0.7, 0.3, 0.2]
    _assert_png(p, plots.roc_plot({"d": (labels, scores)}, p))


def test_roc_plot_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        plots.roc_plot({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'only_pos'"):
        plots.roc_plot({"only_pos": ([1, 1], [0.2, 0.3])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same length"):
        plots.roc_plot({"d": ([1, 0, 1], [0.2, 0.3])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="NaN"):
        plots.roc_plot({"d": ([1, 0], [0.2, float("nan")])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="label 2"):
        plots.roc_plot({"d": ([1, 2], [0.2, 0.3])}, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_score_histogram_with_unlabelled(tmp_path: Path) -> None:
    labels, scores = _scores(300)
    mixed: list[int | None] = [int(v) for v in labels]
    for i in range(0, 300, 4):
        mixed[i] = None if i % 8 else -1
    p = tmp_path / "hist.png"
    _assert_png(p, plots.score_histogram(scores, mixed, p, threshold=0.6, title="Scores"))


def test_score_histogram_all_unlabelled_and_constant(tmp_path: Path) -> None:
    p = tmp_path / "hist_u.png"
    _assert_png(p, plots.score_histogram(np.full(20, 0.5), [None] * 20, p))


def test_confusion_plot(tmp_path: Path) -> None:
    labels, scores = _scores(100)
    p = tmp_path / "cm.png"
    _assert_png(p, plots.confusion_plot(list(labels) + [-1], list(scores > 0.6) + [True], p, title="CM"))
    with pytest.raises(ValueError, match="decisions"):
        plots.confusion_plot([0, 1], [0, 3], tmp_path / "bad.png")


def test_evidence_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = []
    for i in range(3):
        real = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        nbs = [
            (f"gen_{i}_{j}", rng.uniform(-1, 1, (32, 32)), 0.9 - 0.1 * j)  # tanh-range floats
            for j in range(4 - i)  # ragged rows are fine
        ]
        rows.append((f"patient_{i:04d}_slice_with_a_long_name", real, nbs))
    rows.append(("chw", rng.random((1, 32, 32)), [("g", rng.random((32, 32, 1)) * 1000, 0.5)]))
    p = tmp_path / "grid.png"
    _assert_png(p, plots.evidence_grid(rows, p, title="Evidence"))
    with pytest.raises(ValueError, match="2-D"):
        plots.evidence_grid([("x", np.zeros((2, 3, 4, 5)), [])], tmp_path / "bad.png")


def test_evidence_grid_caps_rows(tmp_path: Path) -> None:
    img = np.linspace(0, 1, 64).reshape(8, 8)
    rows = [(f"r{i}", img, [("g", img.T, 0.5)]) for i in range(20)]
    p = tmp_path / "many.png"
    _assert_png(p, plots.evidence_grid(rows, p))


def test_training_curves(tmp_path: Path) -> None:
    history = [
        {"epoch": e, "loss": 1.0 / (e + 1), "active_fraction": 0.5 + 0.01 * e,
         "val_auc": (0.6 + 0.02 * e) if e % 2 else None}
        for e in range(10)
    ]
    p = tmp_path / "train.png"
    _assert_png(p, plots.training_curves(history, p), min_side=150)
    q = tmp_path / "loss_only.png"
    _assert_png(q, plots.training_curves([{"loss": 1.0}, {"loss": 0.5}], q), min_side=150)
    with pytest.raises(ValueError, match="available keys"):
        plots.training_curves([{"foo": 1}], tmp_path / "bad.png")
