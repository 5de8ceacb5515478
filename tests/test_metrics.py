"""Evaluation metrics: known answers, an independent numpy reference, and exact DDP-style merging."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from dreambooth_pl.metrics import (
    DirectionalSimilarity,
    MeanValue,
    PairedCosine,
    PairwiseCosine,
    directional_similarity,
    within_group_pairs,
)

D = 16


def _rand(n: int, seed: int, d: int = D) -> torch.Tensor:
    # Raw, non-unit features with a random scale per row: the metrics must normalise them.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.1) * 5


def _np_unit(x: torch.Tensor) -> np.ndarray:
    a = x.numpy().astype(np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_identical_sets_score_one():
    v = _rand(1, 0)
    real = v * torch.tensor([[1.0], [2.0], [0.5]])  # three embeddings of one image, different scales
    gen = v * torch.tensor([[3.0], [0.1]])
    m = PairwiseCosine()
    m.update(real, gen)
    assert abs(m.compute().item() - 1.0) < 1e-6
    m = PairwiseCosine()
    m.update(real, real, exclude_self=True)
    assert abs(m.compute().item() - 1.0) < 1e-6


def test_orthogonal_sets_score_zero():
    # Real rows live in coordinates 0..7, generated rows in 8..15: every pair is orthogonal.
    real, gen = _rand(4, 1), _rand(5, 2)
    real[:, 8:] = 0
    gen[:, :8] = 0
    m = PairwiseCosine()
    m.update(real, gen)
    assert abs(m.compute().item()) < 1e-12


def test_pairwise_matches_numpy():
    real, gen = _rand(5, 3), _rand(7, 4)
    m = PairwiseCosine()
    m.update(real, gen)
    expected = (_np_unit(real) @ _np_unit(gen).T).mean()
    assert m.compute().item() == pytest.approx(expected, abs=1e-12)
    assert m.count.item() == 35


def test_pairwise_exclude_self_matches_numpy():
    real = _rand(6, 5)
    m = PairwiseCosine()
    m.update(real, real, exclude_self=True)
    u = _np_unit(real)
    sims = u @ u.T
    expected = np.mean([sims[i, j] for i in range(6) for j in range(6) if i != j])
    assert m.compute().item() == pytest.approx(expected, abs=1e-12)
    assert m.count.item() == 30
    # Including the diagonal (all ones) would raise the score: the exclusion matters.
    assert sims.mean() > expected + 1e-3
    with_self = PairwiseCosine()
    with_self.update(real, real)
    assert with_self.count.item() == 36
    assert with_self.compute().item() == pytest.approx((30 * expected + 6) / 36, abs=1e-12)


def test_exclude_self_rejects_two_sets():
    with pytest.raises(ValueError, match="exclude_self"):
        PairwiseCosine().update(_rand(4, 0), _rand(4, 1), exclude_self=True)
    with pytest.raises(ValueError, match="exclude_self"):
        PairwiseCosine().update(_rand(4, 0), _rand(3, 0), exclude_self=True)


def test_paired_cosine_matches_numpy():
    a, b = _rand(9, 6), _rand(9, 7)
    m = PairedCosine()
    m.update(a, b)
    expected = (_np_unit(a) * _np_unit(b)).sum(1).mean()
    assert m.compute().item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="a\\[i\\] with b\\[i\\]"):
        m.update(a, b[:3])


def test_directional_similarity_matches_numpy():
    i_src, i_edit, t_src, t_edit = (_rand(6, s) for s in (10, 11, 12, 13))
    got = directional_similarity(i_src, i_edit, t_src, t_edit)
    di = _np_unit(i_edit) - _np_unit(i_src)
    dt = _np_unit(t_edit) - _np_unit(t_src)
    expected = (di * dt).sum(1) / (np.linalg.norm(di, axis=1) * np.linalg.norm(dt, axis=1))
    assert got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    m = DirectionalSimilarity()
    m.update(i_src, i_edit, t_src, t_edit)
    assert m.compute().item() == pytest.approx(expected.mean(), abs=1e-12)


def test_directional_similarity_known_answers():
    e = torch.eye(4)
    src, edit = e[[0]], e[[1]]
    assert directional_similarity(src, edit, src, edit).item() == pytest.approx(1.0, abs=1e-12)  # same direction
    assert directional_similarity(src, edit, edit, src).item() == pytest.approx(-1.0, abs=1e-12)  # opposite
    assert directional_similarity(src, src, src, edit).item() == 0.0  # unchanged image: no direction
    with pytest.raises(ValueError, match="one shape"):
        directional_similarity(src, edit, src, e[:2])


def test_dimension_mismatch_is_explained():
    with pytest.raises(ValueError, match="same encoder"):
        PairwiseCosine().update(_rand(2, 0, d=8), _rand(2, 1, d=16))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        PairwiseCosine().update(torch.ones(8), _rand(2, 1))


def test_mean_value_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 0.8, 11)  # LPIPS-like distances
    m = MeanValue()
    m.update(torch.tensor(values[:4]))
    m.update(torch.tensor(values[4:10], dtype=torch.float32))
    m.update(torch.tensor(values[10]))  # a 0-d tensor counts as one value
    assert m.count.item() == 11
    # The middle batch was rounded to float32 before the metric saw it; the sums themselves are float64.
    expected = np.concatenate([values[:4], values[4:10].astype(np.float32), values[10:]]).mean()
    assert m.compute().item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="flatten"):
        m.update(torch.ones(2, 2))


def test_within_group_pairs():
    pairs = within_group_pairs(4)
    assert len(pairs) == 6 and len(set(pairs)) == 6
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert all(i < j for i, j in pairs)  # no self pairs, each unordered pair once
    assert within_group_pairs(1) == [] and within_group_pairs(0) == []
    with pytest.raises(ValueError, match="n >= 0"):
        within_group_pairs(-1)


def test_empty_metric_computes_nan():
    for metric in (PairwiseCosine(), PairedCosine(), MeanValue(), DirectionalSimilarity()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
            assert torch.isnan(metric.compute())
    m = PairwiseCosine()
    m.update(_rand(1, 0), _rand(1, 0), exclude_self=True)  # one image: no distinct pairs
    assert torch.isnan(m.compute())


def test_ddp_merge_is_exact_and_mean_of_means_is_wrong():
    subject = _rand(1, 19)
    real = subject + 0.2 * _rand(5, 20)
    # Rank 0 holds 2 generated images close to the subject, rank 1 holds 8 unrelated ones.
    close = subject + 0.2 * _rand(2, 21)
    gen = torch.cat([close, _rand(8, 22)])
    full = PairwiseCosine()
    full.update(real, gen)

    rank0, rank1 = PairwiseCosine(), PairwiseCosine()
    rank0.update(real, gen[:2])
    rank1.update(real, gen[2:])
    mean_of_means = (copy.deepcopy(rank0).compute() + copy.deepcopy(rank1).compute()).item() / 2
    rank0.merge_state(rank1)  # the same "sum" reduction DDP sync applies
    assert rank0.compute().item() == pytest.approx(full.compute().item(), abs=1e-12)
    assert rank0.count.item() == 50
    assert abs(mean_of_means - full.compute().item()) > 0.1
    # Both by hand: the mean over all 50 pairs, and the unweighted mean of the ranks' means (10 and 40 pairs).
    sims = _np_unit(real) @ _np_unit(gen).T  # (5, 10)
    assert full.compute().item() == pytest.approx(sims.mean(), abs=1e-12)
    assert mean_of_means == pytest.approx((sims[:, :2].mean() + sims[:, 2:].mean()) / 2, abs=1e-12)


@pytest.mark.parametrize("cls, n_inputs", [(PairedCosine, 2), (MeanValue, 1), (DirectionalSimilarity, 4)])
def test_ddp_merge_other_metrics(cls, n_inputs):
    if cls is MeanValue:
        inputs = [torch.rand(9, generator=torch.Generator().manual_seed(0))]
    else:
        inputs = [_rand(9, 30 + k) for k in range(n_inputs)]
    full, rank0, rank1 = cls(), cls(), cls()
    full.update(*inputs)
    rank0.update(*(x[:2] for x in inputs))
    rank1.update(*(x[2:] for x in inputs))
    rank0.merge_state(rank1)
    assert rank0.compute().item() == pytest.approx(full.compute().item(), abs=1e-12)
    assert rank0.total.dtype == torch.float64 and rank0.count.item() == 9
