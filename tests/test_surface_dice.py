"""Surface Dice / NSD against DeepMind's surface-distance 0.1 (the KiTS23 route): random anisotropic 2D and 3D
masks, empty masks, the ball dilation against the EDT bit for bit, and the surfel tables."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances, lookup_tables

from nnunet_kaz.evaluation.surface_dice import (_within_by_ball, _within_by_edt, ball_offsets,
                                                contour_length_table, neighbour_codes,
                                                normalized_surface_dice, surface_dice)
from nnunet_kaz.evaluation._surfel_normals import surfel_area_table


def blobs(rng, shape, level=0.5, sigma=1.5):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level + rng.uniform(-0.04, 0.04)


def official(pred, gt, spacing, tol):
    return compute_surface_dice_at_tolerance(compute_surface_distances(gt, pred, spacing), tol)


def test_tables_equal_the_package():
    for sp in [(1.0, 1.0, 1.0), (2.5, 0.7, 1.1), (0.3, 4.0, 0.9)]:
        assert np.array_equal(surfel_area_table(sp), lookup_tables.create_table_neighbour_code_to_surface_area(sp))
    for sp in [(1.0, 1.0), (0.6, 2.3)]:
        assert np.array_equal(contour_length_table(sp),
                              lookup_tables.create_table_neighbour_code_to_contour_length(sp))


@pytest.mark.parametrize("ndim", [2, 3])
def test_neighbour_codes_equal_correlate(ndim):
    rng = np.random.default_rng(ndim)
    m = rng.random((7, 9, 5)[:ndim]) > 0.5
    kernel = lookup_tables.ENCODE_NEIGHBOURHOOD_3D_KERNEL if ndim == 3 else lookup_tables.ENCODE_NEIGHBOURHOOD_2D_KERNEL
    padded = np.zeros(tuple(s + 1 for s in m.shape), np.uint8)  # surface-distance's crop: one zero at the end
    padded[tuple(slice(0, s) for s in m.shape)] = m
    ref = ndimage.correlate(padded, kernel, mode="constant", cval=0)
    assert np.array_equal(neighbour_codes(m), ref)


@pytest.mark.parametrize("ndim", [2, 3])
def test_equals_surface_distance_on_random_anisotropic_masks(ndim):
    rng = np.random.default_rng(10 + ndim)
    checked = 0
    for _ in range(30):
        shape = tuple(int(v) for v in rng.integers(4, 26 if ndim == 3 else 50, size=ndim))
        spacing = tuple(float(v) for v in rng.uniform(0.4, 3.0, size=ndim))
        tol = float(rng.choice([1.0330772532390826, 1.1328796488598762, 1.1498198361434828, rng.uniform(0.2, 6.0)]))
        pred, gt = blobs(rng, shape), blobs(rng, shape)
        if rng.random() < 0.3:  # a shifted copy: most surfels near the tolerance
            gt = np.roll(pred, 1, axis=int(rng.integers(ndim)))
        if not pred.any() or not gt.any():
            continue
        ref = official(pred, gt, spacing, tol)
        for method in ("auto", "ball", "edt"):
            assert surface_dice(pred, gt, spacing, tol, method) == pytest.approx(ref, abs=1e-6)
        assert normalized_surface_dice(pred, gt, spacing, tol) == pytest.approx(ref, abs=1e-6)
        checked += 1
    assert checked >= 20


def test_masks_touching_the_image_border_and_single_voxels():
    sp = (2.0, 0.7, 0.9)
    pred = np.zeros((6, 8, 7), bool)
    gt = np.zeros_like(pred)
    pred[0, 0, 0] = True  # a corner voxel
    gt[0, :2, :2] = True
    assert surface_dice(pred, gt, sp, 1.1) == pytest.approx(official(pred, gt, sp, 1.1), abs=1e-6)
    pred[:] = True  # the whole image
    assert surface_dice(pred, gt, sp, 1.1) == pytest.approx(official(pred, gt, sp, 1.1), abs=1e-6)


def test_empty_masks_follow_kits23():
    """KiTS23's metrics.py decides empty masks before calling surface-distance (both empty 1, one empty 0);
    surface-distance itself gives NaN for two empty masks (and, for one, uses np.Inf, gone in NumPy 2)."""
    sp = (2.5, 0.8, 0.8)
    empty = np.zeros((5, 6, 7), bool)
    blob = empty.copy()
    blob[1:3, 2:4, 2:5] = True
    assert surface_dice(empty, empty, sp, 1.0) == 1.0
    assert np.isnan(official(empty, empty, sp, 1.0))
    assert surface_dice(blob, empty, sp, 1.0) == 0.0
    assert surface_dice(empty, blob, sp, 1.0) == 0.0


def test_ball_dilation_equals_the_edt_exactly():
    rng = np.random.default_rng(5)
    sp = np.array([1.5, 0.75, 0.5])
    # tolerances exactly on ball radii (a spacing, a diagonal computed like scipy) and just off them
    diag = float(np.sqrt((1 * sp[0]) ** 2 + (1 * sp[1]) ** 2))
    for tol in (0.75, 1.5, diag, np.nextafter(diag, 0), np.nextafter(diag, 9), 1.0330772532390826, 2.2):
        for _ in range(4):
            a = rng.random((12, 15, 14)) > 0.93
            b = rng.random((12, 15, 14)) > 0.93
            got = _within_by_ball(a, b, ball_offsets(sp, tol))
            assert np.array_equal(got, _within_by_edt(a, b, sp, tol))


def test_bad_arguments():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shapes differ"):
        surface_dice(a, a[:3], (1, 1, 1), 1.0)
    with pytest.raises(ValueError, match="method"):
        surface_dice(a, a, (1, 1, 1), 1.0, method="kd")
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(a, a, (1, 1, 1), -1.0)
