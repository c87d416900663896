"""Procedural CT-like phantoms and a tiny memorising generator, for bundled sample data.

The real CT slices this project is tuned on may not be redistributed, so demos and tests run on data made
here instead:

- :func:`make_phantom` draws one 64 x 64 axial chest slice in a lung window (black outside a circular field
  of view, gray air, a soft-tissue body, two dark lungs with bright vessels, heart, spine, ribs and table).
- :func:`make_patients` draws several neighbouring slices per synthetic patient, so that near-duplicate
  slices exist, as in real CT series, and data splits must keep patients whole.
- :class:`PCAGenerator` is a stand-in for a GAN, NOT a GAN: a linear (PCA) model of its training images
  whose samples can be made to partly copy training images, with a knob for how strongly.
- :func:`make_sample_dataset` writes a membership-inference benchmark in the ImageCLEF layout used by the
  shared benchmarks (``dev/{generated,used,not_used}``, ``test/{generated,real_unknown}``) plus answer keys.

Example::

    from pathlib import Path
    from fingerprint.data.phantoms import make_sample_dataset
    counts = make_sample_dataset(Path("sample-bench"), memorisation=0.9, seed=0)

Everything is numpy + Pillow and deterministic given the seed: the same arguments give the same bytes.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fingerprint.data.images import save_gray_png, write_generated
from fingerprint.io import atomic_dir

__all__ = [
    "PCAGenerator",
    "make_patients",
    "make_phantom",
    "make_sample_dataset",
]

# Rendering at twice the output resolution and averaging down gives anti-aliased organ edges, which the
# real (Lanczos-downscaled) slices have; aliased staircase edges would be an easy tell for any detector.
_SUPERSAMPLE = 2
# Slice spacing in the normalised cranio-caudal coordinate z in [0, 1]; small enough that neighbouring
# slices of one patient look alike, large enough that they are not copies.
_SLICE_DZ = 0.03


@dataclass
class _Segment:
    """One vessel branch: a capsule between two points that fades in and out along z."""

    x0: float
    y0: float
    x1: float
    y1: float
    sigma: float  # half-thickness (normalised units)
    amp: float  # brightness over the lung (gray levels)
    zc: float  # slice position where the branch is strongest
    zw: float  # extent along z
    drift_x: float  # in-plane motion per unit z (vessels run obliquely through the slab)
    drift_y: float


@dataclass
class _Lung:
    side: int  # -1 = image left, +1 = image right
    cx: float
    cy: float
    ax: float
    ay: float
    rot: float
    power: float  # superellipse exponent: 2 = ellipse, larger = boxier
    harm: np.ndarray  # (k, 3): harmonic order, amplitude, phase of the boundary wobble
    val: float
    segments: list[_Segment]


@dataclass
class _PatientParams:
    """Everything that is fixed for one synthetic patient; per-slice variation comes from z and noise."""

    fov_r: float
    fov_val: float
    body_cx: float
    body_cy: float
    body_ax: float
    body_ay: float
    body_pow: float
    body_val: float
    rim_w: float
    rim_delta: float
    ant_depth: float
    ant_delta: float
    table_gap: float
    table_h: float
    table_val: float
    table_curve: float
    lungs: list[_Lung]
    heart_cx: float
    heart_cy: float
    heart_ax: float
    heart_ay: float
    heart_delta: float
    aorta_dx: float
    aorta_r: float
    spine_r: float
    spine_val: float
    rib_angles: np.ndarray
    rib_val: float
    nodules: np.ndarray  # (k, 6): lung index, u, v, radius, amplitude, zc
    ggo: np.ndarray  # (k, 5): lung index, u, v, radius, amplitude (ground-glass patches)
    shading: np.ndarray  # (k, 4): fx, fy, phase, amplitude of smooth intensity variation
    noise_sigma: float
    texture_amp: float


def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels per side), got {size!r}")


def _sample_lung(rng: np.random.Generator, side: int) -> _Lung:
    cx = side * rng.uniform(0.36, 0.46)
    cy = rng.uniform(-0.04, 0.08)
    ax = rng.uniform(0.27, 0.35)
    ay = rng.uniform(0.42, 0.54)
    n_h = 3
    harm = np.stack(
        [np.arange(2, 2 + n_h, dtype=float), rng.normal(0.0, 0.05, n_h) / np.arange(1, 1 + n_h),
         rng.uniform(0, 2 * np.pi, n_h)],
        axis=1,
    )
    # Vessels branch out from the hilum (the medial middle of each lung), thinning towards the periphery;
    # on an axial slice most of them show as short streaks and dots, not as long spokes.
    hx, hy = cx - side * 0.6 * ax, cy + rng.uniform(-0.05, 0.1)
    segments: list[_Segment] = []

    def add(x0: float, y0: float, x1: float, y1: float, sigma: float, amp: float) -> None:
        segments.append(_Segment(
            x0=x0, y0=y0, x1=x1, y1=y1, sigma=sigma, amp=amp, zc=rng.uniform(0.0, 1.0),
            zw=rng.uniform(0.08, 0.25), drift_x=rng.normal(0, 0.25), drift_y=rng.normal(0, 0.25),
        ))

    for _ in range(int(rng.integers(4, 8))):
        ang = rng.uniform(-0.5 * np.pi, 0.5 * np.pi) + (np.pi if side < 0 else 0.0)
        ln = rng.uniform(0.1, 0.22)
        x1, y1 = hx + ln * np.cos(ang), hy + ln * np.sin(ang) * 1.3
        add(hx, hy, x1, y1, rng.uniform(0.010, 0.016), rng.uniform(45, 80))
        for _ in range(int(rng.integers(1, 3))):
            a2 = ang + rng.normal(0, 0.5)
            l2 = rng.uniform(0.05, 0.12)
            add(x1, y1, x1 + l2 * np.cos(a2), y1 + l2 * np.sin(a2) * 1.3, rng.uniform(0.006, 0.011),
                rng.uniform(35, 65))
    for _ in range(int(rng.integers(12, 24))):
        r, ang = np.sqrt(rng.uniform(0.05, 0.75)), rng.uniform(0, 2 * np.pi)
        x, y = cx + r * ax * np.cos(ang), cy + r * ay * np.sin(ang)
        ln, a2 = rng.uniform(0.0, 0.05), rng.uniform(0, 2 * np.pi)
        add(x, y, x + ln * np.cos(a2), y + ln * np.sin(a2), rng.uniform(0.005, 0.009), rng.uniform(30, 60))
    return _Lung(
        side=side, cx=cx, cy=cy, ax=ax, ay=ay, rot=side * rng.uniform(-0.2, 0.1),
        power=rng.uniform(2.0, 2.8), harm=harm, val=rng.uniform(100, 118), segments=segments,
    )


def _sample_params(rng: np.random.Generator) -> _PatientParams:
    body_val = rng.uniform(168, 188)
    n_nod = int(rng.choice([0, 0, 1, 1, 2]))
    nodules = np.stack(
        [rng.integers(0, 2, n_nod).astype(float), rng.uniform(-0.6, 0.6, n_nod), rng.uniform(-0.6, 0.6, n_nod),
         rng.uniform(0.025, 0.06, n_nod), rng.uniform(50, 90, n_nod), rng.uniform(0, 1, n_nod)],
        axis=1,
    ).reshape(n_nod, 6)
    n_ggo = int(rng.choice([0, 0, 0, 1, 2]))
    ggo = np.stack(
        [rng.integers(0, 2, n_ggo).astype(float), rng.uniform(-0.5, 0.5, n_ggo), rng.uniform(-0.5, 0.7, n_ggo),
         rng.uniform(0.08, 0.2, n_ggo), rng.uniform(15, 40, n_ggo)],
        axis=1,
    ).reshape(n_ggo, 5)
    n_sh = 3
    shading = np.stack(
        [rng.normal(0, 1.2, n_sh), rng.normal(0, 1.2, n_sh), rng.uniform(0, 2 * np.pi, n_sh),
         rng.uniform(1.0, 4.0, n_sh)],
        axis=1,
    )
    n_ribs = int(rng.integers(4, 8))
    return _PatientParams(
        fov_r=rng.uniform(0.97, 1.03), fov_val=rng.uniform(92, 108),
        body_cx=rng.normal(0, 0.02), body_cy=rng.uniform(-0.04, 0.06),
        body_ax=rng.uniform(0.88, 1.0), body_ay=rng.uniform(0.62, 0.76), body_pow=rng.uniform(2.2, 3.2),
        body_val=body_val, rim_w=rng.uniform(0.02, 0.05), rim_delta=rng.uniform(4, 14),
        ant_depth=rng.uniform(0.0, 0.18), ant_delta=rng.uniform(-25, 12),
        table_gap=rng.uniform(0.03, 0.09), table_h=rng.uniform(0.04, 0.08), table_val=rng.uniform(105, 150),
        table_curve=rng.uniform(0.0, 0.15),
        lungs=[_sample_lung(rng, -1), _sample_lung(rng, +1)],
        heart_cx=rng.uniform(-0.02, 0.08), heart_cy=rng.uniform(-0.08, 0.06),
        heart_ax=rng.uniform(0.17, 0.26), heart_ay=rng.uniform(0.2, 0.3), heart_delta=rng.uniform(8, 20),
        aorta_dx=rng.uniform(-0.08, 0.06), aorta_r=rng.uniform(0.045, 0.07),
        spine_r=rng.uniform(0.085, 0.115), spine_val=rng.uniform(195, 225),
        rib_angles=np.sort(rng.uniform(0.2, 0.92, n_ribs)) * np.pi, rib_val=rng.uniform(200, 230),
        nodules=nodules, ggo=ggo, shading=shading,
        noise_sigma=rng.uniform(1.0, 3.0), texture_amp=rng.uniform(1.5, 5.0),
    )


def _superellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
                  power: float = 2.0, rot: float = 0.0) -> np.ndarray:
    """Normalised radius: < 1 inside the (rotated super-)ellipse."""
    c, s = np.cos(rot), np.sin(rot)
    u = ((x - cx) * c + (y - cy) * s) / ax
    v = (-(x - cx) * s + (y - cy) * c) / ay
    return (np.abs(u) ** power + np.abs(v) ** power) ** (1.0 / power)


def _segment_dist(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    dx, dy = x1 - x0, y1 - y0
    den = dx * dx + dy * dy
    t = np.zeros_like(x) if den < 1e-12 else np.clip(((x - x0) * dx + (y - y0) * dy) / den, 0.0, 1.0)
    return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


@functools.lru_cache(maxsize=16)
def _blur_matrix(n: int, sigma_px: float) -> np.ndarray:
    """``(n, n)`` matrix applying a 1-D Gaussian blur with reflected edges, so a 2-D blur is ``K @ img @ K.T``.

    Two small matrix products beat a per-row Python loop by far at these sizes, and need no scipy.
    """
    r = max(1, int(3 * sigma_px))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for off, wt in zip(range(-r, r + 1), k, strict=True):
            j = i + off
            j = -j - 1 if j < 0 else (2 * n - j - 1 if j >= n else j)  # symmetric reflection at the edges
            m[i, min(max(j, 0), n - 1)] += wt
    m.setflags(write=False)
    return m


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of a square image."""
    k = _blur_matrix(img.shape[0], float(sigma_px))
    return k @ img @ k.T


def _window(coords: np.ndarray, cx: float, cy: float, radius: float) -> tuple[slice, slice]:
    """Rows and columns of the grid within ``radius`` of (cx, cy): local features are drawn only there."""
    n = len(coords)
    step = coords[1] - coords[0]

    def rng1(c: float) -> slice:
        lo = int(np.floor((c - radius - coords[0]) / step))
        hi = int(np.ceil((c + radius - coords[0]) / step)) + 1
        return slice(min(max(lo, 0), n), min(max(hi, 0), n))

    return rng1(cy), rng1(cx)


def _render(p: _PatientParams, z: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw the slice of patient ``p`` at cranio-caudal position ``z``; ``rng`` only feeds per-slice noise."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")  # y grows downwards (anterior at the top)

    fov = np.hypot(x, y) < p.fov_r
    img = np.full((n, n), p.fov_val)

    # Patient table below the body, slightly curved like a real couch.
    body_bottom = p.body_cy + p.body_ay
    ty = body_bottom + p.table_gap - p.table_curve * x**2
    img = np.where((y > ty) & (y < ty + p.table_h), p.table_val, img)
    img = np.where((y > ty + p.table_h + 0.02) & (y < ty + p.table_h + 0.04), p.table_val - 15, img)

    # Body: boxier than an ellipse, with a brighter skin/muscle rim and an anterior layer (breast / fat)
    # whose brightness differs per patient, as seen at the top of the real slices.
    body_r = _superellipse(x, y, p.body_cx, p.body_cy, p.body_ax, p.body_ay, p.body_pow)
    body = body_r < 1.0
    img = np.where(body, p.body_val, img)
    img = np.where(body & (body_r > 1.0 - p.rim_w), p.body_val + p.rim_delta, img)
    ant = body & (y < p.body_cy - p.body_ay + p.ant_depth + 0.04 * np.cos(3 * x)) & (body_r < 1.0 - p.rim_w)
    img = np.where(ant, p.body_val + p.ant_delta, img)

    # Lungs grow towards the middle of the series and shrink towards apex and base.
    lung_scale = 0.78 + 0.3 * np.sin(np.pi * (0.15 + 0.7 * z))
    lung_masks = []
    for lung in p.lungs:
        r = _superellipse(x, y, lung.cx, lung.cy, lung.ax * lung_scale, lung.ay * lung_scale, lung.power,
                          lung.rot)
        th = np.arctan2(y - lung.cy, x - lung.cx)
        wobble = np.zeros_like(r)
        for k, amp, ph in lung.harm:
            wobble += amp * np.cos(k * th + ph + 2.0 * z)
        lung_masks.append(r < 1.0 + wobble)

    # Heart and great vessels occupy the mediastinum and bite into the medial lungs; the heart is larger in
    # lower slices (higher z).
    hs = 0.7 + 0.6 * z
    heart = _superellipse(x, y, p.heart_cx, p.heart_cy, p.heart_ax * hs, p.heart_ay * hs) < 1.0
    spine_y = p.body_cy + p.body_ay - 0.27
    aorta = np.hypot(x - p.aorta_dx, y - (spine_y - p.spine_r - p.aorta_r - 0.02)) < p.aorta_r
    # A column of soft tissue always separates the lungs, from the sternum down to the spine
    # (narrow in front, where the lungs nearly meet behind the sternum, wider behind the heart).
    half_w = np.where(y < p.heart_cy, 0.02, 0.05)
    medi = heart | aorta | ((np.abs(x - 0.5 * p.heart_cx) < half_w) & (y < spine_y))

    # Lungs stay clear of the mediastinum and of the chest wall.
    lung_masks = [m & body & ~medi & (body_r < 1.0 - p.rim_w - 0.05) for m in lung_masks]
    for lung, m in zip(p.lungs, lung_masks, strict=True):
        img = np.where(m, lung.val, img)
    img = np.where(medi & body, p.body_val + p.heart_delta, img)

    # Spine: vertebral body with a bright cortex, dark canal, spinous process behind it.
    d_vert = np.hypot(x, y - spine_y)
    img = np.where(d_vert < p.spine_r, p.spine_val, img)
    img = np.where((d_vert > p.spine_r * 0.78) & (d_vert < p.spine_r), p.spine_val + 15, img)
    canal_y = spine_y + p.spine_r + 0.035
    img = np.where(np.hypot(x, y - canal_y) < 0.035, p.body_val - 5, img)
    proc = _superellipse(x, y, 0.0, canal_y + 0.07, 0.025, 0.06) < 1.0
    img = np.where(proc & body, p.spine_val, img)
    # Transverse processes and rib heads flank the canal.
    for side in (-1, 1):
        tp = _superellipse(x, y, side * (p.spine_r + 0.06), canal_y, 0.07, 0.025, rot=side * 0.4) < 1.0
        img = np.where(tp & body, p.spine_val - 10, img)

    # Ribs: small bright ovals just inside the body outline, moving a little from slice to slice. Angles
    # run from anterior (0) round the side to posterior (pi).
    for side in (-1, 1):
        for ang in p.rib_angles:
            a = float(ang) + 0.1 * z
            rx = p.body_cx + side * 0.87 * p.body_ax * np.sin(a)
            ry = p.body_cy - 0.87 * p.body_ay * np.cos(a)
            win = _window(coords, rx, ry, 0.04)
            rib = _superellipse(x[win], y[win], rx, ry, 0.035, 0.018, rot=side * (np.pi / 2 - a)) < 1.0
            img[win] = np.where(rib & body[win], p.rib_val, img[win])

    # Lung contents: vessels, nodules, ground-glass patches and fine parenchymal texture.
    inside_lungs = lung_masks[0] | lung_masks[1]
    add = np.zeros_like(img)
    for lung in p.lungs:
        for sg in lung.segments:
            w = np.exp(-(((z - sg.zc) / sg.zw) ** 2))
            if w < 0.05:
                continue
            ox, oy = sg.drift_x * (z - sg.zc), sg.drift_y * (z - sg.zc)
            x0, y0, x1, y1 = sg.x0 + ox, sg.y0 + oy, sg.x1 + ox, sg.y1 + oy
            win = _window(coords, 0.5 * (x0 + x1), 0.5 * (y0 + y1),
                          0.5 * np.hypot(x1 - x0, y1 - y0) + 4 * sg.sigma)
            d = _segment_dist(x[win], y[win], x0, y0, x1, y1)
            add[win] = np.maximum(add[win], w * sg.amp * np.exp(-0.5 * (d / sg.sigma) ** 2))
    for li, u, v, rad, amp, zc in p.nodules:
        lung = p.lungs[int(li)]
        w = np.exp(-(((z - zc) / 0.12) ** 2))
        nx, ny = lung.cx + u * lung.ax, lung.cy + v * lung.ay
        win = _window(coords, nx, ny, rad + 0.05)
        d = np.hypot(x[win] - nx, y[win] - ny)
        add[win] = np.maximum(add[win], w * amp / (1.0 + np.exp((d - rad * w) / 0.006)))
    for li, u, v, rad, amp in p.ggo:
        lung = p.lungs[int(li)]
        d = np.hypot(x - (lung.cx + u * lung.ax), y - (lung.cy + v * lung.ay))
        add += amp * np.exp(-0.5 * (d / rad) ** 2)
    add += p.texture_amp * _blur(rng.standard_normal((n, n)), 1.2)
    img = np.where(inside_lungs, img + add, img)

    # Smooth scanner-like intensity drift across the field of view.
    for fx, fy, ph, amp in p.shading:
        img += amp * np.cos(np.pi * (fx * x + fy * y) + ph)

    img = np.where(fov, img, 0.0)
    small = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    fov_small = fov.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
    small = _blur(small, 0.5)
    # Noise stays inside the field of view: outside it real slices are exactly black.
    small += (fov_small > 0.99) * p.noise_sigma * rng.standard_normal((size, size))
    small *= fov_small > 0.0
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def make_phantom(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw one CT-like axial chest slice (lung window) for a new random synthetic patient.

    Args:
        rng: source of all randomness (patient anatomy, slice position, noise).
        size: output side length in pixels (>= 16).

    Returns:
        ``(size, size)`` uint8 image: black outside a circular field of view, gray air, a soft-tissue body
        with a brighter rim, two darker lungs with bright vessels and sometimes nodules, heart, spine, ribs,
        patient table, smooth shading and noise.
    """
    _check_size(size)
    params = _sample_params(rng)
    return _render(params, float(rng.uniform(0.2, 0.85)), rng, size)


def make_patients(rng: np.random.Generator, n_patients: int, slices_per_patient: int,
                  size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_patients`` synthetic CT series of ``slices_per_patient`` neighbouring slices each.

    Slices of one patient share all anatomy and differ by a small step along the body axis (organs change
    size, vessels drift in and out) and by fresh noise, so neighbours look alike, as in real CT series.

    Returns:
        ``(images, groups)``: images ``(n_patients * slices_per_patient, size, size)`` uint8, patient-major
        order; groups ``(N,)`` int64 patient index (0 .. n_patients - 1) of each image.
    """
    _check_size(size)
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    if slices_per_patient < 1:
        raise ValueError(f"slices_per_patient must be >= 1, got {slices_per_patient}")
    span = (slices_per_patient - 1) * _SLICE_DZ
    if span > 0.7:
        raise ValueError(
            f"slices_per_patient={slices_per_patient} spans more than the chest ({span:.2f} > 0.7 in z); "
            f"use at most {int(0.7 / _SLICE_DZ) + 1} slices per patient"
        )
    images = np.empty((n_patients * slices_per_patient, size, size), dtype=np.uint8)
    groups = np.repeat(np.arange(n_patients, dtype=np.int64), slices_per_patient)
    for pi in range(n_patients):
        params = _sample_params(rng)
        z0 = rng.uniform(0.15, 0.85 - span)
        for si in range(slices_per_patient):
            images[pi * slices_per_patient + si] = _render(params, z0 + si * _SLICE_DZ, rng, size)
    return images, groups


class PCAGenerator:
    """A stand-in for a GAN (NOT a GAN): a linear PCA image model that partly memorises its training set.

    Fitting keeps a pixel mean and the top ``n_components`` principal components (learnt from the training
    images, or from separate reference images, see :meth:`fit`), plus each training image's coefficients in
    that basis (its "code"). Sampling one image:

    1. pick a random training image's code (with probability ``blend``, a random mix of two training codes,
       mixing weight up to 0.5, imitating a generator interpolating between modes);
    2. mix it with a fresh Gaussian code ``g`` drawn with the per-component standard deviations of the
       training codes: ``code = memorisation * source + sqrt(1 - memorisation**2) * g``;
    3. decode ``mean + code @ components`` and round to uint8.

    ``memorisation`` is therefore the correlation between a sample's code and the training code it came
    from: 1.0 gives projections of training images (near copies), 0.0 a Gaussian model that knows the
    training set only through the basis and the spread of its codes. In between, samples sit closer to training images
    than to other images of the same kind, which is the signal membership inference looks for. Fine detail
    beyond ``n_components`` is never reproduced, so samples are blurrier than real slices, like a small GAN's.

    It is fitted in milliseconds (one SVD), which is the point: tests and demos need a generator with a
    known training set, not a good one.
    """

    def __init__(self, n_components: int = 32, memorisation: float = 0.8, blend: float = 0.0) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if not 0.0 <= memorisation <= 1.0:
            raise ValueError(f"memorisation must be in [0, 1], got {memorisation}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be a probability in [0, 1], got {blend}")
        self.n_components = int(n_components)
        self.memorisation = float(memorisation)
        self.blend = float(blend)
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.codes_: np.ndarray | None = None
        self.code_std_: np.ndarray | None = None
        self.shape_: tuple[int, int] | None = None

    def fit(self, images: np.ndarray, basis_images: np.ndarray | None = None) -> PCAGenerator:
        """Fit on ``(N, H, W)`` uint8 training images; returns ``self``.

        Args:
            images: the training set (N >= 2). Their codes are what samples copy from.
            basis_images: optional ``(M, H, W)`` reference images (M >= 2) of the same kind, NOT members of
                the training set, from which the mean and components are learnt instead. Without them the
                basis is fitted to the training images, and because a small training set spans its own
                subspace exactly, any sample in that subspace is then closer to members than to non-members:
                membership leaks even at ``memorisation=0``. With a reference basis the training images
                enter only through their codes, so ``memorisation`` controls the whole leak.
        """
        images = self._check_images(images, "images")
        n, h, w = images.shape
        x = images.reshape(n, h * w).astype(np.float64) / 255.0
        if basis_images is None:
            b = x
        else:
            basis_images = self._check_images(basis_images, "basis_images")
            if basis_images.shape[1:] != (h, w):
                raise ValueError(f"basis_images are {basis_images.shape[1:]} but images are {(h, w)}: "
                                 "use images of one size")
            b = basis_images.reshape(len(basis_images), h * w).astype(np.float64) / 255.0
        self.mean_ = b.mean(axis=0)
        # Economy SVD of the N x D data matrix: N is small (tens to hundreds), so this is cheap even for D=4096.
        _, s, vt = np.linalg.svd(b - self.mean_, full_matrices=False)
        k = min(self.n_components, len(b) - 1, max(1, int((s > 1e-8 * s[0]).sum())))
        self.components_ = vt[:k]
        self.codes_ = (x - self.mean_) @ self.components_.T
        self.code_std_ = self.codes_.std(axis=0)
        self.shape_ = (h, w)
        return self

    @staticmethod
    def _check_images(images: np.ndarray, name: str) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N >= 2, H, W), got {images.shape}")
        return images

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` images, ``(n, H, W)`` uint8."""
        if self.codes_ is None or self.components_ is None or self.mean_ is None or self.shape_ is None:
            raise RuntimeError("PCAGenerator.sample called before fit(images)")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        n_train = self.codes_.shape[0]
        src = self.codes_[rng.integers(0, n_train, n)]
        other = self.codes_[rng.integers(0, n_train, n)]
        lam = rng.uniform(0.0, 0.5, (n, 1)) * (rng.uniform(size=(n, 1)) < self.blend)
        src = (1.0 - lam) * src + lam * other
        fresh = rng.standard_normal(src.shape) * self.code_std_
        a = self.memorisation
        codes = a * src + np.sqrt(max(0.0, 1.0 - a * a)) * fresh
        x = self.mean_ + codes @ self.components_
        return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).reshape(n, *self.shape_)


def make_sample_dataset(
    out_dir: Path | str,
    n_patients: int = 30,
    slices_per_patient: int = 4,
    size: int = 64,
    n_generated_dev: int = 200,
    n_generated_test: int = 200,
    memorisation: float = 0.9,
    n_components: int = 32,
    blend: float = 0.1,
    n_reference_patients: int = 30,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write a synthetic membership-inference benchmark in the ImageCLEF layout of the shared benchmarks.

    Patients are split as wholes: half are "used" (every slice of theirs trains a :class:`PCAGenerator`),
    the rest "not used". On each side about a third of the patients go to the test set and the rest to dev,
    so dev and test real images never share a patient. Layout::

        out_dir/dev/generated/gen_00001.png ...      samples (dev seed)
        out_dir/dev/used/used_0001.png ...           training images of the dev-side used patients
        out_dir/dev/not_used/not_used_0001.png ...
        out_dir/test/generated/gen_00001.png ...     samples (different seed)
        out_dir/test/real_unknown/real_unknown_0001.png ...   used + not used, shuffled
        out_dir/test_labels.csv    id,label   (id = file stem, 1 = used for training)
        out_dir/groups.csv         id,group   (patient index of every real image)
        out_dir/README.md          how it was made

    The folder is built in a temporary sibling and renamed into place, so it is never half written.

    Args:
        out_dir: folder to create; must not exist unless ``overwrite``.
        n_patients: synthetic patients (>= 4: dev and test each need used and not-used patients).
        slices_per_patient: neighbouring slices per patient.
        size: image side in pixels.
        n_generated_dev, n_generated_test: generated images per split.
        memorisation: :class:`PCAGenerator` knob in [0, 1]; high = easy benchmark, low = hard.
        n_components: PCA components of the generator.
        blend: probability that a sample mixes two training images.
        n_reference_patients: extra phantom patients, never written and in no split, from which the
            generator's PCA basis is learnt (see :meth:`PCAGenerator.fit`); this makes ``memorisation`` the
            only membership leak, so a low value gives a benchmark near chance. 0 fits the basis to the
            training images, which leaks membership strongly whatever ``memorisation`` is.
        seed: the only source of randomness; same arguments give byte-identical files.
        overwrite: replace an existing ``out_dir``.

    Returns:
        Counts: ``patients``, ``used_patients``, ``train_images``, ``dev_generated``, ``dev_used``,
        ``dev_not_used``, ``test_generated``, ``test_real_unknown``, ``test_used``, ``test_not_used``.
    """
    out_dir = Path(out_dir)
    problems = []
    if n_patients < 4:
        problems.append(f"n_patients must be >= 4 (dev and test each need used and not-used patients), "
                        f"got {n_patients}")
    if slices_per_patient < 1:
        problems.append(f"slices_per_patient must be >= 1, got {slices_per_patient}")
    if n_generated_dev < 1 or n_generated_test < 1:
        problems.append(f"n_generated_dev and n_generated_test must be >= 1, got {n_generated_dev} and "
                        f"{n_generated_test}")
    if not 0.0 <= memorisation <= 1.0:
        problems.append(f"memorisation must be in [0, 1], got {memorisation}")
    if n_reference_patients < 0 or n_reference_patients * slices_per_patient == 1:
        problems.append(f"n_reference_patients must be 0 (basis from the training images) or give >= 2 "
                        f"reference images, got {n_reference_patients}")
    if problems:
        raise ValueError("make_sample_dataset: " + "; ".join(problems))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; delete it or pass overwrite=True")

    # Independent streams, so that e.g. changing the number of generated images leaves the real images
    # (and hence the labels) unchanged.
    ss_patients, ss_split, ss_dev, ss_test, ss_shuffle, ss_ref = np.random.SeedSequence(seed).spawn(6)
    images, groups = make_patients(np.random.default_rng(ss_patients), n_patients, slices_per_patient, size)
    ref = None
    if n_reference_patients > 0:
        ref, _ = make_patients(np.random.default_rng(ss_ref), n_reference_patients, slices_per_patient, size)

    rs = np.random.default_rng(ss_split)
    order = rs.permutation(n_patients)
    n_used = n_patients // 2
    used_p, not_used_p = order[:n_used], order[n_used:]

    def split_dev_test(pats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_test = min(len(pats) - 1, max(1, round(len(pats) / 3)))
        return np.sort(pats[n_test:]), np.sort(pats[:n_test])

    dev_used_p, test_used_p = split_dev_test(used_p)
    dev_not_p, test_not_p = split_dev_test(not_used_p)

    def idx_of(pats: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(groups, pats))

    train_idx = idx_of(used_p)
    gen = PCAGenerator(n_components=n_components, memorisation=memorisation, blend=blend)
    gen.fit(images[train_idx], basis_images=ref)
    dev_gen = gen.sample(n_generated_dev, np.random.default_rng(ss_dev))
    test_gen = gen.sample(n_generated_test, np.random.default_rng(ss_test))

    dev_used_idx, dev_not_idx = idx_of(dev_used_p), idx_of(dev_not_p)
    test_real = np.concatenate([idx_of(test_used_p), idx_of(test_not_p)])
    test_lab = np.concatenate([np.ones(len(idx_of(test_used_p)), int), np.zeros(len(idx_of(test_not_p)), int)])
    perm = np.random.default_rng(ss_shuffle).permutation(len(test_real))
    test_real, test_lab = test_real[perm], test_lab[perm]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        group_rows: list[tuple[str, int]] = []
        label_rows: list[tuple[str, int]] = []
        write_generated(tmp, dev_gen, test_gen)
        for prefix, idxs in (("used", dev_used_idx), ("not_used", dev_not_idx)):
            for i, j in enumerate(idxs, 1):
                stem = f"{prefix}_{i:04d}"
                save_gray_png(images[j], tmp / "dev" / prefix / f"{stem}.png")
                group_rows.append((stem, int(groups[j])))
        for i, (j, lab) in enumerate(zip(test_real, test_lab, strict=True), 1):
            stem = f"real_unknown_{i:04d}"
            save_gray_png(images[j], tmp / "test/real_unknown" / f"{stem}.png")
            group_rows.append((stem, int(groups[j])))
            label_rows.append((stem, int(lab)))
        for name, header, rows in (("test_labels.csv", ("id", "label"), label_rows),
                                   ("groups.csv", ("id", "group"), group_rows)):
            with open(tmp / name, "w", newline="") as f:
                wr = csv.writer(f, lineterminator="\n")
                wr.writerow(header)
                wr.writerows(rows)
        counts = {
            "patients": n_patients,
            "used_patients": len(used_p),
            "train_images": len(train_idx),
            "dev_generated": n_generated_dev,
            "dev_used": len(dev_used_idx),
            "dev_not_used": len(dev_not_idx),
            "test_generated": n_generated_test,
            "test_real_unknown": len(test_real),
            "test_used": int(test_lab.sum()),
            "test_not_used": int(len(test_lab) - test_lab.sum()),
        }
        (tmp / "README.md").write_text(_readme(counts, _readme_fields(
            seed, size, slices_per_patient, memorisation, n_components, blend, n_reference_patients, gen,
            used_p, dev_used_p, test_used_p, dev_not_p, test_not_p)))
    return counts


def _readme_fields(seed: int, size: int, spp: int, memorisation: float, n_components: int, blend: float,
                   n_ref: int, gen: PCAGenerator, used_p: np.ndarray, dev_used_p: np.ndarray,
                   test_used_p: np.ndarray, dev_not_p: np.ndarray, test_not_p: np.ndarray) -> dict[str, str]:
    """Strings for the README (kept apart so the writer above stays readable)."""
    def fmt(a: np.ndarray) -> str:
        return ", ".join(str(int(v)) for v in sorted(a))

    assert gen.components_ is not None
    return {
        "seed": str(seed), "size": str(size), "spp": str(spp), "mem": f"{memorisation:g}",
        "k": str(gen.components_.shape[0]), "k_req": str(n_components), "blend": f"{blend:g}",
        "basis": (f"{n_ref * spp} slices of {n_ref} separate reference phantom patients (not released, in no "
                  "split)" if n_ref > 0 else "the training images themselves"),
        "used": fmt(used_p), "dev_used": fmt(dev_used_p), "test_used": fmt(test_used_p),
        "dev_not": fmt(dev_not_p), "test_not": fmt(test_not_p),
    }


def _readme(c: dict[str, int], s: dict[str, str]) -> str:
    return f"""# Synthetic membership-inference sample benchmark

Made by `fingerprint.data.phantoms.make_sample_dataset(seed={s['seed']})`. Every image is synthetic: procedural
CT-like phantoms (no patient data), so this folder may be shared freely. It imitates the layout of the
ImageCLEFmedical GANs task so that the whole pipeline can run on it.

## How it was made
- {c['patients']} synthetic patients, {s['spp']} neighbouring axial slices each, {s['size']} x {s['size']} pixels,
  8-bit grayscale PNG (`fingerprint.data.phantoms.make_patients`).
- Patients were split as wholes: {c['used_patients']} "used" patients, the rest "not used". The generator was
  trained on all {c['train_images']} slices of the used patients: patients {s['used']}.
- The generator is a `PCAGenerator`, a stand-in for a GAN and NOT a GAN: mean + {s['k']} principal components
  (requested {s['k_req']}), learnt from {s['basis']}; a sample is a training image's code
  mixed with a fresh Gaussian code, `memorisation * code + sqrt(1 - memorisation^2) * noise`, with
  memorisation = {s['mem']}, and with probability {s['blend']} the training code is first blended with a second one.
- Dev and test real images come from different patients. Dev: used patients {s['dev_used']}; not-used
  patients {s['dev_not']}. Test: used patients {s['test_used']}; not-used patients {s['test_not']}.
- Dev and test generated images are drawn from the same generator with different random streams.

## Layout and counts
- `dev/generated/`: {c['dev_generated']} generated images (`gen_00001.png` ...).
- `dev/used/`: {c['dev_used']} real images that trained the generator (`used_0001.png` ...).
- `dev/not_used/`: {c['dev_not_used']} real images that did not (`not_used_0001.png` ...).
- `test/generated/`: {c['test_generated']} generated images.
- `test/real_unknown/`: {c['test_real_unknown']} real images, shuffled ({c['test_used']} used,
  {c['test_not_used']} not used).
- `test_labels.csv`: `id,label` for `test/real_unknown` (id = file name without `.png`, 1 = used).
- `groups.csv`: `id,group`, the synthetic patient of every real image (for grouped cross-validation).

`test_labels.csv` and this README are answer keys: do not use them to fit or tune a detector.
"""
