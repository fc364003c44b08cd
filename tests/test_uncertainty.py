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
    mean_pairwise_dice,
    normalized_entropy,
    pooled_pairwise_dice,
    relunet_score,
    relunet_scores,
)
from nnunet_kaz.uncertainty.scores import SCORE_COLUMNS, class_scores


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
    # pooled pairwise Dice from the intersections equals the pooled ratio computed pair by pair, and the count-map
    # form 2 sum_x C(k_x, 2) / ((N - 1) sum_i |S_i|)
    inter = sum((masks[i] & masks[j]).sum() for i, j in itertools.combinations(range(3), 2))
    denom = sum(masks[i].sum() + masks[j].sum() for i, j in itertools.combinations(range(3), 2))
    assert r.pooled_pairwise_dice(1) == pytest.approx(2 * inter / denom)
    k = masks.sum(0)
    assert r.pooled_pairwise_dice(1) == pytest.approx(2 * (k * (k - 1) / 2).sum() / (2 * vols.sum()))
    # equal volumes here, so it is also the plain mean of the pairwise Dice scores
    dices = [2 * (masks[i] & masks[j]).sum() / (masks[i].sum() + masks[j].sum())
             for i, j in itertools.combinations(range(3), 2)]
    assert r.pooled_pairwise_dice(1) == pytest.approx(np.mean(dices))
    # labelled uncertainty: mean over voxels with mean p >= 0.5 of U = -(1/N) sum_i p_i ln p_i
    u = -(samples[:, 1] * np.log(samples[:, 1].clip(1e-12))).mean(0)
    mean_fg = samples[:, 1].mean(0)
    expected = u[mean_fg >= 0.5].mean()
    assert labelled_uncertainty(r.mean[1], -r.mean_plogp[1]) == pytest.approx(expected, rel=1e-5)
    # mutual information is entropy of the mean minus mean entropy, >= 0
    h_mean = normalized_entropy(r.mean)
    h_samples = np.mean([normalized_entropy(s) for s in samples], 0)
    assert r.mean_entropy is None  # softmax: derived from the mean p ln p, no accumulator of its own
    np.testing.assert_allclose(r.sample_entropy(), h_samples, atol=1e-6)
    assert (h_mean - h_samples >= -1e-6).all()


def test_identical_samples_have_no_mutual_information_or_variance():
    s = _samples()[0]
    stats = StreamingStats(2, (2, 3))
    for _ in range(4):
        stats.add(torch.from_numpy(s))
    r = stats.result()
    np.testing.assert_allclose(r.variance, 0, atol=1e-7)
    np.testing.assert_allclose(normalized_entropy(r.mean) - r.sample_entropy(), 0, atol=1e-6)
    assert r.pooled_pairwise_dice(1) == pytest.approx(1.0) == r.pairwise_dice(1)
    assert coefficient_of_variation(r.volumes[:, 1]) == 0


def _authors_relunet_score(p_class, valmap):
    """Transcription of Rel-UNet's code (sinaziaee/sgdr, AUTHORS_CODE.md): `estimate_uncertainty.py` builds
    `mask = (mean_p.T > 0.5).astype(np.uint8)` and `uncertainty_from_mask_and_valmap` returns
    `100 * sum(valmap) / sum(abs(mask - cv2.dilate(mask, np.ones((3, 3)))))`, on uint8 arrays: mask - dilated
    wraps to 255 on every ring pixel. A 3D volume goes to cv2 transposed, (x, y, z): cv2 dilates each z slice
    (its last axis is cv2's channel axis, at most 512 of them)."""
    import cv2

    mask = (np.asarray(p_class).T > 0.5).astype(np.uint8)
    # cv2 returns a one-channel image without its channel axis: put it back (a one-slice volume)
    edge = np.abs(mask - cv2.dilate(mask, np.ones((3, 3), np.uint8)).reshape(mask.shape))
    assert edge.dtype == np.uint8 and set(np.unique(edge)) <= {0, 255}  # the wrap: 0 - 1 = 255
    return 100 * np.sum(np.asarray(valmap, dtype=np.float64).T) / np.sum(edge)


def test_relunet_score_hand_case_in_every_convention():
    p = np.zeros((7, 7))
    p[2:5, 2:5] = 0.9  # a 3x3 mask: its face-connected outer ring has 12 pixels, its 3x3-square ring 16
    p[0, 0] = 0.5      # exactly 0.5 is outside the mask (the authors' p > 0.5) but carries 1 bit of entropy
    h = binary_entropy(p)
    total = 9 * -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1)) + 1.0
    assert h.sum() == pytest.approx(total, rel=1e-12)
    assert relunet_score(p, h) == pytest.approx(100 * total / (255 * 16), rel=1e-12)  # the default: authors'
    assert relunet_score(p, h) == pytest.approx(_authors_relunet_score(p, h), rel=1e-12)
    assert relunet_score(p, h, convention="eq9") == pytest.approx(total / 16, rel=1e-12)
    assert relunet_score(p, h, convention="cross") == pytest.approx(total / 12, rel=1e-12)
    assert relunet_scores(p, h) == pytest.approx({"relunet_score": 100 * total / (255 * 16),
                                                  "relunet_score_eq9": total / 16,
                                                  "relunet_score_cross": total / 12}, rel=1e-12)
    assert math.isnan(relunet_score(np.zeros((5, 5)), np.zeros((5, 5))))
    assert all(math.isnan(v) for v in relunet_scores(np.full((5, 5), 0.5), np.ones((5, 5))).values())
    with pytest.raises(ValueError, match="convention"):
        relunet_score(p, h, convention="other")


@pytest.mark.parametrize("shape", [(37, 53), (5, 29, 41), (1, 16, 16), (12, 9, 31)])
def test_relunet_score_equals_the_authors_code_on_random_soft_masks(shape):
    """Smooth random probability fields (several blobs, masks touching the border, anisotropic volumes, a
    single-slice volume): our default equals the transcription of their function. Both sum the same float64
    entropies in another order (the transcription over the transposed array): relative error ~ n eps, far
    below 1e-9."""
    from scipy import ndimage

    rng = np.random.default_rng(sum(shape))
    for trial in range(4):
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
        p = 1 / (1 + np.exp(-field / field.std() * 3 + trial))
        h = binary_entropy(p)
        ours, theirs = relunet_score(p, h), _authors_relunet_score(p, h)
        if not (p > 0.5).any():
            assert math.isnan(ours)
            continue
        assert ours == pytest.approx(theirs, rel=1e-9)
        assert relunet_score(p, h, convention="eq9") == pytest.approx(2.55 * theirs, rel=1e-9)


def _brute_force_ring(mask, neighbours):
    """Pixels outside `mask` with a neighbour (offsets) inside it, by an explicit loop."""
    ring = 0
    h, w = mask.shape
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                continue
            ring += any(0 <= y + dy < h and 0 <= x + dx < w and mask[y + dy, x + dx] for dy, dx in neighbours)
    return ring


def test_relunet_score_of_a_disc_of_radius_10_in_every_convention():
    """A soft disc (p = 0.8 inside): the authors' value is 100 / 255 of the plain eq. 9 ratio."""
    import cv2

    yy, xx = np.mgrid[:31, :33]
    disc = (yy - 15) ** 2 + (xx - 16) ** 2 <= 100
    n_disc = sum(1 for y in range(-10, 11) for x in range(-10, 11) if x * x + y * y <= 100)
    assert disc.sum() == n_disc == 317
    p = np.where(disc, 0.8, 0.0)
    h = binary_entropy(p)
    total = n_disc * -(0.8 * math.log2(0.8) + 0.2 * math.log2(0.2))  # entropy only inside the disc
    square = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    cross = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    ring_square, ring_cross = _brute_force_ring(disc, square), _brute_force_ring(disc, cross)
    u8 = disc.astype(np.uint8)
    assert int((cv2.dilate(u8, np.ones((3, 3), np.uint8)) - u8).sum()) == ring_square
    assert ring_square > ring_cross
    assert relunet_score(p, h) == pytest.approx(100 * total / (255 * ring_square))
    assert relunet_score(p, h, convention="eq9") == pytest.approx(total / ring_square)
    assert relunet_score(p, h, convention="cross") == pytest.approx(total / ring_cross)
    # 3D: slice by slice along the first axis (cv2 on each slice), nothing across slices
    vol = np.stack([disc, np.zeros_like(disc), disc])
    pv = np.where(vol, 0.8, 0.0)
    assert relunet_score(pv, binary_entropy(pv)) == pytest.approx(100 * 2 * total / (255 * 2 * ring_square))
    assert relunet_score(pv, binary_entropy(pv)) == pytest.approx(_authors_relunet_score(pv, binary_entropy(pv)))
    # the cross spreads across slices: the empty middle slice gains the two discs' shadow (317 voxels)
    assert relunet_score(pv, binary_entropy(pv), convention="cross") == pytest.approx(
        2 * total / (2 * ring_cross + 317))


def _exact_mean_pairwise_dice(masks):
    """Paper 004: the mean over all pairs of their Dice, pair by pair (empty pair: 1)."""
    dices = []
    for i, j in itertools.combinations(range(len(masks)), 2):
        a, b = masks[i], masks[j]
        denom = a.sum() + b.sum()
        dices.append(2 * (a & b).sum() / denom if denom else 1.0)
    return float(np.mean(dices))


def _brute_pooled_pairwise_dice(masks):
    """The pooled variant's definition, pair by pair: 2 sum_{i<j} |S_i & S_j| / sum_{i<j} (|S_i| + |S_j|)
    (all empty: 1)."""
    inter = denom = 0
    for a, b in itertools.combinations(masks, 2):
        inter += int((a & b).sum())
        denom += int(a.sum()) + int(b.sum())
    return 2 * inter / denom if denom else 1.0


def _binary_samples(masks):
    fg = np.asarray(masks, dtype=np.float32) * 0.9 + 0.05
    return np.stack([1 - fg, fg], 1)


def test_pairwise_dice_of_nine_identical_samples_and_one_empty_is_0_8():
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:6] = True
    masks = [mask] * 9 + [np.zeros_like(mask)]
    stats = StreamingStats(2, mask.shape)
    for s in _binary_samples(masks):
        stats.add(torch.from_numpy(s))
    r = stats.result()
    assert r.pairwise_dice(1) == pytest.approx(36 / 45) == pytest.approx(0.8)
    assert r.pooled_pairwise_dice(1) == pytest.approx(8 / 9)  # the pooled variant
    assert math.isnan(r.pairwise_dice(0))  # background is not tracked


@pytest.mark.parametrize("shape", [(9, 11), (3, 5, 7), (1, 13, 10)])
def test_streamed_pairwise_dice_equals_pair_by_pair_on_random_masks(shape):
    """Masks of different sizes in different places (the frame grows and is re-packed), some empty, the first
    ones empty (before any frame exists), added one at a time and in batches."""
    rng = np.random.default_rng(3)
    masks = [np.zeros(shape, bool), np.zeros(shape, bool)]
    for k in range(12):
        m = np.zeros(shape, bool)
        if k % 5 != 3:
            lo = [int(rng.integers(0, n)) for n in shape]
            box = tuple(slice(a, a + int(rng.integers(1, n - a + 1))) for a, n in zip(lo, shape))
            m[box] = rng.random(m[box].shape) < 0.7
        masks.append(m)
    samples = _binary_samples(masks)
    one, batched = StreamingStats(2, shape), StreamingStats(2, shape)
    for s in samples:
        one.add(torch.from_numpy(s))
    for start in range(0, len(samples), 4):
        batched.add(torch.from_numpy(samples[start:start + 4]))
    expected = _exact_mean_pairwise_dice(masks)
    assert one.result().pairwise_dice(1) == pytest.approx(expected, rel=1e-12)
    assert batched.result().pairwise_dice(1) == pytest.approx(expected, rel=1e-12)
    inter = one.result().intersections[1]
    brute = np.array([[(a & b).sum() for b in masks] for a in masks])
    np.testing.assert_array_equal(inter, brute)
    assert mean_pairwise_dice(brute, brute.diagonal()) == pytest.approx(expected)
    assert one.result().pooled_pairwise_dice(1) == pytest.approx(_brute_pooled_pairwise_dice(masks), rel=1e-12)


def _disagreement_words(masks) -> int:
    """Brute force: 64-voxel words of the flattened volume where the masks are not all equal."""
    flat = np.stack([m.ravel() for m in masks])
    differ = (flat != flat[0]).any(0)
    return int(np.unique(np.flatnonzero(differ) // 64).size)


def test_pairwise_masks_are_stored_only_where_they_disagree():
    """Identical masks, even spanning the volume (two corner voxels in every mask), store no words; a mask that
    differs in a small block adds the words where the masks disagree (brute force) and nothing else."""
    from nnunet_kaz.uncertainty import PairwiseIntersections

    shape = (40, 64, 64)
    mask = np.zeros(shape, bool)
    mask[10:18, 20:36, 30:46] = True
    mask[0, 0, 0] = mask[-1, -1, -1] = True
    pi = PairwiseIntersections(shape)
    for _ in range(5):
        pi.add(mask)
    assert pi.band_words == 0 and pi.packed_nbytes == 0
    np.testing.assert_array_equal(pi.inter, np.full((5, 5), mask.sum()))
    other = mask.copy()
    other[20:22, 40:44, 10:20] = True  # 2 x 4 rows of 10 voxels: each row within one or two 64-voxel words
    pi.add(other)
    masks = [mask] * 5 + [other]
    assert pi.band_words == _disagreement_words(masks) <= 16
    np.testing.assert_array_equal(pi.inter, np.array([[(a & b).sum() for b in masks] for a in masks]))
    assert pi.packed_nbytes == 6 * pi.band_words * 8  # the open block's six rows over the band


@pytest.mark.parametrize("kind", ["blobs", "noise"])
@pytest.mark.parametrize("block_bytes", [1, 1500, 4 << 20])
def test_pairwise_intersections_exact_across_blocks_and_batches(monkeypatch, kind, block_bytes):
    """Blocks of 1 row, a few rows and one block (forced): the intersections of 14 masks (empty ones first and
    in between, blobs that move and grow so that the band grows after blocks were compressed, or noise), read
    midway (a partial batch) and at the end, equal the brute force; the band is exactly the words where the masks
    disagree; blob rows are held in fewer bytes than packed rows, noise rows in no more than packed rows plus
    zlib's overhead."""
    from nnunet_kaz.uncertainty import PairwiseIntersections

    rng = np.random.default_rng(7)
    shape = (20, 33, 47)
    zz, yy, xx = np.indices(shape)
    masks = [np.zeros(shape, bool)]
    for k in range(13):
        if k == 5:
            masks.append(np.zeros(shape, bool))
        elif kind == "blobs":
            c = (10, 8 + 1.5 * k, 12 + 2 * k)
            masks.append(((zz - c[0]) / 6) ** 2 + ((yy - c[1]) / (4 + k / 2)) ** 2 + ((xx - c[2]) / 7) ** 2 <= 1)
        else:
            masks.append(rng.random(shape) < 0.3 + 0.02 * k)
    monkeypatch.setattr(PairwiseIntersections, "BLOCK_BYTES", block_bytes)
    pi = PairwiseIntersections(shape)
    for k, m in enumerate(masks):
        pi.add(m)
        if k == 8:  # read midway: the waiting masks are intersected then, the rest at the end
            brute = np.array([[(a & b).sum() for b in masks[:9]] for a in masks[:9]])
            np.testing.assert_array_equal(pi.inter, brute)
    brute = np.array([[(a & b).sum() for b in masks] for a in masks])
    np.testing.assert_array_equal(pi.inter, brute)
    assert pi.band_words == _disagreement_words(masks)
    if block_bytes == 1:
        assert len(pi._closed) == len(masks)  # every row its own compressed block
        rows_held = sum(len(b[0]) for b in pi._closed)
        if kind == "blobs":
            assert rows_held < pi.packed_nbytes / 2
        else:
            assert rows_held <= pi.packed_nbytes * 1.01 + 64 * len(pi._closed)


def test_mask_packer_slab_by_slab_equals_packbits_of_the_whole_mask():
    """Slabs of any length (not multiples of 8 voxels) give np.packbits of the whole flattened mask, zero-padded
    to whole 64-bit words."""
    from nnunet_kaz.uncertainty.streaming import MaskPacker

    rng = np.random.default_rng(2)
    mask = rng.random((7, 5, 3)) < 0.5  # 105 voxels: 13 bytes and 1 bit
    packer = MaskPacker(mask.size)
    for a, b in ((0, 1), (1, 4), (4, 7)):
        packer.feed(mask[a:b])
    words = packer.finish()
    expected = np.zeros(16, np.uint8)
    expected[:14] = np.packbits(mask.ravel())
    np.testing.assert_array_equal(words.view(np.uint8), expected)
    with pytest.raises(ValueError, match="packed"):
        MaskPacker(106).finish()


def test_streaming_variance_is_accurate_for_small_variances():
    """Issue 14.6: samples around p ~ 0.5 with variance ~1e-6, against numpy in float64. E[p^2] - E[p]^2 in
    float32 loses this (checked below, so the test would fail on the old accumulator)."""
    rng = np.random.default_rng(0)
    n, shape = 50, (3, 8, 9)
    fg = (0.5 + 0.3 * rng.random(shape) + 1e-3 * rng.standard_normal((n, *shape))).astype(np.float32)
    samples = np.stack([1 - fg, fg], 1)
    reference = samples.astype(np.float64).var(0)
    assert 5e-7 < reference[1].mean() < 2e-6
    stats = StreamingStats(2, shape)
    for start in (0, 1, 4, 11, 30):  # uneven batches
        stop = {0: 1, 1: 4, 4: 11, 11: 30, 30: n}[start]
        stats.add(torch.from_numpy(samples[start:stop]))
    r = stats.result()
    np.testing.assert_allclose(r.variance, reference, rtol=1e-3)
    np.testing.assert_allclose(r.mean, samples.astype(np.float64).mean(0), rtol=1e-6)
    t = torch.from_numpy(samples)
    naive = ((t * t).sum(0) / n - (t.sum(0) / n) ** 2).numpy()
    assert np.abs(naive - reference).max() / reference.max() > 1e-2  # the old formula's error


def test_class_scores_columns():
    masks = [np.pad(np.ones((3, 3), bool), 2)] * 3 + [np.pad(np.ones((2, 3), bool), ((2, 3), (2, 2)))]
    samples = _binary_samples(masks)
    stats = StreamingStats(2, masks[0].shape)
    stats.add(torch.from_numpy(samples))
    r = stats.result()
    row = class_scores(r, 1, r.mean[1], -r.mean_plogp[1])
    assert set(row) | {"case", "label", "n_members", "n_samples"} == set(SCORE_COLUMNS)
    assert row["pairwise_dice"] == pytest.approx(_exact_mean_pairwise_dice(masks))
    assert row["pairwise_dice_pooled"] == pytest.approx(_brute_pooled_pairwise_dice(masks), rel=1e-12)
    assert row["pairwise_dice"] != pytest.approx(row["pairwise_dice_pooled"])  # unequal volumes: they differ
    assert row["relunet_score"] == pytest.approx(relunet_score(r.mean[1], binary_entropy(r.mean[1])))


def test_edge_cases_are_defined():
    assert math.isnan(pooled_pairwise_dice(np.zeros((1, 1)), np.array([2])))  # one sample
    assert pooled_pairwise_dice(np.zeros((2, 2)), np.array([0, 0])) == 1.0  # all empty: agreement
    assert math.isnan(labelled_uncertainty(np.zeros(4), np.ones(4)))


@pytest.mark.parametrize("shape", [(7, 5, 9), (1, 6, 11), (13, 3, 4)])
def test_slab_by_slab_accumulation_equals_numpy_on_the_whole_volume(shape, monkeypatch):
    """Issue 15: `add` works through slabs of the first spatial axis (here 1-2 rows, so the last slab is
    partial); the statistics equal a float64 numpy computation on the whole stack of samples, the volumes and
    the pairwise intersections exactly."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(7, 3, *shape)) * 3
    samples = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # softmax over 3 classes
    monkeypatch.setattr(StreamingStats, "SLAB_VOXELS", 2 * int(np.prod(shape[1:])) - 1)  # 1 row per slab
    stats = StreamingStats(3, shape, max_samples=7)
    for start in (0, 3, 4):  # batches of 3, 1, 3
        stats.add(torch.from_numpy(samples[start:start + {0: 3, 3: 1, 4: 3}[start]].astype(np.float32)))
    r = stats.result()
    np.testing.assert_allclose(r.mean, samples.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.variance, samples.var(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.mean_plogp, (samples * np.log(samples)).mean(0), rtol=1e-5, atol=1e-6)
    h = -(samples * np.log(samples)).sum(1) / np.log(3)
    np.testing.assert_allclose(r.sample_entropy(), h.mean(0), rtol=1e-5, atol=1e-6)
    binary = samples >= 0.5
    np.testing.assert_array_equal(r.volumes, binary.reshape(7, 3, -1).sum(-1))
    for c in (1, 2):
        brute = np.array([[(a & b).sum() for b in binary[:, c]] for a in binary[:, c]])
        np.testing.assert_array_equal(r.intersections[c], brute)
    with pytest.raises(ValueError, match="after result"):
        stats.add(torch.from_numpy(samples[:1].astype(np.float32)))


@pytest.mark.parametrize("regions", [False, True])
def test_adding_logits_slab_by_slab_equals_adding_their_probabilities(regions, monkeypatch):
    """`add_logits` (the probabilities made slab by slab inside the accumulation) gives the statistics of `add` on
    the whole probabilities within float32 rounding (torch's softmax may round a slab 1 ulp apart from the whole),
    and the same counts, volumes and pairwise intersections, for batches of 1 and 3."""
    rng = np.random.default_rng(8)
    shape = (5, 4, 6)
    logits = torch.from_numpy(rng.normal(size=(7, 3, *shape)).astype(np.float16) * 3)

    def nonlin(z):
        z = z.float()
        return torch.sigmoid(z) if regions else torch.softmax(z, 1)

    monkeypatch.setattr(StreamingStats, "SLAB_VOXELS", 2 * 4 * 6 - 1)  # 1 row per slab
    whole, slabs = (StreamingStats(3, shape, regions, max_samples=7) for _ in range(2))
    for start, b in ((0, 1), (1, 3), (4, 3)):
        whole.add(nonlin(logits[start:start + b]))
        slabs.add_logits(logits[start:start + b], nonlin)
    a, b = whole.result(), slabs.result()
    for key in ("mean", "var", "mean_plogp"):
        np.testing.assert_allclose(getattr(b, key), getattr(a, key), rtol=0, atol=3e-7, err_msg=key)
    np.testing.assert_allclose(b.sample_entropy(), a.sample_entropy(), rtol=0, atol=3e-7)
    np.testing.assert_array_equal(b.volumes, a.volumes)
    assert a.intersections.keys() == b.intersections.keys() == ({0, 1, 2} if regions else {1, 2})
    for c in a.intersections:
        np.testing.assert_array_equal(b.intersections[c], a.intersections[c])
    assert a.intersections[1].shape == (7, 7) and a.intersections[1].diagonal().sum() > 0


def test_more_samples_than_announced_is_an_error():
    stats = StreamingStats(2, (2, 2), max_samples=1)
    stats.add(torch.full((1, 2, 2, 2), 0.5))
    with pytest.raises(ValueError, match="sized for 1"):
        stats.add(torch.full((1, 2, 2, 2), 0.5))
