"""Streaming calibration error against direct computation and torchmetrics; uncertainty AUROC against
scikit-learn; threshold analysis and score correlations on hand-checkable data."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from nnunet_kaz.evaluation.calibration import CalibrationSet, ReliabilityHistogram, roi_mask
from nnunet_kaz.evaluation.score_correlation import score_correlations
from nnunet_kaz.evaluation.uncertainty_validation import (
    ErrorAuroc,
    scaled_uncertainty,
    threshold_counts,
)


def miscalibrated(rng, n):
    """Confidences skewed to 0 and outcomes whose frequency crosses the diagonal (gaps of both signs)."""
    p = (rng.random(n) ** 2).astype(np.float32)
    y = rng.random(n) < np.clip(p + 0.15 * np.sin(6 * np.pi * p), 0, 1)
    return p, y


def direct_ece(p, y, n_bins, norm="l1"):
    p = p.astype(np.float64)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    total, worst = 0.0, 0.0
    for k in range(n_bins):
        m = idx == k
        if m.any():
            gap = abs(y[m].mean() - p[m].mean())
            total += m.mean() * gap
            worst = max(worst, gap)
    return total if norm == "l1" else worst


def streamed(p, y, n_bins=15, chunks=7):
    h = ReliabilityHistogram(n_bins)
    for idx in np.array_split(np.arange(p.size), chunks):
        h.add(p[idx], y[idx])
    return h


@pytest.mark.parametrize("n_bins", [15, 10, 7])
def test_ece_mce_brier_equal_direct_and_torchmetrics(n_bins):
    rng = np.random.default_rng(n_bins)
    p, y = miscalibrated(rng, 600_003)  # several internal blocks of 2^18
    h = streamed(p, y, n_bins)
    assert h.n == p.size
    assert h.ece() == pytest.approx(direct_ece(p, y, n_bins), abs=1e-12)
    assert h.mce() == pytest.approx(direct_ece(p, y, n_bins, "max"), abs=1e-12)
    assert h.brier() == pytest.approx(np.mean((p.astype(np.float64) - y) ** 2), abs=1e-12)
    tp, ty = torch.from_numpy(p.astype(np.float64)), torch.from_numpy(y.astype(np.int64))
    assert h.ece() == pytest.approx(binary_calibration_error(tp, ty, n_bins=n_bins).item(), abs=1e-12)
    assert h.mce() == pytest.approx(binary_calibration_error(tp, ty, n_bins=n_bins, norm="max").item(), abs=1e-12)
    assert h.ece() > 0.01  # the data is miscalibrated: a zero would hide a bug
    one = ReliabilityHistogram(n_bins)
    one.add(p, y)
    assert one.ece() == pytest.approx(h.ece(), abs=1e-14)
    merged = streamed(p[:1000], y[:1000], n_bins).merge(streamed(p[1000:], y[1000:], n_bins))
    assert merged.ece() == pytest.approx(h.ece(), abs=1e-14) and merged.n == h.n


def exact_ace(p, y, n_bins):
    order = np.argsort(p, kind="stable")
    ps, ys = p[order].astype(np.float64), y[order]
    return sum(abs(ys[g].sum() - ps[g].sum()) for g in np.array_split(np.arange(p.size), n_bins)) / p.size


def test_ace_exact_when_no_fine_bin_straddles_a_boundary():
    rng = np.random.default_rng(0)
    values = np.linspace(0.01, 0.99, 1500).astype(np.float32)   # distinct, far apart: one value per fine bin
    p = rng.permutation(values)
    y = rng.random(p.size) < np.clip(p + 0.2 * np.sin(5 * p), 0, 1)
    h = streamed(p, y, 15)
    assert h.ace() == pytest.approx(exact_ace(p, y, 15), abs=1e-12)
    assert h.ace() != pytest.approx(h.ece(), abs=1e-4)


def test_ace_close_to_exact_on_continuous_data():
    rng = np.random.default_rng(1)
    p, y = miscalibrated(rng, 300_000)
    assert streamed(p, y, 15).ace() == pytest.approx(exact_ace(p, y, 15), abs=2e-4)


def test_multiclass_top_label_and_classwise():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (4, 30, 40)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    gt = np.array([rng.choice(4, p=probs[:, i, j] ** 2 / (probs[:, i, j] ** 2).sum())
                   for i in range(30) for j in range(40)]).reshape(30, 40)
    cal = CalibrationSet(15, labels=[1, 2, 3])
    cal.add_case(probs[:, :15], gt[:15])
    cal.add_case(probs[:, 15:], gt[15:])
    t = cal.table().set_index(["scope", "class"])
    flat_p = torch.from_numpy(probs.reshape(4, -1).T.astype(np.float64))
    tm = multiclass_calibration_error(flat_p, torch.from_numpy(gt.ravel()), num_classes=4, n_bins=15).item()
    assert t.loc[("all", "top-label"), "ece"] == pytest.approx(tm, abs=1e-6)  # torchmetrics sums in float32
    top = probs.max(0).ravel()
    assert t.loc[("all", "top-label"), "ece"] == pytest.approx(direct_ece(top, probs.argmax(0).ravel() == gt.ravel(),
                                                                          15), abs=1e-12)
    onehot = np.eye(4)[gt].transpose(2, 0, 1)
    assert t.loc[("all", "top-label"), "brier"] == pytest.approx(((probs - onehot) ** 2).sum(0).mean(), abs=1e-9)
    for k in (1, 2, 3):
        assert t.loc[("all", str(k)), "ece"] == pytest.approx(direct_ece(probs[k].ravel(), gt.ravel() == k, 15),
                                                              abs=1e-12)
    assert list(cal.table()["class"]) == ["top-label", "1", "2", "3", "macro"]
    # macro: the mean over the foreground classes of the one-vs-rest figures, by hand
    for m, norm in (("ece", "l1"), ("mce", "max")):
        want = np.mean([direct_ece(probs[k].ravel(), gt.ravel() == k, 15, norm) for k in (1, 2, 3)])
        assert t.loc[("all", "macro"), m] == pytest.approx(want, abs=1e-12)


def test_binary_rows_and_roi_scope():
    rng = np.random.default_rng(3)
    p1 = rng.random((20, 20)).astype(np.float32)
    probs = np.stack([1 - p1, p1])
    gt = (rng.random((20, 20)) < p1).astype(np.uint8)
    roi = np.zeros((20, 20), bool)
    roi[5:12, 3:9] = True
    cal = CalibrationSet(10, labels=[1])
    cal.add_case(probs, gt, roi)
    t = cal.table()
    assert list(zip(t["scope"], t["class"])) == [("all", "1"), ("roi", "1")]
    assert t.loc[1, "n_voxels"] == roi.sum()
    assert t.loc[1, "ece"] == pytest.approx(direct_ece(p1[roi], gt[roi] == 1, 10), abs=1e-12)


def test_roi_mask_is_physical_distance():
    gt = np.zeros((30, 30), np.uint8)
    gt[14, 14] = 1
    pred = np.zeros_like(gt)
    roi = roi_mask(gt, pred, (2.0, 1.0), 4.0)
    ii, jj = np.indices(gt.shape)
    np.testing.assert_array_equal(roi, ((ii - 14) * 2.0) ** 2 + (jj - 14) ** 2 <= 16.0)
    assert not roi_mask(np.zeros_like(gt), pred, (1.0, 1.0), 3.0).any()


def test_bad_confidences():
    h = ReliabilityHistogram()
    for bad in (np.array([0.2, 1.5]), np.array([-0.1, 0.5]), np.array([0.2, np.nan])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            h.add(bad, np.array([0, 1]))
    with pytest.raises(ValueError, match="outcomes"):
        h.add(np.array([0.2]), np.array([0, 1]))
    assert h.n == 0 and np.isnan(h.ece())


def test_auroc_equals_sklearn():
    rng = np.random.default_rng(4)
    err = rng.random(100_000) < 0.05
    u_cont = np.abs(rng.normal(0, 1, err.size) + 1.2 * err).astype(np.float32)
    u_quant = (np.round(u_cont * 16) / 16).astype(np.float32)     # exact binary fractions: one per fine bin
    for u, tol in ((u_quant, 1e-12), (u_cont, 1e-4)):
        a = ErrorAuroc()
        for idx in np.array_split(np.arange(u.size), 5):
            a.add(u[idx], err[idx])
        assert a.auroc() == pytest.approx(roc_auc_score(err, u), abs=tol)
        assert a.n_errors == err.sum() and a.n_voxels == err.size
    assert np.isnan(ErrorAuroc().auroc())
    with pytest.raises(ValueError, match=">= 0"):
        ErrorAuroc().add(np.array([-1.0]), np.array([True]))


def test_threshold_counts_by_hand():
    pred = np.array([1, 1, 1, 0, 0, 0, 1, 0], bool)
    gt = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    u = np.array([10, 60, 80, 90, 30, 0, 20, 100], np.float32)   # TP TP FP FN TN TN TP TN
    rows = {r["T"]: r for r in threshold_counts(pred, gt, u, (100, 75, 50, 25))}
    assert (rows[100]["tp"], rows[100]["fp"], rows[100]["fn"], rows[100]["uncertain"]) == (3, 1, 1, 0)
    assert (rows[75]["tp"], rows[75]["fp"], rows[75]["fn"], rows[75]["uncertain"]) == (3, 0, 0, 3)
    assert rows[75]["uncertain_tn"] == 1 and rows[75]["filtered_fp"] == 1.0 and rows[75]["filtered_tp"] == 0.0
    assert (rows[25]["tp"], rows[25]["uncertain"], rows[25]["uncertain_tn"]) == (2, 5, 2)
    assert rows[25]["filtered_tp"] == pytest.approx(1 / 3)


def test_scaled_uncertainty_is_u_over_its_maximum_per_slice():
    """The authors' U / max(U) x 100 per 2D slice (not min-max: the minimum stays where it is)."""
    u = np.array([[0.2, 0.4], [0.6, 0.3]], np.float32)  # one 2D image: one slice
    for scaling in ("slice", "case"):
        np.testing.assert_allclose(scaled_uncertainty(u, scaling), [[100 / 3, 200 / 3], [100, 50]], rtol=1e-6)
    np.testing.assert_allclose(scaled_uncertainty(u, "absolute"), [[20, 40], [60, 30]], rtol=1e-6)
    vol = np.stack([u, np.zeros_like(u), u / 4])  # 3D (z, y, x): each axial slice by its own maximum
    np.testing.assert_allclose(scaled_uncertainty(vol), np.stack([scaled_uncertainty(u), np.zeros_like(u),
                                                                  scaled_uncertainty(u)]), rtol=1e-6)
    np.testing.assert_allclose(scaled_uncertainty(vol, "case"), 100 * vol / 0.6, rtol=1e-6)  # one maximum
    assert not scaled_uncertainty(np.zeros((3, 4)), "slice").any()  # nothing uncertain: all 0, no division
    np.testing.assert_allclose(scaled_uncertainty(np.full(4, 0.3, np.float32), "case"), 100)
    with pytest.raises(ValueError):
        scaled_uncertainty(u, "other")


def test_score_correlations_equal_scipy():
    rng = np.random.default_rng(5)
    cases = [f"c{i}" for i in range(12)]
    dice = rng.random(12)
    scores = pd.DataFrame({"case": cases, "label": 1, "mean_entropy": -dice + rng.normal(0, 0.2, 12),
                           "cv": np.r_[np.nan, rng.random(11)], "n_members": 5, "n_samples": 50,
                           "conformal_volume": rng.integers(0, 500, 12)})  # predict --conformal: not a score
    metrics = pd.DataFrame({"case": cases, "label": 1, "dice": dice})
    c = score_correlations(scores, metrics).set_index("score")
    want = spearmanr(scores["mean_entropy"], dice)
    assert c.loc["mean_entropy", "spearman_rho"] == pytest.approx(want.statistic)
    assert c.loc["mean_entropy", "p_value"] == pytest.approx(want.pvalue)
    assert c.loc["mean_entropy", "spearman_rho"] < 0
    assert c.loc["cv", "n"] == 11 and c.loc["cv", "n_dropped"] == 1
    assert c.loc["cv", "spearman_rho"] == pytest.approx(spearmanr(scores["cv"][1:], dice[1:]).statistic)
    assert set(c.index) == {"mean_entropy", "cv"}


@pytest.mark.parametrize("n_classes", [2, 4])
def test_float32_entropy_matches_float64(n_classes):
    from nnunet_kaz.uncertainty import normalized_entropy

    rng = np.random.default_rng(n_classes)
    logits = rng.normal(0, 3, (n_classes, 20, 30)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    probs[:, 0, 0] = np.eye(n_classes)[0]          # a certain voxel: 0 log 0 = 0
    h = normalized_entropy(probs)  # float32 in, float32 out (the evaluation path on whole volumes)
    assert h.dtype == np.float32 and h[0, 0] == 0 and h.max() <= 1 + 1e-6
    np.testing.assert_allclose(h, normalized_entropy(probs.astype(np.float64)), atol=2e-6)


def test_labels_present():
    from nnunet_kaz.evaluation.cases import labels_present

    seg = np.zeros((5, 6), np.uint8)
    seg[1, 1], seg[2, 2] = 3, 1
    assert labels_present(seg) == {1, 3}
    seg[0, 0] = 200
    assert labels_present(seg) == {1, 3, 200} and labels_present(np.zeros(3, np.uint8)) == set()


@pytest.mark.parametrize("n_classes,n_bins", [(2, 15), (4, 15), (3, 10)])
def test_calibrators_top_label_ece_equals_torchmetrics(n_classes, n_bins):
    """postprocessing.top_label_ece, which judges the calibrators, against torchmetrics' multiclass (top-label)
    calibration error on the same (N, C) probabilities; integer sample weights against repeated rows."""
    from nnunet_kaz.postprocessing import top_label_ece

    rng = np.random.default_rng(n_classes)
    logits = rng.normal(0, 3, (5000, n_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # overconfident: a gap a zero would hide
    # torchmetrics casts the confidences to float32: give both sides float32 values, so that both bin alike,
    # and allow for its float32 sums (abs 1e-5 over ~1e4 rows; in float64 its formula agrees to 1e-16)
    probs = probs.astype(np.float32).astype(np.float64)
    y = np.array([rng.choice(n_classes, p=np.sqrt(q) / np.sqrt(q).sum()) for q in probs])
    tm = multiclass_calibration_error(torch.from_numpy(probs), torch.from_numpy(y), num_classes=n_classes,
                                      n_bins=n_bins).item()
    ours = top_label_ece(probs, y, n_bins=n_bins)
    assert ours > 0.02 and ours == pytest.approx(tm, abs=1e-5)
    w = np.where(y == 0, 1, 4) + rng.integers(0, 2, size=len(y))  # class-dependent, as pooling weights are
    tm_w = multiclass_calibration_error(torch.from_numpy(np.repeat(probs, w, axis=0)),
                                        torch.from_numpy(np.repeat(y, w)), num_classes=n_classes,
                                        n_bins=n_bins).item()
    assert top_label_ece(probs, y, sample_weight=w, n_bins=n_bins) == pytest.approx(tm_w, abs=1e-5)
    assert tm_w != pytest.approx(tm, abs=1e-3)  # the weights matter
