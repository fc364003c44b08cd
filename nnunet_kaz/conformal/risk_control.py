"""Conformal risk control of the false-negative rate (Angelopoulos, Bates, Fisch, Lei, Schuster, "Conformal Risk
Control", ICLR 2024, section 2 and Theorem 1).

For one label and a validation ("calibration") set of n cases, the prediction set of a case is the mask
C_lambda = {x : p(x) >= 1 - lambda}, lambda in [0, 1]: larger lambda, larger mask. The loss of a case is its
false-negative rate

    FNR_i(lambda) = |{x in Y_i : p_i(x) < 1 - lambda}| / |Y_i|        (Y_i = the label's voxels in case i),

and FNR_i = 0 when the label is absent from case i (the paper's convention for its tumour example, section 3.1;
such a case cannot be missed). FNR_i is non-increasing in lambda and bounded by B = 1. The calibrated parameter is

    lambda_hat = inf { lambda : n / (n + 1) * mean_i FNR_i(lambda) + B / (n + 1) <= alpha }     (paper eq. 4)

and Theorem 1 guarantees E[FNR_{n+1}(lambda_hat)] <= alpha for a new case exchangeable with the validation cases.
The guarantee is on average over cases (and over the draw of the validation set), not per case or per voxel.

lambda_hat is found exactly, not on a grid: the mean FNR as a function of the threshold t = 1 - lambda only changes
at the probability values that labelled voxels take, so the largest feasible threshold is one of those values (or
t = 1, the smallest mask). We pool every labelled voxel of every case with weight 1 / (n |Y_i|), sort by
probability and take cumulative sums: mean FNR(t) = total weight of pooled voxels with p < t.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from nnunet_kaz.errors import KazError


def min_cases(alpha: float) -> int:
    """Fewest validation cases for which the bound can be met at all: B / (n + 1) <= alpha, i.e. n >= 1/alpha - 1."""
    return int(np.ceil(1.0 / alpha - 1.0 - 1e-12))


def check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise KazError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def false_negative_rate(prob: np.ndarray, label_mask: np.ndarray, threshold: float) -> float:
    """FNR of the mask {prob >= threshold} against `label_mask`; 0 when the label is absent (paper section 3.1)."""
    n = int(np.count_nonzero(label_mask))
    if n == 0:
        return 0.0
    return float(np.count_nonzero(prob[label_mask] < threshold)) / n


@dataclass
class FNRControl:
    """Fit lambda_hat for one label on validation cases (`fit`), then turn probabilities into the guaranteed mask
    (`transform`), scikit-learn style. `threshold_ = 1 - lambda_hat_` is stored exactly (the probability value the
    search found), so the mask is `p >= threshold_` with no floating-point round trip through lambda.

    `fit` takes, per case, the label's probability map and its boolean ground-truth mask (any shape; they are only
    flattened). Only the labelled voxels' probabilities are kept, so memory is the labels' size, not the volumes'.
    """

    alpha: float = 0.1
    threshold_: float = field(default=np.nan, init=False)
    lambda_hat_: float = field(default=np.nan, init=False)
    n_cases_: int = field(default=0, init=False)
    n_cases_with_label_: int = field(default=0, init=False)
    validation_risk_: float = field(default=np.nan, init=False)

    def fit(self, cases: Iterable[tuple[np.ndarray, np.ndarray]]) -> "FNRControl":
        alpha = check_alpha(self.alpha)
        values, sizes = [], []
        n = 0
        for prob, mask in cases:
            prob, mask = np.asarray(prob), np.asarray(mask, dtype=bool)
            if prob.shape != mask.shape:
                raise KazError(f"probability map of shape {prob.shape} does not match its label's {mask.shape}")
            n += 1
            if mask.any():
                values.append(prob[mask].astype(np.float64).ravel())
                sizes.append(values[-1].size)
        if n < min_cases(alpha):
            raise KazError(f"{n} validation case(s) cannot meet alpha = {alpha}: the bound needs at least "
                           f"{min_cases(alpha)} (n >= 1/alpha - 1)")
        self.n_cases_, self.n_cases_with_label_ = n, len(values)
        t = self._largest_feasible_threshold(values, sizes, n, alpha)
        self.threshold_, self.lambda_hat_ = t, 1.0 - t
        self.validation_risk_ = self._mean_fnr(values, sizes, n, t)
        return self

    @staticmethod
    def _mean_fnr(values: list[np.ndarray], sizes: list[int], n: int, t: float) -> float:
        return float(sum(np.count_nonzero(v < t) / s for v, s in zip(values, sizes)) / n)

    @staticmethod
    def _largest_feasible_threshold(values: list[np.ndarray], sizes: list[int], n: int, alpha: float) -> float:
        """max t in {distinct labelled probabilities} U {1} with n/(n+1) R(t) + 1/(n+1) <= alpha, R(t) the mean
        FNR of {p >= t}; R is non-decreasing in t, so the feasible thresholds form a prefix of the sorted values."""
        if not values:  # the label is absent everywhere: R = 0 for every t, the smallest mask qualifies
            return 1.0
        p = np.concatenate(values)
        w = np.concatenate([np.full(s, 1.0 / (s * n)) for s in sizes])
        order = np.argsort(p, kind="stable")
        p, w = p[order], w[order]
        candidates, first = np.unique(p, return_index=True)
        below = np.concatenate([[0.0], np.cumsum(w)])[first]  # R(v) = weight of voxels with p < v
        if candidates[-1] < 1.0:  # t = 1 (lambda = 0): every labelled voxel is below it
            candidates, below = np.append(candidates, 1.0), np.append(below, w.sum())
        feasible = n / (n + 1) * below + 1.0 / (n + 1) <= alpha + 1e-12
        # feasible is a prefix (R non-decreasing); the first candidate has R = 0, feasible since n >= 1/alpha - 1
        return float(candidates[np.flatnonzero(feasible)[-1]])

    def transform(self, prob: np.ndarray) -> np.ndarray:
        """The guaranteed mask {p >= threshold_} (bool)."""
        if np.isnan(self.threshold_):
            raise KazError("FNRControl is not fitted")
        return np.asarray(prob) >= self.threshold_

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "threshold": self.threshold_, "lambda_hat": self.lambda_hat_,
                "n_cases": self.n_cases_, "n_cases_with_label": self.n_cases_with_label_,
                "validation_risk": self.validation_risk_}

    @classmethod
    def from_dict(cls, d: dict) -> "FNRControl":
        obj = cls(alpha=float(d["alpha"]))
        obj.threshold_, obj.lambda_hat_ = float(d["threshold"]), float(d["lambda_hat"])
        obj.n_cases_, obj.n_cases_with_label_ = int(d["n_cases"]), int(d["n_cases_with_label"])
        obj.validation_risk_ = float(d["validation_risk"])
        return obj
