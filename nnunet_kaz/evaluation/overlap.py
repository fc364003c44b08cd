"""Voxel-overlap metrics between two binary masks.

Definitions, from the confusion counts TP, FP, FN, TN of the prediction P against the ground truth G:
- dice = 2 TP / (2 TP + FP + FN); jaccard = TP / (TP + FP + FN) (paper 000 section 2.4: DSC, Jaccard);
- precision = TP / (TP + FP); recall (sensitivity, SE) = TP / (TP + FN);
  specificity (SP) = TN / (TN + FP) (paper 001's SP and SE);
- rvd = (V_P - V_G) / V_G, the signed relative volume difference (paper 001 eq. 5 with the subtraction the
  printed formula drops, see papers/INDEX.md): negative for under-segmentation. Volumes are voxel counts; the
  voxel volume cancels in the ratio, so rvd is unitless and spacing-free.
- Empty masks: both empty -> dice, jaccard, precision, recall, specificity 1 and rvd 0 (a perfect
  prediction of nothing). Otherwise a 0/0 ratio is undefined and returned as NaN: precision when P is empty,
  recall and rvd when G is empty, specificity when G fills the image. Dice and jaccard are 0 when exactly one
  mask is empty. Callers count NaNs rather than averaging them away.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OVERLAP_METRICS = ("dice", "jaccard", "precision", "recall", "specificity", "rvd")


@dataclass(frozen=True)
class ConfusionCounts:
    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, pred: np.ndarray, gt: np.ndarray) -> "ConfusionCounts":
        """Counts of two same-shape boolean masks (one pass for TP plus two counts)."""
        pred = np.asarray(pred, dtype=bool)
        gt = np.asarray(gt, dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction and ground truth shapes differ: {pred.shape} vs {gt.shape}")
        tp = int(np.count_nonzero(pred & gt))
        n_pred = int(np.count_nonzero(pred))
        n_gt = int(np.count_nonzero(gt))
        return cls(tp, n_pred - tp, n_gt - tp, pred.size - n_pred - n_gt + tp)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def metrics_from_counts(c: ConfusionCounts) -> dict[str, float]:
    """The overlap metrics of confusion counts (definitions and empty-mask convention: module docstring)."""
    v_pred, v_gt = c.tp + c.fp, c.tp + c.fn
    if v_pred == 0 and v_gt == 0:
        return {"dice": 1.0, "jaccard": 1.0, "precision": 1.0, "recall": 1.0, "specificity": 1.0, "rvd": 0.0}
    return {
        "dice": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "jaccard": _ratio(c.tp, c.tp + c.fp + c.fn),
        "precision": _ratio(c.tp, v_pred),
        "recall": _ratio(c.tp, v_gt),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "rvd": _ratio(v_pred - v_gt, v_gt),
    }


def overlap_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """dice, jaccard, precision, recall, specificity, rvd of two boolean masks (see module docstring)."""
    return metrics_from_counts(ConfusionCounts.of(pred, gt))
