"""Uncertainty against rater variability: where raters disagree, a useful uncertainty map is high.

Disagreement map (per voxel, from R >= 2 raters' label maps; `rater_disagreement`): the fraction of ordered
pairs of distinct raters whose labels differ, 1 - sum_c n_c (n_c - 1) / (R (R - 1)), n_c the raters voting
label c. 0 where all agree; 1 for two raters who differ (so annotation-vs-truth of the kaz2d phantom is its
0/1 XOR); 2/3 for a 2-1 split of three raters.

- NCC (ValUES, Kahl et al., ICLR 2024, section 4, ambiguity modelling: the normalised cross-correlation
  between the predicted uncertainty map and a "ground-truth uncertainty" map from the rater variability; its
  `compute_ncc` in evaluation/): the Pearson correlation over all voxels of the image,
  sum (u - mean u)(d - mean d) / sqrt(sum (u - mean u)^2 sum (d - mean d)^2), numpy's corrcoef; NaN when
  either map is constant (ValUES returns 0 there). ValUES divides by N with ddof=1 standard deviations, i.e.
  (N - 1) / N times Pearson: a relative 1/N difference, below 1e-4 for any image of 10^4 voxels or more.
  ValUES' reference map is built from the raters' labels too; our pairwise disagreement is, for binary
  labels, 2 n_0 n_1 / (R (R - 1)), monotone in the raters' label variance p (1 - p) like their entropy.
- ROI AUROC: the AUROC of voxel uncertainty as a detector of disagreement voxels (d > 0) inside the region of
  interest of the ECE's `roi` scope (`calibration.roi_mask`: voxels within `margin` of ground-truth or
  prediction foreground), streamed with `uncertainty_validation.ErrorAuroc` (ties count one half).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from nnunet_kaz.evaluation.calibration import roi_mask
from nnunet_kaz.evaluation.uncertainty_validation import ErrorAuroc


def rater_disagreement(annotations: Sequence[np.ndarray]) -> np.ndarray:
    """float32 pairwise disagreement of R >= 2 label maps of one shape (module docstring)."""
    if len(annotations) < 2:
        raise ValueError(f"need at least two raters, got {len(annotations)}")
    first = np.asarray(annotations[0])
    for a in annotations[1:]:
        if np.shape(a) != first.shape:
            raise ValueError(f"rater annotations differ in shape: {first.shape} vs {np.shape(a)}")
    r = len(annotations)
    agree_pairs = np.zeros(first.shape, dtype=np.int32)
    for i in range(r):
        for j in range(i + 1, r):
            agree_pairs += np.asarray(annotations[i]) == np.asarray(annotations[j])
    n_pairs = r * (r - 1) // 2
    return (1.0 - agree_pairs / np.float32(n_pairs)).astype(np.float32)


def ncc(uncertainty: np.ndarray, disagreement: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of the two maps over all voxels (or those of `mask`); NaN if one is constant."""
    u = np.asarray(uncertainty, dtype=np.float64)
    d = np.asarray(disagreement, dtype=np.float64)
    if u.shape != d.shape:
        raise ValueError(f"uncertainty shape {u.shape} differs from the disagreement map's {d.shape}")
    if mask is not None:
        u, d = u[mask], d[mask]
    u, d = u.ravel() - u.mean(), d.ravel() - d.mean()
    den = np.sqrt(np.dot(u, u) * np.dot(d, d))
    return float(np.dot(u, d) / den) if den > 0 else float("nan")


def roi_auroc(uncertainty: np.ndarray, disagreement: np.ndarray, gt: np.ndarray, pred: np.ndarray,
              spacing: Sequence[float], margin: float, accumulator: ErrorAuroc | None = None) -> float:
    """AUROC of `uncertainty` for the voxels with disagreement > 0 inside the ECE's ROI (module docstring).

    With `accumulator` the case's voxels are also added to it (the dataset-level AUROC pools every case)."""
    u = np.asarray(uncertainty)
    d = np.asarray(disagreement)
    if u.shape != d.shape:
        raise ValueError(f"uncertainty shape {u.shape} differs from the disagreement map's {d.shape}")
    roi = roi_mask(gt, pred, spacing, margin)
    case = ErrorAuroc()
    case.add(u[roi], d[roi] > 0)
    if accumulator is not None:
        accumulator.merge(case)
    return case.auroc()
