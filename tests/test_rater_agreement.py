"""Rater disagreement maps, NCC against numpy's corrcoef, the ROI AUROC against sklearn on the ROI's voxels,
and the disagreement folders the kaz converters write (annotation vs truth)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from nnunet_kaz.evaluation.calibration import roi_mask
from nnunet_kaz.evaluation.rater_agreement import ncc, rater_disagreement, roi_auroc
from nnunet_kaz.evaluation.uncertainty_validation import ErrorAuroc


def test_disagreement_by_hand():
    a = np.array([[0, 1, 2, 1]])
    b = np.array([[0, 1, 1, 3]])
    c = np.array([[0, 2, 1, 2]])
    assert np.allclose(rater_disagreement([a, b]), [[0, 0, 1, 1]])
    # all agree 0; a 2-1 split: 2 of the 3 pairs differ; three different labels: every pair differs
    assert np.allclose(rater_disagreement([a, b, c]), [[0, 2 / 3, 2 / 3, 1]])
    assert rater_disagreement([a, b]).dtype == np.float32
    with pytest.raises(ValueError, match="two raters"):
        rater_disagreement([a])
    with pytest.raises(ValueError, match="shape"):
        rater_disagreement([a, b[:, :3]])


def test_ncc_is_pearson():
    rng = np.random.default_rng(0)
    u = rng.random((5, 9, 8))
    d = 0.3 * u + rng.random(u.shape)
    assert ncc(u, d) == pytest.approx(np.corrcoef(u.ravel(), d.ravel())[0, 1], abs=1e-12)
    m = u > 0.5
    assert ncc(u, d, m) == pytest.approx(np.corrcoef(u[m], d[m])[0, 1], abs=1e-12)
    assert np.isnan(ncc(u, np.zeros_like(u)))
    with pytest.raises(ValueError, match="shape"):
        ncc(u, d[:4])


def test_roi_auroc_equals_sklearn_on_the_roi():
    rng = np.random.default_rng(1)
    shape, sp = (6, 30, 28), (2.5, 0.8, 0.8)
    gt = np.zeros(shape, np.uint8)
    gt[2:4, 10:18, 9:20] = 1
    pred = np.zeros_like(gt)
    pred[2:5, 12:20, 8:18] = 1
    d = (gt != pred).astype(np.float32)
    u = np.clip(0.5 * d + rng.normal(0.3, 0.2, shape), 0, None).round(3)  # ties across classes
    roi = roi_mask(gt, pred, sp, 3.0)
    assert 0 < roi.sum() < roi.size
    pooled = ErrorAuroc()
    got = roi_auroc(u, d, gt, pred, sp, 3.0, accumulator=pooled)
    assert got == pytest.approx(roc_auc_score(d[roi] > 0, u[roi]), abs=1e-3)
    assert pooled.n_voxels == roi.sum() and pooled.auroc() == pytest.approx(got)


def test_convert_kaz_writes_annotation_vs_truth(tmp_path):
    from nnunet_kaz.datasets import convert_kaz, write_kaz2d_bmp_folders

    bmp = write_kaz2d_bmp_folders(tmp_path / "bmp", n_patients=6, seed=5, image_size=(40, 50), slices_per_patient=1)
    out = convert_kaz(bmp / "images", bmp / "masks", 931, "KazRaters", resize=(32, 32), truth=bmp / "truth",
                      raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre", n_folds=2)
    files = sorted((out / "raterDisagreementTr").iterdir())
    assert len(files) == 6
    for f in files:
        lab = np.asarray(Image.open(out / "labelsTr" / f.name))
        truth = np.asarray(Image.open(out / "truthTr" / f.name))
        assert np.array_equal(np.asarray(Image.open(f)), (lab != truth).astype(np.uint8))
    assert any(np.asarray(Image.open(f)).any() for f in files)
