"""KiTS23 region Dice / Surface Dice: a constructed case by hand, random label maps against the official route
(neheller/kits23's compute_metrics_for_label: masks per region, empty rules, surface-distance), the summary."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from surface_distance import compute_surface_dice_at_tolerance, compute_surface_distances

from nnunet_kaz.evaluation.kits23_metrics import (KITS23_REGIONS, KITS23_TOLERANCES_MM,
                                                  is_kits23_labels, kits23_case_metrics, kits23_summary)


def official_label_metrics(pred, gt, labels, spacing, tol):
    """neheller/kits23 kits23/evaluation/metrics.py compute_metrics_for_label, transcribed."""
    mask_pred, mask_gt = np.isin(pred, labels), np.isin(gt, labels)
    gt_empty, pred_empty = not mask_gt.any(), not mask_pred.any()
    if gt_empty and pred_empty:
        return 1.0, 1.0
    if gt_empty or pred_empty:
        return 0.0, 0.0
    dc = 2 * np.sum(mask_pred & mask_gt) / (mask_pred.sum() + mask_gt.sum())
    sd = compute_surface_dice_at_tolerance(compute_surface_distances(mask_gt, mask_pred, spacing), tol)
    return dc, sd


def test_constructed_case_by_hand():
    gt = np.zeros((4, 10, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[1:3, 2:8, 2:8] = 1        # kidney 2*6*6 = 72 voxels
    gt[1:3, 2:4, 2:4] = 2        # tumour 8
    gt[1:3, 6:8, 6:8] = 3        # cyst 8
    pred[1:3, 2:8, 2:7] = 1      # kidney region 60, all inside the gt kidney region
    pred[1:3, 2:4, 2:5] = 2      # tumour 12, 8 of them on the gt tumour
    # no cyst predicted: mass = tumour 12 vs gt masses 16 (tumour 8 + cyst 8), overlap 8
    rows = {r["region"]: r for r in kits23_case_metrics(pred, gt, (2.5, 0.8, 0.8))}
    assert rows["kidney_and_mass"]["dice"] == pytest.approx(2 * 60 / (60 + 72))
    assert rows["mass"]["dice"] == pytest.approx(2 * 8 / (12 + 16))
    assert rows["tumor"]["dice"] == pytest.approx(2 * 8 / (12 + 8))
    pred[:] = 0
    gt[gt == 2] = 1               # no tumour anywhere: tumor region both empty -> 1, 1
    rows = {r["region"]: r for r in kits23_case_metrics(pred, gt, (2.5, 0.8, 0.8))}
    assert rows["tumor"]["dice"] == 1.0 and rows["tumor"]["surface_dice"] == 1.0
    assert rows["mass"]["dice"] == 0.0 and rows["mass"]["surface_dice"] == 0.0  # cyst in gt only
    assert rows["kidney_and_mass"]["dice"] == 0.0


def random_case(rng, shape):
    kidney = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    lab = kidney.astype(np.uint8)
    lab[kidney & (ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.53)] = 2
    lab[kidney & (ndimage.gaussian_filter(rng.random(shape), 1.5) < 0.46)] = 3
    return lab


def test_random_label_maps_equal_the_official_route():
    rng = np.random.default_rng(23)
    for k in range(8):
        shape = tuple(int(v) for v in rng.integers(8, 24, size=3))
        spacing = tuple(float(v) for v in rng.uniform(0.5, 3.0, size=3))
        gt, pred = random_case(rng, shape), random_case(rng, shape)
        if k == 1:
            pred[pred == 2] = 1          # no tumour predicted
        if k == 2:
            gt[gt >= 2] = 1
            pred[pred >= 2] = 1          # no masses at all
        rows = kits23_case_metrics(pred, gt, spacing)
        for row in rows:
            dc, sd = official_label_metrics(pred, gt, KITS23_REGIONS[row["region"]], spacing,
                                            KITS23_TOLERANCES_MM[row["region"]])
            assert row["dice"] == pytest.approx(dc, abs=1e-12)
            assert row["surface_dice"] == pytest.approx(sd, abs=1e-6)


def test_summary_and_label_detection():
    t = pd.DataFrame({"case": ["a", "a", "a", "b", "b", "b"],
                      "region": ["kidney_and_mass", "mass", "tumor"] * 2,
                      "dice": [0.9, 0.5, 0.4, 0.7, 0.3, 0.0], "surface_dice": [0.8, 0.6, 0.2, 1.0, 0.4, 0.0]})
    s = kits23_summary(t)
    assert s["regions"]["mass"] == {"dice": pytest.approx(0.4), "surface_dice": pytest.approx(0.5), "n_cases": 2}
    assert s["mean_dice"] == pytest.approx(2.8 / 6) and s["mean_surface_dice"] == pytest.approx(3.0 / 6)
    assert is_kits23_labels({"background": 0, "kidney": 1, "tumor": 2, "cyst": 3})
    assert is_kits23_labels({"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2})
    assert not is_kits23_labels({"background": 0, "ablation_zone": 1})
    assert not is_kits23_labels({"background": 0, "a": 1, "b": 2})
