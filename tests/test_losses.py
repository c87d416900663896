"""The triplet loss and miners against brute-force loops over every triplet."""

import itertools

import pytest
import torch

from fingerprint.detectors.triplet.losses import TripletLoss, triplet_margin_loss
from fingerprint.detectors.triplet.miners import BatchHardMiner, NoMiner, SemiHardMiner, create_miner, squared_distances


def _emb(seed: int, n: int = 7, d: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, p, n_ = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1) for _ in range(3))
    return a, p, n_


def _brute_eq1(a, p, n, margin):
    out = []
    for i in range(a.shape[0]):
        dap = sum((float(a[i, j]) - float(p[i, j])) ** 2 for j in range(a.shape[1]))
        dan = sum((float(a[i, j]) - float(n[i, j])) ** 2 for j in range(a.shape[1]))
        out.append(max(0.0, dap - dan + margin))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.1, 0.5, 2.0])
def test_eq1_matches_brute_force(seed, margin):
    a, p, n = _emb(seed)
    got = triplet_margin_loss(a, p, n, margin)
    assert torch.allclose(got, torch.tensor(_brute_eq1(a, p, n, margin)), atol=1e-5)
    out = TripletLoss(margin)(a, p, n)
    ref = _brute_eq1(a, p, n, margin)
    assert out.loss.item() == pytest.approx(sum(ref) / len(ref), abs=1e-5)
    assert out.active_fraction == pytest.approx(sum(r > 0 for r in ref) / len(ref))
    assert out.triplets == a.shape[0]


def test_squared_distances_match_loops():
    a, p, _ = _emb(3)
    d = squared_distances(a, p)
    for i, j in itertools.product(range(a.shape[0]), range(p.shape[0])):
        assert float(d[i, j]) == pytest.approx(float(((a[i] - p[j]) ** 2).sum()), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_hard_picks_farthest_positive_and_closest_negative(seed):
    a, p, n = _emb(seed)
    ai, pi, ni = BatchHardMiner()(a, p, n, 0.5)
    for i in range(a.shape[0]):
        dp = [float(((a[i] - p[j]) ** 2).sum()) for j in range(p.shape[0])]
        dn = [float(((a[i] - n[j]) ** 2).sum()) for j in range(n.shape[0])]
        assert int(ai[i]) == i
        assert int(pi[i]) == max(range(len(dp)), key=dp.__getitem__)
        assert int(ni[i]) == min(range(len(dn)), key=dn.__getitem__)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_semi_hard_selects_exactly_the_semi_hard_triplets(seed, margin):
    a, p, n = _emb(seed, n=9)
    ai, pi, ni = SemiHardMiner()(a, p, n, margin)
    expected = set()
    for i, j in itertools.product(range(a.shape[0]), range(n.shape[0])):
        dap = float(((a[i] - p[i]) ** 2).sum())
        dan = float(((a[i] - n[j]) ** 2).sum())
        if dap < dan < dap + margin:
            expected.add((i, i, j))
    got = set(zip(ai.tolist(), pi.tolist(), ni.tolist(), strict=True))
    if expected:
        assert got == expected
    else:  # falls back to the sampled triplets rather than an empty step
        assert got == {(i, i, i) for i in range(a.shape[0])}


def test_loss_with_miner_is_differentiable_and_miner_is_not():
    a, p, n = (t.clone().requires_grad_(True) for t in _emb(5))
    out = TripletLoss(0.5, BatchHardMiner())(a, p, n)
    out.loss.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_bad_shapes_and_unknown_miner_are_explained():
    a, p, n = _emb(0)
    with pytest.raises(ValueError, match="batch, dim"):
        TripletLoss(0.5)(a, p[:3], n)
    with pytest.raises(ValueError, match="--mining"):
        create_miner("hardest")
    assert isinstance(create_miner("none"), NoMiner)
