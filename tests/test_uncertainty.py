"""Uncertainty maps and per-image scores against hand computations on hand-built sample sets."""
import itertools
import math

import numpy as np
import pytest
import torch

from nnunet_kaz.uncertainty import (
    StreamingStats,
    binary_entropy,
    coefficient_of_variation,
    labelled_uncertainty,
    normalized_entropy,
    pooled_pairwise_dice,
    relunet_score,
)


def test_entropy_of_a_coin_is_one_and_certainty_is_zero():
    p = np.array([[0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
    assert normalized_entropy(p) == pytest.approx([1.0, 0.0, 0.0])
    three = np.full((3, 1), 1 / 3)
    assert normalized_entropy(three) == pytest.approx([1.0])  # log2(C) normalisation, paper 002 eq. 4
    assert binary_entropy(np.array(0.1)) == pytest.approx(-(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9)))


def _samples():
    """Three hand-made binary-class samples on a 2x3 image (foreground probabilities)."""
    fg = np.array([[[0.9, 0.8, 0.1], [0.2, 0.6, 0.0]],
                   [[0.7, 0.4, 0.5], [0.3, 0.9, 0.0]],
                   [[0.9, 0.6, 0.6], [0.1, 0.2, 0.0]]])
    return np.stack([1 - fg, fg], 1)  # (N, C, H, W)


def test_streaming_stats_and_scores_equal_hand_computation():
    samples = _samples()
    stats = StreamingStats(2, (2, 3))
    for s in samples:  # one at a time, as the predictor streams them
        stats.add(torch.from_numpy(s))
    r = stats.result()
    assert r.n_samples == 3
    np.testing.assert_allclose(r.mean, samples.mean(0), atol=1e-6)
    np.testing.assert_allclose(r.variance, samples.var(0), atol=1e-6)
    masks = samples[:, 1] >= 0.5
    vols = masks.reshape(3, -1).sum(1)
    assert list(r.volumes[:, 1]) == list(vols) == [3, 3, 3]
    # paper 004: CV = Var(V) / (E[V] + 1)
    assert coefficient_of_variation(np.array([2, 4, 6])) == pytest.approx(np.var([2, 4, 6]) / 5)
    # pooled pairwise Dice from the count map equals the pairwise definition computed pair by pair
    inter = sum((masks[i] & masks[j]).sum() for i, j in itertools.combinations(range(3), 2))
    denom = sum(masks[i].sum() + masks[j].sum() for i, j in itertools.combinations(range(3), 2))
    assert pooled_pairwise_dice(r.counts[1], r.volumes[:, 1]) == pytest.approx(2 * inter / denom)
    # equal volumes here, so it is also the plain mean of the pairwise Dice scores
    dices = [2 * (masks[i] & masks[j]).sum() / (masks[i].sum() + masks[j].sum())
             for i, j in itertools.combinations(range(3), 2)]
    assert pooled_pairwise_dice(r.counts[1], r.volumes[:, 1]) == pytest.approx(np.mean(dices))
    # labelled uncertainty: mean over voxels with mean p >= 0.5 of U = -(1/N) sum_i p_i ln p_i
    u = -(samples[:, 1] * np.log(samples[:, 1].clip(1e-12))).mean(0)
    mean_fg = samples[:, 1].mean(0)
    expected = u[mean_fg >= 0.5].mean()
    assert labelled_uncertainty(r.mean[1], -r.mean_plogp[1]) == pytest.approx(expected, rel=1e-5)
    # mutual information is entropy of the mean minus mean entropy, >= 0
    h_mean = normalized_entropy(r.mean)
    h_samples = np.mean([normalized_entropy(s) for s in samples], 0)
    np.testing.assert_allclose(r.mean_entropy, h_samples, atol=1e-6)
    assert (h_mean - h_samples >= -1e-6).all()


def test_identical_samples_have_no_mutual_information_or_variance():
    s = _samples()[0]
    stats = StreamingStats(2, (2, 3))
    for _ in range(4):
        stats.add(torch.from_numpy(s))
    r = stats.result()
    np.testing.assert_allclose(r.variance, 0, atol=1e-7)
    np.testing.assert_allclose(normalized_entropy(r.mean) - r.mean_entropy, 0, atol=1e-6)
    assert pooled_pairwise_dice(r.counts[1], r.volumes[:, 1]) == pytest.approx(1.0)
    assert coefficient_of_variation(r.volumes[:, 1]) == 0


def test_relunet_score_is_total_entropy_over_contour_pixels():
    p = np.zeros((7, 7))
    p[2:5, 2:5] = 0.9  # a 3x3 mask; its face-connected outer ring has 12 pixels
    h = binary_entropy(p)
    assert relunet_score(p, h) == pytest.approx(h.sum() / 12)
    assert math.isnan(relunet_score(np.zeros((5, 5)), np.zeros((5, 5))))


def test_edge_cases_are_defined():
    assert math.isnan(pooled_pairwise_dice(np.zeros(3), np.array([2])))  # one sample
    assert pooled_pairwise_dice(np.zeros(3), np.array([0, 0])) == 1.0  # all empty: agreement
    assert math.isnan(labelled_uncertainty(np.zeros(4), np.ones(4)))
