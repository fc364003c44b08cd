"""Overlap and surface metrics: known answers (discs, spheres, boxes, anisotropic spacing), a brute-force
reference of the definitions, and MONAI on random masks."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from nnunet_kaz.evaluation.overlap import overlap_metrics
from nnunet_kaz.evaluation.surface import (
    _distances_to_surface,
    mask_surface,
    surface_distances,
    surface_metrics,
)


def ball(shape, spacing, centre, radius):
    """Voxels whose centre lies within `radius` (physical units) of `centre` (physical, array axis order)."""
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


def brute_surface(mask):
    """Surface by the definition: a mask voxel with a face neighbour outside the mask or the image."""
    padded = np.pad(mask, 1)
    inner = np.ones_like(mask)
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return mask & ~inner


def brute_metrics(pred, gt, spacing):
    """Every surface metric from all pairwise distances between surface voxel centres."""
    sp = np.asarray(spacing, float)
    ps, gs = brute_surface(pred), brute_surface(gt)
    d = cdist(np.argwhere(ps) * sp, np.argwhere(gs) * sp)
    a, b = d.min(1), d.min(0)
    signed = np.where(gt[ps], -a, a)
    return {"hd": max(a.max(), b.max()), "hd95": max(np.percentile(a, 95), np.percentile(b, 95)),
            "assd": np.concatenate([a, b]).mean(), "mad": a.mean(), "msd": signed.mean()}


def random_masks(rng, shape, sigma=2.0):
    a = ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), sigma) > 0.5
    return a, b


def test_surface_is_what_one_face_erosion_removes():
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    assert mask_surface(cube).sum() == 26          # all but the centre voxel
    single = np.zeros((5, 5), bool)
    single[2, 2] = True
    assert mask_surface(single).sum() == 1
    edge = np.zeros((6, 6), bool)
    edge[:, :3] = True                             # touches the image border: border voxels are surface
    np.testing.assert_array_equal(mask_surface(edge), brute_surface(edge))
    assert mask_surface(edge)[:, 0].all() and not mask_surface(edge)[1:-1, 1].any()


@pytest.mark.parametrize("seed", range(4))
def test_surface_metrics_match_brute_force_definition(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 17, 15) if seed % 2 else (31, 27)
    spacing = (2.5, 0.7, 1.1)[: len(shape)]
    pred, gt = random_masks(rng, shape, sigma=1.5)
    got = surface_metrics(pred, gt, spacing)
    want = brute_metrics(pred, gt, spacing)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12), k


def test_crop_helper_is_bit_equal_to_dense_edt():
    rng = np.random.default_rng(3)
    a, b = random_masks(rng, (14, 20, 18))
    sa, sb = mask_surface(a), mask_surface(b)
    sp = np.array([3.0, 0.6, 0.9])
    dense = ndimage.distance_transform_edt(~sb, sampling=sp)[sa]
    np.testing.assert_array_equal(_distances_to_surface(sb, sa, sp), dense)


def test_concentric_discs_anisotropic():
    spacing = (0.5, 1.0)
    shape = (160, 80)
    centre = (40.0, 40.0)
    gt = ball(shape, spacing, centre, 20.0)
    pred = ball(shape, spacing, centre, 15.0)      # inside the ground truth: 5 mm everywhere
    m = surface_metrics(pred, gt, spacing)
    for k in ("hd", "hd95", "assd", "mad"):
        assert m[k] == pytest.approx(5.0, abs=1.0), k
    assert m["msd"] == pytest.approx(-5.0, abs=1.0)
    assert m["msd"] == pytest.approx(-m["mad"])    # every prediction surface voxel is inside
    o = overlap_metrics(pred, gt)
    assert o["dice"] == pytest.approx(2 * 15 ** 2 / (15 ** 2 + 20 ** 2), rel=0.02)
    assert o["rvd"] == pytest.approx((15 ** 2 - 20 ** 2) / 20 ** 2, rel=0.03)
    assert o["precision"] == 1.0 and o["recall"] == pytest.approx(15 ** 2 / 20 ** 2, rel=0.03)
    grown = surface_metrics(gt, pred, spacing)     # swapped: over-segmentation, positive msd
    assert grown["msd"] == pytest.approx(5.0, abs=1.0) and grown["hd"] == m["hd"]


def test_offset_spheres_anisotropic():
    spacing = (2.0, 0.8, 0.8)
    shape = (24, 60, 60)
    r, d = 10.0, 3.0
    gt = ball(shape, spacing, (23.0, 24.0, 22.0), r)
    pred = ball(shape, spacing, (23.0, 24.0, 22.0 + d), r)
    m = surface_metrics(pred, gt, spacing)
    assert m["hd"] == pytest.approx(d, abs=1.0)
    # signed distance of a point on the shifted sphere, |d e + r u| - r, averaged over the sphere: d^2 / (3 r)
    assert m["msd"] == pytest.approx(d ** 2 / (3 * r), abs=0.25)
    lens = np.pi * (4 * r + d) * (2 * r - d) ** 2 / 12
    assert overlap_metrics(pred, gt)["dice"] == pytest.approx(lens / (4 / 3 * np.pi * r ** 3), rel=0.03)


def test_shifted_boxes_exact_hausdorff():
    gt = np.zeros((20, 12, 14), bool)
    gt[5:15, 2:10, 3:11] = True
    pred = np.roll(gt, 2, axis=0)
    m = surface_metrics(pred, gt, (2.5, 0.7, 1.1))
    assert m["hd"] == pytest.approx(5.0, abs=1e-12)
    o = overlap_metrics(pred, gt)
    assert o["dice"] == pytest.approx(0.8) and o["jaccard"] == pytest.approx(8 / 12) and o["rvd"] == 0.0
    n = gt.size
    assert o["specificity"] == pytest.approx((n - 640 - 128) / (n - 640))


def test_empty_mask_conventions():
    empty = np.zeros((10, 10), bool)
    some = empty.copy()
    some[3:6, 3:6] = True
    both = {**overlap_metrics(empty, empty), **surface_metrics(empty, empty)}
    assert all(both[k] == 1.0 for k in ("dice", "jaccard", "precision", "recall", "specificity"))
    assert all(both[k] == 0.0 for k in ("rvd", "hd", "hd95", "assd", "mad", "msd"))
    for pred, gt in ((empty, some), (some, empty)):
        s = surface_metrics(pred, gt, (1.0, 2.0))
        assert all(np.isnan(v) for v in s.values())
        o = overlap_metrics(pred, gt)
        assert o["dice"] == 0.0 and o["jaccard"] == 0.0
    assert np.isnan(overlap_metrics(empty, some)["precision"]) and overlap_metrics(empty, some)["rvd"] == -1.0
    assert np.isnan(overlap_metrics(some, empty)["recall"]) and np.isnan(overlap_metrics(some, empty)["rvd"])
    d = surface_distances(some, empty, None)
    assert not d.defined and d.gt_to_pred.size == 0 and d.pred_to_gt.size == 8


def test_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        surface_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(np.ones((4, 4), bool), np.ones((4, 4), bool), (1.0, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(np.ones((4, 4), bool), np.ones((4, 4), bool), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_metrics(np.zeros(3, bool), np.zeros(4, bool))


@pytest.mark.parametrize("seed", range(5))
def test_matches_monai_on_random_masks(seed):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(100 + seed)
    shape = [(18, 26, 22), (40, 33), (10, 30, 30), (25, 25, 12), (50, 44)][seed]
    spacing = [(2.5, 0.7, 1.1), (0.6, 1.3), (3.0, 0.8, 0.8), (1.0, 1.0, 1.0), (1.0, 0.35)][seed]
    pred, gt = random_masks(rng, shape)
    ours = surface_metrics(pred, gt, spacing)
    p, g = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(include_background=True, spacing=spacing)
        monai = {"hd": compute_hausdorff_distance(p, g, **kw).item(),
                 "hd95": compute_hausdorff_distance(p, g, percentile=95, **kw).item(),
                 "assd": compute_average_surface_distance(p, g, symmetric=True, **kw).item()}
    for k, v in monai.items():  # MONAI returns float32: agreement to float32 resolution
        assert ours[k] == pytest.approx(v, rel=1e-6), k
