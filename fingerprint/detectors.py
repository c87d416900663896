"""Membership detectors that `fingerprint benchmark` runs side by side on the same images and splits.

Each detector gives every real image of a :class:`Pool` a score, higher = more likely in the generator's
training set. Families (issue #6):

* (a) :class:`PixelNN`: nearest generated image in pixel space, by L2 distance or normalised cross-correlation.
* (b) :class:`SSIMNN`: nearest generated image by SSIM; its decision threshold is a quantile of how similar real
  images are to each other (the best 2023 team's calibration).
* (c) :class:`FrozenNN`: nearest generated image by cosine similarity of frozen ImageNet features (timm).
* (d) :class:`TripletNN`: the seed's triplet fine-tuning (Eq. 1) through :func:`fingerprint.training.fit`,
  then k-NN scoring with the library's :func:`fingerprint.scoring.membership_scores`.
* (e) :class:`GradientNN` (A), :class:`DomainClassifier` (B), their :class:`RankEnsemble` (A+B, no labels),
  and :class:`SelectedEnsemble` ("best"): the rank average of the subset of {pixel NCC, A, B} that does best
  on the training labels.

Why gradients (A, B): CT slices share a bright body outline and smooth tissue, so raw pixel correlation is
dominated by global shape that every slice has. Sobel gradients keep the edges and fine texture, where a
generator's memory of particular training slices shows; on the ctbench sets they beat raw pixels by 0.1-0.2 AUC.

Why a domain classifier (B): a generator reproduces its training distribution, not only single images. A linear
classifier that tells generated from real images, applied to a real image it never saw, rates training members as
"more generated-like". It needs no labels; each real image is scored by a model fitted without its whole group
(cross-fitting), so near-duplicate slices cannot leak its own answer.

Unsupervised detectors (``needs_labels = False``) never read labels in :meth:`Detector.score`; labels only enter
through :meth:`Detector.threshold`, which the harness calls on training folds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata
from torch import nn
from tqdm.auto import tqdm

from fingerprint.thresholds import threshold_max_f1, threshold_real_to_real

log = logging.getLogger(__name__)

__all__ = [
    "Pool",
    "Detector",
    "PixelNN",
    "SSIMNN",
    "FrozenNN",
    "TripletNN",
    "TripletSettings",
    "GradientNN",
    "DomainClassifier",
    "RankEnsemble",
    "SelectedEnsemble",
    "area_resize",
    "unit_rows",
    "gradient_features",
    "topk_mean",
    "ssim_matrix",
]


# ------------------------------------------------------------------------------------------------- data


@dataclass
class Pool:
    """The images one benchmark run works on, as arrays; every detector scores all of ``real``."""

    generated: np.ndarray
    """(G, H, W) float32 in [0, 1]: all generated images (dev and test), the gallery."""
    real: np.ndarray
    """(R, H, W) float32 in [0, 1]: every real image, labelled dev images first, then unlabelled test ones."""
    labels: np.ndarray
    """(R,) int64: 1 = used for training, 0 = not used, -1 = unknown (test)."""
    groups: np.ndarray
    """(R,) int64 pseudo-patient ids: near-duplicate slices share one, and splits keep groups whole."""
    generated_source: np.ndarray
    """(G,) int64: 0 = dev generated, 1 = test generated (the seed balances triplet anchors between them)."""
    real_ids: list[str]
    generated_ids: list[str]
    _pil: dict[str, list[Image.Image]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        r, g = len(self.real), len(self.generated)
        for name, arr, n in (("labels", self.labels, r), ("groups", self.groups, r),
                             ("generated_source", self.generated_source, g)):
            if len(arr) != n:
                raise ValueError(f"Pool.{name} has {len(arr)} entries for {n} images")
        if len(self.real_ids) != r or len(self.generated_ids) != g:
            raise ValueError("Pool ids must match the images one to one")
        if r == 0 or g == 0:
            raise ValueError(f"Pool needs real and generated images (got {r} real, {g} generated)")

    @property
    def labelled(self) -> np.ndarray:
        """Indices of real images with a label (0 or 1)."""
        return np.flatnonzero(self.labels >= 0)

    def pil(self, which: str) -> list[Image.Image]:
        """8-bit gray PIL images of 'real' or 'generated' (for timm preprocessing), made once."""
        if which not in self._pil:
            arr = self.real if which == "real" else self.generated
            self._pil[which] = [Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L") for a in arr]
        return self._pil[which]


# ------------------------------------------------------------------------------------------- features


def area_resize(x: np.ndarray, size: int) -> np.ndarray:
    """Area-average (N, H, W) images to (N, size, size); exact block means when H and W are multiples of size."""
    x = np.asarray(x, dtype=np.float64)
    n, h, w = x.shape
    if (h, w) == (size, size):
        return x

    def mat(n_in: int) -> np.ndarray:
        edges = np.linspace(0.0, n_in, size + 1)
        lo = np.arange(n_in, dtype=np.float64)
        ov = np.clip(np.minimum(lo[None] + 1, edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]), 0, None)
        return ov / ov.sum(axis=1, keepdims=True)

    return np.einsum("ph,nhw,qw->npq", mat(h), x, mat(w), optimize=True)


def unit_rows(v: np.ndarray) -> np.ndarray:
    """Rows mean-centred and scaled to unit length, so a dot product is the normalised cross-correlation."""
    v = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
    v = v - v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def gradient_features(x: np.ndarray, size: int = 64) -> np.ndarray:
    """Sobel gradients (gx then gy) of images area-resized to ``size``, as unit NCC rows (N, 2 * size^2)."""
    x = area_resize(x, size)
    gx = ndimage.sobel(x, axis=-1, mode="nearest")
    gy = ndimage.sobel(x, axis=-2, mode="nearest")
    return unit_rows(np.concatenate([gx.reshape(len(x), -1), gy.reshape(len(x), -1)], axis=1))


def topk_mean(sim: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k largest entries of each row."""
    k = min(k, sim.shape[1])
    if k == 1:
        return sim.max(axis=1)
    return np.partition(sim, sim.shape[1] - k, axis=1)[:, -k:].mean(axis=1)


def _similarity_topk(q: np.ndarray, g: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """topk_mean of q @ g.T, computed in row blocks so memory stays bounded for large pools."""
    return np.concatenate([topk_mean(q[s : s + chunk] @ g.T, k) for s in range(0, len(q), chunk)])


def _gauss_band(n: int, window: int, sigma: float) -> np.ndarray:
    """(n - window + 1, n) matrix: each row a normalised Gaussian window, i.e. a 'valid' 1-D filter."""
    t = np.arange(window) - (window - 1) / 2
    g = np.exp(-(t**2) / (2 * sigma**2))
    g /= g.sum()
    m = n - window + 1
    out = np.zeros((m, n))
    for i in range(m):
        out[i, i : i + window] = g
    return out


def ssim_matrix(
    a: np.ndarray,
    b: np.ndarray,
    window: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    block_pairs: int = 256,
    progress: str | None = None,
) -> np.ndarray:
    """Mean SSIM (Wang et al. 2004) of every image in ``a`` with every image in ``b``: (len(a), len(b)) float32.

    Gaussian window (``window`` taps, ``sigma``), K1 = 0.01, K2 = 0.03, population statistics, and the mean
    over the 'valid' region where the window fits inside the image, which equals scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.

    Why it is fast: per-image means and variances are computed once; per pair only the filtered product
    x*y is needed, and the separable filter is applied as two large matrix products over blocks of about
    ``block_pairs`` pairs that stay in cache (2,500 x 360 pairs of 64 x 64 take well under a minute per core).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:] or a.shape[1] != a.shape[2]:
        raise ValueError(f"ssim_matrix needs square images of one size, got {a.shape} and {b.shape}")
    n = a.shape[1]
    if window > n:
        raise ValueError(f"SSIM window {window} is larger than the {n}x{n} images")
    band = _gauss_band(n, window, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def stats(x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # float64 here: E[x^2] - mu^2 cancels badly in float32. Maps are kept transposed (band x band^T
        # gives (F x)^T below), matching the layout the pair loop produces.
        mu = np.einsum("ph,nhw,qw->nqp", band, x, band, optimize=True)
        var = np.einsum("ph,nhw,qw->nqp", band, x * x, band, optimize=True) - mu**2
        return (torch.from_numpy(mu.astype(np.float32)), torch.from_numpy((mu**2).astype(np.float32)),
                torch.from_numpy(var.astype(np.float32)))

    mu_a, mu2_a, var_a = stats(a)
    mu_b, mu2_b, var_b = stats(b)
    var_a += c2
    mu2_a += c1
    ta, tb = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
    bt = torch.from_numpy(band.T.astype(np.float32).copy())  # (n, m)
    m = bt.shape[1]
    out = torch.empty(len(a), len(b))
    gc = max(1, min(len(b), block_pairs))
    rc = max(1, block_pairs // gc)
    with torch.no_grad():
        for i0 in tqdm(range(0, len(a), rc), desc=progress, disable=progress is None, unit="row", leave=False,
                       unit_scale=rc):
            i1 = min(i0 + rc, len(a))
            for j0 in range(0, len(b), gc):
                j1 = min(j0 + gc, len(b))
                r, g = i1 - i0, j1 - j0
                prod = (ta[i0:i1, None] * tb[None, j0:j1]).reshape(-1, n)
                h = (prod @ bt).view(-1, n, m).transpose(1, 2).reshape(-1, n)  # filter along rows
                f = (h @ bt).view(r, g, m, m)  # then columns: (F(xy))^T per pair
                mm = mu_a[i0:i1, None] * mu_b[None, j0:j1]
                f.sub_(mm).mul_(2).add_(c2)  # 2 sigma_xy + C2
                f.mul_(mm.mul_(2).add_(c1))  # * (2 mu_x mu_y + C1)
                den = mu2_a[i0:i1, None] + mu2_b[None, j0:j1]
                den.mul_(var_a[i0:i1, None] + var_b[None, j0:j1])
                out[i0:i1, j0:j1] = f.div_(den).mean(dim=(2, 3))
    return out.numpy()


def _other_group_mask(groups: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """True where a real pool image shares the row image's group (itself included): never its own reference."""
    rows = np.arange(len(groups)) if rows is None else rows
    return groups[rows, None] == groups[None, :]


# ------------------------------------------------------------------------------------------- detectors


class Detector:
    """A membership detector: :meth:`score` every real image of a pool, :meth:`threshold` from labelled ones."""

    name: str = "detector"
    family: str = "?"
    """Issue #6 family: 'a' pixel, 'b' SSIM, 'c' frozen features, 'd' triplet fine-tuning, 'e' ours."""
    needs_labels: bool = False
    """True: :meth:`score` fits on the labels of ``train`` (the harness refits it per fold)."""
    costly: bool = False
    """True: each fit trains a network, so the harness refits it on fewer repeats (--trained-repeats)."""
    description: str = ""

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        """(R,) scores for every real image in ``pool``; only labels of ``train`` may be used."""
        raise NotImplementedError

    def threshold(self, pool: Pool, scores: np.ndarray, train: np.ndarray) -> float:
        """Decision threshold (decide used when score >= t) from the labelled images ``train`` only."""
        return threshold_max_f1(pool.labels[train], scores[train])


class PixelNN(Detector):
    """(a) Pixel nearest neighbour: negative L2 distance or normalised cross-correlation to the nearest generated
    image, at the pool's resolution."""

    family = "a"

    def __init__(self, metric: str = "ncc") -> None:
        if metric not in ("l2", "ncc"):
            raise ValueError(f"PixelNN metric must be 'l2' or 'ncc', got {metric!r}")
        self.metric = metric
        self.name = f"pixel_{metric}"
        self.description = ("pixel NN, negative L2 distance" if metric == "l2"
                            else "pixel NN, normalised cross-correlation")

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        q = pool.real.reshape(len(pool.real), -1).astype(np.float64)
        g = pool.generated.reshape(len(pool.generated), -1).astype(np.float64)
        if self.metric == "ncc":
            return _similarity_topk(unit_rows(q), unit_rows(g), 1)
        # max of -||q - g||^2 = max of (2 q.g - |g|^2) - |q|^2; the root keeps it a distance.
        best = np.concatenate([(2 * q[s : s + 512] @ g.T - (g * g).sum(1)[None]).max(1)
                               for s in range(0, len(q), 512)])
        return -np.sqrt(np.maximum((q * q).sum(1) - best, 0.0))


class SSIMNN(Detector):
    """(b) SSIM to the nearest generated image; the threshold is a quantile of real-to-real SSIM.

    Real-to-real reference: each real image's best SSIM with a real image outside its own group. The best 2023
    team flagged an image as used when it is closer to a generated image than real images typically are to one
    another; which quantile of that reference to use is chosen on the training folds (max F1 over a grid).
    """

    family = "b"
    name = "ssim"
    description = "SSIM NN, threshold = real-to-real SSIM quantile"

    def __init__(self, quantiles: Sequence[float] = tuple(np.linspace(0.02, 0.98, 49))) -> None:
        self.quantiles = tuple(float(q) for q in quantiles)
        self.reference: np.ndarray | None = None

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        gen = ssim_matrix(pool.real, pool.generated, progress="SSIM real x generated")
        rr = ssim_matrix(pool.real, pool.real)
        np.fill_diagonal(rr, -np.inf)
        outside = np.where(_other_group_mask(pool.groups), -np.inf, rr).max(axis=1)
        # A group holding the whole pool has no outside reference; fall back to every other image.
        ref = np.where(np.isfinite(outside), outside, rr.max(axis=1))
        self.reference = ref
        return gen.max(axis=1)

    def threshold(self, pool: Pool, scores: np.ndarray, train: np.ndarray) -> float:
        if self.reference is None:
            raise RuntimeError("SSIMNN.threshold needs score() to have run on this pool first")
        cands = np.array([threshold_real_to_real(self.reference, q) for q in self.quantiles])
        y, s = pool.labels[train], scores[train]
        dec = s[None, :] >= cands[:, None]
        tp = (dec & (y == 1)).sum(1)
        fp = (dec & (y == 0)).sum(1)
        fn = (~dec & (y == 1)).sum(1)
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        return float(cands[int(np.argmax(f1))])


class _Features(nn.Module):
    """The backbone's pooled features of an EmbeddingNet, without the (random) projection head."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


class FrozenNN(Detector):
    """(c) Cosine similarity of frozen pretrained backbone features (timm) to the nearest generated image."""

    family = "c"

    def __init__(self, backbone: str, weights: str, image_size: int = 128, device: str = "auto",
                 batch_size: int = 64) -> None:
        self.backbone, self.weights, self.image_size = backbone, weights, image_size
        self.device, self.batch_size = device, batch_size
        self.name = f"frozen_{backbone}"
        self.description = f"frozen {backbone} features ({image_size} px), cosine NN"

    def embed(self, pool: Pool) -> tuple[np.ndarray, np.ndarray]:
        from fingerprint.backbones import create_embedder, data_config
        from fingerprint.config import ModelConfig
        from fingerprint.embedding import embed_images, resolve_device
        from fingerprint.transforms import Preprocess

        cfg = ModelConfig(backbone=self.backbone, weights=self.weights, image_size=self.image_size, in_chans=1)
        net = create_embedder(cfg)
        tf = Preprocess(data_config(net, cfg))
        dev = resolve_device(self.device)
        model = _Features(net).to(dev).eval()
        real = embed_images(model, pool.pil("real"), tf, self.batch_size, dev, progress=f"{self.name}: real")
        gen = embed_images(model, pool.pil("generated"), tf, self.batch_size, dev,
                           progress=f"{self.name}: generated")
        return real, gen

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        real, gen = self.embed(pool)
        norm = lambda v: v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)  # noqa: E731
        return _similarity_topk(norm(real.astype(np.float64)), norm(gen.astype(np.float64)), 1)


@dataclass
class TripletSettings:
    """Training settings of (d); small by default so that a 2-core CPU trains one fold in well under a minute."""

    image_size: int = 64
    embed_dim: int = 128
    epochs: int = 3
    triplets_per_epoch: int = 512
    batch_size: int = 32
    lr: float = 1e-4
    margin: float = 0.5
    mining: str = "none"
    k: int = 5
    calibrate: bool = True
    device: str = "auto"
    seed: int = 0


class TripletNN(Detector):
    """(d) The seed's triplet fine-tuning: anchor = generated, positive = used, negative = not-used image (Eq. 1),
    anchors balanced between dev and test generated images, positives augmented; trained with
    :func:`fingerprint.training.fit` (the loop the Ray Train job runs) on the labelled images of ``train`` only,
    then scored with :func:`fingerprint.scoring.membership_scores` (k-NN, real-pool calibration)."""

    family = "d"
    needs_labels = True
    costly = True

    def __init__(self, backbone: str, weights: str, settings: TripletSettings | None = None) -> None:
        self.backbone, self.weights = backbone, weights
        self.settings = settings or TripletSettings()
        self.name = f"triplet_{backbone}"
        s = self.settings
        self.description = (f"triplet fine-tuning {backbone} ({s.image_size} px, {s.epochs} x "
                            f"{s.triplets_per_epoch} triplets), k={s.k} NN")

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        from fingerprint.config import ScoreConfig, TrainConfig
        from fingerprint.embedding import embed_images, resolve_device
        from fingerprint.scoring import membership_scores
        from fingerprint.training import TrainingData, fit
        from fingerprint.transforms import Preprocess

        if train is None:
            raise ValueError(f"{self.name} is trained on labels: pass the training indices")
        train = np.asarray(train)
        s = self.settings
        cfg = TrainConfig(
            backbone=self.backbone, weights=self.weights, embed_dim=s.embed_dim, image_size=s.image_size,
            in_chans=1, k=s.k, calibrate=s.calibrate, epochs=s.epochs, triplets_per_epoch=s.triplets_per_epoch,
            batch_size=s.batch_size, lr=s.lr, margin=s.margin, mining=s.mining, augment=True, val_fraction=0.0,
            seed=s.seed, device=s.device,
        )
        real_pil, gen_pil = pool.pil("real"), pool.pil("generated")
        y = pool.labels[train]
        data = TrainingData(
            anchors=gen_pil, anchor_sources=pool.generated_source,
            positives=[real_pil[i] for i in train[y == 1]], negatives=[real_pil[i] for i in train[y == 0]],
            val_images=[], val_labels=np.zeros(0, dtype=np.int64), val_ids=[],
            gallery=gen_pil, gallery_ids=pool.generated_ids, reference=real_pil,
            split={"train": [pool.real_ids[i] for i in train], "val": []},
        )
        result = fit(cfg, data)
        dev = resolve_device(s.device)
        tf = Preprocess(result.data_config)
        real = embed_images(result.model, real_pil, tf, device=dev, amp=cfg.amp)
        gen = embed_images(result.model, gen_pil, tf, device=dev, amp=cfg.amp)
        score_cfg = ScoreConfig(k=s.k, calibrate=s.calibrate)
        return membership_scores(real, gen, score_cfg, reference=real if s.calibrate else None).score.astype(
            np.float64)


class GradientNN(Detector):
    """(e, "A") Mean normalised cross-correlation of Sobel-gradient images with the k nearest generated images."""

    family = "e"
    name = "grad_nn"

    def __init__(self, size: int = 64, k: int = 10) -> None:
        self.size, self.k = size, k
        self.description = f"gradient NCC ({size} px), mean of {k} nearest generated"

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        q = gradient_features(pool.real, self.size)
        g = gradient_features(pool.generated, self.size)
        return _similarity_topk(q, g, self.k)


class GeneratedMass(Detector):
    """(e) How much generated mass lies near an image: negative mean squared L2 distance to its k nearest
    generated images, in pixels or in the generator's principal subspace.

    A generator that memorises puts many samples around each training image, not just one: averaging over k
    neighbours measures that density and is less noisy than the single nearest neighbour. With ``subspace``, both
    sides are first projected on the principal components that explain ``variance`` of the generated images (the
    directions the generator actually varies in), which drops pixel detail the generator never reproduces. The
    projection uses only generated images, never labels.
    """

    family = "e"

    def __init__(self, k: int = 10, subspace: bool = False, variance: float = 0.95) -> None:
        self.k, self.subspace, self.variance = k, subspace, variance
        self.name = "subspace_mass" if subspace else "pixel_mass"
        self.description = (f"generated mass: mean L2 to {k} nearest generated"
                            + (f", in the generated images' {variance:.0%}-variance PCA subspace" if subspace
                               else ", pixels"))

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        q = pool.real.reshape(len(pool.real), -1).astype(np.float64)
        g = pool.generated.reshape(len(pool.generated), -1).astype(np.float64)
        if self.subspace:
            mu = g.mean(axis=0)
            _, sv, vt = np.linalg.svd(g - mu, full_matrices=False)
            m = int(np.searchsorted(np.cumsum(sv**2) / np.sum(sv**2), self.variance)) + 1
            q, g = (q - mu) @ vt[:m].T, (g - mu) @ vt[:m].T
        g2 = (g * g).sum(1)
        out = []
        for s in range(0, len(q), 512):
            d = np.maximum((q[s : s + 512] ** 2).sum(1)[:, None] + g2[None] - 2 * q[s : s + 512] @ g.T, 0.0)
            out.append(topk_mean(-d, self.k))  # = -(mean of the k smallest squared distances)
        return np.concatenate(out)


class DomainClassifier(Detector):
    """(e, "B") Logistic regression generated (1) vs real pool (0) on gradient features, cross-fitted over groups.

    The real pool is every real image, labelled or not; labels are never read. Groups are spread over ``folds``
    folds at random; each real image is scored (decision function) by a model fitted on all generated images
    and the real images of the other folds, so no model sees the image it scores or its near-duplicates.
    """

    family = "e"
    name = "domain_clf"

    def __init__(self, size: int = 32, c: float = 0.01, folds: int = 10, seed: int = 0) -> None:
        self.size, self.c, self.folds, self.seed = size, c, folds, seed
        self.description = f"gen-vs-real logistic regression on gradients ({size} px, C={c}), {folds}-fold cross-fit"

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        q = gradient_features(pool.real, self.size)
        g = gradient_features(pool.generated, self.size)
        ug = np.unique(pool.groups)
        fold_of_group = dict(zip(ug.tolist(), np.random.default_rng(self.seed).integers(0, self.folds, len(ug)),
                                 strict=True))
        fold = np.array([fold_of_group[v] for v in pool.groups.tolist()])
        out = np.empty(len(q))
        for k in range(self.folds):
            held = fold == k
            if not held.any():
                continue
            x = np.concatenate([g, q[~held]])
            t = np.r_[np.ones(len(g)), np.zeros(int((~held).sum()))]
            clf = LogisticRegression(C=self.c, max_iter=3000, class_weight="balanced").fit(x, t)
            out[held] = clf.decision_function(q[held])
        return out


class _Members(Detector):
    """Shared by the ensembles: member scores computed once per pool, or taken from the harness's cache."""

    family = "e"

    def __init__(self, members: Sequence[Detector], name: str) -> None:
        if not members:
            raise ValueError(f"{type(self).__name__} needs at least one member")
        if any(m.needs_labels for m in members):
            raise ValueError(f"{type(self).__name__} members must be unsupervised (they are scored once)")
        self.members = list(members)
        self.name = name
        self.cache: dict[str, np.ndarray] = {}
        """Member scores already computed on this pool (by member name), reused instead of recomputed."""
        self._pool_id: int | None = None

    def member_ranks(self, pool: Pool) -> dict[str, np.ndarray]:
        """Each member's scores as ranks over the whole real pool divided by its size: no scale, no labels."""
        if self._pool_id is not None and self._pool_id != id(pool):
            self.cache = {}  # a different pool: cached scores belong to the old one
        self._pool_id = id(pool)
        for m in self.members:
            if m.name not in self.cache:
                self.cache[m.name] = m.score(pool)
        return {m.name: rankdata(self.cache[m.name]) / len(pool.real) for m in self.members}


class RankEnsemble(_Members):
    """(e) Mean of the members' ranks over the real pool (each divided by the pool size). Uses no labels."""

    def __init__(self, members: Sequence[Detector], name: str = "rank_ensemble") -> None:
        super().__init__(members, name)
        self.description = "rank average of " + " + ".join(m.name for m in self.members) + " (no labels)"

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        ranks = self.member_ranks(pool)
        return np.mean([ranks[m.name] for m in self.members], axis=0)


class SelectedEnsemble(_Members):
    """(e) The rank average of whichever subset of members has the highest AUC on the training labels.

    Why select: which representation carries a generator's memory depends on the images and the generator. On
    the ctbench CT sets gradients win (pixel NN 0.57-0.70 AUC, gradient detectors 0.78-0.83), while on the
    smooth phantoms of the sample data pixel NN wins (0.91 against 0.65-0.78). Each member is unsupervised and
    scored once; only the choice among the ``2^m - 1`` subsets reads labels, and only those of ``train`` (the
    training folds in the harness, all labelled dev images for test predictions). Ties go to the larger subset,
    since averaging more scores is the safer bet. The choices made are kept in :attr:`chosen`.
    """

    needs_labels = True

    def __init__(self, members: Sequence[Detector], name: str = "best") -> None:
        super().__init__(members, name)
        self.description = ("rank average of the subset of {" + ", ".join(m.name for m in self.members)
                            + "} with the best AUC on the training folds")
        self.chosen: list[tuple[str, ...]] = []

    def subsets(self) -> list[tuple[str, ...]]:
        from itertools import combinations

        names = [m.name for m in self.members]
        return [c for r in range(len(names), 0, -1) for c in combinations(names, r)]

    def score(self, pool: Pool, train: np.ndarray | None = None) -> np.ndarray:
        from fingerprint.metrics import roc_auc

        if train is None:
            raise ValueError(f"{self.name} chooses its members on labels: pass the training indices")
        ranks = self.member_ranks(pool)
        y = pool.labels[train]
        if len(np.unique(y)) < 2:
            raise ValueError(f"{self.name}: the training images need both used and not-used labels")
        combos = {c: np.mean([ranks[n] for n in c], axis=0) for c in self.subsets()}
        # Larger subsets come first, and max() keeps the first of equals: ties go to more members.
        best = max(combos, key=lambda c: roc_auc(y, combos[c][train]))
        self.chosen.append(best)
        return combos[best]


def weights_file(weights_dir: str | Path, backbone: str) -> Path | None:
    """``<weights_dir>/<backbone>.safetensors`` (or .pth/.bin) if it exists."""
    for ext in (".safetensors", ".pth", ".bin"):
        p = Path(weights_dir) / f"{backbone}{ext}"
        if p.is_file():
            return p
    return None
